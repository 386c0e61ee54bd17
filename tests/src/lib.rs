//! Shared harness for the kernel tests: device clients, seeded random data, and the one
//! tolerance rule every kernel test applies.
//!
//! Tolerance rule: measured against an f64 reference, a kernel's largest absolute error may be
//! at most `FACTOR` (2) times the largest error of a naive implementation computing in the
//! kernel's own precision. The naive error counts as at least one unit of roundoff at the
//! output's scale (`eps · max|ref|`): on a tensor of a handful of elements the naive code can
//! round exactly by luck, and no implementation of a composite function is exact. For the same
//! reason, tests of small tensors measure the naive error on at least [`NAIVE_SAMPLE`] inputs
//! drawn from the same distribution as the case's (the case's own inputs first). NaN or
//! infinity where the reference is finite always fails.

pub mod naive_model;
pub mod plans;

use cubecl::prelude::*;
use megabyte_ops::{try_client, FloatElement};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The factor of the tolerance rule.
pub const FACTOR: f64 = 2.0;

/// Fewest inputs on which a naive implementation's error is measured.
pub const NAIVE_SAMPLE: usize = 4096;

/// Machine epsilon of an element type: the spacing of values just above 1.
pub fn epsilon<E: FloatElement>() -> f64 {
    match E::NAME {
        "f32" => f32::EPSILON as f64,
        "f16" => half::f16::EPSILON.to_f64(),
        "bf16" => half::bf16::EPSILON.to_f64(),
        other => panic!("no epsilon for {other}"),
    }
}

/// Rounds an f64 to the element type and back: one roundoff in E's precision.
pub fn round<E: FloatElement>(v: f64) -> f64 {
    E::from_f64(v).to_f64()
}

/// What a comparison measured.
#[derive(Clone, Debug)]
pub struct Errors {
    /// Largest |kernel - reference|.
    pub kernel: f64,
    /// Largest |naive - reference|.
    pub naive: f64,
    /// The bound the kernel had to meet.
    pub allowed: f64,
    /// Index of the kernel's worst element.
    pub worst: usize,
}

/// Applies the tolerance rule. `case` is printed with any failure so it can be rerun.
///
/// `kernel` covers the first `kernel.len()` entries of `reference`; `naive` and `reference` may
/// extend further over the naive sample (see [`NAIVE_SAMPLE`]).
pub fn check<E: FloatElement>(
    case: &str,
    what: &str,
    kernel: &[f64],
    naive: &[f64],
    reference: &[f64],
) -> Result<Errors, String> {
    assert_eq!(
        naive.len(),
        reference.len(),
        "{case}: {what}: naive and reference lengths differ"
    );
    let naive_errors: Vec<f64> = naive
        .iter()
        .zip(reference)
        .map(|(&n, &r)| (n - r).abs())
        .collect();
    check_errors::<E>(case, what, kernel, &naive_errors, reference)
}

/// [`check`] given the naive implementation's errors |naive - reference| instead of its output:
/// for a naive error taken over several equally naive implementations (the model tests' two
/// summation orders, `naive_model::forward_errors`).
pub fn check_errors<E: FloatElement>(
    case: &str,
    what: &str,
    kernel: &[f64],
    naive_errors: &[f64],
    reference: &[f64],
) -> Result<Errors, String> {
    assert!(
        kernel.len() <= reference.len(),
        "{case}: {what}: kernel output longer than the reference"
    );
    assert_eq!(
        naive_errors.len(),
        reference.len(),
        "{case}: {what}: naive errors and reference lengths differ"
    );
    let scale = reference[..kernel.len()]
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()));
    let mut errs = Errors {
        kernel: 0.0,
        naive: 0.0,
        allowed: 0.0,
        worst: 0,
    };
    for (i, (&k, &r)) in kernel.iter().zip(reference).enumerate() {
        if r.is_finite() && !k.is_finite() {
            return Err(format!(
                "{case}: {what}[{i}] = {k} where the reference is {r}"
            ));
        }
        let e = (k - r).abs();
        if e > errs.kernel {
            errs.kernel = e;
            errs.worst = i;
        }
    }
    errs.naive = naive_errors.iter().fold(0f64, |m, &e| m.max(e));
    errs.allowed = FACTOR * errs.naive.max(epsilon::<E>() * scale);
    if errs.kernel > errs.allowed {
        let i = errs.worst;
        return Err(format!(
            "{case}: {what}: max error {:.3e} at [{i}] (kernel {}, reference {}) exceeds {FACTOR} × max(naive {} error {:.3e}, eps·scale {:.3e})",
            errs.kernel,
            kernel[i],
            reference[i],
            E::NAME,
            errs.naive,
            epsilon::<E>() * scale,
        ));
    }
    Ok(errs)
}

/// Reads a device tensor back as f64 values, for [`check`].
pub fn read_f64<R: Runtime, E: FloatElement>(t: &megabyte_ops::Tensor<R, E>) -> Vec<f64> {
    t.to_vec()
        .expect("read back a device tensor")
        .into_iter()
        .map(|v| v.to_f64())
        .collect()
}

/// Uniform values in [lo, hi) from a seed. The seed is part of every test case's printed id.
pub fn uniform(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// Each value rounded to E and back: the inputs a kernel in E actually sees, so the reference
/// can be given exactly those.
pub fn round_all<E: FloatElement>(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| round::<E>(x as f64) as f32).collect()
}

/// Uniform token ids in [0, vocab) from a seed.
pub fn uniform_ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

/// True when running under CI (`CI=true`), where a missing device must fail, not skip.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// The client of runtime R's default device. Without a device: under CI a test failure;
/// elsewhere `None` and a message on how to get one, so the caller can skip.
pub fn client<R: Runtime>() -> Option<ComputeClient<R>> {
    match try_client::<R>(&Default::default()) {
        Ok(c) => Some(c),
        Err(e) if in_ci() => panic!("{e}\nCI=true: kernel tests must run; install a Vulkan driver (apt-get install mesa-vulkan-drivers)"),
        Err(e) => {
            eprintln!("SKIPPED: {e}. Install a Vulkan driver to run kernel tests without a GPU: apt-get install mesa-vulkan-drivers");
            None
        }
    }
}

/// The runtime the kernel tests run on: wgpu, or CUDA with the `cuda` feature
/// (`cargo test -p megabyte-tests --features cuda`).
#[cfg(not(feature = "cuda"))]
pub type TestRuntime = cubecl::wgpu::WgpuRuntime;
#[cfg(feature = "cuda")]
pub type TestRuntime = cubecl::cuda::CudaRuntime;

/// Runs `$body` with `client` bound to runtime `$R`'s client, or returns early (skip) outside CI.
#[macro_export]
macro_rules! with_client {
    ($R:ty, |$client:ident| $body:expr) => {{
        if let Some($client) = $crate::client::<$R>() {
            $body
        }
    }};
}

pub use megabyte_ops::{DeviceProfile, Dtype};

/// One kernel test case: a problem and its seed, named by its `Debug` form in every failure.
/// `run` computes the reference, the naive baseline and the kernel(s) in E and applies the
/// tolerance rule ([`check`]), panicking with the case's name. A case of a preset regime names
/// the plan it must launch ([`KernelCase::expect`]); [`run_cases`] records the launches and
/// fails if that plan is not among them.
pub trait KernelCase: std::fmt::Debug {
    /// The family's plan.
    type Plan: PartialEq + std::fmt::Debug;

    /// `case` names the case in failures: the dtype and the case's `Debug` form.
    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str);

    /// The plan this case must launch, if any.
    fn expect(&self) -> Option<&Self::Plan> {
        None
    }

    /// A recorded call of this family as its planner plans it on `profile`; `None` for other
    /// families' calls.
    fn planned(call: &megabyte_ops::record::Planned, profile: &DeviceProfile)
        -> Option<Self::Plan>;
}

/// Runs every case in E on the test device (skipped outside CI when there is none); a case
/// with an expected plan must launch it (planned with the device's own profile, as the
/// launchers plan). With `MEGABYTE_CASE_TIMES` set, prints each case's wall time (run with
/// `--nocapture`), to find what makes a test binary slow.
pub fn run_cases<E: FloatElement, C: KernelCase>(
    cases: impl FnOnce(Dtype, &DeviceProfile) -> Vec<C>,
) {
    with_client!(TestRuntime, |client| {
        let dtype = Dtype::of_name(E::NAME).expect("a float dtype");
        let profile = DeviceProfile::of(&client);
        let cases = cases(dtype, &profile);
        assert!(!cases.is_empty(), "no {} cases", E::NAME);
        let timed = std::env::var_os("MEGABYTE_CASE_TIMES").is_some();
        for case in cases {
            let name = format!("{} {case:?}", E::NAME);
            let start = std::time::Instant::now();
            if let Some(expected) = case.expect() {
                let run = || case.run::<E>(&client, &name);
                let ((), log) = megabyte_ops::record::recording_this_thread(run);
                let launched: Vec<C::Plan> =
                    log.iter().filter_map(|c| C::planned(c, &profile)).collect();
                assert!(
                    launched.contains(expected),
                    "{name}: expected plan {expected:?} on {}, launched {launched:?}",
                    profile.name
                );
            } else {
                case.run::<E>(&client, &name);
            }
            if timed {
                eprintln!("case time {:8.2} s  {name}", start.elapsed().as_secs_f64());
            }
        }
    });
}

/// The element type of a dtype's name in [`kernel_tests!`].
#[macro_export]
macro_rules! element {
    (f32) => {
        f32
    };
    (f16) => {
        half::f16
    };
    (bf16) => {
        half::bf16
    };
}

/// A test per dtype × regime of one kernel family: `mod f32 { fn sweep, fn presets, fn
/// random }` and so on, so a failing test names its family (the test binary), dtype and
/// regime, and the panic names the case and kernel. Each regime is a function
/// `(Dtype, &DeviceProfile) -> Vec<Case>`; `random` draws `$n` cases from a proptest strategy.
///
/// ```ignore
/// kernel_tests!(Case, [f32, f16], [sweep, presets], random(16, any_case()));
/// ```
#[macro_export]
macro_rules! kernel_tests {
    ($case:ty, [$($dt:ident),+ $(,)?], $regimes:tt, random($n:expr, $strategy:expr) $(,)?) => {
        $(
            $crate::kernel_tests!(@dtype $dt, $case, $regimes, $n, $strategy);
        )+
    };
    (@dtype $dt:ident, $case:ty, [$($regime:ident),* $(,)?], $n:expr, $strategy:expr) => {
        mod $dt {
            use super::*;
            $(
                #[test]
                fn $regime() {
                    $crate::run_cases::<$crate::element!($dt), $case>(super::$regime);
                }
            )*
            ::proptest::proptest! {
                #![proptest_config(::proptest::prelude::ProptestConfig {
                    cases: $n,
                    failure_persistence: None,
                    ..::proptest::prelude::ProptestConfig::default()
                })]
                #[test]
                fn random(case in $strategy) {
                    $crate::run_cases::<$crate::element!($dt), $case>(|_, _| vec![case]);
                }
            }
        }
    };
}

/// The plan half of a [`KernelCase`] impl: `type Plan`, `expect` (the case's `expect` field)
/// and `planned` (how a recorded call of the family is planned: `None` for a call the planner
/// refuses, which was never launched).
///
/// ```ignore
/// impl KernelCase for Case {
///     planned_by!(LayerNormPlan, |profile| Planned::LayerNorm(p) => Some(plan(p, profile)));
///     fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) { .. }
/// }
/// ```
#[macro_export]
macro_rules! planned_by {
    ($plan:ty, |$profile:ident| $($pat:pat => $e:expr),+ $(,)?) => {
        type Plan = $plan;

        fn expect(&self) -> Option<&$plan> {
            self.expect.as_ref()
        }

        fn planned(
            call: &::megabyte_ops::record::Planned,
            $profile: &$crate::DeviceProfile,
        ) -> Option<$plan> {
            #[allow(unreachable_patterns)]
            match call {
                $($pat => $e,)+
                _ => None,
            }
        }
    };
}

/// The plan half of a [`KernelCase`] impl for a family with one kernel and no planner.
#[macro_export]
macro_rules! no_plan {
    () => {
        type Plan = ();

        fn planned(_: &::megabyte_ops::record::Planned, _: &$crate::DeviceProfile) -> Option<()> {
            None
        }
    };
}

/// Every built-in preset's config, by name.
pub fn preset_configs() -> impl Iterator<Item = (&'static str, megabyte_reference::Config)> {
    megabyte_reference::PRESET_NAMES.iter().map(|&name| {
        (
            name,
            megabyte_reference::Config::preset(name).expect("a built-in preset"),
        )
    })
}

/// Fails unless `err` is [`megabyte_ops::OpError::Unsupported`] naming `what` and `value`.
#[track_caller]
pub fn assert_unsupported(err: &megabyte_ops::OpError, what: &str, value: usize) {
    assert!(
        matches!(err, megabyte_ops::OpError::Unsupported { what: w, value: v, .. } if *w == what && *v == value),
        "expected unsupported {what} = {value}, got: {err}"
    );
}

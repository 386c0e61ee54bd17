//! GELU / ReLU kernel against the reference; per dtype a sweep of awkward sizes, every
//! preset's hidden layers, and proptest.

use cubecl::prelude::ComputeClient;
use megabyte_ops::activation::{activation, gelu_naive};
use megabyte_ops::{ActivationKind, FloatElement, Tensor};
use megabyte_reference::activation::{gelu_scalar, relu_scalar};
use megabyte_tests::plans::{activation as activation_of, stacks};
use megabyte_tests::{
    check, kernel_tests, no_plan, preset_configs, read_f64, round, uniform, with_client,
    DeviceProfile, Dtype, KernelCase, TestRuntime, NAIVE_SAMPLE,
};
use proptest::prelude::*;

/// Input ranges: the whole useful range, and near zero, where outputs are small and an
/// inaccurate erf shows (the max-abs-error rule on the wide range is dominated by |x| ~ 6).
const RANGES: &[(f32, f32)] = &[(-6.0, 6.0), (-0.5, 0.5), (-3.0, -0.5)];

#[derive(Clone, Debug)]
struct Case {
    act: ActivationKind,
    n: usize,
    seed: u64,
}

kernel_tests!(Case, [f32, f16], [sweep, presets], random(8, any_case()));

impl KernelCase for Case {
    no_plan!();

    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        for &(lo, hi) in RANGES {
            let case = format!("{case}, inputs in [{lo}, {hi})");
            run_range::<E>(client, &case, self.act, self.n, self.seed, lo, hi);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_range<E: FloatElement>(
    client: &ComputeClient<TestRuntime>,
    case: &str,
    act: ActivationKind,
    n: usize,
    seed: u64,
    lo: f32,
    hi: f32,
) {
    // The case's n inputs, then more from the same distribution for the naive error.
    let sample = uniform(seed, n.max(NAIVE_SAMPLE), lo, hi);
    let xs: Vec<f64> = sample.iter().map(|&v| round::<E>(v as f64)).collect();
    let input = Tensor::<TestRuntime, E>::from_f32(client, &sample[..n], &[n]).unwrap();
    // Poison the output: any element the kernel skips stays NaN and fails the check.
    let output = Tensor::<TestRuntime, E>::full(client, &[n], f64::NAN).unwrap();
    megabyte_ops::activation::activation_into(&input, &output, act).unwrap();
    let got = read_f64(&output);
    // The reference sees exactly the values the kernel saw (rounded to E).
    let (reference, naive): (Vec<f64>, Vec<f64>) = match act {
        // The naive GELU is the straightforward kernel on the same device in the same precision.
        ActivationKind::Gelu => {
            let all = Tensor::<TestRuntime, E>::from_f32(client, &sample, &[sample.len()]).unwrap();
            let naive = read_f64(&gelu_naive(&all).unwrap());
            xs.iter().map(|&x| gelu_scalar(x)).zip(naive).unzip()
        }
        // max(x, 0) is exact in any precision.
        ActivationKind::Relu => xs
            .iter()
            .map(|&x| (relu_scalar(x), round::<E>(relu_scalar(x))))
            .unzip(),
    };
    check::<E>(case, "output", &got, &naive, &reference).unwrap_or_else(|e| panic!("{e}"));
}

/// Lengths that are 1, prime, one off a power of two, and larger than one cube.
const SWEEP: &[usize] = &[1, 2, 3, 4, 7, 33, 255, 1000, 1023, 4097, 65_537];

const ACTS: [ActivationKind; 2] = [ActivationKind::Gelu, ActivationKind::Relu];

fn sweep(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
    (ACTS.into_iter().enumerate())
        .flat_map(|(j, act)| {
            (SWEEP.iter().enumerate()).map(move |(i, &n)| Case {
                act,
                n,
                seed: 1000 + 100 * j as u64 + i as u64,
            })
        })
        .collect()
}

/// Each preset's hidden layers (both stacks' FFN widths, over three rows), with its
/// activation, at most 4M values.
fn presets(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, (_, cfg)) in preset_configs().enumerate() {
        let act = activation_of(&cfg);
        for (j, stack) in stacks(&cfg).into_iter().enumerate() {
            let n = (3 * stack.hidden).min(1 << 22);
            cases.push(Case {
                act,
                n,
                seed: 3000 + 2 * i as u64 + j as u64,
            });
        }
    }
    cases
}

fn any_case() -> impl Strategy<Value = Case> {
    (1usize..5000, any::<bool>(), any::<u64>()).prop_map(|(n, gelu, seed)| Case {
        act: ACTS[gelu as usize],
        n,
        seed,
    })
}

#[test]
fn mismatched_output_shape_is_an_error() {
    with_client!(TestRuntime, |client| {
        let input =
            Tensor::<TestRuntime, f32>::from_f32(&client, &uniform(1, 12, -1.0, 1.0), &[3, 4])
                .unwrap();
        let output = Tensor::<TestRuntime, f32>::empty(&client, &[4, 3]).unwrap();
        let err = megabyte_ops::activation::activation_into(&input, &output, ActivationKind::Gelu)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "activation: `output` has shape [4, 3], expected [3, 4]"
        );
        let empty = Tensor::<TestRuntime, f32>::empty(&client, &[0, 4]).unwrap();
        let err = activation(&empty, ActivationKind::Relu).unwrap_err();
        assert_eq!(
            err.to_string(),
            "activation: `input` is empty (shape [0, 4])"
        );
        let err = Tensor::<TestRuntime, f32>::from_f32(&client, &[1.0; 5], &[2, 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor of shape [2, 3] needs 6 elements, got 5"
        );
    });
}

//! GELU / ReLU kernel against the reference, f32 and f16, proptest and a sweep of awkward sizes.

use megabyte_ops::activation::{activation, gelu_naive};
use megabyte_ops::{ActivationKind, FloatElement, Tensor};
use megabyte_reference::activation::{gelu_scalar, relu_scalar};
use megabyte_tests::{check, read_f64, round, uniform, with_client, TestRuntime, NAIVE_SAMPLE};
use proptest::prelude::*;

/// Input ranges: the whole useful range, and near zero, where outputs are small and an
/// inaccurate erf shows (the max-abs-error rule on the wide range is dominated by |x| ~ 6).
const RANGES: &[(f32, f32)] = &[(-6.0, 6.0), (-0.5, 0.5), (-3.0, -0.5)];

fn run_case<E: FloatElement>(
    client: &cubecl::prelude::ComputeClient<TestRuntime>,
    act: ActivationKind,
    n: usize,
    seed: u64,
) {
    for &(lo, hi) in RANGES {
        run_range::<E>(client, act, n, seed, lo, hi);
    }
}

fn run_range<E: FloatElement>(
    client: &cubecl::prelude::ComputeClient<TestRuntime>,
    act: ActivationKind,
    n: usize,
    seed: u64,
    lo: f32,
    hi: f32,
) {
    let case = format!(
        "activation({act:?}, {}, n={n}, seed={seed}, inputs in [{lo}, {hi}))",
        E::NAME
    );
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
    check::<E>(&case, "output", &got, &naive, &reference).unwrap_or_else(|e| panic!("{e}"));
}

/// Lengths that are 1, prime, one off a power of two, and larger than one cube.
const SWEEP: &[usize] = &[1, 2, 3, 4, 7, 33, 255, 1000, 1023, 4097, 65_537];

#[test]
fn sweep_f32() {
    with_client!(
        TestRuntime,
        |client| for act in [ActivationKind::Gelu, ActivationKind::Relu] {
            for (i, &n) in SWEEP.iter().enumerate() {
                run_case::<f32>(&client, act, n, 1000 + i as u64);
            }
        }
    );
}

#[test]
fn sweep_f16() {
    with_client!(
        TestRuntime,
        |client| for act in [ActivationKind::Gelu, ActivationKind::Relu] {
            for (i, &n) in SWEEP.iter().enumerate() {
                run_case::<half::f16>(&client, act, n, 2000 + i as u64);
            }
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_lengths(n in 1usize..5000, seed: u64, gelu: bool, f16: bool) {
        let act = if gelu { ActivationKind::Gelu } else { ActivationKind::Relu };
        with_client!(TestRuntime, |client| if f16 {
            run_case::<half::f16>(&client, act, n, seed)
        } else {
            run_case::<f32>(&client, act, n, seed)
        });
    }
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

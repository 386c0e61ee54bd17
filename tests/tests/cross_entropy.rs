//! Fused tied-head logits + cross-entropy against an f64 reference, with a naive f32 host
//! implementation (sequential f32 dot products, f32 max and sum of exponentials) as the
//! tolerance baseline. Per dtype: a sweep (V = 256 and 257, odd widths, with and without
//! stored logits), every plan a preset's width and vocabulary get on this device, proptest.

use cubecl::prelude::ComputeClient;
use megabyte_ops::cross_entropy::{bits_per_byte, plan, tied_cross_entropy, CrossEntropyPlan};
use megabyte_ops::record::Planned;
use megabyte_ops::{FloatElement, OpError, Tensor};
use megabyte_tests::plans::{cross_entropy_calls, representatives};
use megabyte_tests::{
    check, kernel_tests, planned_by, read_f64, round, round_all, uniform, uniform_ids, with_client,
    DeviceProfile, Dtype, KernelCase, TestRuntime, NAIVE_SAMPLE,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Case {
    rows: usize,
    d: usize,
    vocab: usize,
    write_logits: bool,
    seed: u64,
    /// The plan this case must launch (the preset regime).
    expect: Option<CrossEntropyPlan>,
}

kernel_tests!(Case, [f32, f16], [sweep, presets], random(4, any_case()));

impl KernelCase for Case {
    planned_by!(CrossEntropyPlan, |profile| Planned::CrossEntropy(p) => Some(plan(p, profile)));

    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        let (rows, d, vocab, write_logits, seed) =
            (self.rows, self.d, self.vocab, self.write_logits, self.seed);
        let r = round_all::<E>;
        // The naive error is measured on at least NAIVE_SAMPLE losses (more rows, same law).
        let sample = rows.max(NAIVE_SAMPLE);
        let x = r(uniform(seed, sample * d, -1.0, 1.0));
        let table = r(uniform(seed ^ 1, vocab * d, -2.0, 2.0));
        let targets = uniform_ids(seed ^ 2, sample, vocab);

        let loss = Tensor::<TestRuntime, f32>::full(client, &[rows], f64::NAN).unwrap();
        let lse = Tensor::<TestRuntime, f32>::full(client, &[rows], f64::NAN).unwrap();
        let logits = Tensor::<TestRuntime, E>::full(client, &[rows, vocab], f64::NAN).unwrap();
        tied_cross_entropy(
            &Tensor::<TestRuntime, E>::from_f32(client, &x[..rows * d], &[rows, d]).unwrap(),
            &Tensor::<TestRuntime, E>::from_f32(client, &table, &[vocab, d]).unwrap(),
            &Tensor::from_ids(client, &targets[..rows], &[rows]).unwrap(),
            &loss,
            &lse,
            write_logits.then_some(&logits),
        )
        .unwrap();

        let (mut ref_z, mut ref_loss, mut ref_lse) = (vec![], vec![], vec![]);
        let (mut nv_z, mut nv_loss, mut nv_lse) = (vec![], vec![], vec![]);
        for row in 0..sample {
            let xr = &x[row * d..][..d];
            let z64: Vec<f64> = (0..vocab)
                .map(|v| {
                    xr.iter()
                        .zip(&table[v * d..][..d])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum()
                })
                .collect();
            let z32: Vec<f32> = (0..vocab)
                .map(|v| {
                    xr.iter()
                        .zip(&table[v * d..][..d])
                        .fold(0f32, |s, (&a, &b)| s + a * b)
                })
                .collect();
            let m64 = z64.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let l64 = m64 + z64.iter().map(|z| (z - m64).exp()).sum::<f64>().ln();
            let m32 = z32.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let l32 = m32 + z32.iter().map(|z| (z - m32).exp()).sum::<f32>().ln();
            let t = targets[row] as usize;
            ref_loss.push(l64 - z64[t]);
            ref_lse.push(l64);
            nv_loss.push((l32 - z32[t]) as f64);
            nv_lse.push(l32 as f64);
            ref_z.extend(z64);
            nv_z.extend(z32.iter().map(|&z| round::<E>(z as f64)));
        }
        // Losses and lse are f32 outputs computed from E inputs: the f32 rule applies.
        check::<f32>(case, "loss", &read_f64(&loss), &nv_loss, &ref_loss)
            .unwrap_or_else(|e| panic!("{e}"));
        check::<f32>(case, "lse", &read_f64(&lse), &nv_lse, &ref_lse)
            .unwrap_or_else(|e| panic!("{e}"));
        if write_logits {
            check::<E>(case, "logits", &read_f64(&logits), &nv_z, &ref_z)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[rustfmt::skip]
const SWEEP: &[(usize, usize, usize)] = &[
    (1, 1, 256), (3, 7, 257), (75, 32, 256), (2, 33, 257), (5, 128, 256),
];

fn sweep(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
    (SWEEP.iter().enumerate())
        .flat_map(|(i, &(rows, d, vocab))| {
            [false, true].map(|write_logits| Case {
                rows,
                d,
                vocab,
                write_logits,
                seed: 1100 + 2 * i as u64 + write_logits as u64,
                expect: None,
            })
        })
        .collect()
}

/// Every plan the presets' heads get here, over a cube's rows and one more.
fn presets(dtype: Dtype, profile: &DeviceProfile) -> Vec<Case> {
    let plans = representatives(
        cross_entropy_calls(dtype),
        profile,
        |p, profile| Ok(plan(p, profile)),
        |p| p.width * p.vocab,
    );
    (plans.into_iter().enumerate())
        .map(|(i, (_, p, plan))| Case {
            rows: plan.cfg.rows + 1,
            d: p.width,
            vocab: p.vocab,
            write_logits: p.write_logits,
            seed: 2100 + i as u64,
            expect: Some(plan),
        })
        .collect()
}

fn any_case() -> impl Strategy<Value = Case> {
    (
        1usize..200,
        1usize..70,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(rows, d, pad_id, write_logits, seed)| Case {
            rows,
            d,
            vocab: if pad_id { 257 } else { 256 },
            write_logits,
            seed,
            expect: None,
        })
}

/// A uniform predictor (all logits equal) costs exactly 8 bits per byte at V = 256.
#[test]
fn uniform_predictor_is_eight_bits_per_byte() {
    with_client!(TestRuntime, |client| {
        let (rows, d) = (10, 8);
        let loss = Tensor::<TestRuntime, f32>::full(&client, &[rows], f64::NAN).unwrap();
        let lse = Tensor::<TestRuntime, f32>::full(&client, &[rows], f64::NAN).unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|i| i * 25).collect();
        tied_cross_entropy(
            &Tensor::<TestRuntime, f32>::from_f32(
                &client,
                &uniform(5, rows * d, -1.0, 1.0),
                &[rows, d],
            )
            .unwrap(),
            &Tensor::<TestRuntime, f32>::full(&client, &[256, d], 0.0).unwrap(),
            &Tensor::from_ids(&client, &targets, &[rows]).unwrap(),
            &loss,
            &lse,
            None,
        )
        .unwrap();
        let bpb = bits_per_byte(&loss).unwrap();
        assert!((bpb - 8.0).abs() < 1e-6, "{bpb}");
    });
}

#[test]
fn bad_input_is_an_error_or_nan() {
    with_client!(TestRuntime, |client| {
        let f = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.5).unwrap();
        let t = Tensor::from_ids(&client, &[1, 2, 999], &[3]).unwrap();
        let err = tied_cross_entropy(&f(&[3, 8]), &f(&[256, 7]), &t, &f(&[3]), &f(&[3]), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cross_entropy: `table` has shape [256, 7], expected [256, 8]"
        );
        let err = tied_cross_entropy(&f(&[3, 8]), &f(&[256, 8]), &t, &f(&[2]), &f(&[3]), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cross_entropy: `loss` has shape [2], expected [3]"
        );
        let e = Tensor::from_ids(&client, &[], &[0]).unwrap();
        let err = tied_cross_entropy(&f(&[0, 8]), &f(&[256, 8]), &e, &f(&[0]), &f(&[0]), None)
            .unwrap_err();
        assert!(matches!(err, OpError::Empty { .. }), "{err}");
        // A target outside the vocabulary: NaN loss, never a plausible number.
        let loss = f(&[3]);
        tied_cross_entropy(&f(&[3, 8]), &f(&[256, 8]), &t, &loss, &f(&[3]), None).unwrap();
        let got = loss.to_vec().unwrap();
        assert!(got[2].is_nan() && got[0].is_finite(), "{got:?}");
    });
}

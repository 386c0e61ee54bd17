//! LayerNorm kernel against the reference (`layer_norm_f64`, f64 outputs), with a naive host
//! implementation in the kernel's precision as the tolerance baseline. Per dtype: a sweep of
//! row widths 1..8192 (widths off the vector width, one row and many), every plan a preset's
//! widths get on this device, and proptest.

use cubecl::prelude::ComputeClient;
use megabyte_ops::layer_norm::{add_layer_norm, layer_norm, plan, LayerNormPlan, EPS};
use megabyte_ops::record::Planned;
use megabyte_ops::{FloatElement, OpError, Tensor};
use megabyte_reference::layer_norm::layer_norm_f64;
use megabyte_tests::plans::{layer_norm_calls, representatives};
use megabyte_tests::{
    check, kernel_tests, planned_by, read_f64, round, round_all, uniform, with_client,
    DeviceProfile, Dtype, KernelCase, TestRuntime, NAIVE_SAMPLE,
};
use proptest::prelude::*;

/// The straightforward f32 implementation: sequential f32 sums, output rounded to E.
fn naive<E: FloatElement>(x: &[f32], w: &[f32], b: &[f32]) -> (Vec<f64>, f64, f64) {
    let c = x.len() as f32;
    let mean = x.iter().sum::<f32>() / c;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / c;
    let rstd = 1.0 / (var + EPS).sqrt();
    (
        x.iter()
            .zip(w)
            .zip(b)
            .map(|((&v, &w), &b)| round::<E>(((v - mean) * rstd * w + b) as f64))
            .collect(),
        mean as f64,
        rstd as f64,
    )
}

#[derive(Clone, Debug)]
struct Case {
    rows: usize,
    width: usize,
    residual: bool,
    seed: u64,
    /// The plan this case must launch (the preset regime).
    expect: Option<LayerNormPlan>,
}

kernel_tests!(Case, [f32, f16], [sweep, presets], random(8, any_case()));

impl KernelCase for Case {
    planned_by!(LayerNormPlan, |profile| Planned::LayerNorm(p) => Some(plan(p, profile)));

    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        let (rows, width, residual, seed) = (self.rows, self.width, self.residual, self.seed);
        let r = round_all::<E>;
        // An offset mean (3.0) makes the one-pass variance formula visibly wrong. The kernel gets
        // `rows` rows; the naive error is measured on at least NAIVE_SAMPLE values (more rows from
        // the same distribution), see the tolerance rule.
        let sample_rows = rows.max(NAIVE_SAMPLE.div_ceil(width));
        let x_in = r(uniform(seed, sample_rows * width, 2.0, 4.0));
        // With the residual add, the normalised row is the sum as stored in E.
        let res = r(uniform(seed ^ 3, sample_rows * width, -1.0, 1.0));
        let x: Vec<f32> = if residual {
            r(x_in.iter().zip(&res).map(|(a, b)| a + b).collect())
        } else {
            x_in.clone()
        };
        let w = r(uniform(seed ^ 1, width, 0.5, 1.5));
        let b = r(uniform(seed ^ 2, width, -0.5, 0.5));
        let input =
            Tensor::<TestRuntime, E>::from_f32(client, &x_in[..rows * width], &[rows, width])
                .unwrap();
        let (wt, bt) = (
            Tensor::<TestRuntime, E>::from_f32(client, &w, &[width]).unwrap(),
            Tensor::<TestRuntime, E>::from_f32(client, &b, &[width]).unwrap(),
        );
        let out = Tensor::<TestRuntime, E>::full(client, &[rows, width], f64::NAN).unwrap();
        let (mean, rstd) = (
            Tensor::<TestRuntime, f32>::full(client, &[rows], f64::NAN).unwrap(),
            Tensor::<TestRuntime, f32>::full(client, &[rows], f64::NAN).unwrap(),
        );
        let sum = Tensor::<TestRuntime, E>::full(client, &[rows, width], f64::NAN).unwrap();
        if residual {
            let res_t =
                Tensor::<TestRuntime, E>::from_f32(client, &res[..rows * width], &[rows, width])
                    .unwrap();
            add_layer_norm(&input, &res_t, &wt, &bt, &sum, &out, &mean, &rstd).unwrap();
            // One f32 add of two E values rounded to E: the kernel must store exactly that.
            let got = read_f64(&sum);
            for (i, (&g, &e)) in got.iter().zip(&x).enumerate() {
                assert_eq!(g, e as f64, "{case}: sum[{i}]");
            }
        } else {
            layer_norm(&input, &wt, &bt, &out, &mean, &rstd).unwrap();
        }

        let (ro, rm, rr) = layer_norm_f64(&x, &w, &b, sample_rows, width);
        let (mut no, mut nm, mut nr) = (vec![], vec![], vec![]);
        for row in x.chunks(width) {
            let (o, m, s) = naive::<E>(row, &w, &b);
            no.extend(o);
            nm.push(m);
            nr.push(s);
        }
        check::<E>(case, "out", &read_f64(&out), &no, &ro).unwrap_or_else(|e| panic!("{e}"));
        check::<f32>(case, "mean", &read_f64(&mean), &nm, &rm).unwrap_or_else(|e| panic!("{e}"));
        check::<f32>(case, "rstd", &read_f64(&rstd), &nr, &rr).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Widths 8..8192, odd ones and ones off the vector width; row counts 1, 3, 75, 1000.
#[rustfmt::skip]
const SWEEP: &[(usize, usize)] = &[
    (1, 8), (3, 7), (75, 33), (1, 8192), (2, 8191), (1000, 64), (5, 1000), (3, 1),
    (7, 4097),
];

fn sweep(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, &(rows, width)) in SWEEP.iter().enumerate() {
        for residual in [false, true] {
            let seed = 700 + 2 * i as u64 + residual as u64;
            cases.push(Case {
                rows,
                width,
                residual,
                seed,
                expect: None,
            });
        }
    }
    cases
}

/// Every plan the presets' LayerNorms get here, each at its width with a full cube of rows
/// and one row more (the plan does not depend on the row count), at most 4M values.
fn presets(dtype: Dtype, profile: &DeviceProfile) -> Vec<Case> {
    let plans = representatives(
        layer_norm_calls(dtype),
        profile,
        |p, profile| Ok(plan(p, profile)),
        |p| p.rows * p.width,
    );
    (plans.into_iter().enumerate())
        .map(|(i, (_, p, plan))| Case {
            rows: (plan.cfg.rows + 1).min((1 << 22) / p.width).max(1),
            width: p.width,
            residual: p.residual,
            seed: 1700 + i as u64,
            expect: Some(plan),
        })
        .collect()
}

fn any_case() -> impl Strategy<Value = Case> {
    (1usize..300, 1usize..3000, any::<bool>(), any::<u64>()).prop_map(
        |(rows, width, residual, seed)| Case {
            rows,
            width,
            residual,
            seed,
            expect: None,
        },
    )
}

#[test]
fn bad_shapes_are_errors() {
    with_client!(TestRuntime, |client| {
        let t = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 1.0).unwrap();
        let s = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.0).unwrap();
        // (input, weight, mean) shapes, the rest matching input.
        let run = |x: &[usize], w: &[usize], m: &[usize]| {
            let (b, out, rstd) = (t(&[x[1]]), t(x), s(&[x[0]]));
            layer_norm(&t(x), &t(w), &b, &out, &s(m), &rstd).unwrap_err()
        };
        let err = run(&[4, 8], &[7], &[4]);
        assert_eq!(
            err.to_string(),
            "layer_norm: `weight` has shape [7], expected [8]"
        );
        let err = run(&[4, 8], &[8], &[3]);
        assert_eq!(
            err.to_string(),
            "layer_norm: `mean` has shape [3], expected [4]"
        );
        let err = run(&[0, 8], &[8], &[0]);
        assert!(matches!(err, OpError::Empty { .. }), "{err}");
    });
}

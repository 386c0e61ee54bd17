//! The fused global→local input (a GEMM with a gather epilogue) against the reference
//! `local_input` (f64), with a naive f32 pipeline as the tolerance baseline: a sequential f32
//! dot product, then the gathered embedding and the position embedding added in f32. Per
//! dtype: a sweep of awkward sizes with both block kernels, every plan a preset's widths get
//! on this device, proptest.

use cubecl::prelude::ComputeClient;
use megabyte_kernels::gemm::GemmConfig;
use megabyte_ops::gemm::{plan_tiled, GemmKernel};
use megabyte_ops::local_input::{local_input, local_input_with};
use megabyte_ops::record::Planned;
use megabyte_ops::{FloatElement, Tensor};
use megabyte_reference::local_input::local_input as reference;
use megabyte_tests::plans::{local_input_calls, representatives, LocalInputCall};
use megabyte_tests::{
    check, kernel_tests, planned_by, read_f64, round, round_all, uniform, uniform_ids, with_client,
    DeviceProfile, Dtype, KernelCase, TestRuntime, NAIVE_SAMPLE,
};
use proptest::prelude::*;

const VOCAB: usize = 257;

#[derive(Clone, Debug)]
struct Case {
    kind: GemmKernel,
    b: usize,
    k: usize,
    p: usize,
    dg: usize,
    dl: usize,
    positions: bool,
    seed: u64,
    /// The plan this case must launch (the preset regime).
    expect: Option<GemmConfig>,
}

kernel_tests!(Case, [f32, f16], [sweep, presets], random(5, any_case()));

impl KernelCase for Case {
    planned_by!(GemmConfig, |profile| Planned::LocalInput(call) => {
        plan_tiled(GemmKernel::Auto, call, profile).ok()
    });

    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        let (kind, b, k, p) = (self.kind, self.b, self.k, self.p);
        let (dg, dl, positions, seed) = (self.dg, self.dl, self.positions, self.seed);
        let r = round_all::<E>;
        // The kernel sees B sequences; the naive error is measured on at least NAIVE_SAMPLE outputs
        // (more sequences from the same distribution).
        let t = k * p;
        let sb = b.max(NAIVE_SAMPLE.div_ceil(t * dl));
        let g = r(uniform(seed, sb * t * dg, -1.0, 1.0));
        let w = r(uniform(seed ^ 1, dg * dl, -1.0, 1.0));
        let e_l = r(uniform(seed ^ 2, VOCAB * dl, -1.0, 1.0));
        let lpad = r(uniform(seed ^ 3, dl, -1.0, 1.0));
        let lpos = r(uniform(seed ^ 4, p * dl, -1.0, 1.0));
        let ids = uniform_ids(seed ^ 5, sb * t, VOCAB);

        let out = Tensor::<TestRuntime, E>::full(client, &[b, t, dl], f64::NAN).unwrap();
        let lpos_t = Tensor::<TestRuntime, E>::from_f32(client, &lpos, &[p, dl]).unwrap();
        local_input_with(
            kind,
            &Tensor::<TestRuntime, E>::from_f32(client, &g[..b * t * dg], &[b, k, p * dg]).unwrap(),
            &Tensor::from_ids(client, &ids[..b * t], &[b, t]).unwrap(),
            &Tensor::<TestRuntime, E>::from_f32(client, &w, &[dg, dl]).unwrap(),
            &Tensor::<TestRuntime, E>::from_f32(client, &e_l, &[VOCAB, dl]).unwrap(),
            &Tensor::<TestRuntime, E>::from_f32(client, &lpad, &[dl]).unwrap(),
            positions.then_some(&lpos_t),
            &out,
        )
        .unwrap();

        // The reference accumulates in f64 and rounds to f32 once: half an f32 ulp, below the
        // naive error (K-term f32 sums) that the tolerance is built on.
        let mut expected = vec![0f32; sb * t * dl];
        reference(
            &mut expected,
            &g,
            &ids,
            &w,
            &e_l,
            &lpad,
            positions.then_some(&lpos[..]),
            sb,
            k,
            p,
            dg,
            dl,
        );
        let reference: Vec<f64> = expected.iter().map(|&v| v as f64).collect();
        let mut naive = Vec::with_capacity(sb * t * dl);
        for row in 0..sb * t {
            let pi = row % p;
            let prev = if pi == 0 {
                &lpad[..]
            } else {
                &e_l[ids[row - 1] as usize * dl..][..dl]
            };
            for o in 0..dl {
                let dot = (0..dg).fold(0f32, |s, i| s + g[row * dg + i] * w[i * dl + o]);
                let pos = if positions { lpos[pi * dl + o] } else { 0.0 };
                naive.push(round::<E>((dot + prev[o] + pos) as f64));
            }
        }
        check::<E>(case, "out", &read_f64(&out), &naive, &reference)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// One patch, P = 1, odd widths, widths not a multiple of the vector or tile.
#[rustfmt::skip]
const SWEEP: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 1), (1, 1, 4, 3, 5), (3, 5, 3, 7, 33), (2, 16, 8, 32, 64),
    (1, 7, 12, 33, 20), (2, 3, 4, 64, 128),
];

fn sweep(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, &(b, k, p, dg, dl)) in SWEEP.iter().enumerate() {
        for (j, kind) in [GemmKernel::Tiled, GemmKernel::Registers]
            .into_iter()
            .enumerate()
        {
            let (positions, seed) = ((i + j) % 2 == 0, 1300 + 2 * i as u64 + j as u64);
            cases.push(Case {
                kind,
                b,
                k,
                p,
                dg,
                dl,
                positions,
                seed,
                expect: None,
            });
        }
    }
    cases
}

/// Every plan the presets' local inputs get here, each through the cheapest call that reaches
/// it.
fn presets(dtype: Dtype, profile: &DeviceProfile) -> Vec<Case> {
    let plans = representatives(
        local_input_calls(dtype),
        profile,
        |call, profile| plan_tiled(GemmKernel::Auto, &call.gemm, profile),
        |call| call.gemm.problem.m * call.gemm.problem.n * call.gemm.problem.k,
    );
    (plans.into_iter().enumerate())
        .map(|(i, (_, LocalInputCall { gemm, patch }, plan))| Case {
            kind: GemmKernel::Auto,
            b: 1,
            k: gemm.problem.m / patch,
            p: patch,
            dg: gemm.problem.k,
            dl: gemm.problem.n,
            positions: i % 2 == 0,
            seed: 2300 + i as u64,
            expect: Some(plan),
        })
        .collect()
}

fn any_case() -> impl Strategy<Value = Case> {
    let dims = (1usize..4, 1usize..8, 1usize..9, 1usize..48, 1usize..80);
    (dims, any::<bool>(), any::<bool>(), any::<u64>()).prop_map(
        |((b, k, p, dg, dl), positions, tiled, seed)| Case {
            kind: if tiled {
                GemmKernel::Tiled
            } else {
                GemmKernel::Auto
            },
            b,
            k,
            p,
            dg,
            dl,
            positions,
            seed,
            expect: None,
        },
    )
}

#[test]
fn bad_input_is_an_error_or_nan() {
    with_client!(TestRuntime, |client| {
        let f = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.5).unwrap();
        let ids = Tensor::from_ids(&client, &[1, 2, 300, 4, 5, 6], &[1, 6]).unwrap();
        // One tensor of the right shapes changed at a time: g (1, 3, 8), W_GL (4, 8),
        // E_L (V, 8), lpad (8), lpos (2, 8) or none, out (1, 6, 8).
        let run = |kind, g: &[usize], e_l: &[usize], lpos: Option<&[usize]>, out| {
            let lpos = lpos.map(f);
            let (w, lpad) = (f(&[4, 8]), f(&[8]));
            local_input_with(kind, &f(g), &ids, &w, &f(e_l), &lpad, lpos.as_ref(), out)
        };
        let (auto, out) = (GemmKernel::Auto, f(&[1, 6, 8]));
        for (g, e_l, lpos, want) in [
            (
                &[1, 3, 8][..],
                &[VOCAB, 8][..],
                Some(&[3, 8][..]),
                "`lpos` has shape [3, 8], expected [2, 8]",
            ),
            (
                &[1, 3, 8],
                &[VOCAB, 7],
                None,
                "`e_l` has shape [257, 7], expected [256, 8]",
            ),
            (
                &[1, 2, 8],
                &[VOCAB, 8],
                None,
                "`g` has shape [1, 2, 8], expected [1, 3, 8]",
            ),
        ] {
            let err = run(auto, g, e_l, lpos, &out).unwrap_err();
            assert_eq!(err.to_string(), format!("local_input: {want}"));
        }
        // The gathering GEMM has no tensor-core form.
        let err = run(
            GemmKernel::CmmaEmulated,
            &[1, 3, 8],
            &[VOCAB, 8],
            None,
            &out,
        )
        .unwrap_err();
        assert!(err.to_string().contains("has no CMMA form"), "{err}");
        // Id 300 sits at t = 2 and is gathered by row t = 3 only.
        local_input(
            &f(&[1, 3, 8]),
            &ids,
            &f(&[4, 8]),
            &f(&[VOCAB, 8]),
            &f(&[8]),
            None,
            &out,
        )
        .unwrap();
        let got = out.to_vec().unwrap();
        for (row, chunk) in got.chunks(8).enumerate() {
            assert_eq!(
                chunk.iter().all(|v| v.is_nan()),
                row == 3,
                "row {row}: {chunk:?}"
            );
        }
    });
}

//! Flash attention against the f64 reference, with the naive score-materialising kernel in the
//! same precision as the tolerance baseline. Per dtype, for self attention and for decoding
//! against a cache (`decode::`): fixed sweeps of awkward sizes for the global and the local
//! regime and strided views, every plan a preset's stacks get on this device (each kernel,
//! the tensor-core one as its emulated twin where the device has no CMMA), proptest; errors.

use cubecl::prelude::ComputeClient;
use megabyte_ops::attention::{
    flash_attention, flash_attention_with, naive_attention, plan, AttentionCall, AttentionPlan,
};
use megabyte_ops::gemm::cmma_supported;
use megabyte_ops::record::Planned;
use megabyte_ops::AttentionKernel;
use megabyte_ops::{FloatElement, OpError, Tensor};
use megabyte_reference::attention::attention_f64;
use megabyte_tests::plans::{attention_calls, representatives};
use megabyte_tests::{
    assert_unsupported, check, kernel_tests, planned_by, read_f64, round_all, uniform, with_client,
    DeviceProfile, Dtype, KernelCase, TestRuntime,
};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Separate contiguous (B, S, H, D) tensors.
    Contiguous,
    /// Views into one (B, S, 3, H, D) fused projection.
    FusedQkv,
}

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    s: usize,
    h: usize,
    d: usize,
    causal: bool,
    layout: Layout,
    seed: u64,
    /// The plan `Auto` must launch (the preset regime).
    expect: Option<AttentionPlan>,
}

kernel_tests!(Case, [f32, f16], [sweep, presets], random(6, any_case()));

/// How `Auto` plans a recorded attention call on `profile`.
fn auto(call: &AttentionCall, profile: &DeviceProfile) -> Result<AttentionPlan, OpError> {
    plan(AttentionKernel::Auto, call, profile)
}

impl KernelCase for Case {
    planned_by!(AttentionPlan, |profile| Planned::Attention(call) => auto(call, profile).ok());

    /// Against the reference: the tiled and rows kernels (a preset case: `Auto`, which must
    /// launch the expected plan), and for 2-byte floats the tensor-core kernel's emulated twin,
    /// and the kernel itself on a device with CMMA.
    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        let (b, s, h, d) = (self.b, self.s, self.h, self.d);
        let (causal, layout, seed) = (self.causal, self.layout, self.seed);
        let n = b * s * h * d;
        // Inputs rounded to E, so the reference sees exactly what the kernels see.
        let gen = |sd: u64| round_all::<E>(uniform(sd, n, -2.0, 2.0));
        let (q, k, v) = (gen(seed), gen(seed ^ 0x9e37), gen(seed ^ 0x7f4a));
        let (ref_out, ref_lse) = attention_f64(&q, &k, &v, b, s, h, d, causal);

        let naive_out = Tensor::<TestRuntime, E>::full(client, &[b, s, h, d], f64::NAN).unwrap();
        let naive_lse = Tensor::<TestRuntime, f32>::full(client, &[b, h, s], f64::NAN).unwrap();
        let t = |x: &[f32]| Tensor::<TestRuntime, E>::from_f32(client, x, &[b, s, h, d]).unwrap();
        naive_attention(&t(&q), &t(&k), &t(&v), &naive_out, &naive_lse, causal).unwrap();
        let (naive_out, naive_lse) = (read_f64(&naive_out), read_f64(&naive_lse));

        // A preset case runs the plan it must launch (`Auto`); the others every kernel.
        let mut kernels = if self.expect.is_some() {
            vec![AttentionKernel::Auto]
        } else {
            vec![
                AttentionKernel::Tiled,
                AttentionKernel::Rows,
                AttentionKernel::RowsSplitDims,
            ]
        };
        if std::mem::size_of::<E>() == 2 {
            kernels.push(AttentionKernel::CmmaEmulated);
            if cmma_supported::<TestRuntime, E>(client) {
                kernels.push(AttentionKernel::Cmma);
            }
        }
        for kernel in kernels {
            let case = format!("{case} {kernel:?}");
            // Poisoned outputs: an element the kernel never writes stays NaN and fails.
            let out = Tensor::<TestRuntime, E>::full(client, &[b, s, h, d], f64::NAN).unwrap();
            let lse = Tensor::<TestRuntime, f32>::full(client, &[b, h, s], f64::NAN).unwrap();
            match layout {
                Layout::Contiguous => {
                    let (qt, kt, vt) = (t(&q), t(&k), t(&v));
                    flash_attention_with(
                        kernel,
                        &qt.view(),
                        &kt.view(),
                        &vt.view(),
                        &out,
                        &lse,
                        causal,
                    )
                    .unwrap();
                }
                Layout::FusedQkv => {
                    let mut fused = vec![0f32; 3 * n];
                    for row in 0..b * s {
                        for (part, src) in [&q, &k, &v].into_iter().enumerate() {
                            fused[(row * 3 + part) * h * d..][..h * d]
                                .copy_from_slice(&src[row * h * d..][..h * d]);
                        }
                    }
                    let qkv = Tensor::<TestRuntime, E>::from_f32(client, &fused, &[b, s, 3, h, d])
                        .unwrap();
                    let strides = [s * 3 * h * d, 3 * h * d, d, 1];
                    let view =
                        |part: usize| qkv.strided(part * h * d, &[b, s, h, d], &strides).unwrap();
                    flash_attention_with(kernel, &view(0), &view(1), &view(2), &out, &lse, causal)
                        .unwrap();
                }
            }
            check::<E>(&case, "out", &read_f64(&out), &naive_out, &ref_out)
                .unwrap_or_else(|e| panic!("{e}"));
            // Every kernel keeps softmax statistics in f32.
            check::<f32>(&case, "lse", &read_f64(&lse), &naive_lse, &ref_lse)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// (batch, seq, heads, head_dim): sequences of 1, 2, 7, 113, 1023, 1025; head dims 32, 64, 80,
/// 128 and odd ones; batches of 1, 3 and 75; nothing a multiple of the 16-row tile but 64.
#[rustfmt::skip]
const GLOBAL_SWEEP: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 64), (1, 2, 2, 32), (3, 7, 2, 80), (1, 113, 1, 128), (3, 113, 2, 33),
    (1, 1023, 1, 64), (1, 1025, 1, 32), (75, 7, 1, 64), (2, 64, 3, 80),
];

/// The local regime: many sequences of a patch's length.
#[rustfmt::skip]
const LOCAL_SWEEP: &[(usize, usize, usize, usize)] = &[
    (300, 8, 2, 64), (75, 4, 1, 32), (9, 32, 2, 64), (40, 12, 1, 80), (3, 192, 1, 64),
    (500, 1, 1, 16),
];

fn sweep(dtype: Dtype, _: &DeviceProfile) -> Vec<Case> {
    let case = |(b, s, h, d), causal, layout, seed| Case {
        b,
        s,
        h,
        d,
        causal,
        layout,
        seed,
        expect: None,
    };
    let mut cases = Vec::new();
    // Non-causal global cases in f32 only (the same code path in f16, twice the time).
    let both: &[bool] = if dtype == Dtype::F32 {
        &[true, false]
    } else {
        &[true]
    };
    for (i, &shape) in GLOBAL_SWEEP.iter().enumerate() {
        for &causal in both {
            cases.push(case(shape, causal, Layout::Contiguous, 100 + i as u64));
        }
    }
    let local = if dtype == Dtype::F32 {
        Layout::Contiguous
    } else {
        Layout::FusedQkv
    };
    for (i, &shape) in LOCAL_SWEEP.iter().enumerate() {
        cases.push(case(shape, true, local, 300 + i as u64));
    }
    for (i, &shape) in FUSED_SWEEP.iter().enumerate() {
        cases.push(case(shape, true, Layout::FusedQkv, 500 + i as u64));
    }
    cases
}

/// Views into one fused projection, as the model passes them.
const FUSED_SWEEP: &[(usize, usize, usize, usize)] =
    &[(2, 37, 3, 64), (1, 16, 4, 32), (5, 8, 2, 80)];

/// Every plan `Auto` gives the presets' self attention here (each stack's heads and head dim,
/// every sequence length that reaches another tile), the cheapest call of each, over one
/// sequence in the fused projection's layout.
fn presets(dtype: Dtype, profile: &DeviceProfile) -> Vec<Case> {
    let calls = attention_calls(dtype)
        .into_iter()
        .filter(|(_, c)| c.seq_k == c.problem.seq);
    let plans = representatives(calls.collect(), profile, auto, |c| {
        let p = &c.problem;
        p.seq * p.seq * p.heads * p.head_dim
    });
    (plans.into_iter().enumerate())
        .map(|(i, (_, call, plan))| Case {
            b: 1,
            s: call.problem.seq,
            h: call.problem.heads,
            d: call.problem.head_dim,
            causal: true,
            layout: Layout::FusedQkv,
            seed: 2500 + i as u64,
            expect: Some(plan),
        })
        .collect()
}

fn any_case() -> impl Strategy<Value = Case> {
    let d = prop::sample::select(vec![8usize, 16, 24, 32, 40, 64, 80, 96, 128, 17, 33]);
    let dims = (1usize..4, 1usize..150, 1usize..4, d);
    (dims, any::<bool>(), any::<bool>(), any::<u64>()).prop_map(
        |((b, s, h, d), causal, fused, seed)| Case {
            b,
            s,
            h,
            d,
            causal,
            layout: if fused {
                Layout::FusedQkv
            } else {
                Layout::Contiguous
            },
            seed,
            expect: None,
        },
    )
}

/// Decoding against a KV cache: the last `sq` query rows against all `s` keys, read out of a
/// cache buffer with room for `s + 5` positions, must equal those rows of full causal
/// attention.
mod decode {
    use super::*;

    #[derive(Clone, Debug)]
    pub(super) struct Case {
        b: usize,
        s: usize,
        sq: usize,
        h: usize,
        d: usize,
        seed: u64,
        /// The plan `Auto` must launch (the preset regime).
        expect: Option<AttentionPlan>,
    }

    impl KernelCase for Case {
        planned_by!(AttentionPlan, |profile| Planned::Attention(call) => auto(call, profile).ok());

        fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
            let (b, s, sq, h, d, seed) = (self.b, self.s, self.sq, self.h, self.d, self.seed);
            let n = b * s * h * d;
            let gen = |sd: u64| round_all::<E>(uniform(sd, n, -2.0, 2.0));
            let (q, k, v) = (gen(seed), gen(seed ^ 0x9e37), gen(seed ^ 0x7f4a));
            let (ref_out, ref_lse) = attention_f64(&q, &k, &v, b, s, h, d, true);
            let t =
                |x: &[f32]| Tensor::<TestRuntime, E>::from_f32(client, x, &[b, s, h, d]).unwrap();
            let (naive_out, naive_lse) = (
                Tensor::<TestRuntime, E>::full(client, &[b, s, h, d], f64::NAN).unwrap(),
                Tensor::<TestRuntime, f32>::full(client, &[b, h, s], f64::NAN).unwrap(),
            );
            naive_attention(&t(&q), &t(&k), &t(&v), &naive_out, &naive_lse, true).unwrap();
            let (naive_out, naive_lse) = (read_f64(&naive_out), read_f64(&naive_lse));
            // The last sq rows of (B, S, H, D) and of (B, H, S).
            let rows = |x: &[f64]| -> Vec<f64> {
                (0..b)
                    .flat_map(|bi| x[(bi * s + s - sq) * h * d..(bi + 1) * s * h * d].to_vec())
                    .collect()
            };
            let lse_rows = |x: &[f64]| -> Vec<f64> {
                (0..b * h)
                    .flat_map(|bh| x[bh * s + s - sq..(bh + 1) * s].to_vec())
                    .collect()
            };
            let cap = s + 5;
            let cache = |x: &[f32]| {
                let mut buf = vec![f32::NAN; b * cap * h * d];
                for bi in 0..b {
                    buf[bi * cap * h * d..][..s * h * d]
                        .copy_from_slice(&x[bi * s * h * d..][..s * h * d]);
                }
                Tensor::<TestRuntime, E>::from_f32(client, &buf, &[b, cap, h, d]).unwrap()
            };
            let (kc, vc, qt) = (cache(&k), cache(&v), t(&q));
            let kv_strides = [cap * h * d, h * d, d, 1];
            let q_view = qt
                .strided((s - sq) * h * d, &[b, sq, h, d], &[s * h * d, h * d, d, 1])
                .unwrap();
            let kernels: &[AttentionKernel] = if self.expect.is_some() {
                &[AttentionKernel::Auto]
            } else {
                &[
                    AttentionKernel::Auto,
                    AttentionKernel::Rows,
                    AttentionKernel::RowsSplitDims,
                ]
            };
            for &kernel in kernels {
                let case = format!("{case} {kernel:?}");
                let out = Tensor::<TestRuntime, E>::full(client, &[b, sq, h, d], f64::NAN).unwrap();
                let lse = Tensor::<TestRuntime, f32>::full(client, &[b, h, sq], f64::NAN).unwrap();
                flash_attention_with(
                    kernel,
                    &q_view,
                    &kc.strided(0, &[b, s, h, d], &kv_strides).unwrap(),
                    &vc.strided(0, &[b, s, h, d], &kv_strides).unwrap(),
                    &out,
                    &lse,
                    true,
                )
                .unwrap();
                check::<E>(
                    &case,
                    "out",
                    &read_f64(&out),
                    &rows(&naive_out),
                    &rows(&ref_out),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                check::<f32>(
                    &case,
                    "lse",
                    &read_f64(&lse),
                    &lse_rows(&naive_lse),
                    &lse_rows(&ref_lse),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    /// (batch, keys, queries, heads, head dim).
    #[rustfmt::skip]
    const SWEEP: &[(usize, usize, usize, usize, usize)] = &[
        (1, 1, 1, 1, 64), (2, 9, 1, 2, 32), (3, 33, 1, 4, 16), (1, 113, 7, 2, 80),
        (2, 8, 8, 2, 64),
        // One row per unit past head dim 64: q re-read from memory at every key.
        (2, 50, 1, 2, 128), (1, 17, 1, 1, 80),
        // An odd head dim: scalar loads, and the last split's slice runs past D.
        (2, 12, 3, 1, 33),
    ];

    /// Cases the random test failed on, with their seeds: (batch, keys, queries, heads, head
    /// dim, seed).
    const REGRESSIONS: &[(usize, usize, usize, usize, usize, u64)] = &[
        // The Rows kernel at an odd head dim, 4 chunks of keys: its output rounded once more
        // than the naive kernel's (a reciprocal, then a product, where the naive divides).
        (1, 29, 2, 2, 33, 14_249_560_490_211_166_670),
    ];

    pub(super) fn sweep(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
        let seeded = (SWEEP.iter().enumerate())
            .map(|(i, &(b, s, sq, h, d))| (b, s, sq, h, d, 700 + i as u64));
        (seeded.chain(REGRESSIONS.iter().copied()))
            .map(|(b, s, sq, h, d, seed)| Case {
                b,
                s,
                sq,
                h,
                d,
                seed,
                expect: None,
            })
            .collect()
    }

    /// Every plan `Auto` gives the presets' stacks decoding one or a few positions against a
    /// full cache, the cheapest call of each, over one sequence.
    pub(super) fn presets(dtype: Dtype, profile: &DeviceProfile) -> Vec<Case> {
        let calls = attention_calls(dtype)
            .into_iter()
            .filter(|(_, c)| c.seq_k > c.problem.seq);
        let plans = representatives(calls.collect(), profile, auto, |c| {
            c.seq_k * c.problem.heads * c.problem.head_dim
        });
        (plans.into_iter().enumerate())
            .map(|(i, (_, call, plan))| Case {
                b: 1,
                s: call.seq_k,
                sq: call.problem.seq,
                h: call.problem.heads,
                d: call.problem.head_dim,
                seed: 2700 + i as u64,
                expect: Some(plan),
            })
            .collect()
    }

    pub(super) fn any_case() -> impl Strategy<Value = Case> {
        let d = prop::sample::select(vec![8usize, 16, 32, 33, 64, 80, 128]);
        (
            1usize..3,
            1usize..120,
            1usize..5,
            1usize..4,
            d,
            any::<u64>(),
        )
            .prop_map(|(b, s, sq, h, d, seed)| Case {
                b,
                s,
                sq: sq.min(s),
                h,
                d,
                seed,
                expect: None,
            })
    }

    kernel_tests!(Case, [f32, f16], [sweep, presets], random(4, any_case()));
}

#[test]
fn decode_errors() {
    with_client!(TestRuntime, |client| {
        // The tiled kernel needs as many keys as queries: an error, not a wrong answer.
        let t = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.5).unwrap();
        let (q, kv) = (t(&[1, 1, 2, 16]), t(&[1, 6, 2, 16]));
        let (out, lse) = (t(&[1, 1, 2, 16]), t(&[1, 2, 1]));
        let err = flash_attention_with(
            AttentionKernel::Tiled,
            &q.view(),
            &kv.view(),
            &kv.view(),
            &out,
            &lse,
            true,
        )
        .unwrap_err();
        assert_unsupported(&err, "key sequence length", 6);
        // Fewer keys than queries is a shape error.
        let err = flash_attention(&kv.view(), &q.view(), &q.view(), &out, &lse, true).unwrap_err();
        assert!(matches!(err, OpError::Shape { tensor: "k", .. }), "{err}");
    });
}

#[test]
fn bad_shapes_are_errors() {
    with_client!(TestRuntime, |client| {
        let t = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.5).unwrap();
        let (q, k, v) = (t(&[1, 8, 2, 16]), t(&[1, 8, 2, 16]), t(&[1, 9, 2, 16]));
        let (out, lse) = (
            t(&[1, 8, 2, 16]),
            Tensor::<TestRuntime, f32>::full(&client, &[1, 2, 8], 0.0).unwrap(),
        );
        let err = flash_attention(&q.view(), &k.view(), &v.view(), &out, &lse, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "attention: `v` has shape [1, 9, 2, 16], expected [1, 8, 2, 16]"
        );

        let bad_lse = Tensor::<TestRuntime, f32>::full(&client, &[1, 8, 2], 0.0).unwrap();
        let err =
            flash_attention(&q.view(), &k.view(), &k.view(), &out, &bad_lse, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "attention: `lse` has shape [1, 8, 2], expected [1, 2, 8]"
        );

        let wide = t(&[1, 4, 1, 300]);
        let lse1 = Tensor::<TestRuntime, f32>::full(&client, &[1, 1, 4], 0.0).unwrap();
        let err = flash_attention(&wide.view(), &wide.view(), &wide.view(), &wide, &lse1, true)
            .unwrap_err();
        assert_unsupported(&err, "head dim", 300);

        let empty = t(&[1, 0, 2, 16]);
        let lse0 = Tensor::<TestRuntime, f32>::full(&client, &[1, 2, 0], 0.0).unwrap();
        let err = flash_attention(
            &empty.view(),
            &empty.view(),
            &empty.view(),
            &empty,
            &lse0,
            true,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "attention: `q` is empty (shape [1, 0, 2, 16])"
        );

        let err = q.strided(8, &[1, 8, 2, 16], &[256, 32, 16, 1]).unwrap_err();
        assert!(matches!(err, OpError::ViewOutOfBounds { .. }), "{err}");

        // The tensor-core kernels take 2-byte floats only, and as many keys as queries.
        let run = |kernel| {
            flash_attention_with(kernel, &q.view(), &k.view(), &k.view(), &out, &lse, true)
                .unwrap_err()
                .to_string()
        };
        assert!(
            run(AttentionKernel::CmmaEmulated).contains("element bytes for the tensor-core kernel"),
            "{}",
            run(AttentionKernel::CmmaEmulated)
        );
        assert!(
            run(AttentionKernel::Cmma).contains("f32"),
            "{}",
            run(AttentionKernel::Cmma)
        );
        let h =
            |shape: &[usize]| Tensor::<TestRuntime, half::f16>::full(&client, shape, 0.5).unwrap();
        let (q16, cache16, out16) = (h(&[1, 2, 2, 16]), h(&[1, 8, 2, 16]), h(&[1, 2, 2, 16]));
        let lse2 = Tensor::<TestRuntime, f32>::full(&client, &[1, 2, 2], 0.0).unwrap();
        let err = flash_attention_with(
            AttentionKernel::CmmaEmulated,
            &q16.view(),
            &cache16.view(),
            &cache16.view(),
            &out16,
            &lse2,
            true,
        )
        .unwrap_err();
        assert_unsupported(&err, "key sequence length", 8);
    });
}

/// The acceptance shape of the global regime: one sequence of 16,384 patches, 8 heads of 64,
/// f32. Memory stays O(S·D): the device's reserved memory after the call is compared with the
/// inputs and outputs (the S² scores alone would take 8 GiB). A few rows are checked against
/// the reference. Slow on lavapipe; run with
/// `cargo test --release -p megabyte-tests --test attention -- --ignored global_16k`.
#[test]
#[ignore]
fn global_16k_runs_in_linear_memory() {
    with_client!(TestRuntime, |client| {
        let (b, s, h, d) = (1usize, 16_384usize, 8usize, 64usize);
        let n = b * s * h * d;
        let (q, k, v) = (
            uniform(1, n, -2.0, 2.0),
            uniform(2, n, -2.0, 2.0),
            uniform(3, n, -2.0, 2.0),
        );
        let t =
            |x: &[f32]| Tensor::<TestRuntime, f32>::from_f32(&client, x, &[b, s, h, d]).unwrap();
        let (qt, kt, vt) = (t(&q), t(&k), t(&v));
        let out = Tensor::<TestRuntime, f32>::full(&client, &[b, s, h, d], f64::NAN).unwrap();
        let lse = Tensor::<TestRuntime, f32>::full(&client, &[b, h, s], f64::NAN).unwrap();
        let start = std::time::Instant::now();
        flash_attention(&qt.view(), &kt.view(), &vt.view(), &out, &lse, true).unwrap();
        let got = out.to_vec().unwrap();
        let elapsed = start.elapsed();
        let usage = client.memory_usage().unwrap();
        let io_bytes = (4 * n + h * s) * 4;
        println!("seq {s}, {h} heads of {d}: {:.1} s; device memory reserved {} MiB, in use {} MiB, inputs+outputs {} MiB, S² scores would be {} MiB",
            elapsed.as_secs_f64(), usage.bytes_reserved >> 20, usage.bytes_in_use >> 20, io_bytes >> 20, (s * s * h * 4) >> 20);
        assert!(
            usage.bytes_reserved < 2 * io_bytes as u64,
            "reserved {} bytes for {} bytes of tensors",
            usage.bytes_reserved,
            io_bytes
        );
        // Rows near the start, the middle and the end, every head, in f64.
        for &i in &[0usize, 1, 5000, 16_383] {
            for hh in 0..h {
                fn at(x: &[f32], j: usize, hh: usize, h: usize, d: usize) -> &[f32] {
                    &x[(j * h + hh) * d..][..d]
                }
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        at(&q, i, hh, h, d)
                            .iter()
                            .zip(at(&k, j, hh, h, d))
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                for x in 0..d {
                    let want: f64 = (0..=i)
                        .map(|j| (scores[j] - mx).exp() / z * at(&v, j, hh, h, d)[x] as f64)
                        .sum();
                    let g = got[(i * h + hh) * d + x] as f64;
                    assert!(
                        (g - want).abs() < 1e-4,
                        "row {i} head {hh} dim {x}: {g} vs {want}"
                    );
                }
            }
        }
    });
}

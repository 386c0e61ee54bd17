//! Causal attention: the flash kernel against the naive score-materialising kernels and
//! cubek-attention 0.2.0 (its register-tile "unit" routine, the one that runs without plane
//! ops or tensor cores) on the same runtime; on devices with tensor cores, also the CMMA flash
//! kernel next to the plain tiled one in f16. Throughput counts causal FLOPs: half of
//! 4·S²·D per (batch, head). Decoding (one new query row per sequence against a KV cache)
//! compares `Rows` with `RowsSplitDims`; its throughput counts 4·S_kv·D per (batch, head).
//!
//! `cargo bench -p megabyte-benches --bench attention`

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use cubecl::prelude::*;
use cubek_attention::definition::{AccumulatorPrecision, AttentionGlobalTypes, AttentionOptions};
use cubek_attention::launch::{launch_ref, BlueprintStrategy, Strategy};
use megabyte_ops::attention::{flash_attention_with, naive_attention, AttentionProblem};
use megabyte_ops::gemm::cmma_supported;
use megabyte_ops::AttentionKernel;
use megabyte_ops::{FloatElement, Tensor};

type Rt = megabyte_benches::BenchRuntime;

/// (name, batch, seq, heads, head_dim). Global: one long sequence of patches of a wide model.
/// Local: B·K independent sequences of one patch each.
const SHAPES: &[(&str, usize, usize, usize, usize)] = &[
    ("global_k1024", 1, 1024, 8, 64), // small preset at T = 8 KiB: K = 1024 patches
    ("global_k2048", 1, 2048, 4, 64), // K = 2048 patches, 4 heads
    ("local_p8", 4096, 8, 4, 64),     // P = 8: 4096 patch sequences, 4 heads of 64
    ("local_p32", 1024, 32, 4, 64),   // P = 32 (the audio configuration)
];

fn cubek_causal<R: Runtime>(
    client: &ComputeClient<R>,
    q: &Tensor<R, f32>,
    k: &Tensor<R, f32>,
    v: &Tensor<R, f32>,
    out: &Tensor<R, f32>,
) {
    // cubek-attention wants (B, H, S, D); the tensors were allocated in that order.
    let bind = megabyte_benches::binding::<R, f32>;
    let dtypes = AttentionGlobalTypes::from_single_float_dtype(
        f32::as_type_native_unchecked(),
        AttentionGlobalTypes::mask_dtype(client),
    );
    launch_ref::<R>(
        Strategy::Unit(BlueprintStrategy::Inferred(())),
        client,
        bind(q),
        bind(k),
        bind(v),
        None,
        bind(out),
        &dtypes,
        AttentionOptions {
            causal: true,
            accumulator_precision: AccumulatorPrecision::default(),
        },
    )
    .expect("cubek-attention launch");
}

/// A flash kernel's name in bench ids.
fn kernel_label(kernel: AttentionKernel) -> &'static str {
    match kernel {
        AttentionKernel::Tiled => "tiled",
        AttentionKernel::Rows => "rows",
        AttentionKernel::RowsSplitDims => "rows_split",
        AttentionKernel::Cmma => "cmma",
        AttentionKernel::CmmaEmulated => "cmma_emulated",
        AttentionKernel::Auto => "auto",
    }
}

/// One bench row per kernel (`wgpu_attention_<dtype>_flash_<kernel>`): the flash kernel on q,
/// k and v of (B, S, H, D) = `dims`, each holding `data` in E, into out and lse.
fn bench_flash<E: FloatElement>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    client: &ComputeClient<Rt>,
    shape: &str,
    kernels: &[AttentionKernel],
    dims: [usize; 4],
    data: &[f32],
) {
    let [b, s, h, _] = dims;
    let upload = || Tensor::<Rt, E>::from_f32(client, data, &dims).unwrap();
    let (q, k, v) = (upload(), upload(), upload());
    let out = Tensor::<Rt, E>::empty(client, &dims).unwrap();
    let lse = Tensor::<Rt, f32>::empty(client, &[b, h, s]).unwrap();
    for &kernel in kernels {
        let label = format!("wgpu_attention_{}_flash_{}", E::NAME, kernel_label(kernel));
        megabyte_benches::timed(group, client, &label, shape, || {
            let (q, k, v) = (q.view(), k.view(), v.view());
            flash_attention_with(kernel, &q, &k, &v, &out, &lse, true).unwrap()
        });
    }
}

fn bench(c: &mut Criterion) {
    let Some((client, mut group)) = megabyte_benches::group(c, "attention", 4) else {
        return;
    };
    for &(name, b, s, h, d) in SHAPES {
        let problem = AttentionProblem {
            batch: b,
            seq: s,
            heads: h,
            head_dim: d,
            causal: true,
        };
        group.throughput(Throughput::Elements(problem.flops() as u64));
        let n = b * s * h * d;
        let data: Vec<f32> = megabyte_benches::data(n, 0, -1.0, 1.0);
        let t = |shape: &[usize]| Tensor::<Rt, f32>::from_f32(&client, &data, shape).unwrap();
        let (q, k, v) = (t(&[b, s, h, d]), t(&[b, s, h, d]), t(&[b, s, h, d]));
        let out = Tensor::<Rt, f32>::empty(&client, &[b, s, h, d]).unwrap();
        let lse = Tensor::<Rt, f32>::empty(&client, &[b, h, s]).unwrap();
        let dims = [b, s, h, d];
        let kernels = [AttentionKernel::Tiled, AttentionKernel::Rows];
        bench_flash::<f32>(&mut group, &client, name, &kernels, dims, &data);
        if cmma_supported::<Rt, half::f16>(&client) {
            let kernels = [AttentionKernel::Cmma, AttentionKernel::Tiled];
            bench_flash::<half::f16>(&mut group, &client, name, &kernels, dims, &data);
        }
        // The naive kernels hold B·H·S² scores; skip where that passes 1 GiB.
        if b * h * s * s * 4 <= 1 << 30 {
            megabyte_benches::timed(
                &mut group,
                &client,
                "wgpu_attention_f32_naive",
                name,
                || naive_attention(&q, &k, &v, &out, &lse, true).unwrap(),
            );
        }
        let (qc, kc, vc) = (t(&[b, h, s, d]), t(&[b, h, s, d]), t(&[b, h, s, d]));
        let outc = Tensor::<Rt, f32>::empty(&client, &[b, h, s, d]).unwrap();
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_attention_f32_cubek_unit",
            name,
            || cubek_causal(&client, &qc, &kc, &vc, &outc),
        );
    }
    // Decoding: one query row per (batch, head) against a cache of 2,048 positions.
    for (name, b, s_kv, h, d) in [
        ("decode_kv2048_d64", 4usize, 2048usize, 8usize, 64usize),
        ("decode_kv2048_d128", 4, 2048, 8, 128),
    ] {
        group.throughput(Throughput::Elements((4 * b * h * s_kv * d) as u64));
        let data: Vec<f32> = megabyte_benches::data(b * s_kv * h * d, 0, -1.0, 1.0);
        let t = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::<Rt, f32>::from_f32(&client, &data[..n], shape).unwrap()
        };
        let (q, k, v) = (t(&[b, 1, h, d]), t(&[b, s_kv, h, d]), t(&[b, s_kv, h, d]));
        let out = Tensor::<Rt, f32>::empty(&client, &[b, 1, h, d]).unwrap();
        let lse = Tensor::<Rt, f32>::empty(&client, &[b, h, 1]).unwrap();
        for kernel in [AttentionKernel::Rows, AttentionKernel::RowsSplitDims] {
            let label = format!("wgpu_attention_f32_flash_{}", kernel_label(kernel));
            megabyte_benches::timed(&mut group, &client, &label, name, || {
                let (q, k, v) = (q.view(), k.view(), v.view());
                flash_attention_with(kernel, &q, &k, &v, &out, &lse, true).unwrap()
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The fused global input (bytes → shifted patches) in GB/s of output written, and the fused
//! global→local input (a GEMM with a gather epilogue) against the plain GEMM of the same shape,
//! in FLOP/s (2·B·T·D_G·D_L).
//!
//! `cargo bench -p megabyte-benches --bench patch_embed`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use megabyte_ops::gemm::{gemm, Epilogue};
use megabyte_ops::local_input::local_input;
use megabyte_ops::patch_embed::patch_embed;
use megabyte_ops::Tensor;

type Rt = megabyte_benches::BenchRuntime;

/// (name, B, T, P, D_G, D_L): `tiny` at batch 8; the paper's text model over one 2 KiB
/// sequence.
const SHAPES: &[(&str, usize, usize, usize, usize, usize)] =
    &[("tiny", 8, 64, 4, 16, 32), ("text", 1, 2048, 8, 256, 1024)];
const VOCAB: usize = 256;

fn bench(c: &mut Criterion) {
    let Some((client, mut group)) = megabyte_benches::group(c, "patch_embed", 3) else {
        return;
    };
    for &(name, b, t, p, dg, dl) in SHAPES {
        let k = t / p;
        let data = |n: usize| -> Vec<f32> { megabyte_benches::data(n, 0, -1.0, 1.0) };
        let ids: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 31) % VOCAB as u32)
            .collect();
        let ids = Tensor::from_ids(&client, &ids, &[b, t]).unwrap();
        let wte = Tensor::<Rt, f32>::from_f32(&client, &data(VOCAB * dg), &[VOCAB, dg]).unwrap();
        let wpe = Tensor::<Rt, f32>::from_f32(&client, &data(t * dg), &[t, dg]).unwrap();
        let pad = Tensor::<Rt, f32>::from_f32(&client, &data(p * dg), &[p * dg]).unwrap();
        let g = Tensor::<Rt, f32>::empty(&client, &[b, k, p * dg]).unwrap();
        group.throughput(Throughput::Bytes((b * t * dg * 4) as u64));
        megabyte_benches::timed(&mut group, &client, "wgpu_patch_embed_f32", name, || {
            patch_embed(&ids, &wte, &wpe, &pad, &g, p).unwrap()
        });

        let w_gl = Tensor::<Rt, f32>::from_f32(&client, &data(dg * dl), &[dg, dl]).unwrap();
        let e_l = Tensor::<Rt, f32>::from_f32(&client, &data(VOCAB * dl), &[VOCAB, dl]).unwrap();
        let lpad = Tensor::<Rt, f32>::from_f32(&client, &data(dl), &[dl]).unwrap();
        let lpos = Tensor::<Rt, f32>::from_f32(&client, &data(p * dl), &[p, dl]).unwrap();
        let out = Tensor::<Rt, f32>::empty(&client, &[b, t, dl]).unwrap();
        group.throughput(Throughput::Elements((2 * b * t * dg * dl) as u64));
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_local_input_f32_fused",
            name,
            || local_input(&g, &ids, &w_gl, &e_l, &lpad, Some(&lpos), &out).unwrap(),
        );
        let g_rows = g.clone().reshape(&[b * t, dg]).unwrap();
        let out_rows = out.clone().reshape(&[b * t, dl]).unwrap();
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_local_input_f32_gemm_only",
            name,
            || gemm(&g_rows.view(), &w_gl.view(), &out_rows, &Epilogue::none()).unwrap(),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

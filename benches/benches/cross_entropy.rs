//! Fused tied logits + cross-entropy against the unfused route: the logits as a GEMM against
//! the transposed embedding table (a view, no copy), written to memory. FLOPs = 2·rows·V·D.
//!
//! `cargo bench -p megabyte-benches --bench cross_entropy`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use megabyte_ops::cross_entropy::tied_cross_entropy;
use megabyte_ops::gemm::{gemm, Epilogue};
use megabyte_ops::Tensor;

type Rt = megabyte_benches::BenchRuntime;

/// (name, rows = B·T, D_L): `tiny` at batch 8, and the paper's text model over 2048 bytes.
const SHAPES: &[(&str, usize, usize)] = &[("tiny", 512, 32), ("text", 2048, 1024)];
const VOCAB: usize = 256;

fn bench(c: &mut Criterion) {
    let Some((client, mut group)) = megabyte_benches::group(c, "cross_entropy", 3) else {
        return;
    };
    for &(name, rows, d) in SHAPES {
        group.throughput(Throughput::Elements((2 * rows * VOCAB * d) as u64));
        let data = |n: usize| -> Vec<f32> { megabyte_benches::data(n, 0, -1.0, 1.0) };
        let x = Tensor::<Rt, f32>::from_f32(&client, &data(rows * d), &[rows, d]).unwrap();
        let table = Tensor::<Rt, f32>::from_f32(&client, &data(VOCAB * d), &[VOCAB, d]).unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 31) % VOCAB as u32).collect();
        let targets = Tensor::from_ids(&client, &targets, &[rows]).unwrap();
        let loss = Tensor::<Rt, f32>::empty(&client, &[rows]).unwrap();
        let lse = Tensor::<Rt, f32>::empty(&client, &[rows]).unwrap();
        let logits = Tensor::<Rt, f32>::empty(&client, &[rows, VOCAB]).unwrap();
        megabyte_benches::timed(&mut group, &client, "wgpu_ce_f32_fused", name, || {
            tied_cross_entropy(&x, &table, &targets, &loss, &lse, None).unwrap()
        });
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_ce_f32_fused_with_logits",
            name,
            || tied_cross_entropy(&x, &table, &targets, &loss, &lse, Some(&logits)).unwrap(),
        );
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_logits_f32_gemm_only",
            name,
            || gemm(&x.view(), &table.view().t(), &logits, &Epilogue::none()).unwrap(),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! LayerNorm, plain and fused with the residual add, in GB/s of row data moved (reads of the
//! input and residual, writes of the output and the sum; the (C) parameters are not counted).
//!
//! `cargo bench -p megabyte-benches --bench layer_norm`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use megabyte_ops::layer_norm::{add_layer_norm, layer_norm};
use megabyte_ops::Tensor;

type Rt = megabyte_benches::BenchRuntime;

/// (name, rows, C): the global widths of `tiny` and of the paper's text model (one 8 KiB
/// sequence: 1024 patches), and its local width over 8192 bytes.
const SHAPES: &[(&str, usize, usize)] = &[
    ("tiny_global", 128, 64),
    ("text_global", 1024, 2048),
    ("text_local", 8192, 1024),
];

fn bench(c: &mut Criterion) {
    let Some((client, mut group)) = megabyte_benches::group(c, "layer_norm", 3) else {
        return;
    };
    for &(name, rows, width) in SHAPES {
        let data: Vec<f32> = megabyte_benches::data(rows * width, 0, -0.0, 4.0);
        let x = Tensor::<Rt, f32>::from_f32(&client, &data, &[rows, width]).unwrap();
        let r = Tensor::<Rt, f32>::from_f32(&client, &data, &[rows, width]).unwrap();
        let w = Tensor::<Rt, f32>::full(&client, &[width], 1.0).unwrap();
        let b = Tensor::<Rt, f32>::full(&client, &[width], 0.0).unwrap();
        let out = Tensor::<Rt, f32>::empty(&client, &[rows, width]).unwrap();
        let sum = Tensor::<Rt, f32>::empty(&client, &[rows, width]).unwrap();
        let mean = Tensor::<Rt, f32>::empty(&client, &[rows]).unwrap();
        let rstd = Tensor::<Rt, f32>::empty(&client, &[rows]).unwrap();
        let bytes = (rows * width * 4) as u64;
        group.throughput(Throughput::Bytes(2 * bytes));
        megabyte_benches::timed(&mut group, &client, "wgpu_layer_norm_f32", name, || {
            layer_norm(&x, &w, &b, &out, &mean, &rstd).unwrap()
        });
        group.throughput(Throughput::Bytes(4 * bytes));
        megabyte_benches::timed(&mut group, &client, "wgpu_add_layer_norm_f32", name, || {
            add_layer_norm(&x, &r, &w, &b, &sum, &out, &mean, &rstd).unwrap()
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

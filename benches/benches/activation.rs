//! GELU kernel vs the naive GELU kernel on the same runtime, GB/s over MEGABYTE FFN activations.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use megabyte_ops::activation::{gelu, gelu_naive};
use megabyte_ops::Tensor;

type Rt = megabyte_benches::BenchRuntime;

/// Named shapes: the FFN hidden activation of one global layer, (B·K, 4·P·D_G).
const SHAPES: &[(&str, usize, usize)] = &[
    ("tiny_global_ffn", 16, 256), // tiny preset: K = 16 patches, 4·64 hidden
    ("small_global_ffn", 256, 1024), // small preset: K = 256, 4·256 hidden
    ("paper_text_global_ffn", 64, 8192), // 64 patches of the 758M global model, 4·2048 hidden
];

fn bench(c: &mut Criterion) {
    let Some(client) = megabyte_benches::client_or_skip("activation") else {
        return;
    };
    let mut group = c.benchmark_group("activation");
    for &(name, rows, cols) in SHAPES {
        let n = rows * cols;
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2000) as f32 / 250.0 - 4.0)
            .collect();
        let input = Tensor::<Rt, f32>::from_f32(&client, &data, &[rows, cols]).unwrap();
        // Read n elements and write n elements.
        group.throughput(Throughput::Bytes((2 * n * 4) as u64));
        megabyte_benches::timed(&mut group, &client, "wgpu_gelu_f32", name, || {
            drop(gelu(&input).unwrap())
        });
        megabyte_benches::timed(&mut group, &client, "wgpu_gelu_naive_f32", name, || {
            drop(gelu_naive(&input).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! FFN GEMMs: both main loops (registers, the one `Auto` picks on lavapipe, and tiled) with the
//! fused epilogue (fc1: bias + GELU, fc2: bias + residual)
//! against the naive one-unit-per-output kernel and cubek-matmul 0.2.0 (plain A·B, no
//! epilogue, so the comparison favours it) on the same runtime. cubek's register-tile "unit"
//! routines are the ones that run without plane ops or tensor cores; both are measured.
//! Throughput counts 2·M·N·K FLOPs.
//!
//! `cargo bench -p megabyte-benches --bench gemm` (a filter such as `tiny` picks shapes).

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use cubecl::prelude::*;
use cubek_matmul::definition::MatmulElems;
use cubek_matmul::launch::{launch_ref, Strategy};
use cubek_std::InputBinding;
use megabyte_ops::gemm::{cmma_supported, gemm_naive, gemm_with, GemmKernel};
use megabyte_ops::{ActivationKind, Epilogue, FloatElement, GemmProblem, Tensor};

type Rt = megabyte_benches::BenchRuntime;

/// (name, M rows, K in, N out, fc1). fc1 is the up projection (bias + GELU), fc2 the down
/// projection (bias + residual). Rows: `tiny` at batch 8 (8·16 patches globally, 8·64 bytes
/// locally); the paper's text model (global width 2048, local 1024) over 512 rows, half of
/// one 8 KiB sequence's patches.
const SHAPES: &[(&str, usize, usize, usize, bool)] = &[
    ("tiny_global_fc1", 128, 64, 256, true),
    ("tiny_global_fc2", 128, 256, 64, false),
    ("tiny_local_fc1", 512, 32, 128, true),
    ("tiny_local_fc2", 512, 128, 32, false),
    ("text_global_fc1", 512, 2048, 8192, true),
    ("text_global_fc2", 512, 8192, 2048, false),
    ("text_local_fc1", 512, 1024, 4096, true),
    ("text_local_fc2", 512, 4096, 1024, false),
];

/// Largest problem the naive kernel is timed on (it runs at a few hundred MFLOP/s here).
const NAIVE_MAX_FLOPS: f64 = 5e9;

fn cubek<R: Runtime>(
    client: &ComputeClient<R>,
    strategy: &Strategy,
    a: &Tensor<R, f32>,
    b: &Tensor<R, f32>,
    out: &Tensor<R, f32>,
) {
    let bind = megabyte_benches::binding::<R, f32>;
    let dtype = f32::as_type_native_unchecked();
    let mut elems = MatmulElems::from_single_dtype(dtype);
    launch_ref::<R>(
        strategy,
        client,
        InputBinding::Normal(bind(a), dtype.storage_type()),
        InputBinding::Normal(bind(b), dtype.storage_type()),
        bind(out),
        &mut elems,
    )
    .expect("cubek-matmul launch");
}

/// One row per kernel (`wgpu_gemm_<dtype>_<kernel>_fused`): our GEMM of a and b into out with
/// the shape's fused epilogue (fc1: bias + GELU; fc2: bias + residual).
fn bench_ours<E: FloatElement>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    client: &ComputeClient<Rt>,
    shape: &str,
    kernels: &[GemmKernel],
    [a, b, bias, residual, out]: [&Tensor<Rt, E>; 5],
    fc1: bool,
) {
    let epi = if fc1 {
        Epilogue::none().bias(bias).activation(ActivationKind::Gelu)
    } else {
        Epilogue::none().bias(bias).residual(residual)
    };
    for &kernel in kernels {
        let label = format!("wgpu_gemm_{}_{kernel:?}_fused", E::NAME).to_lowercase();
        megabyte_benches::timed(group, client, &label, shape, || {
            gemm_with(kernel, &a.view(), &b.view(), out, &epi).unwrap()
        });
    }
}

fn bench(c: &mut Criterion) {
    let Some((client, mut group)) = megabyte_benches::group(c, "gemm", 4) else {
        return;
    };
    for &(name, m, k, n, fc1) in SHAPES {
        let problem = GemmProblem { batch: 1, m, n, k };
        group.throughput(Throughput::Elements(problem.flops() as u64));
        let data =
            |len: usize, salt: usize| -> Vec<f32> { megabyte_benches::data(len, salt, -1.0, 1.0) };
        let a = Tensor::<Rt, f32>::from_f32(&client, &data(m * k, 1), &[m, k]).unwrap();
        let b = Tensor::<Rt, f32>::from_f32(&client, &data(k * n, 2), &[k, n]).unwrap();
        let bias = Tensor::<Rt, f32>::from_f32(&client, &data(n, 3), &[n]).unwrap();
        let residual = Tensor::<Rt, f32>::from_f32(&client, &data(m * n, 4), &[m, n]).unwrap();
        let out = Tensor::<Rt, f32>::empty(&client, &[m, n]).unwrap();
        let operands = [&a, &b, &bias, &residual, &out];
        bench_ours(
            &mut group,
            &client,
            name,
            &[GemmKernel::Registers, GemmKernel::Tiled],
            operands,
            fc1,
        );
        for (label, strategy) in [
            (
                "wgpu_gemm_f32_cubek_simple_unit",
                Strategy::SimpleUnit(Default::default()),
            ),
            (
                "wgpu_gemm_f32_cubek_double_unit",
                Strategy::DoubleUnit(Default::default()),
            ),
            // cubek's own pick: tensor-core routines where the device has them.
            ("wgpu_gemm_f32_cubek_auto", Strategy::Auto),
        ] {
            // Without tensor cores cubek's pick is SimpleUnit, already measured.
            if matches!(strategy, Strategy::Auto) && megabyte_benches::RUNTIME == "wgpu" {
                continue;
            }
            megabyte_benches::timed(&mut group, &client, label, name, || {
                cubek(&client, &strategy, &a, &b, &out)
            });
        }
        if cmma_supported::<Rt, half::f16>(&client) {
            let h = |t: &Tensor<Rt, f32>| {
                Tensor::<Rt, half::f16>::from_f32(&client, &t.to_f32_vec().unwrap(), t.shape())
                    .unwrap()
            };
            let out = Tensor::<Rt, half::f16>::empty(&client, &[m, n]).unwrap();
            let operands = [&h(&a), &h(&b), &h(&bias), &h(&residual), &out];
            bench_ours(
                &mut group,
                &client,
                name,
                &[GemmKernel::Cmma, GemmKernel::Tiled],
                operands,
                fc1,
            );
        }
        if problem.flops() <= NAIVE_MAX_FLOPS {
            megabyte_benches::timed(&mut group, &client, "wgpu_gemm_f32_naive", name, || {
                gemm_naive(&a.view(), &b.view(), &out).unwrap()
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Helpers shared by the criterion benches: device-synchronised timing.

use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use cubecl::prelude::*;

/// Runs `f` `iters` times and waits for the device to finish before stopping the clock, so the
/// time covers the kernels and not only their enqueueing.
pub fn time_synced<R: Runtime>(
    client: &ComputeClient<R>,
    iters: u64,
    mut f: impl FnMut(),
) -> Duration {
    // Drain work queued before the measurement.
    cubecl::future::block_on(client.sync()).expect("device sync");
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    cubecl::future::block_on(client.sync()).expect("device sync");
    start.elapsed()
}

/// `t` as cubek's launchers take it: its handle, strides and shape, in the order it was
/// allocated in.
pub fn binding<R: Runtime, E>(t: &megabyte_ops::Tensor<R, E>) -> TensorBinding<R> {
    let (strides, shape) = (
        cubecl::zspace::Strides::new(&t.strides()),
        t.shape().iter().copied(),
    );
    // SAFETY: the handle, strides and shape are those of one live tensor.
    unsafe { TensorBinding::<R>::from_raw_parts(t.handle().clone(), strides, shape.collect()) }
}

/// Bench `id` (a `wgpu_` label, renamed for the runtime by [`label`]) of `name` in `group`:
/// `f` timed with [`time_synced`].
pub fn timed<R: Runtime>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    client: &ComputeClient<R>,
    id: &str,
    name: impl std::fmt::Display,
    mut f: impl FnMut(),
) {
    group.bench_function(criterion::BenchmarkId::new(label(id), name), |bench| {
        bench.iter_custom(|iters| time_synced(client, iters, &mut f))
    });
}

/// The runtime the benches run on: wgpu, or CUDA with the `cuda` feature
/// (`cargo bench -p megabyte-benches --features cuda`).
#[cfg(not(feature = "cuda"))]
pub type BenchRuntime = cubecl::wgpu::WgpuRuntime;
#[cfg(feature = "cuda")]
pub type BenchRuntime = cubecl::cuda::CudaRuntime;

/// The runtime's name, the prefix of every bench id.
#[cfg(not(feature = "cuda"))]
pub const RUNTIME: &str = "wgpu";
#[cfg(feature = "cuda")]
pub const RUNTIME: &str = "cuda";

/// A bench label written with the `wgpu_` prefix, renamed for the runtime in use.
pub fn label(name: &str) -> String {
    name.replacen("wgpu", RUNTIME, 1)
}

/// The client of the bench runtime's default device, or `None` (with a message naming
/// `benches`) when there is none, so a bench group can skip.
pub fn client_or_skip(benches: &str) -> Option<ComputeClient<BenchRuntime>> {
    match megabyte_ops::try_client::<BenchRuntime>(&Default::default()) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("skipping {benches} benches: {e}");
            None
        }
    }
}

/// The bench runtime's client and the criterion group `name` (10 samples, a 1 s warm-up,
/// `seconds` of measurement per bench), or `None` (with a message) when there is no device.
pub fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    seconds: u64,
) -> Option<(ComputeClient<BenchRuntime>, BenchmarkGroup<'a, WallTime>)> {
    let client = client_or_skip(name)?;
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(seconds));
    Some((client, group))
}

/// `n` deterministic inputs in [lo, hi): 1,000 levels in a scrambled order, shifted by `salt`
/// so that several operands differ.
pub fn data(n: usize, salt: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|i| lo + (hi - lo) * (((i + salt) * 7919) % 1000) as f32 / 1000.0)
        .collect()
}

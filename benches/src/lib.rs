//! Helpers shared by the criterion benches: device-synchronised timing.

use std::time::{Duration, Instant};

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

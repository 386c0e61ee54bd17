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

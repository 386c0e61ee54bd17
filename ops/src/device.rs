//! Compute clients and device capability checks.

use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;

use crate::element::FloatElement;
use crate::error::OpError;

/// Creates the runtime's client for `device`, turning a missing adapter or driver (which the
/// runtimes report by panicking) into an error. The runtime's panic message is still printed
/// by the panic hook; the hook is process-global, and swapping it here would race with other
/// threads.
pub fn try_client<R: Runtime>(device: &R::Device) -> Result<ComputeClient<R>, OpError> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| R::client(device)));
    result.map_err(|payload| {
        let reason = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the runtime panicked while opening the device".to_string());
        OpError::NoDevice {
            runtime: std::any::type_name::<R>(),
            reason,
        }
    })
}

/// Checks that the device stores and computes with `E`.
pub fn ensure_dtype<R: Runtime, E: FloatElement>(
    client: &ComputeClient<R>,
    op: &'static str,
) -> Result<(), OpError> {
    if client.properties().supports_type(E::cube_type()) {
        Ok(())
    } else {
        Err(OpError::UnsupportedDtype {
            op,
            dtype: E::NAME,
            device: std::any::type_name::<R>().to_string(),
        })
    }
}

/// The widest vector the device loads efficiently for `E` that divides every length given.
pub fn vector_size_for<R: Runtime, E: FloatElement>(
    client: &ComputeClient<R>,
    lengths: &[usize],
) -> usize {
    crate::profile::widest_vector(&client.properties().hardware, E::DTYPE.bytes(), lengths)
}

/// Launch geometry for `units` independent units in one dimension: the runtime's default cube
/// size for that much work, and enough cubes (spread over x, y, z within the device limits) to
/// cover them. Kernels bounds-check `ABSOLUTE_POS`, since the count may overshoot.
pub fn grid_1d<R: Runtime>(client: &ComputeClient<R>, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, units);
    let cubes = units.div_ceil(dim.num_elems() as usize) as u32;
    (CubeCountSelection::new(client, cubes).cube_count(), dim)
}

/// Launches `kernel` (a `launch_unchecked` path) over `units` independent units in one
/// dimension with the geometry of [`grid_1d`]: the client, the cube count and the cube size go
/// ahead of the arguments given. It expands to the unchecked launch, so it stands inside the
/// caller's `unsafe` block, whose SAFETY note says why the launch is sound.
macro_rules! launch_1d {
    ($kernel:path [$client:expr, $units:expr] $($arg:expr),* $(,)?) => {{
        let client = $client;
        let (count, dim) = $crate::device::grid_1d(client, $units);
        $kernel(client, count, dim, $($arg),*)
    }};
}
pub(crate) use launch_1d;

/// The largest single buffer the device allocates, in bytes (wgpu: the storage-buffer binding
/// limit, 128 MiB on many Vulkan drivers). Callers that size buffers from the problem (the
/// model's sequence chunks) stay under it.
pub fn max_buffer_bytes<R: Runtime>(client: &ComputeClient<R>) -> usize {
    usize::try_from(client.properties().memory.max_page_size).unwrap_or(usize::MAX)
}

//! What CUDA this machine has, asked of the driver API through `cudarc` (which loads
//! `libcuda.so` at run time, so a build with the `cuda` feature runs on machines without it).
//! `--device auto|cuda` and `megabyte info --device cuda` ask here before they open a
//! runtime, and say in one line why when there is no CUDA.

use cudarc::driver::{result, sys};

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor): (9, 0) for sm_90.
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

impl std::fmt::Display for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "cuda:{} {} (sm_{major}{minor}, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.memory_bytes as f64 / (1u64 << 30) as f64
        )
    }
}

/// The CUDA devices, or why there are none: no driver library on the loader's path, a driver
/// that does not start, or no device.
pub fn devices() -> Result<Vec<CudaDevice>, String> {
    // SAFETY: only probes whether the driver library loads; nothing is called through it.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver: libcuda.so is not on the loader's path".into());
    }
    fn why(what: &'static str) -> impl Fn(result::DriverError) -> String {
        move |e| format!("CUDA driver: {what}: {e}")
    }
    result::init().map_err(why("cuInit failed"))?;
    let count = result::device::get_count().map_err(why("counting devices"))?;
    if count <= 0 {
        return Err("CUDA driver found no device".into());
    }
    (0..count)
        .map(|i| {
            let dev = result::device::get(i).map_err(why("opening a device"))?;
            let name = result::device::get_name(dev).map_err(why("reading a name"))?;
            let attribute = |a| {
                // SAFETY: `dev` came from `device::get` above.
                unsafe { result::device::get_attribute(dev, a) }
                    .map_err(why("reading an attribute"))
            };
            use sys::CUdevice_attribute::*;
            let major = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            // SAFETY: as above.
            let memory =
                unsafe { result::device::total_mem(dev) }.map_err(why("reading memory"))?;
            Ok(CudaDevice {
                ordinal: i as usize,
                name,
                compute_capability: (major, minor),
                memory_bytes: memory,
            })
        })
        .collect()
}

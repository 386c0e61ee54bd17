//! What the planners read of a device, as plain data: [`DeviceProfile`].
//!
//! A launcher takes the profile of its client ([`DeviceProfile::of`]) and hands it to the
//! family's planner, a pure function of the problem and the profile. The named profiles
//! ([`DeviceProfile::lavapipe`], [`DeviceProfile::cuda_sm80`], [`DeviceProfile::cuda_sm90`],
//! [`DeviceProfile::hip_gfx90a`]) let the tests and the code-generation checks plan for devices
//! this machine does not have: the CUDA check compiles what an A100 or an H100 would launch.

use cubecl::ir::features::MmaConfig;
use megabyte_kernels::gemm::FRAGMENT;

use crate::gemm::CMMA_PLANE;
use cubecl::ir::HardwareProperties;
use cubecl::prelude::*;

/// Element types the planners distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The dtype of a float element type by its name (`FloatElement::NAME`).
    pub fn of_name(name: &str) -> Option<Dtype> {
        match name {
            "f32" => Some(Dtype::F32),
            "f16" => Some(Dtype::F16),
            "bf16" => Some(Dtype::Bf16),
            _ => None,
        }
    }
}

/// Everything a planner may read of a device, taken from `client.properties()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceProfile {
    /// For tables and messages ("lavapipe", "cuda sm_90", or the runtime's name).
    pub name: &'static str,
    /// Cube and unit limits, shared memory, plane sizes, load width and vector sizes, as the
    /// runtime reports them.
    pub hardware: HardwareProperties,
    /// Plane (warp) operations: sums, broadcasts, shuffles across a plane.
    pub plane_ops: bool,
    /// 16 × 16 × 16 CMMA fragments with f32 accumulation in 32-unit planes, per input type.
    pub cmma_f16: bool,
    pub cmma_bf16: bool,
    /// Element types the device stores and computes with.
    pub f16: bool,
    pub bf16: bool,
    /// The largest single buffer, in bytes.
    pub max_buffer: usize,
}

impl DeviceProfile {
    /// The profile of the device behind `client`.
    pub fn of<R: Runtime>(client: &ComputeClient<R>) -> Self {
        let props = client.properties();
        let hw = props.hardware.clone();
        let f32_t = f32::cube_type();
        let (plane, f) = (CMMA_PLANE as u32, FRAGMENT as u32);
        let mma = |e: StorageType| {
            hw.plane_size_min == plane
                && hw.plane_size_max == plane
                && props.features.matmul.cmma.contains(&MmaConfig {
                    a_type: e,
                    b_type: e,
                    cd_type: f32_t,
                    m: f,
                    n: f,
                    k: f,
                })
        };
        let f16_t = half::f16::cube_type();
        let bf16_t = half::bf16::cube_type();
        DeviceProfile {
            name: R::name(client),
            plane_ops: props.features.plane.contains(cubecl::features::Plane::Ops),
            cmma_f16: mma(f16_t),
            cmma_bf16: mma(bf16_t),
            f16: props.supports_type(f16_t),
            bf16: props.supports_type(bf16_t),
            max_buffer: usize::try_from(props.memory.max_page_size).unwrap_or(usize::MAX),
            hardware: hw,
        }
    }

    /// The vector widths worth loading `dtype` with, widest first (cubecl's
    /// `io_optimized_vector_sizes`: the load width over the element's bits, capped by the
    /// device's largest vector).
    pub fn vector_sizes(&self, dtype: Dtype) -> impl Iterator<Item = usize> {
        vector_sizes(&self.hardware, dtype.bytes())
    }

    /// The widest vector for `dtype` that divides every length given (1 if none).
    pub fn vector_for(&self, dtype: Dtype, lengths: &[usize]) -> usize {
        widest_vector(&self.hardware, dtype.bytes(), lengths)
    }

    /// Whether the device has the CMMA fragments the tensor-core kernels use for `dtype`.
    pub fn cmma(&self, dtype: Dtype) -> bool {
        match dtype {
            Dtype::F32 => false,
            Dtype::F16 => self.cmma_f16,
            Dtype::Bf16 => self.cmma_bf16,
        }
    }

    /// Mesa's lavapipe (llvmpipe) through cubecl-wgpu 0.10, as it reports itself on the
    /// machines this project is tested on (Mesa 22.3, LLVM 15, two cores): no plane ops (the
    /// WGSL path hides them), no CMMA, 32 KiB of shared memory, 128 MiB buffers.
    /// `profile::tests` checks it against the live adapter when that is lavapipe.
    pub fn lavapipe() -> Self {
        DeviceProfile {
            name: "lavapipe",
            hardware: HardwareProperties {
                load_width: 128,
                plane_size_min: 8,
                plane_size_max: 8,
                max_bindings: 31,
                max_shared_memory_size: 32_768,
                max_cube_count: (65_535, 65_535, 65_535),
                max_units_per_cube: 1024,
                max_cube_dim: (1024, 1024, 1024),
                num_streaming_multiprocessors: None,
                num_cpu_cores: None,
                num_tensor_cores: None,
                min_tensor_cores_dim: None,
                max_vector_size: 4,
            },
            plane_ops: false,
            cmma_f16: false,
            cmma_bf16: false,
            f16: true,
            bf16: false,
            max_buffer: 134_217_728,
        }
    }

    /// A GPU with `lanes`-wide planes, 128-bit loads, no cap on vector sizes, 1024 units per
    /// cube (up to `max_z` along z), plane ops and f16, and a quarter of its `memory` as the
    /// largest buffer; no CMMA and no bf16 (the CUDA profiles add them).
    fn gpu(
        name: &'static str,
        lanes: u32,
        shared: usize,
        sms: u32,
        memory: u64,
        max_z: u32,
    ) -> Self {
        DeviceProfile {
            name,
            hardware: HardwareProperties {
                load_width: 128,
                plane_size_min: lanes,
                plane_size_max: lanes,
                max_bindings: 1024,
                max_shared_memory_size: shared,
                max_cube_count: (2_147_483_647, 65_535, 65_535),
                max_units_per_cube: 1024,
                max_cube_dim: (1024, 1024, max_z),
                num_streaming_multiprocessors: Some(sms),
                num_cpu_cores: None,
                num_tensor_cores: None,
                min_tensor_cores_dim: None,
                max_vector_size: usize::MAX,
            },
            plane_ops: true,
            cmma_f16: false,
            cmma_bf16: false,
            f16: true,
            bf16: false,
            max_buffer: (memory / 4) as usize,
        }
    }

    /// A CUDA device as cubecl-cuda 0.10 reports it (`runtime.rs`: 32-lane warps, 128-bit
    /// loads, no cap on vector sizes, 1024 threads per block (64 along z), plane ops, WMMA
    /// fragments for f16 and bf16, a quarter of the memory as the largest buffer), with the
    /// shared memory per block (opt-in), SM count and memory of the given part.
    fn cuda(name: &'static str, shared: usize, sms: u32, memory: u64) -> Self {
        let mut profile = Self::gpu(name, 32, shared, sms, memory, 64);
        profile.hardware.num_tensor_cores = Some(4);
        profile.hardware.min_tensor_cores_dim = Some(8);
        DeviceProfile {
            cmma_f16: true,
            cmma_bf16: true,
            bf16: true,
            ..profile
        }
    }

    /// An A100 (sm_80, 80 GB): 163 KiB of shared memory per block, 108 SMs.
    pub fn cuda_sm80() -> Self {
        Self::cuda("cuda sm_80", 166_912, 108, 80 << 30)
    }

    /// An H100 SXM (sm_90, 80 GB): 227 KiB of shared memory per block, 132 SMs.
    pub fn cuda_sm90() -> Self {
        Self::cuda("cuda sm_90", 232_448, 132, 80 << 30)
    }

    /// An MI200-class part (gfx90a) as a HIP runtime would report it: 64-lane wavefronts,
    /// 64 KiB of LDS per workgroup, 1024 work items, no CMMA the kernels can use here (ROCm 5.2
    /// has no rocWMMA), no bf16 headers the HIP dialect can include.
    pub fn hip_gfx90a() -> Self {
        Self::gpu("hip gfx90a", 64, 65_536, 110, 64 << 30, 1024)
    }
}

/// The vector widths worth loading `bytes`-wide elements with on hardware `hw`, widest first.
fn vector_sizes(hw: &HardwareProperties, bytes: usize) -> impl Iterator<Item = usize> {
    let max = (hw.load_width as usize / (bytes * 8))
        .min(hw.max_vector_size)
        .max(1);
    let candidates = max.trailing_zeros() + 1;
    (0..candidates).rev().map(|i| 1usize << i)
}

/// The widest of [`vector_sizes`] that divides every length given (1 if none); what every
/// launcher's vector width comes from (`device::vector_size_for` on a live client).
pub(crate) fn widest_vector(hw: &HardwareProperties, bytes: usize, lengths: &[usize]) -> usize {
    vector_sizes(hw, bytes)
        .find(|&v| lengths.iter().all(|&n| n % v == 0))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_sizes_follow_the_load_width() {
        let lvp = DeviceProfile::lavapipe();
        assert_eq!(lvp.vector_sizes(Dtype::F32).collect::<Vec<_>>(), [4, 2, 1]);
        assert_eq!(lvp.vector_sizes(Dtype::F16).collect::<Vec<_>>(), [4, 2, 1]);
        let h100 = DeviceProfile::cuda_sm90();
        assert_eq!(h100.vector_sizes(Dtype::F32).collect::<Vec<_>>(), [4, 2, 1]);
        assert_eq!(
            h100.vector_sizes(Dtype::F16).collect::<Vec<_>>(),
            [8, 4, 2, 1]
        );
        assert_eq!(h100.vector_for(Dtype::Bf16, &[64, 24]), 8);
        assert_eq!(h100.vector_for(Dtype::Bf16, &[64, 20]), 4);
        assert_eq!(h100.vector_for(Dtype::F32, &[7]), 1);
    }
}

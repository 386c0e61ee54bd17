//! Host launchers for the MEGABYTE CubeCL kernels, generic over `R: cubecl::Runtime`.
//!
//! Each launcher validates shapes and device features, picks vectorisation and launch geometry
//! from `client.properties()`, and returns `Result<_, OpError>`; bad input is an error naming
//! the offending value, never a panic.
//!
//! Runtime features: `wgpu` (default; Vulkan, Metal, DX12, and CPU Vulkan drivers such as
//! lavapipe), `cuda`, `hip` (needs ROCm to link).

pub mod activation;
pub mod attention;
pub mod copy;
pub mod cross_entropy;
pub mod decode;
pub mod device;
pub mod element;
pub mod embedding;
pub mod error;
pub mod gemm;
pub mod layer_norm;
pub mod local_input;
pub mod optim;
pub mod patch_embed;
pub mod profile;
pub mod record;
pub mod reduce;
pub mod tensor;

pub use attention::AttentionKernel;
pub use cubecl;
pub use device::{ensure_dtype, max_buffer_bytes, try_client};
pub use element::FloatElement;
pub use error::OpError;
pub use gemm::{Epilogue, GemmProblem};
pub use megabyte_kernels::activation::ActivationKind;
pub use profile::{DeviceProfile, Dtype};
pub use tensor::{Tensor, TensorView};

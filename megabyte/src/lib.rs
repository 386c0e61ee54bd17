//! MEGABYTE: a multiscale byte-level transformer (Yu et al., "MEGABYTE: Predicting Million-byte
//! Sequences with Multiscale Transformers", arXiv 2305.07185), on CubeCL kernels.
//!
//! A large global transformer runs over patches of P bytes; a small local transformer predicts
//! the bytes inside each patch. The configuration, parameter layout and the CPU reference model
//! live in `megabyte-reference` and are re-exported here; [`Model`] runs the forward pass on a
//! device through the launchers of `megabyte-ops`, [`Generator`] samples with KV caches, and
//! [`checkpoint`] reads and writes safetensors files.
//!
//! ```no_run
//! use megabyte::ops::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
//! use megabyte::{checkpoint, GenerateOptions, Generator, Model, Sampling};
//!
//! fn main() -> Result<(), megabyte::Error> {
//!     let client = megabyte::ops::try_client::<WgpuRuntime>(&WgpuDevice::default())?;
//!     let ckpt = checkpoint::load("model.safetensors")?;
//!     let model = Model::<WgpuRuntime>::new(&client, &ckpt.config, &ckpt.weights)?;
//!     let sampling = Sampling { temperature: 0.8, top_k: 0, top_p: 0.95, seed: 1 };
//!     let opts = GenerateOptions { max_new: 200, sampling, stop: vec![b"\n\n".to_vec()] };
//!     let gen = Generator::new(&model, opts)?;
//!     gen.generate(&[b"fn main() {"], |_, byte| print!("{}", byte as char))?;
//!     Ok(())
//! }
//! ```

mod block;
mod cache;
pub mod checkpoint;
pub mod corpus;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod eval;
pub mod generate;
pub mod info;
pub mod model;
#[cfg(feature = "plot")]
pub mod plot;
pub mod train;
mod weights;

pub use error::Error;
pub use generate::{
    DecodeKernel, DecodeModel, Decoder, GenerateOptions, Generator, ReferenceDecoder,
    ReferenceModel, StepDecoder,
};
pub use megabyte_ops as ops;
pub use megabyte_reference as reference;
pub use megabyte_reference::{Activation, Config, ConfigError, Sampling, Weights, PRESET_NAMES};
pub use model::Model;

//! Pure-Rust CPU reference for MEGABYTE (Yu et al., "MEGABYTE: Predicting Million-byte
//! Sequences with Multiscale Transformers", arXiv 2305.07185).
//!
//! Plain loops, f32 storage, f64 accumulation, one function per op with a shape comment on
//! every argument. It is the oracle every kernel and the device model are tested against, and
//! it is the `cpu` device of the `megabyte` program.
//!
//! Layouts are row-major and contiguous. Shape letters: B batch, T sequence, K = T / P patches,
//! P patch, C channels, NH heads, HS head size, V vocabulary, D_G / D_L global / local width.

// Ops take every buffer and every dimension as explicit arguments, as llm.c's reference does:
// the signature is the op's documentation.
#![allow(clippy::too_many_arguments)]

pub mod activation;
pub mod attention;
pub mod config;
pub mod cross_entropy;
pub mod error;
pub mod ffn;
pub mod gemm;
pub mod generate;
pub mod layer_norm;
pub mod local_input;
pub mod model;
pub mod patch_embed;
pub mod weights;

pub use config::{Activation, Config, ConfigError, PRESET_NAMES};
pub use error::Error;
pub use generate::{generate, generate_batch, Sampler, Sampling};
pub use model::{forward, loss_bits_per_byte};
pub use weights::{Params, Weights};

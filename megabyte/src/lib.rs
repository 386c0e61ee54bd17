//! MEGABYTE: a multiscale byte-level transformer (Yu et al., "MEGABYTE: Predicting Million-byte
//! Sequences with Multiscale Transformers", arXiv 2305.07185), on CubeCL kernels.
//!
//! A large global transformer runs over patches of P bytes; a small local transformer predicts
//! the bytes inside each patch. The configuration, parameter layout and the CPU reference model
//! live in `megabyte-reference` and are re-exported here; the device model builds on the
//! launchers of `megabyte-ops`.

pub use megabyte_ops as ops;
pub use megabyte_reference as reference;
pub use megabyte_reference::{Activation, Config, ConfigError, Sampling, Weights, PRESET_NAMES};

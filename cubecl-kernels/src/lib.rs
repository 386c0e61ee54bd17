//! CubeCL kernels for MEGABYTE. Device code only: every kernel here is launched, validated and
//! tested through its host launcher in `megabyte-ops`, generic over `cubecl::Runtime`.
//!
//! One kernel family per file (a folder, `attention/` and `gemm/`, where a family has several
//! variants), with the same stem as its launcher in `ops/`, its oracle in
//! `reference/`, its tests in `tests/` and its bench in `benches/`.

pub mod activation;
pub mod attention;
pub mod copy;
pub mod cross_entropy;
pub mod decode;
pub mod embedding;
pub mod fragment;
pub mod gemm;
pub mod layer_norm;
pub mod local_input;
pub mod optim;
pub mod patch_embed;
pub mod reduce;

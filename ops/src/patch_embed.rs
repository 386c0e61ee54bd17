//! Launcher for the fused global input: bytes to (B, K, P·D_G) in one kernel.

use cubecl::prelude::*;
use megabyte_kernels::patch_embed::patch_embed as patch_embed_kernel;

use crate::device::{ensure_dtype, launch_1d, vector_size_for};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::tensor::Tensor;

const OP: &str = "patch_embed";

/// out[b, 0] = pad; out[b, k] = the embeddings of bytes (k-1)·P .. k·P (each `wte[id] +
/// wpe[t]`), laid side by side as one P·D vector. Shapes: ids (B, T) with T a multiple of
/// `patch`, wte (V, D), wpe (T_max >= T, D), pad (P·D), out (B, T/P, P·D).
///
/// Ids are not checked on the host (that would need a read-back); an id >= V turns its
/// embedding into NaN, so a bad id can never pass as a plausible number.
pub fn patch_embed<R: Runtime, E: FloatElement>(
    ids: &Tensor<R, u32>,
    wte: &Tensor<R, E>,
    wpe: &Tensor<R, E>,
    pad: &Tensor<R, E>,
    out: &Tensor<R, E>,
    patch: usize,
) -> Result<(), OpError> {
    let t = ids.shape().get(1).copied().unwrap_or(0);
    if patch == 0 || t % patch != 0 {
        return Err(OpError::unsupported(
            OP,
            "sequence length",
            t,
            format!("must be a multiple of the patch size {patch}"),
        ));
    }
    let b = ids.shape().first().copied().unwrap_or(0);
    let d = wte.shape().get(1).copied().unwrap_or(0);
    if wpe.shape().len() != 2 || wpe.shape()[1] != d || wpe.shape()[0] < t {
        return Err(OpError::shape(OP, "wpe", wpe.shape(), vec![t, d]));
    }
    out.expect_shape(OP, "out", &[b, t / patch, patch * d])?;
    patch_embed_window(ids, 0, wte, wpe, pad, out, patch, 0)
}

/// The global input for patches `first_patch .. first_patch + K'` only, out (B, K', P·D): what
/// a decoding step needs. `ids` (B, T_ids) holds the bytes from position `ids_start` on and must
/// cover every byte those patches embed, (first_patch - 1)·P .. (first_patch + K' - 1)·P
/// (none for patch 0, the pad); wpe must have a row for each of them.
#[allow(clippy::too_many_arguments)]
pub fn patch_embed_window<R: Runtime, E: FloatElement>(
    ids: &Tensor<R, u32>,
    ids_start: usize,
    wte: &Tensor<R, E>,
    wpe: &Tensor<R, E>,
    pad: &Tensor<R, E>,
    out: &Tensor<R, E>,
    patch: usize,
    first_patch: usize,
) -> Result<(), OpError> {
    let client = out.client();
    ensure_dtype::<R, E>(client, OP)?;
    if ids.shape().len() != 2 {
        return Err(OpError::shape(OP, "ids", ids.shape(), vec![0, 0]));
    }
    if wte.shape().len() != 2 {
        return Err(OpError::shape(OP, "wte", wte.shape(), vec![0, 0]));
    }
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let d = wte.shape()[1];
    if b == 0 || t == 0 || d == 0 || wte.shape()[0] == 0 {
        let (name, shape) = if b == 0 || t == 0 {
            ("ids", ids.shape())
        } else {
            ("wte", wte.shape())
        };
        return Err(OpError::empty(OP, name, shape.to_vec()));
    }
    if patch == 0 {
        return Err(OpError::unsupported(
            OP,
            "patch",
            patch,
            "must be at least 1",
        ));
    }
    if out.shape().len() != 3 || out.shape()[0] != b || out.shape()[2] != patch * d {
        return Err(OpError::shape(
            OP,
            "out",
            out.shape(),
            vec![b, 0, patch * d],
        ));
    }
    let k_len = out.shape()[1];
    if k_len == 0 {
        return Err(OpError::empty(OP, "out", out.shape().to_vec()));
    }
    // Bytes the patches read: (first - 1)·P .. (first + K' - 1)·P, none for the pad patch.
    let first_byte = first_patch.saturating_sub(1) * patch;
    let end_byte = (first_patch + k_len).saturating_sub(1) * patch;
    if end_byte > first_byte && (ids_start > first_byte || ids_start + t < end_byte) {
        return Err(OpError::unsupported(OP, "ids start", ids_start, format!(
                "ids cover bytes {ids_start}..{}, patches {first_patch}..{} need {first_byte}..{end_byte}",
                ids_start + t,
                first_patch + k_len
            )));
    }
    if wpe.shape().len() != 2 || wpe.shape()[1] != d || wpe.shape()[0] < end_byte {
        return Err(OpError::shape(OP, "wpe", wpe.shape(), vec![end_byte, d]));
    }
    pad.expect_shape(OP, "pad", &[patch * d])?;
    let vector = vector_size_for::<R, E>(client, &[d]);
    // SAFETY: shapes checked above; `vector` divides D so no vector straddles two rows; the
    // kernel guards on `out.len()` and reads wte only at ids < V.
    unsafe {
        launch_1d!(patch_embed_kernel::launch_unchecked::<E, R>[client, out.len() / vector]
            vector, ids.arg(), wte.arg(), wpe.arg(), pad.arg(), out.arg(), patch, first_patch,
            ids_start);
    }
    Ok(())
}

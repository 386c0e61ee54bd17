//! Launcher for the fused global input: bytes to (B, K, P·D_G) in one kernel.

use cubecl::prelude::*;
use megabyte_kernels::patch_embed::patch_embed as patch_embed_kernel;

use crate::device::{ensure_dtype, grid_1d, vector_size_for};
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
        return Err(OpError::Empty {
            op: OP,
            tensor: name,
            shape: shape.to_vec(),
        });
    }
    if patch == 0 || t % patch != 0 {
        return Err(OpError::Unsupported {
            op: OP,
            what: "sequence length",
            value: t,
            reason: format!("must be a multiple of the patch size {patch}"),
        });
    }
    if wpe.shape().len() != 2 || wpe.shape()[1] != d || wpe.shape()[0] < t {
        return Err(OpError::shape(OP, "wpe", wpe.shape(), vec![t, d]));
    }
    pad.expect_shape(OP, "pad", &[patch * d])?;
    out.expect_shape(OP, "out", &[b, t / patch, patch * d])?;
    let vector = vector_size_for::<R, E>(client, &[d]);
    let (count, dim) = grid_1d(client, out.len() / vector);
    // SAFETY: shapes checked above; `vector` divides D so no vector straddles two rows; the
    // kernel guards on `out.len()` and reads wte only at ids < V.
    unsafe {
        patch_embed_kernel::launch_unchecked::<E, R>(
            client,
            count,
            dim,
            vector,
            ids.arg(),
            wte.arg(),
            wpe.arg(),
            pad.arg(),
            out.arg(),
            patch,
        );
    }
    Ok(())
}

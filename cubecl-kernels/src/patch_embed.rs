//! The global model's input in one pass: byte embedding, position embedding, patchify and the
//! shift right by one patch, from byte ids straight to (B, K, P·D_G).

use cubecl::prelude::*;

/// out[b, k, p·D + d] = pad[p·D + d] for k = 0, else
/// wte[x[b, t], d] + wpe[t, d] with t = (k-1)·P + p (the last patch of x is not used).
///
/// One unit per output vector (N lanes along d). `ids` is (B, T), `wte` (V, D), `wpe`
/// (T_max >= T, D), `pad` (P·D), `out` (B, K, P·D), all contiguous. An id >= V yields NaN in
/// its row instead of an out-of-bounds read; the launcher documents it.
#[cube(launch_unchecked)]
pub fn patch_embed<F: Float, N: Size>(
    ids: &Tensor<u32>,
    wte: &Tensor<Vector<F, N>>,
    wpe: &Tensor<Vector<F, N>>,
    pad: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    patch: usize,
) {
    if ABSOLUTE_POS < out.len() {
        let nv = N::value();
        let t_len = ids.shape(1);
        let vocab = wte.shape(0);
        let dv = wte.shape(1) / nv;
        let w = patch * dv;
        let k_len = t_len / patch;
        let b = ABSOLUTE_POS / (k_len * w);
        let rem = ABSOLUTE_POS % (k_len * w);
        let k = rem / w;
        let j = rem % w;
        if k == 0 {
            out[ABSOLUTE_POS] = pad[j];
        } else {
            let t = (k - 1) * patch + j / dv;
            let d = j % dv;
            let raw = ids[b * t_len + t];
            let id = raw as usize;
            // NaN from the bits of a runtime value (WGSL has no NaN literal).
            let mut v = Vector::<f32, N>::new(f32::reinterpret(0x7FC0_0000u32 | (raw & 1u32)));
            if id < vocab {
                v = Vector::<f32, N>::cast_from(wte[id * dv + d])
                    + Vector::<f32, N>::cast_from(wpe[t * dv + d]);
            }
            out[ABSOLUTE_POS] = Vector::cast_from(v);
        }
    }
}

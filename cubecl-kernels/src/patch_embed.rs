//! The global model's input in one pass: byte embedding, position embedding, patchify and the
//! shift right by one patch, from byte ids straight to (B, K, P·D_G).

use cubecl::prelude::*;

/// out[b, k', p·D + d] for the global patch k = first_patch + k': pad[p·D + d] for k = 0, else
/// wte[x[b, t - ids_start], d] + wpe[t, d] with t = (k-1)·P + p.
///
/// The whole-sequence forward calls it with `first_patch = ids_start = 0` and ids covering
/// every byte (the last patch of x is then not used); a decoding step embeds one patch k with
/// the ids of patch k-1 only (`ids_start = (k-1)·P`).
///
/// One unit per output vector (N lanes along d). `ids` is (B, T_ids), `wte` (V, D), `wpe`
/// (T_max, D), `pad` (P·D), `out` (B, K', P·D), all contiguous; the launcher checks that ids and
/// wpe cover every position read. An id >= V yields NaN in its row instead of an out-of-bounds
/// read; the launcher documents it.
#[cube(launch_unchecked)]
pub fn patch_embed<F: Float, N: Size>(
    ids: &Tensor<u32>,
    wte: &Tensor<Vector<F, N>>,
    wpe: &Tensor<Vector<F, N>>,
    pad: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    patch: usize,
    first_patch: usize,
    ids_start: usize,
) {
    if ABSOLUTE_POS < out.len() {
        let nv = N::value();
        let t_len = ids.shape(1);
        let vocab = wte.shape(0);
        let dv = wte.shape(1) / nv;
        let w = patch * dv;
        let k_len = out.shape(1);
        let b = ABSOLUTE_POS / (k_len * w);
        let rem = ABSOLUTE_POS % (k_len * w);
        let k = first_patch + rem / w;
        let j = rem % w;
        if k == 0 {
            out[ABSOLUTE_POS] = pad[j];
        } else {
            let t = (k - 1) * patch + j / dv;
            let d = j % dv;
            let raw = ids[b * t_len + t - ids_start];
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

//! The local model's input in one kernel: the global output projected to the local width (a
//! GEMM over all B·T byte rows) with an epilogue that gathers the embedding of the previous byte
//! of the patch (the learned local pad at p = 0) and adds the local position embedding.

use cubecl::prelude::*;

use crate::gemm::{block_pos, main_loop, tile_vector, GemmConfig, STAGE_VECTOR};

/// `out[r, :] = g[r, :] · W_GL + (p == 0 ? lpad : E_L[ids[r - 1]]) + lpos[p]` for each byte row
/// r = b·T + t, p = t mod P. `g` is (1, B·T, D_G), i.e. (B, K, P·D_G) seen per byte, `w` is
/// (1, D_G, D_L), `ids` (B·T), `e_l` (V, D_L), `lpad` (D_L), `lpos` (P, D_L) (a placeholder
/// unless `positions`), `out` (1, B·T, D_L). The main loop is the one `cfg` names. An id >= V
/// gives a NaN row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn local_input<F: Float, NA: Size, NB: Size, NO: Size, S: Size>(
    g: &Tensor<Vector<F, NA>>,
    w: &Tensor<Vector<F, NB>>,
    ids: &Tensor<u32>,
    e_l: &Tensor<Vector<F, NO>>,
    lpad: &Tensor<Vector<F, NO>>,
    lpos: &Tensor<Vector<F, NO>>,
    out: &mut Tensor<Vector<F, NO>>,
    patch: usize,
    #[comptime] cfg: GemmConfig,
    #[comptime] positions: bool,
) {
    let m = g.shape(1);
    let n = w.shape(2);
    let pos = block_pos(m, 1, cfg.block_m, cfg.block_n);
    if pos.batch < 1 {
        let mut acc =
            Array::<Vector<f32, S>>::new(comptime!(cfg.tile_m * cfg.tile_n / STAGE_VECTOR));
        main_loop::<F, NA, NB, S>(g, w, 0, 0, pos, &mut acc, cfg);

        let vo = cfg.vector_out;
        let vocab = e_l.shape(0);
        let row0 = pos.m0 + UNIT_POS_Y as usize * cfg.tile_m;
        let col0 = pos.n0 + UNIT_POS_X as usize * cfg.tile_n;
        #[unroll]
        for i in 0..cfg.tile_m {
            let gm = row0 + i;
            if gm < m {
                let p = gm % patch;
                let mut id = vocab;
                let mut raw = 0u32;
                if p > 0 {
                    raw = ids[gm - 1];
                    id = raw as usize;
                }
                #[unroll]
                for jv in 0..comptime!(cfg.tile_n / cfg.vector_out) {
                    let gn = col0 + jv * vo;
                    if gn < n {
                        let mut v = tile_vector::<NO, S>(&acc, i, jv, cfg);
                        if p == 0 {
                            v += Vector::cast_from(lpad[gn / vo]);
                        } else if id < vocab {
                            v += Vector::cast_from(e_l[(id * n + gn) / vo]);
                        } else {
                            // NaN from runtime bits (WGSL has no NaN literal).
                            v = Vector::new(f32::reinterpret(0x7FC0_0000u32 | (raw & 1u32)));
                        }
                        if comptime!(positions) {
                            v += Vector::cast_from(lpos[(p * n + gn) / vo]);
                        }
                        out[(gm * n + gn) / vo] = Vector::cast_from(v);
                    }
                }
            }
        }
    }
}

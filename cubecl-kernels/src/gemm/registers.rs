//! The registers main loop: no shared memory and no barriers, operands streamed from cache.

use cubecl::prelude::*;

use super::{BlockPos, GemmConfig, STAGE_VECTOR};

/// The main loop of [`gemm()`] with `cfg.registers`: no shared memory and no barriers; each
/// unit streams its rows of A (vectors along k) and its columns of B (vectors along n)
/// straight from global memory, four k at a time, and accumulates its register tile.
/// Neighbouring units read the same rows and columns, which caches serve; on CPU drivers, where
/// barriers are expensive and caches large, this beats staging through shared memory.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn register_main_loop<F: Float, NA: Size, NB: Size, S: Size>(
    a: &Tensor<Vector<F, NA>>,
    b: &Tensor<Vector<F, NB>>,
    a_offset: usize,
    b_offset: usize,
    pos: BlockPos,
    acc: &mut Array<Vector<f32, S>>,
    #[comptime] cfg: GemmConfig,
) {
    let sv = STAGE_VECTOR;
    let tqn = comptime!(cfg.tile_n / STAGE_VECTOR);
    let va = cfg.vector_a;
    let vb = cfg.vector_b;
    let m = a.shape(1);
    let k_len = a.shape(2);
    let n = b.shape(2);
    let row0 = pos.m0 + UNIT_POS_Y as usize * cfg.tile_m;
    let col0 = pos.n0 + UNIT_POS_X as usize * cfg.tile_n;
    let a_base = a_offset + pos.batch * a.stride(0);
    let b_base = b_offset + pos.batch * b.stride(0);
    let sam = a.stride(1);
    let sbk = b.stride(1);
    #[unroll]
    for i in 0..comptime!(cfg.tile_m * cfg.tile_n / STAGE_VECTOR) {
        acc[i] = Vector::new(0.0);
    }
    let mut ak = Array::<Vector<f32, S>>::new(cfg.tile_m);
    let mut bq = Array::<Vector<f32, S>>::new(tqn);
    let steps = k_len.div_ceil(sv);
    let mut step = 0;
    while step < steps {
        let k0 = step * sv;
        #[unroll]
        for r in 0..cfg.tile_m {
            let gm = row0 + r;
            let mut quad = Vector::<f32, S>::new(0.0);
            #[unroll]
            for c in 0..comptime!(STAGE_VECTOR / cfg.vector_a) {
                let gk = k0 + c * va;
                let mut v = Vector::<f32, NA>::new(0.0);
                if gm < m && gk < k_len {
                    v = Vector::cast_from(a[(a_base + gm * sam + gk) / va]);
                }
                #[unroll]
                for e in 0..va {
                    quad[c * va + e] = v[e];
                }
            }
            ak[r] = quad;
        }
        #[unroll]
        for kk in 0..sv {
            let gk = k0 + kk;
            #[unroll]
            for j in 0..tqn {
                let mut quad = Vector::<f32, S>::new(0.0);
                #[unroll]
                for c in 0..comptime!(STAGE_VECTOR / cfg.vector_b) {
                    let gn = col0 + j * sv + c * vb;
                    let mut v = Vector::<f32, NB>::new(0.0);
                    if gk < k_len && gn < n {
                        v = Vector::cast_from(b[(b_base + gk * sbk + gn) / vb]);
                    }
                    #[unroll]
                    for e in 0..vb {
                        quad[c * vb + e] = v[e];
                    }
                }
                bq[j] = quad;
            }
            #[unroll]
            for r in 0..cfg.tile_m {
                let av = Vector::<f32, S>::new(ak[r][kk]);
                #[unroll]
                for j in 0..tqn {
                    acc[r * tqn + j] += av * bq[j];
                }
            }
        }
        step += 1;
    }
}

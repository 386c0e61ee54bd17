//! The tiled main loop: operand tiles staged through shared memory as f32, a register tile per unit.

use cubecl::prelude::*;

use super::{
    register_main_loop, source, BlockPos, GemmConfig, StageShape, TileSource, STAGE_VECTOR,
};

/// Stages the `block_k × block_o` tile at depth `k0` of an operand into shared memory as f32
/// vectors of [`STAGE_VECTOR`] along o: `smem[k · block_o/S + o/S]`, read from `src` (out of
/// range elements stage as zero). Global loads are vectors of NV along k (`shape.along_k`) or
/// along o; along o, `src.o_len` must be a multiple of NV.
#[cube]
fn stage_tile<F: Float, NV: Size, S: Size>(
    t: &Tensor<Vector<F, NV>>,
    smem: &mut SharedMemory<Vector<f32, S>>,
    src: &TileSource,
    k0: usize,
    #[comptime] shape: StageShape,
) {
    let sv = STAGE_VECTOR;
    let quads = comptime!(shape.block_o / STAGE_VECTOR);
    let unit = UNIT_POS as usize;
    if comptime!(shape.along_k) {
        // A task: one quad of o × nv consecutive k, from STAGE_VECTOR loads along k.
        let groups = comptime!(shape.block_k / shape.nv);
        let tasks = comptime!(quads * (shape.block_k / shape.nv));
        #[unroll]
        for l in 0..comptime!(tasks.div_ceil(shape.units)) {
            let id = l * shape.units + unit;
            if id < tasks {
                let q = id / groups;
                let kg = (id % groups) * shape.nv;
                let gk = k0 + kg;
                let mut rows = Array::<Vector<f32, NV>>::new(sv);
                #[unroll]
                for r in 0..sv {
                    let go = src.o0 + q * sv + r;
                    let mut v = Vector::<f32, NV>::new(0.0);
                    if go < src.o_len && gk < src.k_len {
                        v = Vector::cast_from(
                            t[(src.base + go * src.s_o + gk * src.s_k) / shape.nv],
                        );
                    }
                    rows[r] = v;
                }
                #[unroll]
                for e in 0..shape.nv {
                    let mut quad = Vector::<f32, S>::new(0.0);
                    #[unroll]
                    for r in 0..sv {
                        quad[r] = rows[r][e];
                    }
                    smem[(kg + e) * quads + q] = quad;
                }
            }
        }
    } else {
        // A task: one quad of o at one k, from STAGE_VECTOR / nv loads along o.
        let tasks = comptime!(quads * shape.block_k);
        #[unroll]
        for l in 0..comptime!(tasks.div_ceil(shape.units)) {
            let id = l * shape.units + unit;
            if id < tasks {
                let kk = id / quads;
                let q = id % quads;
                let gk = k0 + kk;
                let mut quad = Vector::<f32, S>::new(0.0);
                #[unroll]
                for r in 0..comptime!(STAGE_VECTOR / shape.nv) {
                    let go = src.o0 + q * sv + r * shape.nv;
                    let mut v = Vector::<f32, NV>::new(0.0);
                    if go < src.o_len && gk < src.k_len {
                        v = Vector::cast_from(
                            t[(src.base + go * src.s_o + gk * src.s_k) / shape.nv],
                        );
                    }
                    #[unroll]
                    for e in 0..shape.nv {
                        quad[r * shape.nv + e] = v[e];
                    }
                }
                smem[kk * quads + q] = quad;
            }
        }
    }
}

/// The main loop the config names: with `cfg.registers`, [`register_main_loop()`]; otherwise
/// the shared-memory loop. Either accumulates this unit's `tile_m × tile_n` register tile of
/// `A[b]·B[b]` for the block at (m0, n0) into `acc`: `tile_m` rows of `tile_n / S` vectors
/// along n, zeroed here.
/// `a` is (batch, M, K), `b` is (batch, K, N), both with element offsets. Every unit of the
/// cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn main_loop<F: Float, NA: Size, NB: Size, S: Size>(
    a: &Tensor<Vector<F, NA>>,
    b: &Tensor<Vector<F, NB>>,
    a_offset: usize,
    b_offset: usize,
    pos: BlockPos,
    acc: &mut Array<Vector<f32, S>>,
    #[comptime] cfg: GemmConfig,
) {
    if comptime!(cfg.registers) {
        register_main_loop::<F, NA, NB, S>(a, b, a_offset, b_offset, pos, acc, cfg);
    } else {
        let sv = STAGE_VECTOR;
        let qm = comptime!(cfg.block_m / STAGE_VECTOR);
        let qn = comptime!(cfg.block_n / STAGE_VECTOR);
        let tqm = comptime!(cfg.tile_m / STAGE_VECTOR);
        let tqn = comptime!(cfg.tile_n / STAGE_VECTOR);
        let m = a.shape(1);
        let k_len = a.shape(2);
        let n = b.shape(2);
        let tx = UNIT_POS_X as usize;
        let ty = UNIT_POS_Y as usize;

        let a_base = a_offset + pos.batch * a.stride(0);
        let b_base = b_offset + pos.batch * b.stride(0);
        let (stage_a, stage_b) = comptime!(cfg.stage_shapes());
        let a_src = source(a_base, a.stride(1), a.stride(2), pos.m0, m, k_len);
        let b_src = source(b_base, b.stride(2), b.stride(1), pos.n0, n, k_len);

        let mut a_s = SharedMemory::<Vector<f32, S>>::new(comptime!(
            cfg.block_k * cfg.block_m / STAGE_VECTOR
        ));
        let mut b_s = SharedMemory::<Vector<f32, S>>::new(comptime!(
            cfg.block_k * cfg.block_n / STAGE_VECTOR
        ));
        let mut bq = Array::<Vector<f32, S>>::new(tqn);

        #[unroll]
        for i in 0..comptime!(cfg.tile_m * cfg.tile_n / STAGE_VECTOR) {
            acc[i] = Vector::new(0.0);
        }

        let steps = k_len.div_ceil(cfg.block_k);
        let mut step = 0;
        while step < steps {
            let k0 = step * cfg.block_k;
            stage_tile::<F, NA, S>(a, &mut a_s, &a_src, k0, stage_a);
            stage_tile::<F, NB, S>(b, &mut b_s, &b_src, k0, stage_b);
            sync_cube();

            // Row quad by row quad, the whole stage depth at a time: a quad's accumulators stay
            // in registers across the k loop (on SIMD CPU drivers every lane's tile lives in vector
            // registers, and a whole tile does not fit).
            #[unroll]
            for iq in 0..tqm {
                #[unroll]
                for kk in 0..cfg.block_k {
                    let a4 = a_s[kk * qm + ty * tqm + iq];
                    #[unroll]
                    for j in 0..tqn {
                        bq[j] = b_s[kk * qn + tx * tqn + j];
                    }
                    #[unroll]
                    for r in 0..sv {
                        let av = Vector::<f32, S>::new(a4[r]);
                        #[unroll]
                        for j in 0..tqn {
                            acc[(iq * sv + r) * tqn + j] += av * bq[j];
                        }
                    }
                }
            }
            sync_cube();
            step += 1;
        }
    }
}

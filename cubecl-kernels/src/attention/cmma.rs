//! The tensor-core flash kernel: QKᵀ and PV on 16 × 16 × 16 CMMA fragments, and its emulated twin.

use cubecl::prelude::*;

use super::{FlashIo, NEG};
use crate::fragment::{
    fragment_mma_emulated, load_fragment, mma_b, zero_accumulator, FRAGMENT, SMEM_ALIGN,
};

/// Comptime shape of [`flash_attention_cmma()`].
///
/// A cube of `planes` planes of `plane_size` units computes `16 · planes` query rows of one
/// (batch, head) pair; plane p owns rows 16p..16p + 16. K/V tiles of `block_k` keys stream
/// through shared memory as F; QKᵀ and PV run on 16 × 16 × 16 CMMA fragments (F inputs, f32
/// accumulation). The head dim is padded with zeros to a multiple of 16 in shared memory, so
/// any D up to the launcher's maximum works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashCmmaConfig {
    /// Planes per cube, each owning 16 query rows.
    pub planes: usize,
    /// Keys per K/V tile, a multiple of 16.
    pub block_k: usize,
    /// D, the head dim.
    pub head_dim: usize,
    /// Units per plane (the warp size, 32 on CUDA).
    pub plane_size: usize,
    /// Mask keys after the query.
    pub causal: bool,
    /// Vector width of the global loads and stores; must equal the launch's vector size N.
    pub vector: usize,
    /// Compute each fragment product with plain loops over the same shared tiles, offsets,
    /// strides and layouts instead of the tensor-core instructions (see [`crate::gemm`]'s
    /// `CmmaConfig::emulated`): runnable, and tested, on devices without CMMA.
    pub emulated: bool,
}

impl FlashCmmaConfig {
    /// Query rows per cube.
    pub fn block_q(&self) -> usize {
        FRAGMENT * self.planes
    }

    /// D rounded up to a multiple of 16: the width of the shared Q, K, V and output tiles.
    pub fn padded_dim(&self) -> usize {
        self.head_dim.next_multiple_of(FRAGMENT)
    }

    pub fn units(&self) -> usize {
        self.planes * self.plane_size
    }

    /// Shared memory in bytes for an element of `elem_bytes` bytes: Q, K, V and P tiles in F;
    /// the score tile, the output accumulator and one per-row factor in f32; alignment slack.
    pub fn shared_bytes(&self, elem_bytes: usize) -> usize {
        let (bq, bk, dp) = (self.block_q(), self.block_k, self.padded_dim());
        (bq * dp + 2 * bk * dp + bq * bk) * elem_bytes
            + (bq * bk + bq * dp + bq) * 4
            + 6 * SMEM_ALIGN
    }

    /// True when fragments and planes tile the blocks evenly.
    pub fn is_valid(&self) -> bool {
        self.planes >= 1
            && self.block_k >= FRAGMENT
            && self.block_k.is_multiple_of(FRAGMENT)
            && self.plane_size >= 1
            && (FRAGMENT * FRAGMENT).is_multiple_of(self.plane_size)
            && self.plane_size >= FRAGMENT
            && self.vector >= 1
            && self.head_dim.is_multiple_of(self.vector)
    }
}

/// Stages rows `pos0..pos0 + rows` of one head of a (B, S, H, D) view into `smem` as F,
/// row-major with row stride `dp` (D padded to a multiple of 16), with the cube's units in
/// vectors of N = `cfg.vector`. Rows past `seq`, and the padding dims D..dp, stage as zero.
/// `base` is the element offset of (b, row 0, h).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_head_rows<F: Float, N: Size>(
    t: &Tensor<Vector<F, N>>,
    smem: &mut SharedMemory<F>,
    base: usize,
    row_stride: usize,
    pos0: usize,
    seq: usize,
    #[comptime] rows: usize,
    #[comptime] cfg: FlashCmmaConfig,
) {
    let d = cfg.head_dim;
    let dp = comptime!(cfg.padded_dim());
    let nv = cfg.vector;
    let units = comptime!(cfg.units());
    let per_row = comptime!(dp / nv);
    let tasks = comptime!(rows * dp / nv);
    for l in 0..comptime!(tasks.div_ceil(units)) {
        let id = l * units + UNIT_POS as usize;
        if id < tasks {
            let r = id / per_row;
            let c = id % per_row;
            let pos = pos0 + r;
            let mut val = Vector::<F, N>::new(F::new(0.0));
            // N divides D: a vector is wholly inside D or wholly padding.
            if pos < seq && c * nv < d {
                val = t[(base + pos * row_stride) / nv + c];
            }
            #[unroll]
            for e in 0..nv {
                smem[r * dp + c * nv + e] = val[e];
            }
        }
    }
}

/// The tensor-core flash attention: the same function, layouts, offsets and log-sum-exp as
/// [`flash_attention()`], with QKᵀ and PV on CMMA fragments (see [`FlashCmmaConfig`]). Per K/V
/// tile, each plane computes its 16 × block_k scores into an f32 tile; the lane owning a row
/// applies scale and mask, updates the running max and sum and writes the unnormalised
/// probabilities as F; the output accumulator (f32, shared) is rescaled row by row, loaded as
/// fragments, and P·V added to it. Tiles above the diagonal are skipped. F is f16 or bf16 on a
/// device whose properties list the 16 × 16 × 16 fragment; the launcher checks. Cube:
/// (`plane_size`, `planes`) units, one cube per (batch, head, block of query rows).
#[cube(launch_unchecked)]
pub fn flash_attention_cmma<F: Float, N: Size>(
    io: &mut FlashIo<F, N>,
    #[comptime] cfg: FlashCmmaConfig,
) {
    let f = FRAGMENT;
    let bq = comptime!(cfg.block_q());
    let bk = cfg.block_k;
    let dp = comptime!(cfg.padded_dim());
    let nv = cfg.vector;
    let units = comptime!(cfg.units());
    let ps = cfg.plane_size;

    let batch = io.q.shape(0);
    let seq = io.q.shape(1);
    let heads = io.q.shape(2);
    let n_qb = seq.div_ceil(bq);
    let item = CUBE_POS;
    // A cube past the end returns before any barrier, as a whole.
    if item < batch * heads * n_qb {
        let plane = UNIT_POS_Y as usize;
        let lane = UNIT_POS_X as usize;
        let qb = item % n_qb;
        let h = (item / n_qb) % heads;
        let b = item / (n_qb * heads);
        let q0 = qb * bq;
        // This lane's row, when it owns one (lane < 16): softmax statistics live in registers.
        let row = plane * f + lane;
        let qpos = q0 + row;
        let owns_row = lane < f;
        let kv_len = if comptime!(cfg.causal) {
            min(q0 + bq, seq)
        } else {
            seq
        };
        let n_tiles = kv_len.div_ceil(bk);

        let mut q_s = SharedMemory::<F>::new_aligned(comptime!(bq * dp), SMEM_ALIGN);
        let mut k_s = SharedMemory::<F>::new_aligned(comptime!(bk * dp), SMEM_ALIGN);
        let mut v_s = SharedMemory::<F>::new_aligned(comptime!(bk * dp), SMEM_ALIGN);
        let mut p_s = SharedMemory::<F>::new_aligned(comptime!(bq * bk), SMEM_ALIGN);
        let mut s_s = SharedMemory::<f32>::new_aligned(comptime!(bq * bk), SMEM_ALIGN);
        let mut o_s = SharedMemory::<f32>::new_aligned(comptime!(bq * dp), SMEM_ALIGN);
        let mut row_s = SharedMemory::<f32>::new_aligned(bq, SMEM_ALIGN);

        let q_base = io.q_offset as usize + b * io.q.stride(0) + h * io.q.stride(2);
        let k_base = io.k_offset as usize + b * io.k.stride(0) + h * io.k.stride(2);
        let v_base = io.v_offset as usize + b * io.v.stride(0) + h * io.v.stride(2);
        stage_head_rows::<F, N>(&io.q, &mut q_s, q_base, io.q.stride(1), q0, seq, bq, cfg);
        for l in 0..comptime!((bq * dp).div_ceil(units)) {
            let e = l * units + UNIT_POS as usize;
            if e < bq * dp {
                o_s[e] = 0.0;
            }
        }

        // The plane's rows start at these offsets in the Q, P and score tiles and the output.
        let q_rows = plane * f * dp;
        let s_rows = plane * f * bk;
        let mut m = f32::new(NEG);
        let mut l = f32::new(0.0);
        let mut l_p = f32::new(0.0);
        let mut tile = 0;
        while tile < n_tiles {
            let k0 = tile * bk;
            stage_head_rows::<F, N>(&io.k, &mut k_s, k_base, io.k.stride(1), k0, seq, bk, cfg);
            stage_head_rows::<F, N>(&io.v, &mut v_s, v_base, io.v.stride(1), k0, seq, bk, cfg);
            sync_cube();

            // S = Q Kᵀ for the plane's 16 rows: K is staged [key][d], which is Kᵀ column-major.
            if comptime!(cfg.emulated) {
                for j in 0..comptime!(cfg.block_k / FRAGMENT) {
                    for r in 0..comptime!(FRAGMENT * FRAGMENT / cfg.plane_size) {
                        let e = r * ps + lane;
                        s_s[s_rows + (e / f) * bk + j * f + e % f] = 0.0;
                    }
                    for kk in 0..comptime!(dp / FRAGMENT) {
                        fragment_mma_emulated::<F>(
                            &q_s,
                            q_rows + kk * f,
                            dp,
                            &k_s,
                            j * f * dp + kk * f,
                            dp,
                            true,
                            &mut s_s,
                            s_rows + j * f,
                            bk,
                            lane,
                            ps,
                        );
                    }
                }
            } else {
                let mut accs = Sequence::<cmma::Matrix<f32>>::new();
                #[unroll]
                for _ in 0..comptime!(cfg.block_k / FRAGMENT) {
                    accs.push(zero_accumulator());
                }
                // Each Q fragment is loaded once and multiplied into every key fragment.
                #[unroll]
                for kk in 0..comptime!(dp / FRAGMENT) {
                    let a =
                        load_fragment::<F>(&q_s, q_rows + kk * f, dp, cmma::MatrixIdent::A, false);
                    #[unroll]
                    for j in 0..comptime!(cfg.block_k / FRAGMENT) {
                        mma_b::<F>(&a, &k_s, j * f * dp + kk * f, dp, true, accs.index(j));
                    }
                }
                #[unroll]
                for j in 0..comptime!(cfg.block_k / FRAGMENT) {
                    let c0 = s_rows + j * f;
                    cmma::store(
                        &mut s_s
                            .slice_mut(c0, c0 + comptime!((FRAGMENT - 1) * cfg.block_k + FRAGMENT)),
                        accs.index(j),
                        u32::new(comptime!(cfg.block_k as i64)),
                        cmma::MatrixLayout::RowMajor,
                    );
                }
            }
            sync_cube();

            // Online softmax by the row's owner; P is written unnormalised, in F. Two sums: of
            // the rounded values P·V uses (`l_p`, which normalises the output, so its weights
            // sum to 1) and of the exact ones (`l`, for the log-sum-exp).
            if owns_row {
                let mut tile_max = f32::new(NEG);
                for x in 0..bk {
                    let key = k0 + x;
                    let mut valid = qpos < seq && key < seq;
                    if comptime!(cfg.causal) {
                        valid = valid && key <= qpos;
                    }
                    if valid {
                        tile_max = max(tile_max, s_s[s_rows + lane * bk + x] * io.scale);
                    }
                }
                let m_new = max(m, tile_max);
                let alpha = (m - m_new).exp();
                let mut sum = f32::new(0.0);
                let mut sum_p = f32::new(0.0);
                for x in 0..bk {
                    let key = k0 + x;
                    let mut valid = qpos < seq && key < seq;
                    if comptime!(cfg.causal) {
                        valid = valid && key <= qpos;
                    }
                    let mut p = f32::new(0.0);
                    if valid {
                        p = (s_s[s_rows + lane * bk + x] * io.scale - m_new).exp();
                    }
                    let pf = F::cast_from(p);
                    p_s[s_rows + lane * bk + x] = pf;
                    sum += p;
                    sum_p += f32::cast_from(pf);
                }
                l = l * alpha + sum;
                l_p = l_p * alpha + sum_p;
                m = m_new;
                row_s[row] = alpha;
            }
            sync_cube();

            // O = O · alpha (row by row), then O += P V.
            for r in 0..comptime!(FRAGMENT * cfg.padded_dim() / cfg.plane_size) {
                let e = r * ps + lane;
                o_s[q_rows + e] *= row_s[plane * f + e / dp];
            }
            sync_cube();
            if comptime!(cfg.emulated) {
                for dj in 0..comptime!(dp / FRAGMENT) {
                    for kk in 0..comptime!(cfg.block_k / FRAGMENT) {
                        fragment_mma_emulated::<F>(
                            &p_s,
                            s_rows + kk * f,
                            bk,
                            &v_s,
                            kk * f * dp + dj * f,
                            dp,
                            false,
                            &mut o_s,
                            q_rows + dj * f,
                            dp,
                            lane,
                            ps,
                        );
                    }
                }
            } else {
                let mut accs = Sequence::<cmma::Matrix<f32>>::new();
                #[unroll]
                for dj in 0..comptime!(dp / FRAGMENT) {
                    let acc = unsafe {
                        cmma::Matrix::<f32>::uninitialized(
                            cmma::MatrixIdent::Accumulator,
                            FRAGMENT,
                            FRAGMENT,
                            FRAGMENT,
                            cmma::MatrixLayout::Undefined,
                        )
                    };
                    let c0 = q_rows + dj * f;
                    cmma::load_with_layout(
                        &acc,
                        &o_s.slice(c0, c0 + comptime!((FRAGMENT - 1) * dp + FRAGMENT)),
                        u32::new(comptime!(dp as i64)),
                        cmma::MatrixLayout::RowMajor,
                    );
                    accs.push(acc);
                }
                // Each P fragment is loaded once and multiplied into every output fragment.
                #[unroll]
                for kk in 0..comptime!(cfg.block_k / FRAGMENT) {
                    let a =
                        load_fragment::<F>(&p_s, s_rows + kk * f, bk, cmma::MatrixIdent::A, false);
                    #[unroll]
                    for dj in 0..comptime!(dp / FRAGMENT) {
                        mma_b::<F>(&a, &v_s, kk * f * dp + dj * f, dp, false, accs.index(dj));
                    }
                }
                #[unroll]
                for dj in 0..comptime!(dp / FRAGMENT) {
                    let c0 = q_rows + dj * f;
                    cmma::store(
                        &mut o_s.slice_mut(c0, c0 + comptime!((FRAGMENT - 1) * dp + FRAGMENT)),
                        accs.index(dj),
                        u32::new(comptime!(dp as i64)),
                        cmma::MatrixLayout::RowMajor,
                    );
                }
            }
            // K, V, P and the scores are overwritten next tile.
            sync_cube();
            tile += 1;
        }

        if owns_row {
            row_s[row] = 1.0 / l_p;
            if qpos < seq {
                io.lse[b * io.lse.stride(0) + h * io.lse.stride(1) + qpos * io.lse.stride(2)] =
                    m + l.ln();
            }
        }
        sync_cube();

        let per_row = comptime!(cfg.head_dim / cfg.vector);
        let tasks = comptime!(bq * cfg.head_dim / cfg.vector);
        let o_base = b * io.out.stride(0) + h * io.out.stride(2);
        for it in 0..comptime!(tasks.div_ceil(units)) {
            let id = it * units + UNIT_POS as usize;
            let r = id / per_row;
            let c = id % per_row;
            let pos = q0 + r;
            if id < tasks && pos < seq {
                let mut val = Vector::<f32, N>::empty();
                #[unroll]
                for e in 0..nv {
                    val[e] = o_s[r * dp + c * nv + e] * row_s[r];
                }
                io.out[(o_base + pos * io.out.stride(1)) / nv + c] = Vector::cast_from(val);
            }
        }
    }
}

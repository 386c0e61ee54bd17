//! Flash-style multi-head attention forward, and the naive score-materialising kernels it is
//! measured against.
//!
//! Layout: q, k, v and out are (B, S, H, D) with arbitrary strides over B, S and H and a unit
//! stride over D, so q, k and v can be views into one fused (B, S, 3, H, D) projection. Each of
//! q, k, v also takes an element offset into its buffer for that purpose. lse is (B, H, S), f32:
//! the natural log-sum-exp of each row's scaled scores, saved for the backward pass.
//!
//! One *group* of `block_q × block_k` units computes a block of `block_q` query rows of one
//! (batch, head) pair, streaming K/V tiles of `block_k` keys through shared memory with an
//! online softmax: running row max `m` and sum `l`, the accumulator rescaled by `exp(m_old -
//! m_new)` each tile. The S × S score matrix is never formed; per group only a
//! `block_q × block_k` tile of it lives in shared memory. A cube holds `groups` groups side by
//! side (`UNIT_POS_Z`): for the local regime (a huge batch of sequences of P = 4..32 bytes) one
//! cube processes several whole sequences at once instead of padding each to a large tile.
//!
//! Unit (i, j) of a group computes score (i, j) of each tile, and owns output dims
//! j, j + block_k, j + 2·block_k, ... of row i. Everything after the loads runs in f32.

use cubecl::prelude::*;

use crate::gemm::{load_fragment, zero_accumulator, FRAGMENT, SMEM_ALIGN};

/// Comptime shape of the flash kernel. The launcher picks it from the device's shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    /// Query rows per group.
    pub block_q: usize,
    /// Keys per K/V tile.
    pub block_k: usize,
    /// D, the head dim.
    pub head_dim: usize,
    /// Groups per cube.
    pub groups: usize,
    /// Mask keys after the query (key j visible to query i iff j <= i).
    pub causal: bool,
    /// Vector width of the global loads and stores; must equal the launch's vector size N.
    pub vector: usize,
}

impl FlashConfig {
    /// f32 words of shared memory the kernel allocates.
    pub fn shared_words(&self) -> usize {
        self.groups
            * (self.block_q * self.head_dim
                + 2 * self.block_k * self.head_dim
                + 2 * self.block_q * self.block_k)
    }

    /// Output dims each unit owns: ceil(D / block_k).
    pub fn dims_per_unit(&self) -> usize {
        self.head_dim.div_ceil(self.block_k)
    }

    /// Vector loads per unit to fill a Q block (also the stores of the output block).
    pub fn q_loads(&self) -> usize {
        (self.block_q * self.head_dim / self.vector).div_ceil(self.block_q * self.block_k)
    }

    /// Vector loads per unit to fill one K (and one V) tile.
    pub fn kv_loads(&self) -> usize {
        (self.block_k * self.head_dim / self.vector).div_ceil(self.block_q * self.block_k)
    }
}

/// Large negative stand-in for -inf: `exp(NEG - NEG)` stays finite where -inf would give NaN.
const NEG: f32 = -1.0e30;

#[cube(launch_unchecked)]
pub fn flash_attention<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    q_offset: u32,
    k_offset: u32,
    v_offset: u32,
    scale: f32,
    #[comptime] cfg: FlashConfig,
) {
    let bq = cfg.block_q;
    let bk = cfg.block_k;
    let d = cfg.head_dim;
    let nv = cfg.vector;
    let dv = comptime!(cfg.head_dim / cfg.vector);
    let dpu = comptime!(cfg.dims_per_unit());
    let group_units = bq * bk;
    // Fixed trip counts, unrolled: llvmpipe (lavapipe) caps the iterations a shader loop may run
    // per invocation at 65,535, counted across re-entries, which a long KV loop with inner
    // loops exceeds (seen: keys past ~15,400 silently dropped at S = 16,384). Only the KV tile
    // loop stays a loop.
    let q_loads = comptime!(cfg.q_loads());
    let kv_loads = comptime!(cfg.kv_loads());

    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
    let n_qb = seq.div_ceil(bq);
    let total = batch * heads * n_qb;

    let g = UNIT_POS_Z as usize;
    let i = UNIT_POS_Y as usize;
    let j = UNIT_POS_X as usize;
    let t = i * bk + j;

    // This group's work item: a block of query rows of one (batch, head). Groups past the end
    // still take part in every barrier; they just write nothing.
    let item = CUBE_POS * cfg.groups + g;
    let active = item < total;
    let item_c = select(active, item, 0);
    let qb = item_c % n_qb;
    let bh = item_c / n_qb;
    let h = bh % heads;
    let b = bh / heads;
    let q0 = qb * bq;
    let qpos = q0 + i;
    let row_valid = active && qpos < seq;

    // Key range: causal blocks stop at their last row; tiles above the diagonal are never
    // visited. The loop bound must be the same for the whole cube (it contains barriers), so
    // take the furthest of the cube's groups.
    let mut kv_len = seq;
    if comptime!(cfg.causal) {
        kv_len = 0;
        #[unroll]
        for gg in 0..cfg.groups {
            let it = CUBE_POS * cfg.groups + gg;
            if it < total {
                kv_len = max(kv_len, min((it % n_qb + 1) * bq, seq));
            }
        }
    }
    let n_tiles = kv_len.div_ceil(bk);

    let mut q_s = SharedMemory::<f32>::new(cfg.groups * cfg.block_q * cfg.head_dim);
    let mut k_s = SharedMemory::<f32>::new(cfg.groups * cfg.block_k * cfg.head_dim);
    let mut v_s = SharedMemory::<f32>::new(cfg.groups * cfg.block_k * cfg.head_dim);
    let mut s_s = SharedMemory::<f32>::new(cfg.groups * cfg.block_q * cfg.block_k);
    let mut p_s = SharedMemory::<f32>::new(cfg.groups * cfg.block_q * cfg.block_k);
    let q_base = g * bq * d;
    let kv_base = g * bk * d;
    let s_base = g * bq * bk + i * bk;

    // Q block. Rows past the sequence are zero. The score scale is applied to each dot product,
    // not folded into Q: rounding Q·scale element by element costs the scores several ulps.
    let q_row0 = q_offset as usize + b * q.stride(0) + h * q.stride(2);
    #[unroll]
    for it in 0..q_loads {
        let e = t + it * group_units;
        if e < bq * dv {
            let r = e / dv;
            let c = e % dv;
            let pos = q0 + r;
            let mut val = Vector::<f32, N>::new(0.0);
            if active && pos < seq {
                val = Vector::<f32, N>::cast_from(q[(q_row0 + pos * q.stride(1)) / nv + c]);
            }
            #[unroll]
            for l in 0..nv {
                q_s[q_base + r * d + c * nv + l] = val[l];
            }
        }
    }

    let mut m = f32::new(NEG);
    let mut l = f32::new(0.0);
    let mut acc = Array::<f32>::new(dpu);
    #[unroll]
    for c in 0..dpu {
        acc[c] = 0.0;
    }

    let k_row0 = k_offset as usize + b * k.stride(0) + h * k.stride(2);
    let v_row0 = v_offset as usize + b * v.stride(0) + h * v.stride(2);
    let mut tile = 0;
    while tile < n_tiles {
        let k0 = tile * bk;
        // K and V tiles; keys past the sequence are zero (and masked below).
        #[unroll]
        for it in 0..kv_loads {
            let e = t + it * group_units;
            if e < bk * dv {
                let r = e / dv;
                let c = e % dv;
                let pos = k0 + r;
                let mut kval = Vector::<f32, N>::new(0.0);
                let mut vval = Vector::<f32, N>::new(0.0);
                if active && pos < seq {
                    kval = Vector::<f32, N>::cast_from(k[(k_row0 + pos * k.stride(1)) / nv + c]);
                    vval = Vector::<f32, N>::cast_from(v[(v_row0 + pos * v.stride(1)) / nv + c]);
                }
                #[unroll]
                for l in 0..nv {
                    k_s[kv_base + r * d + c * nv + l] = kval[l];
                    v_s[kv_base + r * d + c * nv + l] = vval[l];
                }
            }
        }
        sync_cube();

        // Score (i, j). Only tiles that cross the diagonal can fail the causal test; checking
        // it everywhere costs one compare per score.
        let key = k0 + j;
        let mut valid = row_valid && key < seq;
        if comptime!(cfg.causal) {
            valid = valid && key <= qpos;
        }
        let mut s = f32::new(NEG);
        if valid {
            let mut dot = f32::new(0.0);
            #[unroll]
            for x in 0..d {
                dot += q_s[q_base + i * d + x] * k_s[kv_base + j * d + x];
            }
            s = dot * scale;
        }
        s_s[s_base + j] = s;
        sync_cube();

        // Online softmax: every unit of row i derives the same new max from the shared row.
        let mut tile_max = f32::new(NEG);
        #[unroll]
        for x in 0..bk {
            tile_max = max(tile_max, s_s[s_base + x]);
        }
        let m_new = max(m, tile_max);
        let alpha = (m - m_new).exp();
        p_s[s_base + j] = select(valid, (s - m_new).exp(), 0.0);
        sync_cube();

        let mut row_sum = f32::new(0.0);
        #[unroll]
        for x in 0..bk {
            row_sum += p_s[s_base + x];
        }
        l = l * alpha + row_sum;
        #[unroll]
        for c in 0..dpu {
            let dd = j + c * bk;
            if dd < d {
                let mut a = acc[c] * alpha;
                #[unroll]
                for x in 0..bk {
                    a += p_s[s_base + x] * v_s[kv_base + x * d + dd];
                }
                acc[c] = a;
            }
        }
        m = m_new;
        // K/V and the score tiles are overwritten next iteration.
        sync_cube();
        tile += 1;
    }

    // Normalise into the Q tile (no longer needed), then store whole vectors cooperatively.
    let inv_l = 1.0 / l;
    #[unroll]
    for c in 0..dpu {
        let dd = j + c * bk;
        if dd < d {
            q_s[q_base + i * d + dd] = acc[c] * inv_l;
        }
    }
    if row_valid && j == 0 {
        lse[b * lse.stride(0) + h * lse.stride(1) + qpos * lse.stride(2)] = m + l.ln();
    }
    sync_cube();

    let o_row0 = b * out.stride(0) + h * out.stride(2);
    #[unroll]
    for it in 0..q_loads {
        let e = t + it * group_units;
        let r = e / dv;
        let c = e % dv;
        let pos = q0 + r;
        if e < bq * dv && active && pos < seq {
            let mut val = Vector::<f32, N>::empty();
            #[unroll]
            for l in 0..nv {
                val[l] = q_s[q_base + r * d + c * nv + l];
            }
            out[(o_row0 + pos * out.stride(1)) / nv + c] = Vector::cast_from(val);
        }
    }
}

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
/// row-major with row stride `dp` (D padded to a multiple of 16). Rows past `seq`, and the
/// padding dims D..dp, stage as zero. `base` is the element offset of (b, row 0, h).
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
    #[comptime] d: usize,
    #[comptime] dp: usize,
    #[comptime] nv: usize,
    #[comptime] units: usize,
) {
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

/// acc += a · B on one 16 × 16 × 16 fragment, B at `b0` (stride `b_stride`), row-major
/// `[k][n]` or, with `b_col_major`, stored `[n][k]`.
#[cube]
fn mma_b<F: Float>(
    a: &cmma::Matrix<F>,
    b_s: &SharedMemory<F>,
    b0: usize,
    #[comptime] b_stride: usize,
    #[comptime] b_col_major: bool,
    acc: &cmma::Matrix<f32>,
) {
    let b = load_fragment::<F>(b_s, b0, b_stride, cmma::MatrixIdent::B, b_col_major);
    cmma::execute::<F, F, f32, f32>(a, &b, acc, acc);
}

/// One fragment product `C += A · B` (A row-major, B as [`mma_b`] reads it) as plain loops,
/// the accumulator in shared memory (row-major at `c0`, stride `c_stride`): lane `lane` of the
/// plane owns elements lane, lane + plane_size, ... of the fragment.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fragment_mma_emulated<F: Float>(
    a_s: &SharedMemory<F>,
    a0: usize,
    #[comptime] a_stride: usize,
    b_s: &SharedMemory<F>,
    b0: usize,
    #[comptime] b_stride: usize,
    #[comptime] b_col_major: bool,
    c_s: &mut SharedMemory<f32>,
    c0: usize,
    #[comptime] c_stride: usize,
    lane: usize,
    #[comptime] plane_size: usize,
) {
    let f = FRAGMENT;
    for r in 0..comptime!(FRAGMENT * FRAGMENT / plane_size) {
        let e = r * plane_size + lane;
        let (fr, fc) = (e / f, e % f);
        let mut dot = f32::new(0.0);
        #[unroll]
        for x in 0..FRAGMENT {
            let bv = if comptime!(b_col_major) {
                b_s[b0 + fc * b_stride + x]
            } else {
                b_s[b0 + x * b_stride + fc]
            };
            dot += f32::cast_from(a_s[a0 + fr * a_stride + x]) * f32::cast_from(bv);
        }
        c_s[c0 + fr * c_stride + fc] += dot;
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
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_cmma<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    q_offset: u32,
    k_offset: u32,
    v_offset: u32,
    scale: f32,
    #[comptime] cfg: FlashCmmaConfig,
) {
    let f = FRAGMENT;
    let bq = comptime!(cfg.block_q());
    let bk = cfg.block_k;
    let d = cfg.head_dim;
    let dp = comptime!(cfg.padded_dim());
    let nv = cfg.vector;
    let units = comptime!(cfg.units());
    let ps = cfg.plane_size;

    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
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

        let q_base = q_offset as usize + b * q.stride(0) + h * q.stride(2);
        let k_base = k_offset as usize + b * k.stride(0) + h * k.stride(2);
        let v_base = v_offset as usize + b * v.stride(0) + h * v.stride(2);
        stage_head_rows::<F, N>(
            q,
            &mut q_s,
            q_base,
            q.stride(1),
            q0,
            seq,
            bq,
            d,
            dp,
            nv,
            units,
        );
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
            stage_head_rows::<F, N>(
                k,
                &mut k_s,
                k_base,
                k.stride(1),
                k0,
                seq,
                bk,
                d,
                dp,
                nv,
                units,
            );
            stage_head_rows::<F, N>(
                v,
                &mut v_s,
                v_base,
                v.stride(1),
                k0,
                seq,
                bk,
                d,
                dp,
                nv,
                units,
            );
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
                        tile_max = max(tile_max, s_s[s_rows + lane * bk + x] * scale);
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
                        p = (s_s[s_rows + lane * bk + x] * scale - m_new).exp();
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
                lse[b * lse.stride(0) + h * lse.stride(1) + qpos * lse.stride(2)] = m + l.ln();
            }
        }
        sync_cube();

        let per_row = comptime!(cfg.head_dim / cfg.vector);
        let tasks = comptime!(bq * cfg.head_dim / cfg.vector);
        let o_base = b * out.stride(0) + h * out.stride(2);
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
                out[(o_base + pos * out.stride(1)) / nv + c] = Vector::cast_from(val);
            }
        }
    }
}

/// Naive attention, step 1: scores[b, h, i, j] = q_i · k_j · scale in f32, stored in F; one unit
/// per score. Masked scores are left as computed; [`naive_softmax()`] applies the mask.
#[cube(launch_unchecked)]
pub fn naive_scores<F: Float>(q: &Tensor<F>, k: &Tensor<F>, scores: &mut Tensor<F>, scale: f32) {
    let seq = q.shape(1);
    let heads = q.shape(2);
    let d = q.shape(3);
    if ABSOLUTE_POS < scores.len() {
        let j = ABSOLUTE_POS % seq;
        let i = (ABSOLUTE_POS / seq) % seq;
        let h = (ABSOLUTE_POS / (seq * seq)) % heads;
        let b = ABSOLUTE_POS / (seq * seq * heads);
        let qi = b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
        let kj = b * k.stride(0) + j * k.stride(1) + h * k.stride(2);
        let mut dot = f32::new(0.0);
        for x in 0..d {
            dot += f32::cast_from(q[qi + x]) * f32::cast_from(k[kj + x]);
        }
        scores[ABSOLUTE_POS] = F::cast_from(dot * scale);
    }
}

/// Naive attention, step 2: one unit per row turns scores into probabilities in place (f32
/// arithmetic, stored in F) and writes the row's log-sum-exp.
#[cube(launch_unchecked)]
pub fn naive_softmax<F: Float>(
    scores: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    #[comptime] causal: bool,
) {
    let seq = scores.shape(3);
    if ABSOLUTE_POS < lse.len() {
        let i = ABSOLUTE_POS % seq;
        let row = ABSOLUTE_POS * seq;
        let mut end = seq;
        if comptime!(causal) {
            end = i + 1;
        }
        let mut mx = f32::new(NEG);
        for j in 0..end {
            mx = max(mx, f32::cast_from(scores[row + j]));
        }
        let mut sum = f32::new(0.0);
        for j in 0..end {
            sum += (f32::cast_from(scores[row + j]) - mx).exp();
        }
        for j in 0..seq {
            let mut p = f32::new(0.0);
            if j < end {
                p = (f32::cast_from(scores[row + j]) - mx).exp() / sum;
            }
            scores[row + j] = F::cast_from(p);
        }
        lse[ABSOLUTE_POS] = mx + sum.ln();
    }
}

/// Naive attention, step 3: out[b, i, h, x] = Σ_j probs[b, h, i, j] · v[b, j, h, x], f32
/// accumulation; one unit per output element. `out` is contiguous (B, S, H, D).
#[cube(launch_unchecked)]
pub fn naive_weighted_sum<F: Float>(probs: &Tensor<F>, v: &Tensor<F>, out: &mut Tensor<F>) {
    let seq = v.shape(1);
    let heads = v.shape(2);
    let d = v.shape(3);
    if ABSOLUTE_POS < out.len() {
        let x = ABSOLUTE_POS % d;
        let h = (ABSOLUTE_POS / d) % heads;
        let i = (ABSOLUTE_POS / (d * heads)) % seq;
        let b = ABSOLUTE_POS / (d * heads * seq);
        let row = ((b * heads + h) * seq + i) * seq;
        let mut acc = f32::new(0.0);
        for j in 0..seq {
            acc += f32::cast_from(probs[row + j])
                * f32::cast_from(v[b * v.stride(0) + j * v.stride(1) + h * v.stride(2) + x]);
        }
        out[ABSOLUTE_POS] = F::cast_from(acc);
    }
}

/// Comptime shape of [`flash_attention_rows()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowsConfig {
    pub head_dim: usize,
    /// Vector width of the global loads; must equal the launch's vector size N.
    pub vector: usize,
    pub causal: bool,
    /// Keys scored per softmax rescale.
    pub chunk: usize,
    /// Query rows per unit: each K/V vector loaded serves this many rows.
    pub rows: usize,
    /// Read q from memory at every key instead of holding it in registers (see
    /// [`RowsConfig::q_from_memory_for`]).
    pub q_from_memory: bool,
    /// Units per row block (at least 1, at most D / vector): each computes the rows' full
    /// scores but accumulates, and writes, only its own [`RowsConfig::split_vectors`] head-dim
    /// vectors of the output. 1 for one unit per row block.
    pub splits: usize,
}

impl RowsConfig {
    /// Whether q stays in memory: always for one row per unit (decoding) on GPUs
    /// (`plane_ops`), where holding q and the output accumulator in registers spilled (580
    /// bytes at head dim 128 in f32, a few at 32) and q is one cached row re-read at each key;
    /// on CPU drivers only past head dim 64.
    pub fn q_from_memory_for(rows: usize, head_dim: usize, plane_ops: bool) -> bool {
        rows == 1 && (plane_ops || head_dim > 64)
    }

    /// Splits that leave each unit at most [`ROWS_SPLIT_ACCUMULATORS`] f32 accumulators per row.
    pub fn splits_for(head_dim: usize, vector: usize) -> usize {
        (head_dim / vector).div_ceil((ROWS_SPLIT_ACCUMULATORS / vector).max(1))
    }

    /// Head-dim vectors each unit accumulates: ceil(D / vector / splits).
    pub fn split_vectors(&self) -> usize {
        (self.head_dim / self.vector).div_ceil(self.splits)
    }
}

/// Output accumulators per row and unit that [`RowsConfig::splits_for`] aims for. With a
/// whole row of 80 f32 accumulators the decode kernel needed 168 registers on sm_90 (254 at
/// 128), and ptxas spilled to fit two cubes of 256 units in 128; split to at most 32 it uses
/// 89-120 at head dims 32 to 128, without spills.
pub const ROWS_SPLIT_ACCUMULATORS: usize = 32;

/// Head-dim vectors per step of [`flash_attention_rows()`]'s dot product when q is read from
/// memory.
const Q_STEP: usize = 2;

/// Flash attention with a few query rows per unit and no shared memory or barriers: the unit
/// keeps its rows' q and output accumulators in registers and streams keys from global memory,
/// `chunk` at a time (one rescale of the accumulators per chunk); each loaded K/V vector serves
/// all `rows` rows. Units are numbered (b, h, row block, split) with the split fastest, then
/// the row block, so neighbouring units read the same K/V rows from cache.
///
/// This suits devices where barriers are expensive and caches large (CPU Vulkan drivers such as
/// lavapipe), and the local regime; on GPUs the tiled [`flash_attention()`] reuses K/V through
/// shared memory instead.
///
/// With `cfg.splits > 1`, `splits` neighbouring units share a row block: each recomputes the
/// scores (the same K rows, so from cache) and accumulates its own slice of the head dims.
/// Decoding on GPUs uses this: one row per (batch, head) gives few units, and a whole row of
/// accumulators per unit costs registers.
#[cube(launch_unchecked)]
pub fn flash_attention_rows<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    q_offset: u32,
    k_offset: u32,
    v_offset: u32,
    scale: f32,
    #[comptime] cfg: RowsConfig,
) {
    let nv = cfg.vector;
    let dv = comptime!(cfg.head_dim / cfg.vector);
    let ch = cfg.chunk;
    let rr = cfg.rows;
    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
    // Keys may outnumber queries (decoding against a cache): query i is position
    // i + shift of the key sequence and, when causal, sees keys 0..=i + shift.
    let seq_k = k.shape(1);
    let shift = seq_k - seq;
    let n_rb = seq.div_ceil(rr);
    let dps = comptime!(cfg.split_vectors());
    if ABSOLUTE_POS < batch * heads * n_rb * cfg.splits {
        // This unit's first head-dim vector of the output.
        let split = ABSOLUTE_POS % cfg.splits;
        let c0 = split * dps;
        let unit = ABSOLUTE_POS / cfg.splits;
        let i0 = (unit % n_rb) * rr;
        let bh = unit / n_rb;
        let h = bh % heads;
        let b = bh / heads;

        let q_row0 = q_offset as usize + b * q.stride(0) + h * q.stride(2);
        let mut qr = Array::<Vector<f32, N>>::new(comptime!(if cfg.q_from_memory {
            1
        } else {
            cfg.rows * cfg.head_dim / cfg.vector
        }));
        let mut acc = Array::<Vector<f32, N>>::new(comptime!(cfg.rows * cfg.split_vectors()));
        let mut m = Array::<f32>::new(rr);
        let mut l = Array::<f32>::new(rr);
        #[unroll]
        for r in 0..rr {
            let i = min(i0 + r, seq - 1);
            let q_at = (q_row0 + i * q.stride(1)) / nv;
            if comptime!(!cfg.q_from_memory) {
                #[unroll]
                for c in 0..dv {
                    qr[r * dv + c] = Vector::<f32, N>::cast_from(q[q_at + c]);
                }
            }
            #[unroll]
            for c in 0..dps {
                acc[r * dps + c] = Vector::<f32, N>::new(0.0);
            }
            m[r] = NEG;
            l[r] = 0.0;
        }
        let k_row0 = k_offset as usize + b * k.stride(0) + h * k.stride(2);
        let v_row0 = v_offset as usize + b * v.stride(0) + h * v.stride(2);

        let mut end = seq_k;
        if comptime!(cfg.causal) {
            end = min(i0 + rr + shift, seq_k);
        }
        let n_chunks = end.div_ceil(ch);
        let q_steps = (q.shape(3) / nv).div_ceil(Q_STEP);
        // Scores of the chunk, then (in place) their probabilities: (rows, chunk).
        let mut sp = Array::<f32>::new(comptime!(cfg.rows * cfg.chunk));
        // Loops over the keys of a chunk stay loops (each runs at most S times per unit, inside
        // llvmpipe's per-loop iteration cap for S < 65,536); loops over rows and head-dim
        // vectors are unrolled.
        let mut chunk = 0;
        while chunk < n_chunks {
            let j0 = chunk * ch;
            for u in 0..ch {
                let j = j0 + u;
                let mut dots = Array::<Vector<f32, N>>::new(rr);
                #[unroll]
                for r in 0..rr {
                    dots[r] = Vector::<f32, N>::new(0.0);
                }
                if j < end {
                    let k_at = (k_row0 + j * k.stride(1)) / nv;
                    if comptime!(cfg.q_from_memory) {
                        // The dims go in steps whose count is a run-time value: unrolled whole,
                        // the compiler hoisted q's loads (the same at every key) into
                        // registers and spilled.
                        #[unroll]
                        for r in 0..rr {
                            let q_at = (q_row0 + min(i0 + r, seq - 1) * q.stride(1)) / nv;
                            let mut step = 0;
                            while step < q_steps {
                                #[unroll]
                                for u in 0..Q_STEP {
                                    let c = step * Q_STEP + u;
                                    if c < dv {
                                        dots[r] += Vector::<f32, N>::cast_from(q[q_at + c])
                                            * Vector::<f32, N>::cast_from(k[k_at + c]);
                                    }
                                }
                                step += 1;
                            }
                        }
                    } else {
                        #[unroll]
                        for c in 0..dv {
                            let kc = Vector::<f32, N>::cast_from(k[k_at + c]);
                            #[unroll]
                            for r in 0..rr {
                                dots[r] += qr[r * dv + c] * kc;
                            }
                        }
                    }
                }
                #[unroll]
                for r in 0..rr {
                    let mut total = f32::new(0.0);
                    #[unroll]
                    for lane in 0..nv {
                        total += dots[r][lane];
                    }
                    let mut visible = j < end;
                    if comptime!(cfg.causal) {
                        visible = visible && j <= i0 + r + shift;
                    }
                    sp[r * ch + u] = select(visible, total * scale, f32::new(NEG));
                }
            }
            #[unroll]
            for r in 0..rr {
                let mut chunk_max = f32::new(NEG);
                for u in 0..ch {
                    chunk_max = max(chunk_max, sp[r * ch + u]);
                }
                let m_new = max(m[r], chunk_max);
                let alpha = (m[r] - m_new).exp();
                let mut sum = f32::new(0.0);
                for u in 0..ch {
                    // Masked scores sit at -1e30: their exp underflows to exactly 0.
                    let p = (sp[r * ch + u] - m_new).exp();
                    sp[r * ch + u] = p;
                    sum += p;
                }
                l[r] = l[r] * alpha + sum;
                m[r] = m_new;
                #[unroll]
                for c in 0..dps {
                    acc[r * dps + c] = acc[r * dps + c] * Vector::new(alpha);
                }
            }
            for u in 0..ch {
                let j = j0 + u;
                if j < end {
                    let v_at = (v_row0 + j * v.stride(1)) / nv;
                    #[unroll]
                    for c in 0..dps {
                        // The last split's slice may run past D (with one split, c0 = 0 and it
                        // never does).
                        if c0 + c < dv {
                            let vc = Vector::<f32, N>::cast_from(v[v_at + c0 + c]);
                            #[unroll]
                            for r in 0..rr {
                                acc[r * dps + c] += Vector::new(sp[r * ch + u]) * vc;
                            }
                        }
                    }
                }
            }
            chunk += 1;
        }

        let o_row0 = b * out.stride(0) + h * out.stride(2);
        #[unroll]
        for r in 0..rr {
            let i = i0 + r;
            if i < seq {
                let inv_l = Vector::<f32, N>::new(1.0 / l[r]);
                let o_at = (o_row0 + i * out.stride(1)) / nv;
                #[unroll]
                for c in 0..dps {
                    if c0 + c < dv {
                        out[o_at + c0 + c] = Vector::cast_from(acc[r * dps + c] * inv_l);
                    }
                }
                if split == 0 {
                    lse[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)] =
                        m[r] + l[r].ln();
                }
            }
        }
    }
}

/// Comptime shape of the attention backward kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardConfig {
    pub head_dim: usize,
    pub causal: bool,
    /// Units per row: each accumulates the gradient over ceil(D / splits) of the head dims
    /// (and recomputes the row's full dot products). More splits, fewer accumulator registers
    /// per unit.
    pub splits: usize,
    /// Keep the row's own operand vectors (q_i; k_j and v_j) in registers for the whole key
    /// loop, instead of re-reading them from memory (the same row every time, so from cache).
    pub rows_in_registers: bool,
}

impl BackwardConfig {
    /// Head dims each unit accumulates.
    pub fn dims_per_split(&self) -> usize {
        self.head_dim.div_ceil(self.splits)
    }
}

/// Dims per step of [`dots_from_memory`]'s loop.
const DOT_STEP: usize = 16;

/// (Σ_c a[a_at + c]·b[b_at + c], Σ_c x[x_at + c]·y[y_at + c]) over c < `d`, in index order,
/// every operand read from memory. The loop runs `steps` (= ceil(d / 16), passed at run time)
/// steps of 16 unrolled dims: a trip count the compiler cannot see keeps it from unrolling the
/// whole loop and hoisting a row that stays the same across the caller's loop into registers,
/// which is what re-reading it from cache is meant to avoid.
#[cube]
#[allow(clippy::too_many_arguments)]
fn dots_from_memory<F: Float>(
    a: &Tensor<F>,
    a_at: usize,
    b: &Tensor<F>,
    b_at: usize,
    x: &Tensor<F>,
    x_at: usize,
    y: &Tensor<F>,
    y_at: usize,
    steps: usize,
    #[comptime] d: usize,
) -> (f32, f32) {
    let mut s = f32::new(0.0);
    let mut t = f32::new(0.0);
    let mut step = 0;
    while step < steps {
        #[unroll]
        for u in 0..DOT_STEP {
            let c = step * DOT_STEP + u;
            if c < d {
                s += f32::cast_from(a[a_at + c]) * f32::cast_from(b[b_at + c]);
                t += f32::cast_from(x[x_at + c]) * f32::cast_from(y[y_at + c]);
            }
        }
        step += 1;
    }
    (s, t)
}

/// (q_i·k_j, dO_i·v_j) for [`attention_backward_q()`]: q_i from registers (`qr`) when
/// `in_registers`, otherwise every operand through [`dots_from_memory`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn query_row_dots<F: Float>(
    qr: &Array<f32>,
    q: &Tensor<F>,
    q_at: usize,
    k: &Tensor<F>,
    k_at: usize,
    d_out: &Tensor<F>,
    o_at: usize,
    v: &Tensor<F>,
    v_at: usize,
    steps: usize,
    #[comptime] d: usize,
    #[comptime] in_registers: bool,
) -> (f32, f32) {
    let mut s = f32::new(0.0);
    let mut dp = f32::new(0.0);
    if comptime!(in_registers) {
        #[unroll]
        for c in 0..d {
            s += qr[c] * f32::cast_from(k[k_at + c]);
            dp += f32::cast_from(d_out[o_at + c]) * f32::cast_from(v[v_at + c]);
        }
    } else {
        let (a, b) = dots_from_memory::<F>(q, q_at, k, k_at, d_out, o_at, v, v_at, steps, d);
        s = a;
        dp = b;
    }
    (s, dp)
}

/// Attention backward, query side: one unit per (b, h, query i), two passes over the keys and
/// no S × S buffer. Pass 1 recomputes the row's softmax statistics online, as the forward
/// does: the max m_i, the sum l_i = Σ_j exp(s_ij - m_i) and delta_i = Σ_j P_ij (dO_i·V_j).
/// Pass 2 accumulates dQ_i = scale · Σ_j P_ij (dO_i·V_j - delta_i) K_j with
/// P_ij = exp(s_ij - m_i) / l_i. (Recomputing m and l instead of reading the forward's f32
/// log-sum-exp keeps P as accurate as a naive softmax: exp(s - lse) inherits lse's rounding,
/// about |lse|·eps, on every probability.) Writes m, l and delta (B, H, S) for
/// [`attention_backward_kv()`]. q, k, v, dq are strided views (unit stride over D, offsets
/// passed separately); d_out is contiguous (B, S, H, D). `cfg.splits` units share a row, each
/// accumulating dQ over its own slice of the head dims; the first writes the statistics.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn attention_backward_q<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_out: &Tensor<F>,
    dq: &mut Tensor<F>,
    row_max: &mut Tensor<f32>,
    row_sum: &mut Tensor<f32>,
    delta: &mut Tensor<f32>,
    q_offset: u32,
    k_offset: u32,
    v_offset: u32,
    dq_offset: u32,
    scale: f32,
    #[comptime] cfg: BackwardConfig,
) {
    let d = cfg.head_dim;
    let dc = comptime!(cfg.dims_per_split());
    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
    if ABSOLUTE_POS < batch * heads * seq * cfg.splits {
        let split = ABSOLUTE_POS % cfg.splits;
        let row = ABSOLUTE_POS / cfg.splits;
        let i = row % seq;
        let bh = row / seq;
        let h = bh % heads;
        let b = bh / heads;
        let q_at = q_offset as usize + b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
        let k_row0 = k_offset as usize + b * k.stride(0) + h * k.stride(2);
        let v_row0 = v_offset as usize + b * v.stride(0) + h * v.stride(2);
        let o_at = b * d_out.stride(0) + i * d_out.stride(1) + h * d_out.stride(2);
        // The dQ accumulator (this split's dims) lives in registers, and q_i too when
        // `rows_in_registers`; dO_i is always re-read from memory (the same row every time,
        // so from cache): with it in registers too, ptxas spilled 172 bytes at D = 64 for
        // sm_90, 116 without.
        let mut qr = Array::<f32>::new(comptime!(if cfg.rows_in_registers { d } else { 1 }));
        let mut acc = Array::<f32>::new(dc);
        if comptime!(cfg.rows_in_registers) {
            #[unroll]
            for c in 0..d {
                qr[c] = f32::cast_from(q[q_at + c]);
            }
        }
        #[unroll]
        for c in 0..dc {
            acc[c] = 0.0;
        }
        let d0 = split * dc;
        let steps = q.shape(3).div_ceil(DOT_STEP);
        let mut end = seq;
        if comptime!(cfg.causal) {
            end = i + 1;
        }
        // Pass 1: online max, sum and Σ exp(s - m)·dp, rescaled whenever the max grows.
        let mut m = f32::new(NEG);
        let mut l = f32::new(0.0);
        let mut t = f32::new(0.0);
        for j in 0..end {
            let k_at = k_row0 + j * k.stride(1);
            let v_at = v_row0 + j * v.stride(1);
            let (s, dp) = query_row_dots::<F>(
                &qr,
                q,
                q_at,
                k,
                k_at,
                d_out,
                o_at,
                v,
                v_at,
                steps,
                d,
                cfg.rows_in_registers,
            );
            let s = s * scale;
            let m_new = max(m, s);
            let alpha = (m - m_new).exp();
            let e = (s - m_new).exp();
            l = l * alpha + e;
            t = t * alpha + e * dp;
            m = m_new;
        }
        let dl = t / l;
        if split == 0 {
            let stat_at = (b * heads + h) * seq + i;
            row_max[stat_at] = m;
            row_sum[stat_at] = l;
            delta[stat_at] = dl;
        }
        // Pass 2: dQ over this split's dims.
        for j in 0..end {
            let k_at = k_row0 + j * k.stride(1);
            let v_at = v_row0 + j * v.stride(1);
            let (s, dp) = query_row_dots::<F>(
                &qr,
                q,
                q_at,
                k,
                k_at,
                d_out,
                o_at,
                v,
                v_at,
                steps,
                d,
                cfg.rows_in_registers,
            );
            let ds = (s * scale - m).exp() / l * (dp - dl);
            #[unroll]
            for c in 0..dc {
                if d0 + c < d {
                    acc[c] += ds * f32::cast_from(k[k_at + d0 + c]);
                }
            }
        }
        let dq_at = dq_offset as usize + b * dq.stride(0) + i * dq.stride(1) + h * dq.stride(2);
        #[unroll]
        for c in 0..dc {
            if d0 + c < d {
                dq[dq_at + d0 + c] = F::cast_from(acc[c] * scale);
            }
        }
    }
}

/// Attention backward, key side: one unit per (b, h, key j), over the queries that see it:
/// dV_j = Σ_i P_ij dO_i, dK_j = scale · Σ_i P_ij (dO_i·V_j - delta_i) Q_i, with the row
/// statistics m, l and delta from [`attention_backward_q()`]. Views, layouts and splits as there.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn attention_backward_kv<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_out: &Tensor<F>,
    row_max: &Tensor<f32>,
    row_sum: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    q_offset: u32,
    k_offset: u32,
    v_offset: u32,
    dk_offset: u32,
    dv_offset: u32,
    scale: f32,
    #[comptime] cfg: BackwardConfig,
) {
    let d = cfg.head_dim;
    let dc = comptime!(cfg.dims_per_split());
    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
    if ABSOLUTE_POS < batch * heads * seq * cfg.splits {
        let split = ABSOLUTE_POS % cfg.splits;
        let row = ABSOLUTE_POS / cfg.splits;
        let j = row % seq;
        let bh = row / seq;
        let h = bh % heads;
        let b = bh / heads;
        let k_at = k_offset as usize + b * k.stride(0) + j * k.stride(1) + h * k.stride(2);
        let v_at = v_offset as usize + b * v.stride(0) + j * v.stride(1) + h * v.stride(2);
        let q_row0 = q_offset as usize + b * q.stride(0) + h * q.stride(2);
        let o_row0 = b * d_out.stride(0) + h * d_out.stride(2);
        let regs = comptime!(if cfg.rows_in_registers {
            cfg.head_dim
        } else {
            1
        });
        let mut kr = Array::<f32>::new(regs);
        let mut vr = Array::<f32>::new(regs);
        let mut gk = Array::<f32>::new(dc);
        let mut gv = Array::<f32>::new(dc);
        if comptime!(cfg.rows_in_registers) {
            #[unroll]
            for c in 0..d {
                kr[c] = f32::cast_from(k[k_at + c]);
                vr[c] = f32::cast_from(v[v_at + c]);
            }
        }
        #[unroll]
        for c in 0..dc {
            gk[c] = 0.0;
            gv[c] = 0.0;
        }
        let d0 = split * dc;
        let steps = q.shape(3).div_ceil(DOT_STEP);
        let mut start = 0usize;
        if comptime!(cfg.causal) {
            start = j;
        }
        for i in start..seq {
            let q_at = q_row0 + i * q.stride(1);
            let o_at = o_row0 + i * d_out.stride(1);
            let stat_at = (b * heads + h) * seq + i;
            let mut s = f32::new(0.0);
            let mut dp = f32::new(0.0);
            if comptime!(cfg.rows_in_registers) {
                #[unroll]
                for c in 0..d {
                    s += f32::cast_from(q[q_at + c]) * kr[c];
                    dp += f32::cast_from(d_out[o_at + c]) * vr[c];
                }
            } else {
                let (a, b) =
                    dots_from_memory::<F>(q, q_at, k, k_at, d_out, o_at, v, v_at, steps, d);
                s = a;
                dp = b;
            }
            let p = (s * scale - row_max[stat_at]).exp() / row_sum[stat_at];
            let ds = p * (dp - delta[stat_at]);
            #[unroll]
            for c in 0..dc {
                if d0 + c < d {
                    gk[c] += ds * f32::cast_from(q[q_at + d0 + c]);
                    gv[c] += p * f32::cast_from(d_out[o_at + d0 + c]);
                }
            }
        }
        let dk_at = dk_offset as usize + b * dk.stride(0) + j * dk.stride(1) + h * dk.stride(2);
        let dv_at = dv_offset as usize + b * dv.stride(0) + j * dv.stride(1) + h * dv.stride(2);
        #[unroll]
        for c in 0..dc {
            if d0 + c < d {
                dk[dk_at + d0 + c] = F::cast_from(gk[c] * scale);
                dv[dv_at + d0 + c] = F::cast_from(gv[c]);
            }
        }
    }
}

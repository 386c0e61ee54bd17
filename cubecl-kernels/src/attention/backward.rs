//! The attention backward: dQ per query row, dK and dV per key row, softmax recomputed.

use cubecl::prelude::*;

use super::NEG;

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

/// The operands both attention backward kernels take: q, k, v (B, S, H, D) strided views with
/// their element offsets (unit stride over D; they may be views into one fused projection),
/// d_out, the gradient of the forward's output, contiguous (B, S, H, D), the row statistics m,
/// l and delta (B, H, S, f32) that [`attention_backward_q()`] writes and
/// [`attention_backward_kv()`] reads, and the score scale, 1/√D.
#[derive(CubeLaunch, CubeType)]
pub struct BackwardIo<F: Float> {
    pub q: Tensor<F>,
    pub k: Tensor<F>,
    pub v: Tensor<F>,
    pub d_out: Tensor<F>,
    pub row_max: Tensor<f32>,
    pub row_sum: Tensor<f32>,
    pub delta: Tensor<f32>,
    pub q_offset: u32,
    pub k_offset: u32,
    pub v_offset: u32,
    pub scale: f32,
}

/// Dims per step of [`dots_from_memory`]'s loop.
const DOT_STEP: usize = 16;

/// (Σ_c q[q_at + c]·k[k_at + c], Σ_c dO[o_at + c]·v[v_at + c]) over c < `d`, in index order,
/// every operand read from memory. The loop runs `steps` (= ceil(d / 16), passed at run time)
/// steps of 16 unrolled dims: a trip count the compiler cannot see keeps it from unrolling the
/// whole loop and hoisting a row that stays the same across the caller's loop into registers,
/// which is what re-reading it from cache is meant to avoid.
#[cube]
fn dots_from_memory<F: Float>(
    io: &BackwardIo<F>,
    q_at: usize,
    k_at: usize,
    o_at: usize,
    v_at: usize,
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
                s += f32::cast_from(io.q[q_at + c]) * f32::cast_from(io.k[k_at + c]);
                t += f32::cast_from(io.d_out[o_at + c]) * f32::cast_from(io.v[v_at + c]);
            }
        }
        step += 1;
    }
    (s, t)
}

/// The row a unit of the backward kernels works on, from its position among B·H·S rows of
/// `splits` units each: (b, h, the row's position along S, which of the row's units it is).
#[cube]
fn unit_row(
    pos: usize,
    seq: usize,
    heads: usize,
    #[comptime] splits: usize,
) -> (usize, usize, usize, usize) {
    let split = pos % splits;
    let row = pos / splits;
    let bh = row / seq;
    (bh / heads, bh % heads, row % seq, split)
}

/// (q_i·k_j, dO_i·v_j) for [`attention_backward_q()`]: q_i from registers (`qr`) when
/// `cfg.rows_in_registers`, otherwise every operand through [`dots_from_memory`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn query_row_dots<F: Float>(
    qr: &Array<f32>,
    io: &BackwardIo<F>,
    q_at: usize,
    k_at: usize,
    o_at: usize,
    v_at: usize,
    steps: usize,
    #[comptime] cfg: BackwardConfig,
) -> (f32, f32) {
    let d = cfg.head_dim;
    let mut s = f32::new(0.0);
    let mut dp = f32::new(0.0);
    if comptime!(cfg.rows_in_registers) {
        #[unroll]
        for c in 0..d {
            s += qr[c] * f32::cast_from(io.k[k_at + c]);
            dp += f32::cast_from(io.d_out[o_at + c]) * f32::cast_from(io.v[v_at + c]);
        }
    } else {
        let (a, b) = dots_from_memory::<F>(io, q_at, k_at, o_at, v_at, steps, d);
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
#[cube(launch_unchecked)]
pub fn attention_backward_q<F: Float>(
    io: &mut BackwardIo<F>,
    dq: &mut Tensor<F>,
    dq_offset: u32,
    #[comptime] cfg: BackwardConfig,
) {
    let d = cfg.head_dim;
    let dc = comptime!(cfg.dims_per_split());
    let batch = io.q.shape(0);
    let seq = io.q.shape(1);
    let heads = io.q.shape(2);
    if ABSOLUTE_POS < batch * heads * seq * cfg.splits {
        let (b, h, i, split) = unit_row(ABSOLUTE_POS, seq, heads, cfg.splits);
        let q_at =
            io.q_offset as usize + b * io.q.stride(0) + i * io.q.stride(1) + h * io.q.stride(2);
        let k_row0 = io.k_offset as usize + b * io.k.stride(0) + h * io.k.stride(2);
        let v_row0 = io.v_offset as usize + b * io.v.stride(0) + h * io.v.stride(2);
        let o_at = b * io.d_out.stride(0) + i * io.d_out.stride(1) + h * io.d_out.stride(2);
        // The dQ accumulator (this split's dims) lives in registers, and q_i too when
        // `rows_in_registers`; dO_i is always re-read from memory (the same row every time,
        // so from cache): with it in registers too, ptxas spilled 172 bytes at D = 64 for
        // sm_90, 116 without.
        let mut qr = Array::<f32>::new(comptime!(if cfg.rows_in_registers { d } else { 1 }));
        let mut acc = Array::<f32>::new(dc);
        if comptime!(cfg.rows_in_registers) {
            #[unroll]
            for c in 0..d {
                qr[c] = f32::cast_from(io.q[q_at + c]);
            }
        }
        #[unroll]
        for c in 0..dc {
            acc[c] = 0.0;
        }
        let d0 = split * dc;
        let steps = io.q.shape(3).div_ceil(DOT_STEP);
        let mut end = seq;
        if comptime!(cfg.causal) {
            end = i + 1;
        }
        // Pass 1: online max, sum and Σ exp(s - m)·dp, rescaled whenever the max grows.
        let mut m = f32::new(NEG);
        let mut l = f32::new(0.0);
        let mut t = f32::new(0.0);
        for j in 0..end {
            let k_at = k_row0 + j * io.k.stride(1);
            let v_at = v_row0 + j * io.v.stride(1);
            let (s, dp) = query_row_dots::<F>(&qr, io, q_at, k_at, o_at, v_at, steps, cfg);
            let s = s * io.scale;
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
            io.row_max[stat_at] = m;
            io.row_sum[stat_at] = l;
            io.delta[stat_at] = dl;
        }
        // Pass 2: dQ over this split's dims.
        for j in 0..end {
            let k_at = k_row0 + j * io.k.stride(1);
            let v_at = v_row0 + j * io.v.stride(1);
            let (s, dp) = query_row_dots::<F>(&qr, io, q_at, k_at, o_at, v_at, steps, cfg);
            let ds = (s * io.scale - m).exp() / l * (dp - dl);
            #[unroll]
            for c in 0..dc {
                if d0 + c < d {
                    acc[c] += ds * f32::cast_from(io.k[k_at + d0 + c]);
                }
            }
        }
        let dq_at = dq_offset as usize + b * dq.stride(0) + i * dq.stride(1) + h * dq.stride(2);
        #[unroll]
        for c in 0..dc {
            if d0 + c < d {
                dq[dq_at + d0 + c] = F::cast_from(acc[c] * io.scale);
            }
        }
    }
}

/// Attention backward, key side: one unit per (b, h, key j), over the queries that see it:
/// dV_j = Σ_i P_ij dO_i, dK_j = scale · Σ_i P_ij (dO_i·V_j - delta_i) Q_i, with the row
/// statistics m, l and delta from [`attention_backward_q()`]. Views, layouts and splits as there.
#[cube(launch_unchecked)]
pub fn attention_backward_kv<F: Float>(
    io: &BackwardIo<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    dk_offset: u32,
    dv_offset: u32,
    #[comptime] cfg: BackwardConfig,
) {
    let d = cfg.head_dim;
    let dc = comptime!(cfg.dims_per_split());
    let batch = io.q.shape(0);
    let seq = io.q.shape(1);
    let heads = io.q.shape(2);
    if ABSOLUTE_POS < batch * heads * seq * cfg.splits {
        let (b, h, j, split) = unit_row(ABSOLUTE_POS, seq, heads, cfg.splits);
        let k_at =
            io.k_offset as usize + b * io.k.stride(0) + j * io.k.stride(1) + h * io.k.stride(2);
        let v_at =
            io.v_offset as usize + b * io.v.stride(0) + j * io.v.stride(1) + h * io.v.stride(2);
        let q_row0 = io.q_offset as usize + b * io.q.stride(0) + h * io.q.stride(2);
        let o_row0 = b * io.d_out.stride(0) + h * io.d_out.stride(2);
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
                kr[c] = f32::cast_from(io.k[k_at + c]);
                vr[c] = f32::cast_from(io.v[v_at + c]);
            }
        }
        #[unroll]
        for c in 0..dc {
            gk[c] = 0.0;
            gv[c] = 0.0;
        }
        let d0 = split * dc;
        let steps = io.q.shape(3).div_ceil(DOT_STEP);
        let mut start = 0usize;
        if comptime!(cfg.causal) {
            start = j;
        }
        for i in start..seq {
            let q_at = q_row0 + i * io.q.stride(1);
            let o_at = o_row0 + i * io.d_out.stride(1);
            let stat_at = (b * heads + h) * seq + i;
            let mut s = f32::new(0.0);
            let mut dp = f32::new(0.0);
            if comptime!(cfg.rows_in_registers) {
                #[unroll]
                for c in 0..d {
                    s += f32::cast_from(io.q[q_at + c]) * kr[c];
                    dp += f32::cast_from(io.d_out[o_at + c]) * vr[c];
                }
            } else {
                let (a, b) = dots_from_memory::<F>(io, q_at, k_at, o_at, v_at, steps, d);
                s = a;
                dp = b;
            }
            let p = (s * io.scale - io.row_max[stat_at]).exp() / io.row_sum[stat_at];
            let ds = p * (dp - io.delta[stat_at]);
            #[unroll]
            for c in 0..dc {
                if d0 + c < d {
                    gk[c] += ds * f32::cast_from(io.q[q_at + d0 + c]);
                    gv[c] += p * f32::cast_from(io.d_out[o_at + d0 + c]);
                }
            }
        }
        let dk_at = dk_offset as usize + b * dk.stride(0) + j * dk.stride(1) + h * dk.stride(2);
        let dv_at = dv_offset as usize + b * dv.stride(0) + j * dv.stride(1) + h * dv.stride(2);
        #[unroll]
        for c in 0..dc {
            if d0 + c < d {
                dk[dk_at + d0 + c] = F::cast_from(gk[c] * io.scale);
                dv[dv_at + d0 + c] = F::cast_from(gv[c]);
            }
        }
    }
}

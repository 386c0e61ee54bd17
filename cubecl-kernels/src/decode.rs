//! One decoding step of a whole stack of pre-LN blocks, fused into one launch: for one new
//! position per sequence and every layer, LN1 → QKV projection → append K/V to the layer's
//! cache → attention against the cache → output projection + residual → LN2 → fc1 +
//! activation → fc2 + residual; in front, the row's input (read, the local model's input, or
//! the global model's patch embedding); behind, the final LayerNorm (and the logits).
//!
//! Decoding runs a stack on one row per sequence, so the unfused path is nine launches per
//! block of a few hundred FLOPs each: its cost is the launches, not the arithmetic (about
//! 0.09 ms each on lavapipe, several µs on a GPU). Here one cube owns one sequence's row for
//! the whole stack: the row, its normalised copy, the projections and the attention output
//! live in shared memory (f32); the weights, packed one layer after another in one buffer,
//! stream from global memory in vectors of N output columns per unit (adjacent units read
//! adjacent columns); the few values a reduction needs (LayerNorm statistics, a chunk's
//! softmax max and sum) are read straight from shared memory by the units that need them,
//! with eight partial results where the chunk is long, rather than by reduction trees whose
//! barriers cost more than the arithmetic on CPU drivers.
//!
//! Loop iterations per unit are bounded: Mesa's CPU Vulkan driver (lavapipe, through
//! llvmpipe) ends every loop of an invocation, silently, once its loops have run 65,535
//! iterations in total, so a launch that loops more computes part of the stack and leaves the
//! rest of its outputs as they were. The launcher therefore spreads a wide stack's row over
//! more units there and runs a deep or long stack as several launches over ranges of its
//! layers (`layer_begin .. layer_end`), each under a bound it computes from the kernel's loops
//! (`megabyte_ops::decode::loop_trips`). (Unrolling the inner loops instead multiplied the
//! driver's compile time of the kernel by five.)
//!
//! The arithmetic per step is one row's GEMVs (C·(4C + 2H) multiply-adds per layer) and one
//! query per head against `pos + 1` keys. One cube per row suits the widths of a local model
//! or of a small global model; the launcher refuses wide stacks, which run as unfused blocks,
//! since a GEMV on one compute unit would idle the rest of a GPU.

use cubecl::prelude::*;

use crate::activation::apply_activation;

/// Large negative stand-in for -inf: `exp(NEG - NEG)` stays finite where -inf would give NaN.
const NEG: f32 = -1.0e30;

/// Partial results per reduction over a chunk of keys (fewer with fewer units).
pub const PARTS: usize = 8;

/// Where a step's row comes from.
pub mod input {
    /// `h[b]`.
    pub const ROW: u32 = 0;
    /// The local model's input at patch position p = `slot`, `ids` (B, P) holding the patch's
    /// bytes so far: `g[b, p·D ..][.. D] · W_GL + (p = 0 ? pad : embed[ids[b, p - 1]])
    /// (+ positions[p])`.
    pub const LOCAL: u32 = 1;
    /// The global model's input for the patch of bytes `slot .. slot + P`:
    /// `x[p·D .. (p + 1)·D] = embed[ids[b, p]] + positions[slot + p]`.
    pub const PATCH: u32 = 2;
}

/// What a step writes after the stack (besides the residual stream `h`).
pub mod output {
    /// Nothing more.
    pub const ROW: u32 = 0;
    /// `out[b]` = LN_f(x) (the global model's output g).
    pub const NORM: u32 = 1;
    /// `out[b]` = LN_f(x) · tableᵀ, the logits (V).
    pub const LOGITS: u32 = 2;
    /// The logits, and their argmax (the lowest id among equal maxima, as the logits are
    /// stored) written to `ids[b, slot]` (the byte at this position of the patch) and to
    /// `generated[b, gen_at]`: greedy decoding without a host round trip.
    pub const ARGMAX: u32 = 3;
}

/// Comptime shape of [`decode_stack()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeConfig {
    /// Channels C.
    pub width: usize,
    /// FFN hidden width H.
    pub hidden: usize,
    pub heads: usize,
    /// Units per cube.
    pub units: usize,
    /// Keys scored per softmax rescale.
    pub chunk: usize,
    /// Vector width N of the vectorised reads (must equal the launch's N).
    pub vector: usize,
    /// [`crate::activation::ActivationKind::id`].
    pub activation: u32,
    /// One of [`input`].
    pub input: u32,
    /// Whether the input adds position embeddings (always for [`input::PATCH`]).
    pub positions: bool,
    /// D: the width of one position's slice of `g` ([`input::LOCAL`]) or of one byte's
    /// embedding ([`input::PATCH`]).
    pub d_in: usize,
    /// One of [`output`].
    pub output: u32,
}

/// Element offsets of one layer's tensors in the packed weight buffer. Every offset is a
/// multiple of any vector width that divides C and H.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerOffsets {
    pub ln1_w: usize,
    pub ln1_b: usize,
    pub qkv_w: usize,
    pub qkv_b: usize,
    pub proj_w: usize,
    pub proj_b: usize,
    pub ln2_w: usize,
    pub ln2_b: usize,
    pub fc1_w: usize,
    pub fc1_b: usize,
    pub fc2_w: usize,
    pub fc2_b: usize,
    /// Elements per layer.
    pub len: usize,
}

impl LayerOffsets {
    /// The packed order: ln1 (C, C), qkv (C·3C, 3C), proj (C·C, C), ln2 (C, C), fc1 (C·H, H),
    /// fc2 (H·C, C); linear weights (in, out) row-major.
    pub fn new(c: usize, h: usize) -> Self {
        let sizes = [c, c, 3 * c * c, 3 * c, c * c, c, c, c, c * h, h, h * c, c];
        let mut at = [0usize; 12];
        let mut len = 0;
        for (a, s) in at.iter_mut().zip(sizes) {
            *a = len;
            len += s;
        }
        LayerOffsets {
            ln1_w: at[0],
            ln1_b: at[1],
            qkv_w: at[2],
            qkv_b: at[3],
            proj_w: at[4],
            proj_b: at[5],
            ln2_w: at[6],
            ln2_b: at[7],
            fc1_w: at[8],
            fc1_b: at[9],
            fc2_w: at[10],
            fc2_b: at[11],
            len,
        }
    }
}

impl DecodeConfig {
    /// f32 words of shared memory the kernel declares.
    pub fn shared_words(&self) -> usize {
        3 * self.width + (3 * self.width).max(self.hidden) + self.chunk + 2 * PARTS + 2 * self.units
    }

    pub fn offsets(&self) -> LayerOffsets {
        LayerOffsets::new(self.width, self.hidden)
    }
}

/// out = LN(x) · weight + bias over the `c` values of `x`, weight and bias at `w[w0 ..]` and
/// `w[b0 ..]`. Every unit computes the row's statistics itself (two passes over shared
/// memory: mean, then the centred sum of squares) and writes the columns it owns. Ends with a
/// barrier, so `out` is visible to every unit.
#[cube]
#[allow(clippy::too_many_arguments)]
fn norm_row<F: Float>(
    x: &SharedMemory<f32>,
    out: &mut SharedMemory<f32>,
    w: &Tensor<F>,
    w0: usize,
    b0: usize,
    eps: f32,
    u: usize,
    #[comptime] c: usize,
    #[comptime] units: usize,
) {
    let mut s = f32::new(0.0);
    for i in 0..c {
        s += x[i];
    }
    let mean = s / f32::cast_from(c);
    let mut q = f32::new(0.0);
    for i in 0..c {
        let d = x[i] - mean;
        q += d * d;
    }
    let rstd = f32::new(1.0) / f32::sqrt(q / f32::cast_from(c) + eps);
    let mut i = u;
    while i < c {
        out[i] = (x[i] - mean) * rstd * f32::cast_from(w[w0 + i]) + f32::cast_from(w[b0 + i]);
        i += units;
    }
    sync_cube();
}

/// Σ_i x[i] · W[i, o .. o + N] over i < n_in, for a row-major (n_in, n_out) weight starting at
/// element `w0` of `w`, read in vectors of N columns (o and w0 multiples of N).
#[cube]
fn dot_columns<F: Float, N: Size>(
    x: &SharedMemory<f32>,
    w: &Tensor<Vector<F, N>>,
    w0: usize,
    o: usize,
    #[comptime] n_in: usize,
    #[comptime] n_out: usize,
) -> Vector<f32, N> {
    let stride = n_out / N::value();
    let mut at = (w0 + o) / N::value();
    let mut acc = Vector::<f32, N>::new(0.0);
    for i in 0..n_in {
        acc += Vector::new(x[i]) * Vector::<f32, N>::cast_from(w[at]);
        at += stride;
    }
    acc
}

/// One key's value vector: the step's own from shared memory at `own` (rounded as stored), an
/// earlier one from the cache at vector index `at`.
#[cube]
fn value_at<F: Float, N: Size>(
    v_cache: &Tensor<Vector<F, N>>,
    big: &SharedMemory<f32>,
    at: usize,
    own: usize,
    is_own: bool,
) -> Vector<f32, N> {
    let mut v = Vector::<f32, N>::empty();
    if is_own {
        #[unroll]
        for lane in 0..N::value() {
            v[lane] = big[own + lane];
        }
    } else {
        v = Vector::<f32, N>::cast_from(v_cache[at]);
    }
    v
}

/// One decoding step of a range of pre-LN blocks for row b = CUBE_POS of every (B, ·)
/// tensor, `cfg.units` units per cube:
///
/// - the row x, from `cfg.input` (see [`input`]);
/// - per layer l in `layer_begin .. layer_end`: x += proj(attn(LN1(x))), where the step's key
///   and value are written to slot `pos` of `k_cache`/`v_cache` (L, B, cap, C) and its query
///   attends to slots 0 ..= pos; then x += fc2(act(fc1(LN2(x))));
/// - `h[b]` = x, and `out[b]` as `cfg.output` says (see [`output`]).
///
/// `weights` holds the layers' parameters packed as [`LayerOffsets`] says, layer after layer;
/// `weights_v` is the same buffer read in vectors of N (N divides C, H and the head width).
/// `h` (B, C), `g` (B, P·D), `ids` and `out` contiguous; the head `table` (V, C) is read in
/// vectors. Tensors a disabled stage would read are placeholders. A stack run as several
/// launches gives the first its input and the last its output; the others read and write `h`
/// ([`input::ROW`], [`output::ROW`]), which holds the residual stream in F as the layers do
/// between themselves, so the split changes no result.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn decode_stack<F: Float, N: Size>(
    h: &mut Tensor<F>,
    weights: &Tensor<F>,
    weights_v: &Tensor<Vector<F, N>>,
    k_cache: &mut Tensor<Vector<F, N>>,
    v_cache: &mut Tensor<Vector<F, N>>,
    g: &Tensor<F>,
    w_gl: &Tensor<F>,
    embed: &Tensor<F>,
    pad: &Tensor<F>,
    positions: &Tensor<F>,
    ids: &mut Tensor<u32>,
    ln_f: &Tensor<F>,
    table: &Tensor<Vector<F, N>>,
    out: &mut Tensor<F>,
    generated: &mut Tensor<u32>,
    pos: u32,
    slot: u32,
    gen_at: u32,
    layer_begin: u32,
    layer_end: u32,
    scale: f32,
    eps: f32,
    #[comptime] cfg: DecodeConfig,
) {
    let c = comptime!(cfg.width);
    let hid = comptime!(cfg.hidden);
    let units = comptime!(cfg.units);
    let hs = comptime!(cfg.width / cfg.heads);
    let parts = comptime!(PARTS.min(cfg.units));
    let off = comptime!(cfg.offsets());
    let nv = N::value();
    let b = CUBE_POS;
    let u = UNIT_POS as usize;
    // The residual stream, its normalised copy, [q | k | v] then the FFN hidden row, the
    // attention output, one chunk's scores (then probabilities), partial maxima and sums.
    let mut xs = SharedMemory::<f32>::new(c);
    let mut ns = SharedMemory::<f32>::new(c);
    let mut big = SharedMemory::<f32>::new(comptime!((3 * cfg.width).max(cfg.hidden)));
    let mut att = SharedMemory::<f32>::new(c);
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.chunk));
    let mut part = SharedMemory::<f32>::new(comptime!(2 * PARTS));

    // 0. The row.
    if comptime!(cfg.input == input::LOCAL) {
        let d = comptime!(cfg.d_in);
        let p = slot as usize;
        let g0 = b * g.stride(0) + p * d;
        let id = ids[b * ids.stride(0) + select(p > 0, p, 1) - 1] as usize;
        let mut i = u;
        while i < c {
            let mut acc = f32::new(0.0);
            for j in 0..d {
                acc += f32::cast_from(g[g0 + j]) * f32::cast_from(w_gl[j * c + i]);
            }
            // Position p reads byte p - 1 of its patch; p = 0 reads the pad.
            if p == 0 {
                acc += f32::cast_from(pad[i]);
            } else {
                acc += f32::cast_from(embed[id * c + i]);
            }
            if comptime!(cfg.positions) {
                acc += f32::cast_from(positions[p * c + i]);
            }
            xs[i] = acc;
            i += units;
        }
    } else if comptime!(cfg.input == input::PATCH) {
        let d = comptime!(cfg.d_in);
        let t0 = slot as usize;
        let mut i = u;
        while i < c {
            let p = i / d;
            let e = i % d;
            let id = ids[b * ids.stride(0) + p] as usize;
            xs[i] = f32::cast_from(embed[id * d + e]) + f32::cast_from(positions[(t0 + p) * d + e]);
            i += units;
        }
    } else {
        let mut i = u;
        while i < c {
            xs[i] = f32::cast_from(h[b * c + i]);
            i += units;
        }
    }
    sync_cube();

    let pos_u = pos as usize;
    let n_keys = pos_u + 1;
    let kv_slot = k_cache.stride(2) / nv;
    for layer in layer_begin as usize..layer_end as usize {
        let base = layer * comptime!(off.len);
        let kv_row = (layer * k_cache.stride(0) + b * k_cache.stride(1)) / nv;

        // 1. LN1, then q, k, v: unit u computes output columns u·N .. u·N + N, then those
        // `units`·N further on.
        norm_row::<F>(
            &xs,
            &mut ns,
            weights,
            base + off.ln1_w,
            base + off.ln1_b,
            eps,
            u,
            c,
            units,
        );
        let mut o = u * nv;
        while o < 3 * c {
            let acc = dot_columns::<F, N>(
                &ns,
                weights_v,
                base + off.qkv_w,
                o,
                c,
                comptime!(3 * cfg.width),
            );
            #[unroll]
            for lane in 0..nv {
                big[o + lane] = acc[lane] + f32::cast_from(weights[base + off.qkv_b + o + lane]);
            }
            o += units * nv;
        }
        sync_cube();

        // 2. Append k and v at slot `pos`, N columns per store. The step's own key and value
        // are read back from shared memory (rounded as stored), not from the cache: a barrier
        // orders shared memory, not this launch's global writes.
        let mut i = u * nv;
        while i < c {
            let mut k = Vector::<F, N>::empty();
            let mut v = Vector::<F, N>::empty();
            #[unroll]
            for lane in 0..nv {
                k[lane] = F::cast_from(big[c + i + lane]);
                v[lane] = F::cast_from(big[2 * c + i + lane]);
                big[c + i + lane] = f32::cast_from(k[lane]);
                big[2 * c + i + lane] = f32::cast_from(v[lane]);
            }
            k_cache[kv_row + pos_u * kv_slot + i / nv] = k;
            v_cache[kv_row + pos_u * kv_slot + i / nv] = v;
            i += units * nv;
        }
        sync_cube();

        // 3. Attention, head by head, keys in chunks with an online softmax: unit u scores
        // keys j0 + u, j0 + u + units, ...; units 0..8 each take the max, then the sum, of
        // every eighth score, and every unit combines those eight; the output accumulates in
        // `att`, unit u owning head dims u·N .. u·N + N, then those `units`·N further on.
        for head in 0..cfg.heads {
            let q0 = head * hs;
            // The head's query, scaled, in registers.
            let mut qr =
                Array::<Vector<f32, N>>::new(comptime!(cfg.width / cfg.heads / cfg.vector));
            #[unroll]
            for e in 0..comptime!(cfg.width / cfg.heads / cfg.vector) {
                let mut qv = Vector::<f32, N>::empty();
                #[unroll]
                for lane in 0..nv {
                    qv[lane] = big[q0 + e * nv + lane] * scale;
                }
                qr[e] = qv;
            }
            let mut d = u * nv;
            while d < hs {
                #[unroll]
                for lane in 0..nv {
                    att[q0 + d + lane] = f32::new(0.0);
                }
                d += units * nv;
            }
            let mut m = f32::new(NEG);
            let mut l = f32::new(0.0);
            let mut j0 = 0;
            while j0 < n_keys {
                let count = min(comptime!(cfg.chunk), n_keys - j0);
                let mut t = u;
                while t < count {
                    let j = j0 + t;
                    let mut dots = Vector::<f32, N>::new(0.0);
                    if j == pos_u {
                        #[unroll]
                        for e in 0..comptime!(cfg.width / cfg.heads / cfg.vector) {
                            let mut kv = Vector::<f32, N>::empty();
                            #[unroll]
                            for lane in 0..nv {
                                kv[lane] = big[c + q0 + e * nv + lane];
                            }
                            dots += qr[e] * kv;
                        }
                    } else {
                        let at = kv_row + j * kv_slot + q0 / nv;
                        #[unroll]
                        for e in 0..comptime!(cfg.width / cfg.heads / cfg.vector) {
                            dots += qr[e] * Vector::<f32, N>::cast_from(k_cache[at + e]);
                        }
                    }
                    let mut dot = f32::new(0.0);
                    #[unroll]
                    for lane in 0..nv {
                        dot += dots[lane];
                    }
                    scores[t] = dot;
                    t += units;
                }
                sync_cube();
                if u < parts {
                    let mut mx = f32::new(NEG);
                    let mut t = u;
                    while t < count {
                        mx = f32::max(mx, scores[t]);
                        t += parts;
                    }
                    part[u] = mx;
                }
                sync_cube();
                let mut m_new = m;
                #[unroll]
                for i in 0..parts {
                    m_new = f32::max(m_new, part[i]);
                }
                let mut t = u;
                while t < count {
                    scores[t] = f32::exp(scores[t] - m_new);
                    t += units;
                }
                sync_cube();
                if u < parts {
                    let mut sum = f32::new(0.0);
                    let mut t = u;
                    while t < count {
                        sum += scores[t];
                        t += parts;
                    }
                    part[PARTS + u] = sum;
                }
                sync_cube();
                let mut sum = f32::new(0.0);
                #[unroll]
                for i in 0..parts {
                    sum += part[PARTS + i];
                }
                let alpha = f32::exp(m - m_new);
                l = l * alpha + sum;
                m = m_new;
                let mut d = u * nv;
                while d < hs {
                    let mut acc = Vector::<f32, N>::empty();
                    #[unroll]
                    for lane in 0..nv {
                        acc[lane] = att[q0 + d + lane] * alpha;
                    }
                    for t in 0..count {
                        let v = value_at::<F, N>(
                            v_cache,
                            &big,
                            kv_row + (j0 + t) * kv_slot + (q0 + d) / nv,
                            2 * c + q0 + d,
                            j0 + t == pos_u,
                        );
                        acc += Vector::new(scores[t]) * v;
                    }
                    #[unroll]
                    for lane in 0..nv {
                        att[q0 + d + lane] = acc[lane];
                    }
                    d += units * nv;
                }
                // `scores` and `part` are rewritten by the next chunk.
                sync_cube();
                j0 += comptime!(cfg.chunk);
            }
            let mut d = u * nv;
            while d < hs {
                #[unroll]
                for lane in 0..nv {
                    att[q0 + d + lane] = att[q0 + d + lane] / l;
                }
                d += units * nv;
            }
        }
        sync_cube();

        // 4. x += proj(attn) (each unit updates the columns it owns; nobody else reads them).
        let mut o = u * nv;
        while o < c {
            let acc = dot_columns::<F, N>(&att, weights_v, base + off.proj_w, o, c, c);
            #[unroll]
            for lane in 0..nv {
                xs[o + lane] += acc[lane] + f32::cast_from(weights[base + off.proj_b + o + lane]);
            }
            o += units * nv;
        }
        sync_cube();

        // 5. x += fc2(act(fc1(LN2(x)))); the hidden row reuses the q/k/v space.
        norm_row::<F>(
            &xs,
            &mut ns,
            weights,
            base + off.ln2_w,
            base + off.ln2_b,
            eps,
            u,
            c,
            units,
        );
        let mut o = u * nv;
        while o < hid {
            let acc = dot_columns::<F, N>(&ns, weights_v, base + off.fc1_w, o, c, hid);
            #[unroll]
            for lane in 0..nv {
                let pre = acc[lane] + f32::cast_from(weights[base + off.fc1_b + o + lane]);
                let a = apply_activation::<f32, Const<1>>(Vector::new(pre), cfg.activation);
                big[o + lane] = a[0];
            }
            o += units * nv;
        }
        sync_cube();
        let mut o = u * nv;
        while o < c {
            let acc = dot_columns::<F, N>(&big, weights_v, base + off.fc2_w, o, hid, c);
            #[unroll]
            for lane in 0..nv {
                let x =
                    xs[o + lane] + acc[lane] + f32::cast_from(weights[base + off.fc2_b + o + lane]);
                // The residual stream is stored in F between blocks, as the unfused path does.
                xs[o + lane] = f32::cast_from(F::cast_from(x));
            }
            o += units * nv;
        }
        sync_cube();
    }

    let mut i = u;
    while i < c {
        h[b * c + i] = F::cast_from(xs[i]);
        i += units;
    }

    // 6. The final LayerNorm, and the logits.
    if comptime!(cfg.output != output::ROW) {
        norm_row::<F>(&xs, &mut ns, ln_f, 0, c, eps, u, c, units);
        if comptime!(cfg.output == output::NORM) {
            let mut i = u;
            while i < c {
                out[b * c + i] = F::cast_from(ns[i]);
                i += units;
            }
        } else {
            let vocab = table.shape(0);
            let cv = comptime!(cfg.width) / nv;
            // This unit's largest logit (as stored) and its id, the lowest id on ties: the
            // unit visits its ids in increasing order.
            let mut best = f32::new(NEG);
            let mut best_id = u;
            let mut v = u;
            while v < vocab {
                let mut acc = f32::new(0.0);
                for i in 0..cv {
                    let t = Vector::<f32, N>::cast_from(table[v * cv + i]);
                    #[unroll]
                    for lane in 0..nv {
                        acc += ns[i * nv + lane] * t[lane];
                    }
                }
                let stored = F::cast_from(acc);
                out[b * vocab + v] = stored;
                let value = f32::cast_from(stored);
                if value > best || v == u {
                    best = value;
                    best_id = v;
                }
                v += units;
            }
            if comptime!(cfg.output == output::ARGMAX) {
                let mut best_v = SharedMemory::<f32>::new(units);
                let mut best_i = SharedMemory::<u32>::new(units);
                best_v[u] = best;
                best_i[u] = best_id as u32;
                sync_cube();
                if u == 0 {
                    let mut top = best_v[0];
                    let mut top_id = best_i[0];
                    for w in 1..min(units, vocab) {
                        let later = best_v[w] == top && best_i[w] < top_id;
                        if best_v[w] > top || later {
                            top = best_v[w];
                            top_id = best_i[w];
                        }
                    }
                    ids[b * ids.stride(0) + slot as usize] = top_id;
                    generated[b * generated.stride(0) + gen_at as usize] = top_id;
                }
            }
        }
    }
}

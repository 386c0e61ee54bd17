//! The rows flash kernel: a few query rows per unit, registers only, no barriers; with split
//! head dims for decoding on GPUs.

use cubecl::prelude::*;

use super::{FlashIo, NEG};

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
    io: &mut FlashIo<F, N>,
    #[comptime] cfg: RowsConfig,
) {
    let nv = cfg.vector;
    let dv = comptime!(cfg.head_dim / cfg.vector);
    let ch = cfg.chunk;
    let rr = cfg.rows;
    let batch = io.q.shape(0);
    let seq = io.q.shape(1);
    let heads = io.q.shape(2);
    // Keys may outnumber queries (decoding against a cache): query i is position
    // i + shift of the key sequence and, when causal, sees keys 0..=i + shift.
    let seq_k = io.k.shape(1);
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

        let q_row0 = io.q_offset as usize + b * io.q.stride(0) + h * io.q.stride(2);
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
            let q_at = (q_row0 + i * io.q.stride(1)) / nv;
            if comptime!(!cfg.q_from_memory) {
                #[unroll]
                for c in 0..dv {
                    qr[r * dv + c] = Vector::<f32, N>::cast_from(io.q[q_at + c]);
                }
            }
            #[unroll]
            for c in 0..dps {
                acc[r * dps + c] = Vector::<f32, N>::new(0.0);
            }
            m[r] = NEG;
            l[r] = 0.0;
        }
        let k_row0 = io.k_offset as usize + b * io.k.stride(0) + h * io.k.stride(2);
        let v_row0 = io.v_offset as usize + b * io.v.stride(0) + h * io.v.stride(2);

        let mut end = seq_k;
        if comptime!(cfg.causal) {
            end = min(i0 + rr + shift, seq_k);
        }
        let n_chunks = end.div_ceil(ch);
        let q_steps = (io.q.shape(3) / nv).div_ceil(Q_STEP);
        // Scores of the chunk, then (in place) their probabilities: (rows, chunk).
        let mut sp = Array::<f32>::new(comptime!(cfg.rows * cfg.chunk));
        // Each row's rescale of the chunk, and the chunk's own P·V.
        let mut alphas = Array::<f32>::new(rr);
        let mut part = Array::<Vector<f32, N>>::new(comptime!(cfg.rows * cfg.split_vectors()));
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
                    let k_at = (k_row0 + j * io.k.stride(1)) / nv;
                    if comptime!(cfg.q_from_memory) {
                        // The dims go in steps whose count is a run-time value: unrolled whole,
                        // the compiler hoisted q's loads (the same at every key) into
                        // registers and spilled.
                        #[unroll]
                        for r in 0..rr {
                            let q_at = (q_row0 + min(i0 + r, seq - 1) * io.q.stride(1)) / nv;
                            let mut step = 0;
                            while step < q_steps {
                                #[unroll]
                                for u in 0..Q_STEP {
                                    let c = step * Q_STEP + u;
                                    if c < dv {
                                        dots[r] += Vector::<f32, N>::cast_from(io.q[q_at + c])
                                            * Vector::<f32, N>::cast_from(io.k[k_at + c]);
                                    }
                                }
                                step += 1;
                            }
                        }
                    } else {
                        #[unroll]
                        for c in 0..dv {
                            let kc = Vector::<f32, N>::cast_from(io.k[k_at + c]);
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
                    sp[r * ch + u] = select(visible, total * io.scale, f32::new(NEG));
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
                alphas[r] = alpha;
            }
            // The chunk's P·V summed on its own, then added to the rescaled accumulator: two
            // levels of summation, where one running sum over every key rounded more than the
            // naive kernel's normalised sum does.
            #[unroll]
            for c in 0..comptime!(cfg.rows * cfg.split_vectors()) {
                part[c] = Vector::new(0.0);
            }
            for u in 0..ch {
                let j = j0 + u;
                if j < end {
                    let v_at = (v_row0 + j * io.v.stride(1)) / nv;
                    #[unroll]
                    for c in 0..dps {
                        // The last split's slice may run past D (with one split, c0 = 0 and it
                        // never does).
                        if c0 + c < dv {
                            let vc = Vector::<f32, N>::cast_from(io.v[v_at + c0 + c]);
                            #[unroll]
                            for r in 0..rr {
                                part[r * dps + c] += Vector::new(sp[r * ch + u]) * vc;
                            }
                        }
                    }
                }
            }
            #[unroll]
            for r in 0..rr {
                #[unroll]
                for c in 0..dps {
                    acc[r * dps + c] =
                        acc[r * dps + c] * Vector::new(alphas[r]) + part[r * dps + c];
                }
            }
            chunk += 1;
        }

        let o_row0 = b * io.out.stride(0) + h * io.out.stride(2);
        #[unroll]
        for r in 0..rr {
            let i = i0 + r;
            if i < seq {
                let inv_l = Vector::<f32, N>::new(1.0 / l[r]);
                let o_at = (o_row0 + i * io.out.stride(1)) / nv;
                #[unroll]
                for c in 0..dps {
                    if c0 + c < dv {
                        io.out[o_at + c0 + c] = Vector::cast_from(acc[r * dps + c] * inv_l);
                    }
                }
                if split == 0 {
                    io.lse[b * io.lse.stride(0) + h * io.lse.stride(1) + i * io.lse.stride(2)] =
                        m[r] + l[r].ln();
                }
            }
        }
    }
}

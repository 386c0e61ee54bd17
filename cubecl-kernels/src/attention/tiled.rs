//! The tiled flash kernel: groups of units share Q, K and V tiles through shared memory.

use cubecl::prelude::*;

use super::{FlashIo, NEG};

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

#[cube(launch_unchecked)]
pub fn flash_attention<F: Float, N: Size>(io: &mut FlashIo<F, N>, #[comptime] cfg: FlashConfig) {
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

    let batch = io.q.shape(0);
    let seq = io.q.shape(1);
    let heads = io.q.shape(2);
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
    let q_row0 = io.q_offset as usize + b * io.q.stride(0) + h * io.q.stride(2);
    #[unroll]
    for it in 0..q_loads {
        let e = t + it * group_units;
        if e < bq * dv {
            let r = e / dv;
            let c = e % dv;
            let pos = q0 + r;
            let mut val = Vector::<f32, N>::new(0.0);
            if active && pos < seq {
                val = Vector::<f32, N>::cast_from(io.q[(q_row0 + pos * io.q.stride(1)) / nv + c]);
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

    let k_row0 = io.k_offset as usize + b * io.k.stride(0) + h * io.k.stride(2);
    let v_row0 = io.v_offset as usize + b * io.v.stride(0) + h * io.v.stride(2);
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
                    kval =
                        Vector::<f32, N>::cast_from(io.k[(k_row0 + pos * io.k.stride(1)) / nv + c]);
                    vval =
                        Vector::<f32, N>::cast_from(io.v[(v_row0 + pos * io.v.stride(1)) / nv + c]);
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
            s = dot * io.scale;
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
        // The tile's P·V is summed from zero, then added to the rescaled accumulator (two levels
        // of summation, as in the Rows kernel, where one running sum over every key exceeded
        // twice the naive kernel's error in 0.7% of simulated decode cases).
        #[unroll]
        for c in 0..dpu {
            let dd = j + c * bk;
            if dd < d {
                let mut part = f32::new(0.0);
                #[unroll]
                for x in 0..bk {
                    part += p_s[s_base + x] * v_s[kv_base + x * d + dd];
                }
                acc[c] = acc[c] * alpha + part;
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
        io.lse[b * io.lse.stride(0) + h * io.lse.stride(1) + qpos * io.lse.stride(2)] = m + l.ln();
    }
    sync_cube();

    let o_row0 = b * io.out.stride(0) + h * io.out.stride(2);
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
            io.out[(o_row0 + pos * io.out.stride(1)) / nv + c] = Vector::cast_from(val);
        }
    }
}

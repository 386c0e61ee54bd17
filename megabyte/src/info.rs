//! What a configuration costs: parameters, forward FLOPs per byte of each transformer, and
//! device memory for a forward pass and for cached generation.
//!
//! FLOPs count a multiply-add as 2. Per layer of width C and FFN hidden width H, each position
//! costs 2·(C·3C + C·C + 2·C·H) in projections and, in causal attention over sequences of
//! length S, 2·S·C (half of QKᵀ and PV's 4·S·C). The global model has one position per patch,
//! so its per-byte cost is divided by P.

use megabyte_reference::Config;

/// Parameter counts by part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parameters {
    /// Byte and position embeddings, pads, W_GL and an untied head.
    pub embeddings: usize,
    pub global_blocks: usize,
    pub local_blocks: usize,
    pub total: usize,
}

/// Forward FLOPs per byte at a given context length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlopsPerByte {
    /// Global blocks: projections and FFN (once per patch, so divided by P) plus attention.
    pub global: f64,
    /// Local blocks, the global→local projection and the output head.
    pub local: f64,
}

impl FlopsPerByte {
    pub fn total(&self) -> f64 {
        self.global + self.local
    }
}

/// Device memory estimate in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub weights: usize,
    /// Peak live buffers of one forward pass over the context at batch 1 (logits included).
    pub forward: usize,
    /// Global and local KV caches of one generated sequence.
    pub kv_cache: usize,
}

fn block_params(c: usize, h: usize) -> usize {
    // Two LayerNorms, qkv, proj, fc1, fc2 with biases.
    4 * c + c * 3 * c + 3 * c + c * c + c + c * h + h + h * c + c
}

pub fn parameters(cfg: &Config) -> Parameters {
    let wg = cfg.global_width();
    let dl = cfg.d_local;
    let global_blocks = cfg.layers_global * block_params(wg, cfg.ffn_mult * wg);
    let local_blocks = cfg.layers_local * block_params(dl, cfg.ffn_mult * dl);
    let total = cfg.num_parameters();
    Parameters {
        embeddings: total - global_blocks - local_blocks,
        global_blocks,
        local_blocks,
        total,
    }
}

/// Matmul FLOPs of one block per position.
fn block_matmul_flops(c: usize, h: usize) -> f64 {
    2.0 * (c * 3 * c + c * c + 2 * c * h) as f64
}

/// Forward FLOPs per byte over sequences of `context` bytes (a multiple of P).
pub fn flops_per_byte(cfg: &Config, context: usize) -> FlopsPerByte {
    let (p, wg, dl) = (cfg.patch as f64, cfg.global_width(), cfg.d_local);
    let k = (context / cfg.patch) as f64;
    // Causal attention per position: 2·S·C (QKᵀ and PV, half the square).
    let global_attn = 2.0 * k * wg as f64;
    let global =
        cfg.layers_global as f64 * (block_matmul_flops(wg, cfg.ffn_mult * wg) + global_attn) / p;
    let local_attn = 2.0 * p * dl as f64;
    let local = cfg.layers_local as f64 * (block_matmul_flops(dl, cfg.ffn_mult * dl) + local_attn)
        + 2.0 * (cfg.d_global * dl) as f64
        + 2.0 * (dl * cfg.vocab) as f64;
    FlopsPerByte { global, local }
}

/// Memory for weights stored in `elem` bytes per value and a batch-1 forward over `context`
/// bytes, following the buffers `Model` allocates.
pub fn memory(cfg: &Config, context: usize, elem: usize) -> Memory {
    let (p, wg, dl, v) = (cfg.patch, cfg.global_width(), cfg.d_local, cfg.vocab);
    let k = context / p;
    let f32b = 4;
    // One stack's scratch per row: residual stream, normed, qkv (3C), attention out and mid
    // (7C in all) and the FFN hidden; f32 mean, rstd and one log-sum-exp per head.
    let stack = |rows: usize, c: usize, heads: usize| {
        rows * (7 * c + cfg.ffn_mult * c) * elem + rows * (2 + heads) * f32b
    };
    let global = stack(k, wg, cfg.heads_global) + k * wg * elem; // + g
    let local = stack(context, dl, cfg.heads_local);
    let head = context * v * elem + 2 * context * f32b;
    Memory {
        weights: cfg.num_parameters() * elem,
        // The global scratch is freed before the local stack runs; g stays.
        forward: global.max(k * wg * elem + local) + head,
        kv_cache: 2 * (cfg.layers_global * cfg.patches() * wg + cfg.layers_local * p * dl) * elem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_add_up_and_match_the_hand_count_for_tiny() {
        let cfg = Config::tiny();
        let p = parameters(&cfg);
        assert_eq!(p.embeddings + p.global_blocks + p.local_blocks, p.total);
        // tiny: E_G 256·16, E_pos 64·16, pad 64, ln_f 2·64, W_GL 16·32, E_L 256·32, pad 32,
        // E_lpos 4·32, ln_f 2·32.
        let emb = 256 * 16 + 64 * 16 + 64 + 128 + 16 * 32 + 256 * 32 + 32 + 4 * 32 + 64;
        assert_eq!(p.embeddings, emb);
    }

    #[test]
    fn global_flops_per_byte_fall_with_the_patch_size() {
        // The paper's point: the global model's per-byte cost is divided by P.
        let a = Config::preset("paper-text").unwrap();
        let b = Config {
            patch: 16,
            d_global: a.d_global / 2,
            ..a.clone()
        };
        let (fa, fb) = (flops_per_byte(&a, 8192), flops_per_byte(&b, 8192));
        let ratio = fa.global / fb.global;
        assert!(ratio > 1.9 && ratio < 2.1, "{ratio}");
        // Paper-text global: 14 layers of width 2048 -> about 2·12·2048²·14/8 ≈ 176 MFLOP/byte.
        assert!((fa.global / 1.76e8 - 1.0).abs() < 0.05, "{}", fa.global);
    }
}

//! Multi-head attention: the flash kernels of the forward, the naive score-materialising
//! kernels they are measured against, and the backward.
//!
//! Layout: q, k, v and out are (B, S, H, D) with arbitrary strides over B, S and H and a unit
//! stride over D, so q, k and v can be views into one fused (B, S, 3, H, D) projection. Each of
//! q, k, v also takes an element offset into its buffer for that purpose. lse is (B, H, S), f32:
//! the natural log-sum-exp of each row's scaled scores, saved for the backward pass. Every
//! flash kernel computes the same function with an online softmax (running row max and sum,
//! the accumulator rescaled as the max grows): the S × S scores are never formed.
//!
//! | variant | file | what | `AttentionKernel::Auto` picks it |
//! | --- | --- | --- | --- |
//! | [`flash_attention`] | `tiled.rs` | groups of units share Q/K/V tiles through shared memory; several short sequences per cube in the local regime | f32 (and f16/bf16 without tensor cores) on devices with plane ops, queries as long as keys; on devices without plane ops, sequences of 65,536 or more |
//! | [`flash_attention_rows`] | `rows.rs` | a few query rows per unit, registers only, no barriers; `splits > 1` spreads a row's head dims over units | devices without plane ops (CPU drivers such as lavapipe); decoding against a longer KV cache (split on devices with plane ops) |
//! | [`flash_attention_cmma`] | `cmma.rs` | QKᵀ and PV on 16 × 16 × 16 CMMA fragments, f32 accumulation; `emulated` computes the fragments with loops | f16/bf16 on devices whose properties list the fragment |
//! | [`naive_scores`], [`naive_softmax`], [`naive_weighted_sum`] | `naive.rs` | the S × S scores in memory, one unit per element | never: the baseline of tests and benches |
//! | [`attention_backward_q`], [`attention_backward_kv`] | `backward.rs` | dQ per query row, dK and dV per key row, the softmax recomputed from q and k | always (`BackwardKernel::Auto` splits head dims on devices with plane ops) |
//!
//! The launchers, with the planners that choose among these, are `megabyte_ops::attention`.
//! Tested against `megabyte_reference::attention` by `cargo test -p megabyte-tests --test
//! attention` (forward) and `--test backward`; benched by `cargo bench -p megabyte-benches
//! --bench attention` and `--bench backward`. The fragment helpers the CMMA kernel shares with
//! the CMMA GEMM are in `crate::fragment`.

use cubecl::prelude::*;

mod backward;
mod cmma;
mod naive;
mod rows;
mod tiled;

pub use backward::*;
pub use cmma::*;
pub use naive::*;
pub use rows::*;
pub use tiled::*;

/// Large negative stand-in for -inf: `exp(NEG - NEG)` stays finite where -inf would give NaN.
const NEG: f32 = -1.0e30;

/// The operands of every flash forward kernel: q, k, v and out (B, S, H, D) with their element
/// offsets (q, k and v may be views into one fused projection), lse (B, H, S), and the score
/// scale, 1/√D.
#[derive(CubeLaunch, CubeType)]
pub struct FlashIo<F: Float, N: Size> {
    pub q: Tensor<Vector<F, N>>,
    pub k: Tensor<Vector<F, N>>,
    pub v: Tensor<Vector<F, N>>,
    pub out: Tensor<Vector<F, N>>,
    pub lse: Tensor<f32>,
    pub q_offset: u32,
    pub k_offset: u32,
    pub v_offset: u32,
    pub scale: f32,
}

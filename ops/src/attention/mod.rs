//! Launchers for causal (or full) multi-head attention: the flash kernel and the naive
//! score-materialising baseline, and the backward.
//!
//! Layout: q, k, v, out are (B, S, H, D); q, k, v may be strided views (unit stride over D),
//! out is a contiguous tensor. lse is a contiguous (B, H, S) f32 tensor. Scores are scaled by
//! 1/sqrt(D).
//!
//! Decoding against a KV cache: k and v may hold S_kv > S positions, (B, S_kv, H, D); query i
//! is then position i + S_kv - S and, when causal, sees keys 0..=i + S_kv - S. That case runs
//! the `Rows` kernel (`RowsSplitDims` on devices with plane operations).
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | [`AttentionKernel`], [`AttentionProblem`], the checks of q, k, v, the outputs and the head dim |
//! | `plan.rs` | the planners: [`plan`] (the forward kernel `AttentionKernel` resolves to on a device, and its shape), [`plan_tiled`], [`plan_cmma`], [`plan_backward`]; [`AttentionCall`], [`AttentionPlan`], [`BackwardKernel`], [`BackwardProblem`], [`BackwardPlan`] |
//! | `launch.rs` | the forward [`flash_attention`], [`flash_attention_with`] (runs what [`plan`] returns) and [`naive_attention`]; the backward [`attention_backward`], [`attention_backward_with`] |
//!
//! The kernels are `megabyte_kernels::attention`, whose `mod.rs` tables its variants.

use cubecl::prelude::*;

use crate::error::OpError;
use crate::tensor::{Tensor, TensorView};

mod launch;
mod plan;

pub use launch::{
    attention_backward, attention_backward_with, flash_attention, flash_attention_with,
    naive_attention,
};
pub use plan::{
    plan, plan_backward, plan_cmma, plan_tiled, AttentionCall, AttentionPlan, BackwardKernel,
    BackwardPlan, BackwardProblem, CMMA_SMEM_TARGET, ROWS_MAX_SEQ,
};

const OP: &str = "attention";

/// Largest head dim the flash kernel accepts (per-unit registers and shared memory grow with D).
pub const MAX_HEAD_DIM: usize = 256;

/// Which flash kernel runs. All compute the same function with the same online softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `Cmma` for f16/bf16 on devices whose properties list 16×16×16 tensor-core fragments
    /// with f32 accumulation (when queries and keys are the same length); otherwise `Tiled` on
    /// devices with plane (warp) operations, `Rows` on devices without them, which in practice
    /// are CPU drivers such as lavapipe (cubecl's wgpu runtime hides plane ops on CPU
    /// adapters), where barriers are expensive and caches large. Decoding against a longer KV
    /// cache runs `RowsSplitDims` on devices with plane ops and `Rows` on the others.
    Auto,
    /// Groups of units share Q/K/V tiles through shared memory; several short sequences per
    /// cube in the local regime.
    Tiled,
    /// A few query rows per unit (each K/V vector loaded serves them all), registers only, no
    /// barriers.
    Rows,
    /// The `Rows` kernel with one query row per unit group and the row's head dims spread over
    /// the group's units, each accumulating at most 32 floats of output (and recomputing the
    /// row's scores): more units and fewer registers per unit, for decoding on GPUs.
    RowsSplitDims,
    /// QKᵀ and PV on tensor-core (CMMA) fragments, f16/bf16 only, on devices that have them.
    Cmma,
    /// The `Cmma` kernel with each fragment product computed by plain loops over the same
    /// shared tiles: its staging, masking, softmax and accumulator handling on any device
    /// (f16/bf16 only). For tests; slow.
    CmmaEmulated,
}

/// The shape of an attention call, independent of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionProblem {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl AttentionProblem {
    /// Multiply-adds ×2 of QKᵀ and PV; half of them when causal.
    pub fn flops(&self) -> f64 {
        let full = 4.0
            * (self.batch * self.heads) as f64
            * (self.seq as f64).powi(2)
            * self.head_dim as f64;
        if self.causal {
            full / 2.0
        } else {
            full
        }
    }
}

/// Checks q (B, S, H, D) and k, v (B, S_kv, H, D) with S_kv >= S; returns [B, S, H, D] and S_kv.
fn check_qkv<R: Runtime, E>(
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
) -> Result<([usize; 4], usize), OpError> {
    if q.shape.len() != 4 {
        return Err(OpError::Shape {
            op: OP,
            tensor: "q",
            got: q.shape.clone(),
            expected: vec![0; 4],
        });
    }
    let dims = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let seq_k = k.shape.get(1).copied().unwrap_or(0).max(dims[1]);
    let kv_shape = vec![dims[0], seq_k, dims[2], dims[3]];
    for (name, t) in [("k", k), ("v", v)] {
        if t.shape != kv_shape {
            return Err(OpError::Shape {
                op: OP,
                tensor: name,
                got: t.shape.clone(),
                expected: kv_shape,
            });
        }
    }
    if dims.contains(&0) {
        return Err(OpError::empty(OP, "q", q.shape.clone()));
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        check_head_stride(OP, name, t)?;
    }
    Ok((dims, seq_k))
}

/// [`check_qkv`] for a call without a KV cache: keys as many as queries. Returns [B, S, H, D].
fn check_qkv_no_cache<R: Runtime, E>(
    op: &'static str,
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
) -> Result<[usize; 4], OpError> {
    let (dims, seq_k) = check_qkv(q, k, v)?;
    if seq_k != dims[1] {
        return Err(OpError::shape(op, "k", &k.shape, q.shape.clone()));
    }
    Ok(dims)
}

/// Checks that the (B, S, H, D) view `name` has unit stride over D.
fn check_head_stride<R: Runtime, E>(
    op: &'static str,
    name: &'static str,
    t: &TensorView<R, E>,
) -> Result<(), OpError> {
    if t.strides[3] != 1 {
        return Err(OpError::unsupported(
            op,
            "head-dim stride",
            t.strides[3],
            format!("`{name}` must be contiguous along the head dim (stride 1)"),
        ));
    }
    Ok(())
}

/// Checks the head dim against [`MAX_HEAD_DIM`]; `kernels` names what has that limit in the
/// error ("the flash kernel supports").
fn check_head_dim(op: &'static str, head_dim: usize, kernels: &str) -> Result<(), OpError> {
    if head_dim > MAX_HEAD_DIM {
        return Err(OpError::unsupported(
            op,
            "head dim",
            head_dim,
            format!("{kernels} head dims up to {MAX_HEAD_DIM}"),
        ));
    }
    Ok(())
}

fn check_outputs<R: Runtime, E>(
    dims: [usize; 4],
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
) -> Result<(), OpError> {
    let [b, s, h, _] = dims;
    if out.shape() != dims {
        return Err(OpError::Shape {
            op: OP,
            tensor: "out",
            got: out.shape().to_vec(),
            expected: dims.to_vec(),
        });
    }
    if lse.shape() != [b, h, s] {
        return Err(OpError::Shape {
            op: OP,
            tensor: "lse",
            got: lse.shape().to_vec(),
            expected: vec![b, h, s],
        });
    }
    Ok(())
}

/// The score scale, 1/sqrt(D).
fn score_scale(head_dim: usize) -> f32 {
    (1.0 / (head_dim as f64).sqrt()) as f32
}

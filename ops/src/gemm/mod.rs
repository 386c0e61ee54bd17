//! Launchers for the GEMM with a fused epilogue, its naive baseline, and the linear layer built
//! on it.
//!
//! Operands: `a` is (M, K) or (batch, M, K), `b` is (K, N) or (batch, K, N), each a
//! [`TensorView`] with any element strides, so a transpose is a view with swapped strides
//! ([`TensorView::t`]) and a rank-2 operand is broadcast over the other's batch. The output
//! (and the residual, when given) is a contiguous (M, N) or (batch, M, N) tensor; the bias is
//! (N). Accumulation and the epilogue run in f32; the result is rounded once to E.
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | [`Epilogue`], [`GemmProblem`], the operand checks and the rank-3 view of an operand |
//! | `plan.rs` | [`GemmKernel`], [`GemmCall`], [`GemmPlan`] and the planners: [`plan`], [`plan_tiled`] (also what `local_input` runs), the CMMA plan, operand vector widths, the grid |
//! | `launch.rs` | [`gemm`], [`gemm_with`], [`matmul`], [`linear`], [`gemm_naive`] |
//!
//! The kernels are `megabyte_kernels::gemm`, whose `mod.rs` tables its variants.

use cubecl::prelude::*;
use megabyte_kernels::activation::ActivationKind;

use crate::error::OpError;
use crate::tensor::{Tensor, TensorView};

mod launch;
mod plan;

pub use launch::{gemm, gemm_naive, gemm_with, linear, matmul};
pub use plan::{
    cmma_supported, plan, plan_tiled, GemmCall, GemmKernel, GemmPlan, OperandLayout, MAX_VECTOR,
};
pub(crate) use plan::{grid, no_cmma, CMMA_PLANE};

const OP: &str = "gemm";

/// What the GEMM applies to each output element, in this order:
/// `act(scale · acc + bias[n]) + residual[b, m, n]`.
pub struct Epilogue<'a, R: Runtime, E> {
    pub scale: f32,
    pub bias: Option<&'a Tensor<R, E>>,
    pub activation: Option<ActivationKind>,
    pub residual: Option<&'a Tensor<R, E>>,
}

impl<R: Runtime, E> Default for Epilogue<'_, R, E> {
    fn default() -> Self {
        Epilogue {
            scale: 1.0,
            bias: None,
            activation: None,
            residual: None,
        }
    }
}

impl<'a, R: Runtime, E> Epilogue<'a, R, E> {
    /// No epilogue: out = A · B.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn scale(self, scale: f32) -> Self {
        Epilogue { scale, ..self }
    }

    pub fn bias(self, bias: &'a Tensor<R, E>) -> Self {
        Epilogue {
            bias: Some(bias),
            ..self
        }
    }

    pub fn activation(self, act: ActivationKind) -> Self {
        Epilogue {
            activation: Some(act),
            ..self
        }
    }

    pub fn residual(self, residual: &'a Tensor<R, E>) -> Self {
        Epilogue {
            residual: Some(residual),
            ..self
        }
    }
}

/// The shape of a GEMM call, independent of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmProblem {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl GemmProblem {
    /// 2·M·N·K per batch entry.
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// An operand seen as rank 3 (batch, rows, cols), a broadcast batch having stride 0.
pub(crate) fn operand<'a, R: Runtime, E>(
    v: &TensorView<'a, R, E>,
    batch: usize,
) -> TensorView<'a, R, E> {
    let r = v.shape.len();
    let (rows, cols) = (v.shape[r - 2], v.shape[r - 1]);
    let (bstride, rs, cs) = if r == 3 {
        (v.strides[0], v.strides[1], v.strides[2])
    } else {
        (0, v.strides[0], v.strides[1])
    };
    TensorView {
        tensor: v.tensor,
        offset: v.offset,
        shape: vec![batch, rows, cols],
        strides: vec![bstride, rs, cs],
    }
}

/// Validates a and b; returns the problem and the output shape.
fn check_operands<R: Runtime, E>(
    a: &TensorView<R, E>,
    b: &TensorView<R, E>,
) -> Result<(GemmProblem, Vec<usize>), OpError> {
    for (name, t) in [("a", a), ("b", b)] {
        if t.shape.len() != 2 && t.shape.len() != 3 {
            return Err(OpError::shape(OP, name, &t.shape, vec![0; 2]));
        }
        if t.shape.contains(&0) {
            return Err(OpError::empty(OP, name, t.shape.clone()));
        }
    }
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let n = b.shape[rb - 1];
    let batch = match (ra, rb) {
        (3, 3) if a.shape[0] != b.shape[0] => {
            return Err(OpError::shape(OP, "b", &b.shape, vec![a.shape[0], k, n]))
        }
        (3, _) => a.shape[0],
        (_, 3) => b.shape[0],
        _ => 1,
    };
    if b.shape[rb - 2] != k {
        let mut expected = b.shape.clone();
        expected[rb - 2] = k;
        return Err(OpError::shape(OP, "b", &b.shape, expected));
    }
    let out_shape = if ra == 3 || rb == 3 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    Ok((GemmProblem { batch, m, n, k }, out_shape))
}

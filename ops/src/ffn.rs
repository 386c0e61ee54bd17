//! The feed-forward sublayer of a pre-LN block as the model calls it: three launches,
//! LayerNorm → GEMM + bias + activation → GEMM + bias + residual.

use cubecl::prelude::*;
use megabyte_kernels::activation::ActivationKind;

use crate::element::FloatElement;
use crate::error::OpError;
use crate::gemm::{gemm, Epilogue};
use crate::layer_norm::layer_norm;
use crate::tensor::Tensor;

/// The parameters of one FFN sublayer: LayerNorm (C), fc1 (C, H) + (H), fc2 (H, C) + (C).
pub struct FfnWeights<'a, R: Runtime, E> {
    pub ln_weight: &'a Tensor<R, E>,
    pub ln_bias: &'a Tensor<R, E>,
    pub fc1_weight: &'a Tensor<R, E>,
    pub fc1_bias: &'a Tensor<R, E>,
    pub fc2_weight: &'a Tensor<R, E>,
    pub fc2_bias: &'a Tensor<R, E>,
}

/// What the sublayer computed on the way, kept for a backward pass.
pub struct FfnSaved<R: Runtime, E> {
    /// LN(x): (rows, C).
    pub normed: Tensor<R, E>,
    /// Per-row LayerNorm mean and rstd: (rows), f32.
    pub mean: Tensor<R, f32>,
    pub rstd: Tensor<R, f32>,
    /// act(LN(x) · fc1 + b1): (rows, H).
    pub hidden: Tensor<R, E>,
}

/// out = x + fc2(act(fc1(LN(x)))) for x (rows, C); returns out and the saved intermediates.
pub fn ffn<R: Runtime, E: FloatElement>(
    x: &Tensor<R, E>,
    w: &FfnWeights<R, E>,
    act: ActivationKind,
) -> Result<(Tensor<R, E>, FfnSaved<R, E>), OpError> {
    let client = x.client();
    if x.shape().len() != 2 {
        return Err(OpError::Shape {
            op: "ffn",
            tensor: "x",
            got: x.shape().to_vec(),
            expected: vec![0, 0],
        });
    }
    let rows = x.shape()[0];
    let hidden_width = w.fc1_bias.shape().first().copied().unwrap_or(0);
    let normed = Tensor::empty(client, x.shape())?;
    let mean = Tensor::empty(client, &[rows])?;
    let rstd = Tensor::empty(client, &[rows])?;
    layer_norm(x, w.ln_weight, w.ln_bias, &normed, &mean, &rstd)?;
    let hidden = Tensor::empty(client, &[rows, hidden_width])?;
    gemm(
        &normed.view(),
        &w.fc1_weight.view(),
        &hidden,
        &Epilogue::none().bias(w.fc1_bias).activation(act),
    )?;
    let out = Tensor::empty(client, x.shape())?;
    gemm(
        &hidden.view(),
        &w.fc2_weight.view(),
        &out,
        &Epilogue::none().bias(w.fc2_bias).residual(x),
    )?;
    Ok((
        out,
        FfnSaved {
            normed,
            mean,
            rstd,
            hidden,
        },
    ))
}

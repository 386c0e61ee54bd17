//! Launcher for the fused AdamW step.

use cubecl::prelude::*;
use megabyte_kernels::optim::adamw as kernel;

use crate::device::launch_1d;
use crate::error::OpError;
use crate::tensor::Tensor;

/// AdamW hyper-parameters of one step for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// One AdamW step at step number `t` (1-based) on f32 param, grad, and moments m, v (all the
/// same shape); the gradient is multiplied by `grad_scale` first (global-norm clipping).
pub fn adamw<R: Runtime>(
    param: &Tensor<R, f32>,
    grad: &Tensor<R, f32>,
    m: &Tensor<R, f32>,
    v: &Tensor<R, f32>,
    hp: &AdamW,
    t: u64,
    grad_scale: f32,
) -> Result<(), OpError> {
    const OP: &str = "adamw";
    for (name, x) in [("grad", grad), ("m", m), ("v", v)] {
        x.expect_shape(OP, name, param.shape())?;
    }
    if t == 0 {
        return Err(OpError::unsupported(OP, "step", 0, "steps count from 1"));
    }
    let n = param.len();
    if n == 0 {
        return Ok(());
    }
    let c1 = 1.0 / (1.0 - (hp.beta1 as f64).powi(t.min(i32::MAX as u64) as i32));
    let c2 = 1.0 / (1.0 - (hp.beta2 as f64).powi(t.min(i32::MAX as u64) as i32));
    let client = param.client();
    // SAFETY: all four arrays hold n f32 values; the kernel guards on n.
    unsafe {
        launch_1d!(kernel::launch_unchecked::<R>[client, n]
            param.array(), grad.array(), m.array(), v.array(), hp.lr, hp.beta1, hp.beta2, hp.eps,
            hp.weight_decay, c1 as f32, c2 as f32, grad_scale);
    }
    Ok(())
}

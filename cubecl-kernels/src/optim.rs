//! The fused AdamW step.

use cubecl::prelude::*;

/// For each element: g = grad·grad_scale; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
/// param -= lr·(m·c1 / (sqrt(v·c2) + eps) + wd·param), with c1 = 1 / (1 - β1^t) and
/// c2 = 1 / (1 - β2^t) from the host. f32 master weights and moments.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn adamw(
    param: &mut Array<f32>,
    grad: &Array<f32>,
    m: &mut Array<f32>,
    v: &mut Array<f32>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    correction1: f32,
    correction2: f32,
    grad_scale: f32,
) {
    let i = ABSOLUTE_POS;
    if i < param.len() {
        let g = grad[i] * grad_scale;
        let mi = beta1 * m[i] + (1.0 - beta1) * g;
        let vi = beta2 * v[i] + (1.0 - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        let update = mi * correction1 / ((vi * correction2).sqrt() + eps);
        param[i] -= lr * (update + weight_decay * param[i]);
    }
}

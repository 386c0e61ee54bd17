//! The feed-forward sublayer and the pre-LN decoder block.

use crate::activation::{activation_backward, activation_inplace};
use crate::attention::{attention, attention_backward};
use crate::config::Activation;
use crate::gemm::{linear, linear_backward};
use crate::layer_norm::{layer_norm, layer_norm_backward};
use crate::weights::Block;

/// Splits a fused projection (B·T, 3C) into q, k, v, each (B, T, NH, HS) with C = NH·HS.
pub fn split_qkv(qkv: &[f32] /* (B·T, 3C) */, rows: usize, c: usize) -> [Vec<f32>; 3] {
    let mut parts = [
        vec![0f32; rows * c],
        vec![0f32; rows * c],
        vec![0f32; rows * c],
    ];
    for r in 0..rows {
        for (s, part) in parts.iter_mut().enumerate() {
            part[r * c..][..c].copy_from_slice(&qkv[r * 3 * c + s * c..][..c]);
        }
    }
    parts
}

/// What one pre-LN block computes from its input h_in (N = B·T rows of C): the forward's
/// intermediates, which the backward needs.
struct Activations {
    /// LN1(h_in), with its row statistics.
    x1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    /// The fused projection split into heads, each (B, T, NH, HS).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// attn(q, k, v), (B, T, NH, HS).
    y: Vec<f32>,
    /// h_in + proj(y).
    h_mid: Vec<f32>,
    /// LN2(h_mid), with its row statistics.
    x2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    /// fc1(x2) before and after the activation, (N, H).
    u: Vec<f32>,
    z: Vec<f32>,
}

impl Activations {
    #[allow(clippy::too_many_arguments)]
    fn of(
        h_in: &[f32],
        w: &Block,
        act: Activation,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Self {
        let n = b * t;
        assert_eq!(h_in.len(), n * c);
        assert_eq!(c % nh, 0);
        let hidden = w.fc1.bias.len();
        let norm = |x: &[f32], ln: &crate::weights::Norm| {
            let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
            layer_norm(
                &mut out, &mut mean, &mut rstd, x, &ln.weight, &ln.bias, n, c,
            );
            (out, mean, rstd)
        };
        let (x1, mean1, rstd1) = norm(h_in, &w.ln1);
        let mut qkv = vec![0f32; n * 3 * c];
        linear(&mut qkv, &x1, &w.qkv.weight, Some(&w.qkv.bias), n, c, 3 * c);
        let [q, k, v] = split_qkv(&qkv, n, c);
        let (mut y, mut lse) = (vec![0f32; n * c], vec![0f32; b * nh * t]);
        attention(&mut y, &mut lse, &q, &k, &v, b, t, nh, c / nh, true);
        let mut a = vec![0f32; n * c];
        linear(&mut a, &y, &w.proj.weight, Some(&w.proj.bias), n, c, c);
        let h_mid: Vec<f32> = h_in.iter().zip(&a).map(|(x, y)| x + y).collect();
        let (x2, mean2, rstd2) = norm(&h_mid, &w.ln2);
        let mut u = vec![0f32; n * hidden];
        linear(&mut u, &x2, &w.fc1.weight, Some(&w.fc1.bias), n, c, hidden);
        let mut z = u.clone();
        activation_inplace(act, &mut z);
        Activations {
            x1,
            mean1,
            rstd1,
            q,
            k,
            v,
            y,
            h_mid,
            x2,
            mean2,
            rstd2,
            u,
            z,
        }
    }
}

/// One pre-LN block over B sequences of length T, in place:
/// h += proj(attn(LN1(h))); h += FFN(LN2(h)). Attention is causal.
pub fn block_forward(
    h: &mut [f32], // (B, T, C)
    w: &Block,
    act: Activation,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let s = Activations::of(h, w, act, b, t, c, nh);
    let (n, hidden) = (b * t, w.fc1.bias.len());
    linear(h, &s.z, &w.fc2.weight, Some(&w.fc2.bias), n, hidden, c);
    for (hv, m) in h.iter_mut().zip(&s.h_mid) {
        *hv += *m;
    }
}

/// Backward of [`block_forward`], recomputing the block's intermediates from its input.
/// On entry `d_h` is the gradient of the block's output, on return that of its input;
/// parameter gradients are accumulated into `grads`.
pub fn block_backward(
    d_h: &mut [f32], // (B, T, C)
    grads: &mut Block,
    h_in: &[f32], // (B, T, C) the block's input
    w: &Block,
    act: Activation,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let (n, hs, hidden) = (b * t, c / nh, w.fc1.bias.len());
    let s = Activations::of(h_in, w, act, b, t, c, nh);

    // FFN sublayer: h_out = h_mid + fc2(act(fc1(LN2(h_mid)))).
    let mut dz = vec![0f32; n * hidden];
    linear_backward(
        &mut dz,
        &mut grads.fc2.weight,
        Some(&mut grads.fc2.bias),
        d_h,
        &s.z,
        &w.fc2.weight,
        n,
        hidden,
        c,
    );
    let mut du = vec![0f32; n * hidden];
    activation_backward(act, &mut du, &s.u, &dz);
    let mut dx2 = vec![0f32; n * c];
    linear_backward(
        &mut dx2,
        &mut grads.fc1.weight,
        Some(&mut grads.fc1.bias),
        &du,
        &s.x2,
        &w.fc1.weight,
        n,
        c,
        hidden,
    );
    let mut d_mid_ln = vec![0f32; n * c];
    layer_norm_backward(
        &mut d_mid_ln,
        &mut grads.ln2.weight,
        &mut grads.ln2.bias,
        &dx2,
        &s.h_mid,
        &w.ln2.weight,
        &s.mean2,
        &s.rstd2,
        n,
        c,
    );
    let d_mid: Vec<f32> = d_h.iter().zip(&d_mid_ln).map(|(a, b)| a + b).collect();

    // Attention sublayer: h_mid = h_in + proj(attn(qkv(LN1(h_in)))).
    let mut dy = vec![0f32; n * c];
    linear_backward(
        &mut dy,
        &mut grads.proj.weight,
        Some(&mut grads.proj.bias),
        &d_mid,
        &s.y,
        &w.proj.weight,
        n,
        c,
        c,
    );
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * c], vec![0f32; n * c], vec![0f32; n * c]);
    attention_backward(
        &mut dq, &mut dk, &mut dv, &dy, &s.q, &s.k, &s.v, b, t, nh, hs, true,
    );
    let mut dqkv = vec![0f32; n * 3 * c];
    for r in 0..n {
        for (i, part) in [&dq, &dk, &dv].into_iter().enumerate() {
            dqkv[r * 3 * c + i * c..][..c].copy_from_slice(&part[r * c..][..c]);
        }
    }
    let mut dx1 = vec![0f32; n * c];
    linear_backward(
        &mut dx1,
        &mut grads.qkv.weight,
        Some(&mut grads.qkv.bias),
        &dqkv,
        &s.x1,
        &w.qkv.weight,
        n,
        c,
        3 * c,
    );
    let mut d_in_ln = vec![0f32; n * c];
    layer_norm_backward(
        &mut d_in_ln,
        &mut grads.ln1.weight,
        &mut grads.ln1.bias,
        &dx1,
        h_in,
        &w.ln1.weight,
        &s.mean1,
        &s.rstd1,
        n,
        c,
    );
    for ((o, a), b) in d_h.iter_mut().zip(&d_mid).zip(&d_in_ln) {
        *o = a + b;
    }
}

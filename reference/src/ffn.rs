//! The feed-forward sublayer and the pre-LN decoder block.

use crate::activation::activation_inplace;
use crate::attention::attention;
use crate::config::Activation;
use crate::gemm::linear;
use crate::layer_norm::layer_norm_forward;
use crate::weights::Block;

/// out = fc2(act(fc1(inp))), hidden width H.
pub fn ffn(
    out: &mut [f32], // (N, C)
    inp: &[f32],     // (N, C)
    w: &Block,
    act: Activation,
    n: usize,
    c: usize,
) {
    let hidden = w.fc1.bias.len();
    let mut hbuf = vec![0f32; n * hidden]; // (N, H)
    linear(
        &mut hbuf,
        inp,
        &w.fc1.weight,
        Some(&w.fc1.bias),
        n,
        c,
        hidden,
    );
    activation_inplace(act, &mut hbuf);
    linear(out, &hbuf, &w.fc2.weight, Some(&w.fc2.bias), n, hidden, c);
}

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
    let n = b * t;
    assert_eq!(h.len(), n * c);
    assert_eq!(c % nh, 0);
    let hs = c / nh;
    let mut x = vec![0f32; n * c]; // (B, T, C)
    layer_norm_forward(&mut x, h, &w.ln1.weight, &w.ln1.bias, n, c);
    let mut qkv = vec![0f32; n * 3 * c]; // (B, T, 3C)
    linear(&mut qkv, &x, &w.qkv.weight, Some(&w.qkv.bias), n, c, 3 * c);
    let [q, k, v] = split_qkv(&qkv, n, c);
    let mut y = vec![0f32; n * c]; // (B, T, NH, HS)
    let mut lse = vec![0f32; b * nh * t];
    attention(&mut y, &mut lse, &q, &k, &v, b, t, nh, hs, true);
    let mut a = vec![0f32; n * c];
    linear(&mut a, &y, &w.proj.weight, Some(&w.proj.bias), n, c, c);
    for (hv, av) in h.iter_mut().zip(&a) {
        *hv += *av;
    }
    layer_norm_forward(&mut x, h, &w.ln2.weight, &w.ln2.bias, n, c);
    ffn(&mut a, &x, w, act, n, c);
    for (hv, av) in h.iter_mut().zip(&a) {
        *hv += *av;
    }
}

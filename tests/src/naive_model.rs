//! The whole MEGABYTE forward computed naively in f32: every sum accumulated in f32 one term at
//! a time, attention through a materialised score matrix and a two-pass softmax. It is the
//! "same-precision naive implementation" of the tolerance rule for model-level tests: the
//! device model must be within twice its error against the reference (f64 accumulation).
//!
//! The terms of every sum are taken in an [`Order`]: index order or its reverse. Both are
//! equally naive, and a model's error is the sum of thousands of roundings whose sizes depend on
//! that order, so one order's error on a few positions can be far from typical. Model tests
//! therefore take the naive error as the larger of the two orders' (see [`forward_errors`]).

use megabyte_reference::activation::activation_scalar;
use megabyte_reference::config::{Activation, LN_EPS};
use megabyte_reference::ffn::split_qkv;
use megabyte_reference::model::embed_global;
use megabyte_reference::weights::Block;
use megabyte_reference::{Config, Weights};

/// The order in which every sum of the naive forward takes its terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Index order: term 0 first.
    Forward,
    /// Reverse index order: the last term first.
    Reverse,
}

impl Order {
    /// Both orders.
    pub const ALL: [Order; 2] = [Order::Forward, Order::Reverse];

    /// Σ_{i<n} term(i) in f32, adding the terms in this order.
    fn sum(self, n: usize, term: impl Fn(usize) -> f32) -> f32 {
        let mut acc = 0f32;
        for i in 0..n {
            acc += term(match self {
                Order::Forward => i,
                Order::Reverse => n - 1 - i,
            });
        }
        acc
    }
}

/// out (N, OC) = inp (N, C) · w (C, OC) + bias, f32 accumulation.
#[allow(clippy::too_many_arguments)]
fn linear(
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
    order: Order,
) -> Vec<f32> {
    let mut out = vec![0f32; n * oc];
    for r in 0..n {
        for o in 0..oc {
            let acc = order.sum(c, |i| inp[r * c + i] * w[i * oc + o]);
            out[r * oc + o] = acc + bias.map_or(0.0, |b| b[o]);
        }
    }
    out
}

/// LayerNorm over rows of width C, f32 statistics.
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], n: usize, c: usize, order: Order) -> Vec<f32> {
    let mut out = vec![0f32; n * c];
    for r in 0..n {
        let row = &x[r * c..][..c];
        let mean = order.sum(c, |i| row[i]) / c as f32;
        let var = order.sum(c, |i| (row[i] - mean) * (row[i] - mean)) / c as f32;
        let rstd = 1.0 / (var + LN_EPS as f32).sqrt();
        for i in 0..c {
            out[r * c + i] = (row[i] - mean) * rstd * w[i] + b[i];
        }
    }
    out
}

/// Causal attention over (B, T, NH, HS) slices of a fused (B·T, 3C) projection.
fn attention(qkv: &[f32], b: usize, t: usize, nh: usize, hs: usize, order: Order) -> Vec<f32> {
    let c = nh * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let mut out = vec![0f32; b * t * c];
    let mut s = vec![0f32; t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = &qkv[(bi * t + i) * 3 * c + h * hs..][..hs];
                for j in 0..=i {
                    let k = &qkv[(bi * t + j) * 3 * c + c + h * hs..][..hs];
                    s[j] = order.sum(hs, |d| q[d] * k[d]) * scale;
                }
                let m = s[..=i].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for v in s[..=i].iter_mut() {
                    *v = (*v - m).exp();
                }
                let sum = order.sum(i + 1, |j| s[j]);
                for d in 0..hs {
                    let v = |j: usize| qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + d];
                    out[(bi * t + i) * c + h * hs + d] = order.sum(i + 1, |j| s[j] / sum * v(j));
                }
            }
        }
    }
    out
}

/// One pre-LN block over (B, T, C), updating `h` in place, with every stored intermediate
/// (LayerNorm outputs, the fused projection, the attention output, the residual stream, the
/// FFN hidden row) passed through `round`: the identity for f32, a rounding to E for a naive
/// implementation storing E. Sums take their terms in `order`. Returns the block's keys and
/// values, (B·T, C) each.
#[allow(clippy::too_many_arguments)]
pub fn block(
    h: &mut [f32],
    w: &Block,
    act: Activation,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    order: Order,
    round: impl Fn(f32) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    let n = b * t;
    let r = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(&round).collect() };
    let x = r(layer_norm(h, &w.ln1.weight, &w.ln1.bias, n, c, order));
    let qkv = r(linear(
        &x,
        &w.qkv.weight,
        Some(&w.qkv.bias),
        n,
        c,
        3 * c,
        order,
    ));
    let y = r(attention(&qkv, b, t, nh, c / nh, order));
    let a = linear(&y, &w.proj.weight, Some(&w.proj.bias), n, c, c, order);
    h.iter_mut().zip(&a).for_each(|(h, a)| *h = round(*h + a));
    let x = r(layer_norm(h, &w.ln2.weight, &w.ln2.bias, n, c, order));
    let hidden = w.fc1.bias.len();
    let mut u = linear(&x, &w.fc1.weight, Some(&w.fc1.bias), n, c, hidden, order);
    u.iter_mut()
        .for_each(|v| *v = round(activation_scalar(act, *v as f64) as f32));
    let a = linear(&u, &w.fc2.weight, Some(&w.fc2.bias), n, hidden, c, order);
    h.iter_mut().zip(&a).for_each(|(h, a)| *h = round(*h + a));
    let [_, k, v] = split_qkv(&qkv, n, c);
    (k, v)
}

/// Logits (B, T, V) for ids (B, T), every sum in index order.
pub fn forward(cfg: &Config, w: &Weights, x: &[u32], b: usize, t: usize) -> Vec<f32> {
    forward_in(cfg, w, x, b, t, Order::Forward)
}

/// For each position of `reference` (B·T·V logits from the f64 reference), the larger of the
/// two orders' naive errors |naive - reference|. Its maximum is the naive error of the
/// tolerance rule for model tests.
pub fn forward_errors(
    cfg: &Config,
    w: &Weights,
    x: &[u32],
    b: usize,
    t: usize,
    reference: &[f32],
) -> Vec<f64> {
    let mut errs = vec![0f64; reference.len()];
    for order in Order::ALL {
        let naive = forward_in(cfg, w, x, b, t, order);
        for ((e, &n), &r) in errs.iter_mut().zip(&naive).zip(reference) {
            *e = e.max((n as f64 - r as f64).abs());
        }
    }
    errs
}

/// Logits (B, T, V) for ids (B, T), every sum taking its terms in `order`.
pub fn forward_in(
    cfg: &Config,
    w: &Weights,
    x: &[u32],
    b: usize,
    t: usize,
    order: Order,
) -> Vec<f32> {
    let (p, dg, dl, v) = (cfg.patch, cfg.d_global, cfg.d_local, cfg.vocab);
    let (k, c) = (t / p, cfg.global_width());
    let mut h = embed_global(cfg, w, x, b, t);
    for blk in &w.global_blocks {
        block(
            &mut h,
            blk,
            cfg.activation,
            b,
            k,
            c,
            cfg.heads_global,
            order,
            |x| x,
        );
    }
    let g = layer_norm(
        &h,
        &w.global_ln_f.weight,
        &w.global_ln_f.bias,
        b * k,
        c,
        order,
    );
    // (B·T, D_G) rows of g through W_GL, plus the previous byte's embedding and the position.
    let mut l = linear(&g, &w.global_to_local, None, b * t, dg, dl, order);
    for r in 0..b * t {
        let pi = r % p;
        for o in 0..dl {
            let prev = if pi == 0 {
                w.local_pad[o]
            } else {
                w.local_embed[x[r - 1] as usize * dl + o]
            };
            let pos = w.local_pos.as_ref().map_or(0.0, |e| e[pi * dl + o]);
            l[r * dl + o] += prev + pos;
        }
    }
    for blk in &w.local_blocks {
        block(
            &mut l,
            blk,
            cfg.activation,
            b * k,
            p,
            dl,
            cfg.heads_local,
            order,
            |x| x,
        );
    }
    let out = layer_norm(
        &l,
        &w.local_ln_f.weight,
        &w.local_ln_f.bias,
        b * t,
        dl,
        order,
    );
    let mut logits = vec![0f32; b * t * v];
    for r in 0..b * t {
        for id in 0..v {
            logits[r * v + id] = order.sum(dl, |d| {
                let e = match &w.head {
                    Some(head) => head[d * v + id],
                    None => w.local_embed[id * dl + d],
                };
                out[r * dl + d] * e
            });
        }
    }
    logits
}

/// Per-position cross-entropy in nats of logits (N, V) against targets (N), in f32.
pub fn cross_entropy(logits: &[f32], targets: &[u32], v: usize) -> Vec<f32> {
    targets
        .iter()
        .enumerate()
        .map(|(r, &id)| {
            let row = &logits[r * v..][..v];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&z| (z - m).exp()).sum();
            m + sum.ln() - row[id as usize]
        })
        .collect()
}

//! Naive multi-head attention: scores, causal mask, softmax, weighted sum.
//!
//! Layout: q, k, v and out are (B, T, NH, HS), contiguous. The score scale is 1/sqrt(HS).
//! Row (b, h, i) attends to keys j <= i when causal, to all keys otherwise.

/// Softmax of one row in f64: `out[j] = exp(x[j] - max) / sum`. Entries equal to -inf get
/// probability 0 (that is how masked scores are passed). Returns ln(sum exp(x)), the
/// row's log-sum-exp.
pub fn softmax_row(out: &mut [f64], x: &[f64]) -> f64 {
    assert_eq!(out.len(), x.len());
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
    max + sum.ln()
}

/// Attention probabilities: probs[b, h, i, j] = softmax_j(q_i · k_j / sqrt(HS)), with keys after
/// i masked when `causal`. Also returns each row's log-sum-exp of the scaled scores.
pub fn attention_probs(
    probs: &mut [f64], // (B, NH, T, T)
    lse: &mut [f64],   // (B, NH, T)
    q: &[f32],         // (B, T, NH, HS)
    k: &[f32],         // (B, T, NH, HS)
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    causal: bool,
) {
    assert_eq!(q.len(), b * t * nh * hs);
    assert_eq!(k.len(), b * t * nh * hs);
    assert_eq!(probs.len(), b * nh * t * t);
    assert_eq!(lse.len(), b * nh * t);
    let scale = 1.0 / (hs as f64).sqrt();
    let at = |bi: usize, ti: usize, h: usize| ((bi * t + ti) * nh + h) * hs;
    let mut scores = vec![0f64; t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                // 1. scores against every key; 2. the causal mask.
                let qi = &q[at(bi, i, h)..][..hs];
                for j in 0..t {
                    scores[j] = if causal && j > i {
                        f64::NEG_INFINITY
                    } else {
                        let kj = &k[at(bi, j, h)..][..hs];
                        qi.iter()
                            .zip(kj)
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>()
                            * scale
                    };
                }
                // 3. softmax along the keys.
                let row = ((bi * nh + h) * t + i) * t;
                lse[(bi * nh + h) * t + i] = softmax_row(&mut probs[row..row + t], &scores);
            }
        }
    }
}

/// [`attention`] with f64 outputs, for tests that measure f32 kernels against it:
/// returns out (B, T, NH, HS) and lse (B, NH, T).
pub fn attention_f64(
    q: &[f32], // (B, T, NH, HS)
    k: &[f32], // (B, T, NH, HS)
    v: &[f32], // (B, T, NH, HS)
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    causal: bool,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(v.len(), b * t * nh * hs);
    let mut probs = vec![0f64; b * nh * t * t];
    let mut lse = vec![0f64; b * nh * t];
    attention_probs(&mut probs, &mut lse, q, k, b, t, nh, hs, causal);
    // 4. weighted sum of the values.
    let mut out = vec![0f64; b * t * nh * hs];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let row = ((bi * nh + h) * t + i) * t;
                let o = &mut out[((bi * t + i) * nh + h) * hs..][..hs];
                for j in 0..t {
                    let p = probs[row + j];
                    if p == 0.0 {
                        continue;
                    }
                    let vj = &v[((bi * t + j) * nh + h) * hs..][..hs];
                    for (a, &x) in o.iter_mut().zip(vj) {
                        *a += p * x as f64;
                    }
                }
            }
        }
    }
    (out, lse)
}

/// out[b, i, h, :] = sum_j probs[b, h, i, j] · v[b, j, h, :]; lse[b, h, i] as in
/// [`attention_probs`].
pub fn attention(
    out: &mut [f32], // (B, T, NH, HS)
    lse: &mut [f32], // (B, NH, T)
    q: &[f32],       // (B, T, NH, HS)
    k: &[f32],       // (B, T, NH, HS)
    v: &[f32],       // (B, T, NH, HS)
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    causal: bool,
) {
    assert_eq!(out.len(), b * t * nh * hs);
    assert_eq!(lse.len(), b * nh * t);
    let (o64, l64) = attention_f64(q, k, v, b, t, nh, hs, causal);
    for (o, x) in out.iter_mut().zip(o64) {
        *o = x as f32;
    }
    for (o, x) in lse.iter_mut().zip(l64) {
        *o = x as f32;
    }
}

/// Backward of causal (or full) [`attention`]: with P the probabilities,
/// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP - rowsum(dP ∘ P)), dQ = dS·K·scale, dK = dSᵀ·Q·scale.
/// Writes (overwrites) dq, dk, dv, all (B, T, NH, HS).
pub fn attention_backward(
    dq: &mut [f32], // (B, T, NH, HS)
    dk: &mut [f32], // (B, T, NH, HS)
    dv: &mut [f32], // (B, T, NH, HS)
    d_out: &[f32],  // (B, T, NH, HS)
    q: &[f32],      // (B, T, NH, HS)
    k: &[f32],      // (B, T, NH, HS)
    v: &[f32],      // (B, T, NH, HS)
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    causal: bool,
) {
    let n = b * t * nh * hs;
    assert_eq!((dq.len(), dk.len(), dv.len(), d_out.len()), (n, n, n, n));
    let mut probs = vec![0f64; b * nh * t * t];
    let mut lse = vec![0f64; b * nh * t];
    attention_probs(&mut probs, &mut lse, q, k, b, t, nh, hs, causal);
    let scale = 1.0 / (hs as f64).sqrt();
    let at = |bi: usize, ti: usize, h: usize| ((bi * t + ti) * nh + h) * hs;
    let (mut gq, mut gk, mut gv) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    let mut dp = vec![0f64; t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let row = ((bi * nh + h) * t + i) * t;
                let p = &probs[row..row + t];
                let go = &d_out[at(bi, i, h)..][..hs];
                // dP[i, j] = dO_i · V_j, and dV_j += P[i, j]·dO_i.
                for j in 0..t {
                    let vj = &v[at(bi, j, h)..][..hs];
                    dp[j] = go.iter().zip(vj).map(|(&a, &c)| a as f64 * c as f64).sum();
                    for d in 0..hs {
                        gv[at(bi, j, h) + d] += p[j] * go[d] as f64;
                    }
                }
                let rowsum: f64 = (0..t).map(|j| dp[j] * p[j]).sum();
                for j in 0..t {
                    let ds = p[j] * (dp[j] - rowsum) * scale;
                    if ds == 0.0 {
                        continue;
                    }
                    for d in 0..hs {
                        gq[at(bi, i, h) + d] += ds * k[at(bi, j, h) + d] as f64;
                        gk[at(bi, j, h) + d] += ds * q[at(bi, i, h) + d] as f64;
                    }
                }
            }
        }
    }
    for (dst, src) in [(dq, gq), (dk, gk), (dv, gv)] {
        for (o, x) in dst.iter_mut().zip(src) {
            *o = x as f32;
        }
    }
}

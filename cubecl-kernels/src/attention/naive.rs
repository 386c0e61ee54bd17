//! The naive attention that materialises the S × S scores, in three kernels: the baseline the
//! flash kernels are measured against.

use cubecl::prelude::*;

use super::NEG;

/// Naive attention, step 1: scores[b, h, i, j] = q_i · k_j · scale in f32, stored in F; one unit
/// per score. Masked scores are left as computed; [`naive_softmax()`] applies the mask.
#[cube(launch_unchecked)]
pub fn naive_scores<F: Float>(q: &Tensor<F>, k: &Tensor<F>, scores: &mut Tensor<F>, scale: f32) {
    let seq = q.shape(1);
    let heads = q.shape(2);
    let d = q.shape(3);
    if ABSOLUTE_POS < scores.len() {
        let j = ABSOLUTE_POS % seq;
        let i = (ABSOLUTE_POS / seq) % seq;
        let h = (ABSOLUTE_POS / (seq * seq)) % heads;
        let b = ABSOLUTE_POS / (seq * seq * heads);
        let qi = b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
        let kj = b * k.stride(0) + j * k.stride(1) + h * k.stride(2);
        let mut dot = f32::new(0.0);
        for x in 0..d {
            dot += f32::cast_from(q[qi + x]) * f32::cast_from(k[kj + x]);
        }
        scores[ABSOLUTE_POS] = F::cast_from(dot * scale);
    }
}

/// Naive attention, step 2: one unit per row turns scores into probabilities in place (f32
/// arithmetic, stored in F) and writes the row's log-sum-exp.
#[cube(launch_unchecked)]
pub fn naive_softmax<F: Float>(
    scores: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    #[comptime] causal: bool,
) {
    let seq = scores.shape(3);
    if ABSOLUTE_POS < lse.len() {
        let i = ABSOLUTE_POS % seq;
        let row = ABSOLUTE_POS * seq;
        let mut end = seq;
        if comptime!(causal) {
            end = i + 1;
        }
        let mut mx = f32::new(NEG);
        for j in 0..end {
            mx = max(mx, f32::cast_from(scores[row + j]));
        }
        let mut sum = f32::new(0.0);
        for j in 0..end {
            sum += (f32::cast_from(scores[row + j]) - mx).exp();
        }
        for j in 0..seq {
            let mut p = f32::new(0.0);
            if j < end {
                p = (f32::cast_from(scores[row + j]) - mx).exp() / sum;
            }
            scores[row + j] = F::cast_from(p);
        }
        lse[ABSOLUTE_POS] = mx + sum.ln();
    }
}

/// Naive attention, step 3: out[b, i, h, x] = Σ_j probs[b, h, i, j] · v[b, j, h, x], f32
/// accumulation; one unit per output element. `out` is contiguous (B, S, H, D).
#[cube(launch_unchecked)]
pub fn naive_weighted_sum<F: Float>(probs: &Tensor<F>, v: &Tensor<F>, out: &mut Tensor<F>) {
    let seq = v.shape(1);
    let heads = v.shape(2);
    let d = v.shape(3);
    if ABSOLUTE_POS < out.len() {
        let x = ABSOLUTE_POS % d;
        let h = (ABSOLUTE_POS / d) % heads;
        let i = (ABSOLUTE_POS / (d * heads)) % seq;
        let b = ABSOLUTE_POS / (d * heads * seq);
        let row = ((b * heads + h) * seq + i) * seq;
        let mut acc = f32::new(0.0);
        for j in 0..seq {
            acc += f32::cast_from(probs[row + j])
                * f32::cast_from(v[b * v.stride(0) + j * v.stride(1) + h * v.stride(2) + x]);
        }
        out[ABSOLUTE_POS] = F::cast_from(acc);
    }
}

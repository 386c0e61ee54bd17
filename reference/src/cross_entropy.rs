//! Logits and cross-entropy, reported in bits per byte.

use crate::gemm::linear;

/// Tied head: logits[n, v] = sum_d l_out[n, d] · table[v, d].
pub fn logits_tied(
    out: &mut [f32], // (N, V)
    l_out: &[f32],   // (N, D)
    table: &[f32],   // (V, D)
    n: usize,
    d: usize,
    v: usize,
) {
    assert_eq!(out.len(), n * v);
    assert_eq!(l_out.len(), n * d);
    assert_eq!(table.len(), v * d);
    for row in 0..n {
        let x = &l_out[row * d..][..d];
        for id in 0..v {
            let e = &table[id * d..][..d];
            out[row * v + id] = x
                .iter()
                .zip(e)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
}

/// Untied head: logits = l_out · head, head (D, V).
pub fn logits_untied(out: &mut [f32], l_out: &[f32], head: &[f32], n: usize, d: usize, v: usize) {
    linear(out, l_out, head, None, n, d, v);
}

/// Per-position cross-entropy in nats and each row's log-sum-exp, in f64:
/// `losses[n] = lse(logits[n, :]) - logits[n, targets[n]]`.
pub fn cross_entropy(
    losses: &mut [f64], // (N)
    lse: &mut [f64],    // (N)
    logits: &[f32],     // (N, V)
    targets: &[u32],    // (N)
    n: usize,
    v: usize,
) {
    assert_eq!(logits.len(), n * v);
    assert_eq!((targets.len(), losses.len(), lse.len()), (n, n, n));
    for row in 0..n {
        let z = &logits[row * v..][..v];
        let (max, sum) = max_and_sum(z);
        let target = targets[row] as usize;
        assert!(target < v, "target {target} outside vocabulary {v}");
        // ln(sum) - (z_t - max) keeps the result exact when all logits are equal.
        losses[row] = sum.ln() - (z[target] as f64 - max);
        lse[row] = max + sum.ln();
    }
}

/// The largest logit of a row and Σ exp(z - max), in f64.
fn max_and_sum(z: &[f32]) -> (f64, f64) {
    let max = z
        .iter()
        .map(|&x| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    (max, z.iter().map(|&x| (x as f64 - max).exp()).sum())
}

/// Mean of per-position losses in nats, converted to bits: nats / ln 2.
pub fn bits_per_byte(losses: &[f64]) -> f64 {
    losses.iter().sum::<f64>() / losses.len() as f64 / std::f64::consts::LN_2
}

/// Backward of the mean cross-entropy over N rows: d_logits = (softmax(z) - onehot(target)) / N.
pub fn cross_entropy_backward(
    d_logits: &mut [f32], // (N, V)
    logits: &[f32],       // (N, V)
    targets: &[u32],      // (N)
    n: usize,
    v: usize,
) {
    assert_eq!(
        (d_logits.len(), logits.len(), targets.len()),
        (n * v, n * v, n)
    );
    for row in 0..n {
        let z = &logits[row * v..][..v];
        let (max, sum) = max_and_sum(z);
        for id in 0..v {
            let p = (z[id] as f64 - max).exp() / sum;
            let onehot = if id == targets[row] as usize {
                1.0
            } else {
                0.0
            };
            d_logits[row * v + id] = ((p - onehot) / n as f64) as f32;
        }
    }
}

//! LayerNorm over the last dimension.

use crate::config::LN_EPS;

/// [`layer_norm`] with f64 outputs, for tests that measure f32 kernels against it:
/// returns out (N, C), mean (N) and rstd (N).
pub fn layer_norm_f64(
    inp: &[f32],    // (N, C)
    weight: &[f32], // (C)
    bias: &[f32],   // (C)
    n: usize,
    c: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    assert_eq!(inp.len(), n * c);
    assert_eq!((weight.len(), bias.len()), (c, c));
    let (mut out, mut mean, mut rstd) = (vec![0f64; n * c], vec![0f64; n], vec![0f64; n]);
    for row in 0..n {
        let x = &inp[row * c..(row + 1) * c];
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
        let s = 1.0 / (var + LN_EPS).sqrt();
        for i in 0..c {
            out[row * c + i] = (x[i] as f64 - m) * s * weight[i] as f64 + bias[i] as f64;
        }
        mean[row] = m;
        rstd[row] = s;
    }
    (out, mean, rstd)
}

/// out[n, :] = (inp[n, :] - mean) · rstd · weight + bias, with the statistics in f64.
/// Saves `mean[n]` and `rstd[n] = 1 / sqrt(var + eps)` (population variance) for the backward pass.
pub fn layer_norm(
    out: &mut [f32],  // (N, C)
    mean: &mut [f32], // (N)
    rstd: &mut [f32], // (N)
    inp: &[f32],      // (N, C)
    weight: &[f32],   // (C)
    bias: &[f32],     // (C)
    n: usize,
    c: usize,
) {
    assert_eq!(out.len(), n * c);
    assert_eq!((mean.len(), rstd.len()), (n, n));
    let (o, m, s) = layer_norm_f64(inp, weight, bias, n, c);
    for (dst, v) in out.iter_mut().zip(o) {
        *dst = v as f32;
    }
    for (dst, v) in mean.iter_mut().zip(m) {
        *dst = v as f32;
    }
    for (dst, v) in rstd.iter_mut().zip(s) {
        *dst = v as f32;
    }
}

/// LayerNorm without the saved statistics, for the forward pass.
pub fn layer_norm_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) {
    let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
    layer_norm(out, &mut mean, &mut rstd, inp, weight, bias, n, c);
}

/// Backward of [`layer_norm`] from the saved statistics: with x̂ = (x - mean)·rstd and
/// g = d_out·weight, d_inp = rstd·(g - mean(g) - x̂·mean(g·x̂)); d_weight += Σ_n d_out·x̂,
/// d_bias += Σ_n d_out (accumulated).
pub fn layer_norm_backward(
    d_inp: &mut [f32],    // (N, C)
    d_weight: &mut [f32], // (C)
    d_bias: &mut [f32],   // (C)
    d_out: &[f32],        // (N, C)
    inp: &[f32],          // (N, C)
    weight: &[f32],       // (C)
    mean: &[f32],         // (N)
    rstd: &[f32],         // (N)
    n: usize,
    c: usize,
) {
    assert_eq!((d_inp.len(), d_out.len(), inp.len()), (n * c, n * c, n * c));
    let mut dw = vec![0f64; c];
    let mut db = vec![0f64; c];
    for row in 0..n {
        let (m, s) = (mean[row] as f64, rstd[row] as f64);
        let x = &inp[row * c..][..c];
        let dy = &d_out[row * c..][..c];
        let xhat: Vec<f64> = x.iter().map(|&v| (v as f64 - m) * s).collect();
        let g: Vec<f64> = dy
            .iter()
            .zip(weight)
            .map(|(&a, &w)| a as f64 * w as f64)
            .collect();
        let mean_g = g.iter().sum::<f64>() / c as f64;
        let mean_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for i in 0..c {
            d_inp[row * c + i] = (s * (g[i] - mean_g - xhat[i] * mean_gx)) as f32;
            dw[i] += dy[i] as f64 * xhat[i];
            db[i] += dy[i] as f64;
        }
    }
    for i in 0..c {
        d_weight[i] = (d_weight[i] as f64 + dw[i]) as f32;
        d_bias[i] = (d_bias[i] as f64 + db[i]) as f32;
    }
}

//! The FFN sublayer (LN → GEMM + bias + act → GEMM + bias + residual) end to end against the
//! reference (`layer_norm_f64`, `activation_scalar`, f64 products), with a naive f32 pipeline
//! (sequential f32 sums everywhere, the naive device GELU) as the tolerance baseline.

use cubecl::prelude::ComputeClient;
use megabyte_ops::activation::gelu_naive;
use megabyte_ops::ffn::{ffn, FfnWeights};
use megabyte_ops::layer_norm::EPS;
use megabyte_ops::{ActivationKind, Tensor};
use megabyte_reference::activation::activation_scalar;
use megabyte_reference::config::Activation;
use megabyte_reference::layer_norm::layer_norm_f64;
use megabyte_tests::{check, read_f64, uniform, with_client, TestRuntime, NAIVE_SAMPLE};

fn run_case(
    client: &ComputeClient<TestRuntime>,
    rows: usize,
    c: usize,
    h: usize,
    act: Activation,
    seed: u64,
) {
    let case = format!("ffn(f32, rows={rows}, C={c}, H={h}, {act:?}, seed={seed})");
    let kind = match act {
        Activation::Gelu => ActivationKind::Gelu,
        Activation::Relu => ActivationKind::Relu,
    };
    let sample = rows.max(NAIVE_SAMPLE.div_ceil(c));
    let x = uniform(seed, sample * c, -2.0, 2.0);
    let lw = uniform(seed ^ 1, c, 0.5, 1.5);
    let lb = uniform(seed ^ 2, c, -0.5, 0.5);
    let scale1 = 1.0 / (c as f32).sqrt();
    let scale2 = 1.0 / (h as f32).sqrt();
    let w1 = uniform(seed ^ 3, c * h, -scale1, scale1);
    let b1 = uniform(seed ^ 4, h, -0.1, 0.1);
    let w2 = uniform(seed ^ 5, h * c, -scale2, scale2);
    let b2 = uniform(seed ^ 6, c, -0.1, 0.1);

    let up = |v: &[f32], shape: &[usize]| {
        Tensor::<TestRuntime, f32>::from_f32(client, v, shape).unwrap()
    };
    let (lw_t, lb_t, w1_t, b1_t, w2_t, b2_t) = (
        up(&lw, &[c]),
        up(&lb, &[c]),
        up(&w1, &[c, h]),
        up(&b1, &[h]),
        up(&w2, &[h, c]),
        up(&b2, &[c]),
    );
    let weights = FfnWeights {
        ln_weight: &lw_t,
        ln_bias: &lb_t,
        fc1_weight: &w1_t,
        fc1_bias: &b1_t,
        fc2_weight: &w2_t,
        fc2_bias: &b2_t,
    };
    let (out, saved) = ffn(&up(&x[..rows * c], &[rows, c]), &weights, kind).unwrap();
    assert_eq!(saved.hidden.shape(), [rows, h]);

    // Reference, f64 after the f32 inputs.
    let (normed, _, _) = layer_norm_f64(&x, &lw, &lb, sample, c);
    let mut reference = Vec::with_capacity(sample * c);
    for r in 0..sample {
        let hid: Vec<f64> = (0..h)
            .map(|j| {
                let z = b1[j] as f64
                    + (0..c)
                        .map(|i| normed[r * c + i] * w1[i * h + j] as f64)
                        .sum::<f64>();
                activation_scalar(act, z)
            })
            .collect();
        for o in 0..c {
            let y = b2[o] as f64 + (0..h).map(|j| hid[j] * w2[j * c + o] as f64).sum::<f64>();
            reference.push(x[r * c + o] as f64 + y);
        }
    }
    // Naive f32 pipeline.
    let mut pre = Vec::with_capacity(sample * h);
    let mut normed32 = vec![0f32; c];
    for r in 0..sample {
        let row = &x[r * c..][..c];
        let mean = row.iter().sum::<f32>() / c as f32;
        let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
        let rstd = 1.0 / (var + EPS).sqrt();
        for i in 0..c {
            normed32[i] = (row[i] - mean) * rstd * lw[i] + lb[i];
        }
        for j in 0..h {
            pre.push((0..c).fold(0f32, |s, i| s + normed32[i] * w1[i * h + j]) + b1[j]);
        }
    }
    let hid32: Vec<f32> = match act {
        Activation::Gelu => read_f64(&gelu_naive(&up(&pre, &[pre.len()])).unwrap())
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        Activation::Relu => pre.iter().map(|&v| v.max(0.0)).collect(),
    };
    let mut naive = Vec::with_capacity(sample * c);
    for r in 0..sample {
        for o in 0..c {
            let y = (0..h).fold(0f32, |s, j| s + hid32[r * h + j] * w2[j * c + o]) + b2[o];
            naive.push((x[r * c + o] + y) as f64);
        }
    }
    check::<f32>(&case, "out", &read_f64(&out), &naive, &reference)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn ffn_matches_reference() {
    with_client!(TestRuntime, |client| {
        // The tiny preset's global (C = 64) and local (C = 32) widths, odd sizes, one row.
        run_case(&client, 16, 64, 256, Activation::Gelu, 1);
        run_case(&client, 64, 32, 128, Activation::Gelu, 2);
        run_case(&client, 7, 33, 100, Activation::Relu, 3);
        run_case(&client, 1, 48, 192, Activation::Gelu, 4);
    });
}

//! Backward kernels against the reference backward (f64 accumulation), each with a naive f32
//! host implementation as the tolerance baseline: activation, LayerNorm, column sums, attention,
//! cross-entropy, embedding sums, AdamW and the squared norm. Fixed sweeps of awkward sizes and
//! proptest over shapes. Outputs are NaN-poisoned before each launch.

use cubecl::prelude::ComputeClient;
use megabyte_ops::activation::activation_backward;
use megabyte_ops::attention::{attention_backward_with, BackwardKernel};
use megabyte_ops::cross_entropy::cross_entropy_backward;
use megabyte_ops::embedding::embedding_backward;
use megabyte_ops::layer_norm::layer_norm_backward;
use megabyte_ops::optim::{adamw, AdamW};
use megabyte_ops::reduce::{column_sum, squared_norm};
use megabyte_ops::{ActivationKind, Tensor};
use megabyte_reference::activation::activation_backward as ref_activation_backward;
use megabyte_reference::attention::attention_backward as ref_attention_backward;
use megabyte_reference::cross_entropy::cross_entropy_backward as ref_ce_backward;
use megabyte_reference::layer_norm::{layer_norm, layer_norm_backward as ref_ln_backward};
use megabyte_reference::Activation;
use megabyte_tests::{
    check, read_f64, uniform, uniform_ids, with_client, TestRuntime, NAIVE_SAMPLE,
};
use proptest::prelude::*;

type T = Tensor<TestRuntime, f32>;

fn up(client: &ComputeClient<TestRuntime>, data: &[f32], shape: &[usize]) -> T {
    T::from_f32(client, data, shape).unwrap()
}

fn nan(client: &ComputeClient<TestRuntime>, shape: &[usize]) -> T {
    T::full(client, shape, f64::NAN).unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// (naive, reference) for the case's own seed, then for further seeds until the naive error is
/// measured on at least NAIVE_SAMPLE values (the harness's rule for small outputs).
fn sampled(seed: u64, f: impl Fn(u64) -> (Vec<f64>, Vec<f64>)) -> (Vec<f64>, Vec<f64>) {
    let (mut naive, mut reference) = f(seed);
    let mut s = seed;
    while naive.len() < NAIVE_SAMPLE {
        s = s.wrapping_add(0x9e37_79b9);
        let (n, r) = f(s);
        naive.extend(n);
        reference.extend(r);
    }
    (naive, reference)
}

// ---- activation ----

fn naive_act_grad(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => {
            0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
                + x * (-0.5 * x * x).exp() * 0.398_942_3
        }
        Activation::Relu => (x > 0.0) as u8 as f32,
    }
}

fn activation_case(client: &ComputeClient<TestRuntime>, n: usize, act: Activation, seed: u64) {
    let case = format!("activation_backward({act}, n={n}, seed={seed})");
    let data = |s: u64| (uniform(s, n, -5.0, 5.0), uniform(s ^ 1, n, -2.0, 2.0));
    let (x, g) = data(seed);
    let d = nan(client, &[n]);
    let kind = match act {
        Activation::Gelu => ActivationKind::Gelu,
        Activation::Relu => ActivationKind::Relu,
    };
    activation_backward(&up(client, &x, &[n]), &up(client, &g, &[n]), &d, kind).unwrap();
    let (naive, reference) = sampled(seed, |s| {
        let (x, g) = data(s);
        let mut r = vec![0f32; n];
        ref_activation_backward(act, &mut r, &x, &g);
        let nv = x
            .iter()
            .zip(&g)
            .map(|(&x, &g)| (g * naive_act_grad(act, x)) as f64)
            .collect();
        (nv, f64s(&r))
    });
    check::<f32>(&case, "d_input", &read_f64(&d), &naive, &reference)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn activation_sweep() {
    with_client!(
        TestRuntime,
        |client| for (i, &n) in [1usize, 7, 1000, 4097].iter().enumerate() {
            activation_case(&client, n, Activation::Gelu, 10 + i as u64);
            activation_case(&client, n, Activation::Relu, 20 + i as u64);
        }
    );
}

// ---- LayerNorm ----

#[allow(clippy::too_many_arguments)]
fn naive_ln_backward(
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    res: Option<&[f32]>,
    rows: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dx, mut dw, mut db) = (vec![0f32; rows * c], vec![0f32; c], vec![0f32; c]);
    for r in 0..rows {
        let (mut sg, mut sgx) = (0f32, 0f32);
        for i in 0..c {
            let xh = (x[r * c + i] - mean[r]) * rstd[r];
            let g = dy[r * c + i] * w[i];
            sg += g;
            sgx += g * xh;
        }
        for i in 0..c {
            let xh = (x[r * c + i] - mean[r]) * rstd[r];
            let g = dy[r * c + i] * w[i];
            dx[r * c + i] = rstd[r] * (g - sg / c as f32 - xh * sgx / c as f32)
                + res.map_or(0.0, |res| res[r * c + i]);
            dw[i] += dy[r * c + i] * xh;
            db[i] += dy[r * c + i];
        }
    }
    (dx, dw, db)
}

fn ln_case(client: &ComputeClient<TestRuntime>, rows: usize, c: usize, residual: bool, seed: u64) {
    let case = format!("layer_norm_backward(rows={rows}, C={c}, residual={residual}, seed={seed})");
    let data = |s: u64| {
        let x = uniform(s, rows * c, -2.0, 2.0);
        let dy = uniform(s ^ 1, rows * c, -1.0, 1.0);
        let w = uniform(s ^ 2, c, 0.5, 1.5);
        let res = uniform(s ^ 3, rows * c, -1.0, 1.0);
        let (mut out, mut mean, mut rstd) =
            (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
        layer_norm(
            &mut out,
            &mut mean,
            &mut rstd,
            &x,
            &w,
            &vec![0.0; c],
            rows,
            c,
        );
        (x, dy, w, res, mean, rstd)
    };
    let (x, dy, w, res, mean, rstd) = data(seed);
    let (dx, dw, db) = (
        nan(client, &[rows, c]),
        nan(client, &[c]),
        nan(client, &[c]),
    );
    let res_t = up(client, &res, &[rows, c]);
    layer_norm_backward(
        &up(client, &x, &[rows, c]),
        &up(client, &dy, &[rows, c]),
        &up(client, &w, &[c]),
        &Tensor::from_f32(client, &mean, &[rows]).unwrap(),
        &Tensor::from_f32(client, &rstd, &[rows]).unwrap(),
        residual.then_some(&res_t),
        &dx,
        &dw,
        &db,
    )
    .unwrap();
    let run = |s: u64, which: usize| {
        let (x, dy, w, res, mean, rstd) = data(s);
        let (mut rdx, mut rdw, mut rdb) = (vec![0f32; rows * c], vec![0f32; c], vec![0f32; c]);
        ref_ln_backward(
            &mut rdx, &mut rdw, &mut rdb, &dy, &x, &w, &mean, &rstd, rows, c,
        );
        if residual {
            rdx.iter_mut().zip(&res).for_each(|(a, b)| *a += b);
        }
        let (ndx, ndw, ndb) = naive_ln_backward(
            &x,
            &dy,
            &w,
            &mean,
            &rstd,
            residual.then_some(&res[..]),
            rows,
            c,
        );
        let pick =
            |a: Vec<f32>, b: Vec<f32>, c: Vec<f32>| [a, b, c].into_iter().nth(which).unwrap();
        (f64s(&pick(ndx, ndw, ndb)), f64s(&pick(rdx, rdw, rdb)))
    };
    for (which, (name, t)) in [("d_input", &dx), ("d_weight", &dw), ("d_bias", &db)]
        .into_iter()
        .enumerate()
    {
        let (naive, reference) = sampled(seed, |s| run(s, which));
        check::<f32>(&case, name, &read_f64(t), &naive, &reference)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn layer_norm_sweep() {
    with_client!(TestRuntime, |client| for (i, &(rows, c)) in
        [(1usize, 1usize), (3, 7), (17, 64), (5, 300), (40, 33)]
            .iter()
            .enumerate()
    {
        ln_case(&client, rows, c, i % 2 == 0, 100 + i as u64);
        ln_case(&client, rows, c, i % 2 == 1, 110 + i as u64);
    });
}

// ---- column sums and the squared norm ----

#[test]
fn column_sums_of_strided_views_and_squared_norm() {
    with_client!(TestRuntime, |client| {
        for (i, &(rows, cols, stride)) in [
            (1usize, 1usize, 1usize),
            (7, 5, 9),
            (300, 33, 40),
            (1000, 3, 3),
        ]
        .iter()
        .enumerate()
        {
            let case = format!("column_sum(rows={rows}, cols={cols}, row stride={stride})");
            let seed = 200 + i as u64;
            let data = |s: u64| uniform(s, rows * stride + 2, -1.0, 1.0);
            let x = data(seed);
            let t = up(&client, &x, &[x.len()]);
            let view = t.strided(2, &[rows, cols], &[stride, 1]).unwrap();
            let out = up(&client, &vec![0.5; cols], &[cols]);
            column_sum(&view, &out, true).unwrap();
            let (naive, reference) = sampled(seed, |s| {
                let x = data(s);
                let n = (0..cols)
                    .map(|c| 0.5 + (0..rows).map(|r| x[2 + r * stride + c]).sum::<f32>())
                    .map(|v| v as f64)
                    .collect();
                let r = (0..cols)
                    .map(|c| 0.5 + (0..rows).map(|r| x[2 + r * stride + c] as f64).sum::<f64>())
                    .collect();
                (n, r)
            });
            check::<f32>(&case, "out", &read_f64(&out), &naive, &reference)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let a = uniform(300, 100_000, -1.0, 1.0);
        let b = uniform(301, 3, -1.0, 1.0);
        let want: f64 = a.iter().chain(&b).map(|&v| (v as f64).powi(2)).sum();
        let got = squared_norm(&[&up(&client, &a, &[100_000]), &up(&client, &b, &[3])]).unwrap();
        assert!(
            (got - want).abs() < 1e-5 * want,
            "squared norm {got} vs {want}"
        );
    });
}

// ---- attention ----

#[allow(clippy::too_many_arguments)]
fn naive_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    go: &[f32],
    b: usize,
    s: usize,
    h: usize,
    d: usize,
    causal: bool,
) -> [Vec<f32>; 3] {
    let at = |bi: usize, t: usize, hi: usize| ((bi * s + t) * h + hi) * d;
    let scale = 1.0 / (d as f32).sqrt();
    let n = b * s * h * d;
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..s {
                let end = if causal { i + 1 } else { s };
                let mut p: Vec<f32> = (0..end)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[at(bi, i, hi) + c] * k[at(bi, j, hi) + c])
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                p.iter_mut().for_each(|x| *x = (*x - m).exp());
                let sum: f32 = p.iter().sum();
                p.iter_mut().for_each(|x| *x /= sum);
                let dp: Vec<f32> = (0..end)
                    .map(|j| {
                        (0..d)
                            .map(|c| go[at(bi, i, hi) + c] * v[at(bi, j, hi) + c])
                            .sum()
                    })
                    .collect();
                let rowsum: f32 = (0..end).map(|j| p[j] * dp[j]).sum();
                for j in 0..end {
                    let ds = p[j] * (dp[j] - rowsum) * scale;
                    for c in 0..d {
                        dq[at(bi, i, hi) + c] += ds * k[at(bi, j, hi) + c];
                        dk[at(bi, j, hi) + c] += ds * q[at(bi, i, hi) + c];
                        dv[at(bi, j, hi) + c] += p[j] * go[at(bi, i, hi) + c];
                    }
                }
            }
        }
    }
    [dq, dk, dv]
}

/// q, k, v read from one fused (B, S, 3, H, D) tensor and dq, dk, dv written into another, as
/// the model lays them out.
fn attention_case(
    client: &ComputeClient<TestRuntime>,
    b: usize,
    s: usize,
    h: usize,
    d: usize,
    causal: bool,
    seed: u64,
) {
    let case =
        format!("attention_backward(b={b}, s={s}, h={h}, d={d}, causal={causal}, seed={seed})");
    let n = b * s * h * d;
    let data = |sd: u64| {
        (
            uniform(sd, n, -2.0, 2.0),
            uniform(sd ^ 1, n, -2.0, 2.0),
            uniform(sd ^ 2, n, -2.0, 2.0),
            uniform(sd ^ 3, n, -1.0, 1.0),
        )
    };
    let (q, k, v, go) = data(seed);
    let mut fused = vec![0f32; 3 * n];
    for row in 0..b * s {
        for (part, src) in [&q, &k, &v].into_iter().enumerate() {
            fused[(row * 3 + part) * h * d..][..h * d]
                .copy_from_slice(&src[row * h * d..][..h * d]);
        }
    }
    let qkv = up(client, &fused, &[b, s, 3, h, d]);
    let strides = [s * 3 * h * d, 3 * h * d, d, 1];
    fn view<'a>(
        t: &'a T,
        part: usize,
        shape: [usize; 4],
        strides: &[usize],
    ) -> megabyte_ops::TensorView<'a, TestRuntime, f32> {
        t.strided(part * shape[2] * shape[3], &shape, strides)
            .unwrap()
    }
    let shape = [b, s, h, d];
    let mut expected = Vec::new();
    for part in 0..3 {
        expected.push(sampled(seed, |sd| {
            let (q, k, v, go) = data(sd);
            let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            ref_attention_backward(
                &mut dq, &mut dk, &mut dv, &go, &q, &k, &v, b, s, h, d, causal,
            );
            let nv = naive_attention_backward(&q, &k, &v, &go, b, s, h, d, causal);
            (f64s(&nv[part]), f64s(&[dq, dk, dv][part]))
        }));
    }
    for kernel in [BackwardKernel::RowsInRegisters, BackwardKernel::SplitDims] {
        let case = format!("{case} {kernel:?}");
        // Poisoned gradients: an element no unit writes stays NaN and fails.
        let grads = nan(client, &[b, s, 3, h, d]);
        attention_backward_with(
            kernel,
            &view(&qkv, 0, shape, &strides),
            &view(&qkv, 1, shape, &strides),
            &view(&qkv, 2, shape, &strides),
            &up(client, &go, &[b, s, h, d]),
            &view(&grads, 0, shape, &strides),
            &view(&grads, 1, shape, &strides),
            &view(&grads, 2, shape, &strides),
            causal,
        )
        .unwrap();
        let got = read_f64(&grads);
        for (part, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
            let kernel: Vec<f64> = (0..b * s)
                .flat_map(|row| got[(row * 3 + part) * h * d..][..h * d].to_vec())
                .collect();
            let (naive, reference) = &expected[part];
            check::<f32>(&case, name, &kernel, naive, reference).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn attention_sweep() {
    with_client!(TestRuntime, |client| for (i, &(b, s, h, d, causal)) in [
        (1usize, 1usize, 1usize, 8usize, true),
        (2, 7, 2, 16, true),
        (1, 33, 1, 64, true),
        (3, 8, 2, 32, false),
        (2, 17, 3, 20, true),
        // Head dims split over 2 (dQ) and 3 (dK, dV) units, the last with dims past D.
        (1, 9, 2, 80, true),
        (1, 5, 1, 128, false),
    ]
    .iter()
    .enumerate()
    {
        attention_case(&client, b, s, h, d, causal, 400 + i as u64);
    });
}

// ---- cross-entropy ----

#[test]
fn cross_entropy_sweep() {
    with_client!(TestRuntime, |client| for (i, &(rows, v)) in
        [(1usize, 256usize), (7, 257), (100, 256)]
            .iter()
            .enumerate()
    {
        let seed = 500 + i as u64;
        let case = format!("cross_entropy_backward(rows={rows}, V={v}, seed={seed})");
        let data = |s: u64| (uniform(s, rows * v, -4.0, 4.0), uniform_ids(s ^ 1, rows, v));
        let (z, ids) = data(seed);
        let lse: Vec<f32> = (0..rows)
            .map(|r| {
                let row = &z[r * v..][..v];
                let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                (m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()) as f32
            })
            .collect();
        let logits = up(&client, &z, &[rows, v]);
        cross_entropy_backward(
            &logits,
            &Tensor::from_f32(&client, &lse, &[rows]).unwrap(),
            &Tensor::from_ids(&client, &ids, &[rows]).unwrap(),
            1.0 / rows as f32,
        )
        .unwrap();
        let (naive, reference) = sampled(seed, |s| {
            let (z, ids) = data(s);
            let mut r = vec![0f32; rows * v];
            ref_ce_backward(&mut r, &z, &ids, rows, v);
            let mut nv = vec![0f32; rows * v];
            for row in 0..rows {
                let zr = &z[row * v..][..v];
                let m = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = zr.iter().map(|&x| (x - m).exp()).sum();
                for id in 0..v {
                    nv[row * v + id] = ((zr[id] - m).exp() / sum
                        - (id == ids[row] as usize) as u8 as f32)
                        / rows as f32;
                }
            }
            (f64s(&nv), f64s(&r))
        });
        check::<f32>(&case, "d_logits", &read_f64(&logits), &naive, &reference)
            .unwrap_or_else(|e| panic!("{e}"));
    });
}

// ---- embedding sums ----

#[test]
fn embedding_sums_by_id_and_by_position() {
    with_client!(TestRuntime, |client| for (i, &(b, s, d, vocab)) in [
        (1usize, 1usize, 1usize, 4usize),
        (2, 9, 5, 256),
        (3, 40, 16, 257),
        // Many passes of the id-matching loop; more columns than units.
        (2, 300, 70, 256),
        (1, 100, 300, 256),
    ]
    .iter()
    .enumerate()
    {
        let seed = 600 + i as u64;
        let case = format!("embedding_backward(B={b}, S={s}, D={d}, V={vocab}, seed={seed})");
        // Rows are a strided window (every other row) of a larger gradient, ids a column slice.
        let rows_data = uniform(seed, b * 2 * s * d, -1.0, 1.0);
        let ids = uniform_ids(seed ^ 1, b * (s + 1), vocab);
        let rows_t = up(&client, &rows_data, &[b, 2 * s, d]);
        let rows = rows_t
            .strided(d, &[b, s, d], &[2 * s * d, 2 * d, 1])
            .unwrap();
        let ids_t = Tensor::from_ids(&client, &ids, &[b, s + 1]).unwrap();
        let ids_v = ids_t.strided(1, &[b, s], &[s + 1, 1]).unwrap();
        let row = |bi: usize, si: usize| &rows_data[(bi * 2 * s + 2 * si + 1) * d..][..d];
        let by_id = up(&client, &vec![0.25; vocab * d], &[vocab, d]);
        embedding_backward(&rows, Some(&ids_v), &by_id, true).unwrap();
        let by_pos = nan(&client, &[s + 2, d]);
        embedding_backward(&rows, None, &by_pos, false).unwrap();
        let (mut want_id, mut naive_id) = (vec![0.25f64; vocab * d], vec![0.25f32; vocab * d]);
        let (mut want_pos, mut naive_pos) = (vec![0f64; (s + 2) * d], vec![0f32; (s + 2) * d]);
        for bi in 0..b {
            for si in 0..s {
                let id = ids[bi * (s + 1) + si + 1] as usize;
                for c in 0..d {
                    want_id[id * d + c] += row(bi, si)[c] as f64;
                    naive_id[id * d + c] += row(bi, si)[c];
                    want_pos[si * d + c] += row(bi, si)[c] as f64;
                    naive_pos[si * d + c] += row(bi, si)[c];
                }
            }
        }
        check::<f32>(
            &case,
            "by id",
            &read_f64(&by_id),
            &f64s(&naive_id),
            &want_id,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        check::<f32>(
            &case,
            "by position",
            &read_f64(&by_pos),
            &f64s(&naive_pos),
            &want_pos,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    });
}

// ---- AdamW ----

#[test]
fn adamw_matches_the_formula() {
    with_client!(TestRuntime, |client| {
        let n = 1001;
        let (p0, g, m0, v0) = (
            uniform(700, n, -1.0, 1.0),
            uniform(701, n, -1.0, 1.0),
            uniform(702, n, -0.1, 0.1),
            uniform(703, n, 0.0, 0.01),
        );
        let hp = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (t, scale) = (3u64, 0.5f32);
        let (p, gt, m, v) = (
            up(&client, &p0, &[n]),
            up(&client, &g, &[n]),
            up(&client, &m0, &[n]),
            up(&client, &v0, &[n]),
        );
        adamw(&p, &gt, &m, &v, &hp, t, scale).unwrap();
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let mut want = Vec::new();
        let mut naive = Vec::new();
        for i in 0..n {
            let gi = g[i] as f64 * scale as f64;
            let mi = b1 * m0[i] as f64 + (1.0 - b1) * gi;
            let vi = b2 * v0[i] as f64 + (1.0 - b2) * gi * gi;
            let upd = mi / (1.0 - b1.powi(3)) / ((vi / (1.0 - b2.powi(3))).sqrt() + 1e-8);
            want.push(p0[i] as f64 - 1e-2 * (upd + 0.1 * p0[i] as f64));
            // The same steps in f32.
            let gf = g[i] * scale;
            let mf = 0.9f32 * m0[i] + 0.1 * gf;
            let vf = 0.95f32 * v0[i] + 0.05 * gf * gf;
            let uf = mf / (1.0 - 0.9f32.powi(3)) / ((vf / (1.0 - 0.95f32.powi(3))).sqrt() + 1e-8);
            naive.push((p0[i] - 1e-2 * (uf + 0.1 * p0[i])) as f64);
        }
        check::<f32>("adamw", "param", &read_f64(&p), &naive, &want)
            .unwrap_or_else(|e| panic!("{e}"));
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_attention(b in 1usize..3, s in 1usize..40, h in 1usize..3, d in prop::sample::select(vec![8usize, 16, 17, 32, 64]), causal: bool, seed: u64) {
        with_client!(TestRuntime, |client| attention_case(&client, b, s, h, d, causal, seed));
    }

    #[test]
    fn random_layer_norm(rows in 1usize..50, c in 1usize..200, residual: bool, seed: u64) {
        with_client!(TestRuntime, |client| ln_case(&client, rows, c, residual, seed));
    }
}

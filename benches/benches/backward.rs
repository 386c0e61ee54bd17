//! The training kernels: attention backward (FLOP/s), LayerNorm backward, GELU backward,
//! cross-entropy backward, embedding backward and AdamW (GB/s), over the shapes one training
//! step of `tiny` (T = 2048, batch 4) and `small` (batch 2) gives them, and a slice of one layer
//! of the paper's 758M/262M text model (global width 2048, D_L = 1024, P = 8, one 8 KiB
//! sequence): its attention cut to one or two heads, which take seconds each here.
//!
//! Attention backward FLOPs: 2.5 × the forward's, the usual count (recompute QKᵀ, then dV = PᵀdO,
//! dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q: five S×S×D products of 2 FLOPs per multiply-add), halved
//! when causal: 5·S²·D per (batch, head). Bytes are what each kernel must read and write once:
//! - LayerNorm backward: input, d_out, d_input (rows × C), the (C) parameter sums not counted;
//! - GELU backward: pre-activation, d_output, d_input;
//! - cross-entropy backward: logits read and written in place (rows × V);
//! - embedding backward: the gradient rows read, the table written;
//! - AdamW: param, m, v read and written, grad read.
//!
//! `cargo bench -p megabyte-benches --bench backward`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use megabyte_ops::activation::activation_backward;
use megabyte_ops::attention::attention_backward;
use megabyte_ops::cross_entropy::cross_entropy_backward;
use megabyte_ops::embedding::embedding_backward;
use megabyte_ops::layer_norm::layer_norm_backward;
use megabyte_ops::optim::{adamw, AdamW};
use megabyte_ops::{ActivationKind, Tensor};

type Rt = megabyte_benches::BenchRuntime;

fn data(n: usize, salt: usize) -> Vec<f32> {
    megabyte_benches::data(n, salt, -1.0, 1.0)
}

/// (name, B, S, H, D), causal: the global stack of `tiny` at T = 2048 (512 patches, width 64),
/// its local stack (B·K sequences of P = 4, width 32), and `small`'s local stack (P = 8,
/// width 128).
const ATTENTION: &[(&str, usize, usize, usize, usize)] = &[
    ("tiny_global_k512", 4, 512, 2, 32),
    ("tiny_local_p4", 2048, 4, 2, 16),
    ("small_local_p8", 512, 8, 2, 64),
    ("text_global_k1024_h1", 1, 1024, 1, 64),
    ("text_local_p8_h2", 1024, 8, 2, 64),
];

/// (name, rows, C): rows × width of the LayerNorm and activation tensors in one step.
const ROWS: &[(&str, usize, usize)] = &[
    ("tiny_global", 2048, 64),
    ("tiny_local_hidden", 8192, 128),
    ("small_local_hidden", 4096, 512),
    ("text_global", 1024, 2048),
];

fn bench(c: &mut Criterion) {
    let Some((client, mut group)) = megabyte_benches::group(c, "backward", 3) else {
        return;
    };
    let up = |v: &[f32], shape: &[usize]| Tensor::<Rt, f32>::from_f32(&client, v, shape).unwrap();

    for &(name, b, s, h, d) in ATTENTION {
        let n = b * s * h * d;
        let shape = [b, s, h, d];
        let (q, k, v, d_out) = (
            up(&data(n, 1), &shape),
            up(&data(n, 2), &shape),
            up(&data(n, 3), &shape),
            up(&data(n, 4), &shape),
        );
        let (dq, dk, dv) = (
            Tensor::<Rt, f32>::empty(&client, &shape).unwrap(),
            Tensor::<Rt, f32>::empty(&client, &shape).unwrap(),
            Tensor::<Rt, f32>::empty(&client, &shape).unwrap(),
        );
        let flops = 5 * b * h * s * s * d;
        group.throughput(Throughput::Elements(flops as u64));
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_attention_backward_f32",
            name,
            || {
                attention_backward(
                    &q.view(),
                    &k.view(),
                    &v.view(),
                    &d_out,
                    &dq.view(),
                    &dk.view(),
                    &dv.view(),
                    true,
                )
                .unwrap()
            },
        );
    }

    for &(name, rows, width) in ROWS {
        let n = rows * width;
        let (x, dy) = (
            up(&data(n, 5), &[rows, width]),
            up(&data(n, 6), &[rows, width]),
        );
        let dx = Tensor::<Rt, f32>::empty(&client, &[rows, width]).unwrap();
        let bytes = (3 * n * 4) as u64;
        group.throughput(Throughput::Bytes(bytes));
        let weight = up(&data(width, 7), &[width]);
        let (dw, db) = (
            Tensor::<Rt, f32>::empty(&client, &[width]).unwrap(),
            Tensor::<Rt, f32>::empty(&client, &[width]).unwrap(),
        );
        let mean = Tensor::<Rt, f32>::full(&client, &[rows], 0.1).unwrap();
        let rstd = Tensor::<Rt, f32>::full(&client, &[rows], 1.2).unwrap();
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_layer_norm_backward_f32",
            name,
            || layer_norm_backward(&x, &dy, &weight, &mean, &rstd, None, &dx, &dw, &db).unwrap(),
        );
        megabyte_benches::timed(&mut group, &client, "wgpu_gelu_backward_f32", name, || {
            activation_backward(&x, &dy, &dx, ActivationKind::Gelu).unwrap()
        });
    }

    // The head: B·T rows of V = 256 logits; the byte embedding table (256, D_L) from B·T rows.
    for &(name, rows, width) in &[
        ("tiny", 8192usize, 32usize),
        ("small", 4096, 128),
        ("text", 2048, 1024),
    ] {
        let vocab = 256;
        let targets: Vec<u32> = (0..rows).map(|i| (i * 31 % vocab) as u32).collect();
        let targets = Tensor::<Rt, u32>::from_ids(&client, &targets, &[rows]).unwrap();
        let logits = up(&data(rows * vocab, 8), &[rows, vocab]);
        let lse = Tensor::<Rt, f32>::full(&client, &[rows], 6.0).unwrap();
        group.throughput(Throughput::Bytes((2 * rows * vocab * 4) as u64));
        // In place: the logits become gradients, which the next iteration treats as logits
        // again (the work is the same).
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_cross_entropy_backward_f32",
            name,
            || cross_entropy_backward(&logits, &lse, &targets, 1.0 / rows as f32).unwrap(),
        );
        let grad_rows = up(&data(rows * width, 9), &[1, rows, width]);
        let ids = targets.clone().reshape(&[1, rows]).unwrap();
        let table = Tensor::<Rt, f32>::empty(&client, &[vocab, width]).unwrap();
        group.throughput(Throughput::Bytes(((rows + vocab) * width * 4) as u64));
        megabyte_benches::timed(
            &mut group,
            &client,
            "wgpu_embedding_backward_f32",
            name,
            || embedding_backward(&grad_rows.view(), Some(&ids.view()), &table, false).unwrap(),
        );
    }

    // AdamW over every parameter of `tiny` (171,360) and of `small` (3,668,352), and over the
    // linear weights of one local layer of the text model (12 · 1024²).
    for &(name, n) in &[
        ("tiny", 171_360usize),
        ("small", 3_668_352),
        ("text_local_layer", 12 * 1024 * 1024),
    ] {
        let (param, grad) = (up(&data(n, 10), &[n]), up(&data(n, 11), &[n]));
        let (m, v) = (
            Tensor::<Rt, f32>::full(&client, &[n], 0.0).unwrap(),
            Tensor::<Rt, f32>::full(&client, &[n], 0.0).unwrap(),
        );
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        group.throughput(Throughput::Bytes((7 * n * 4) as u64));
        megabyte_benches::timed(&mut group, &client, "wgpu_adamw_f32", name, || {
            adamw(&param, &grad, &m, &v, &hp, 1, 1.0).unwrap()
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

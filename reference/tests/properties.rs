//! Property tests of the reference model itself. Every random input derives from a proptest-drawn
//! seed, which proptest prints with any failing case.

use megabyte_reference::attention::{attention, attention_probs};
use megabyte_reference::cross_entropy::{bits_per_byte, cross_entropy};
use megabyte_reference::patch_embed::{byte_embedding, patchify_shift};
use megabyte_reference::{
    forward, generate, generate_batch, Activation, Config, Sampling, Weights,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

fn ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut r = rng(seed);
    (0..n).map(|_| r.gen_range(0..vocab as u32)).collect()
}

/// Small random architectures covering every flag; context holds `kmax` patches. Widths are
/// at least 3: a LayerNorm over 1 or 2 values is constant or sign-only and hides its input.
fn small_config() -> impl Strategy<Value = Config> {
    (
        1usize..=4,
        2usize..=3,
        1usize..=2,
        1usize..=2,
        3usize..=8,
        0usize..=2,
        0usize..=2,
        1usize..=4,
        any::<(bool, bool, bool, bool)>(),
    )
        .prop_map(
            |(
                patch,
                dg_half,
                heads_global,
                heads_local,
                hs_local,
                lg,
                ll,
                kmax,
                (v257, relu, tied, lpos),
            )| Config {
                vocab: if v257 { 257 } else { 256 },
                patch,
                context: patch * kmax,
                // P·D_G must be divisible by heads_global <= 2; an even D_G guarantees it.
                d_global: 2 * dg_half,
                d_local: heads_local * hs_local,
                layers_global: lg,
                layers_local: ll,
                heads_global,
                heads_local,
                ffn_mult: 2,
                activation: if relu {
                    Activation::Relu
                } else {
                    Activation::Gelu
                },
                tied_head: tied,
                local_positions: lpos,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Position t predicts byte t from bytes < t: changing byte t' leaves logits at positions
    /// <= t' bit-for-bit equal, and does change the logits at t' + 1.
    #[test]
    fn causality(cfg in small_config(), seed: u64, b in 1usize..=2) {
        cfg.validate().unwrap();
        let t = cfg.context;
        let w = Weights::random(&cfg, seed);
        let x = ids(seed ^ 1, b * t, 256);
        let mut r = rng(seed ^ 2);
        let bi = r.gen_range(0..b);
        let tp = r.gen_range(0..t);
        let mut y = x.clone();
        y[bi * t + tp] = (x[bi * t + tp] + 1 + r.gen_range(0..255)) % 256;
        let v = cfg.vocab;
        let lx = forward(&cfg, &w, &x, b, t).unwrap();
        let ly = forward(&cfg, &w, &y, b, t).unwrap();
        let row = |l: &[f32], pos: usize| l[(bi * t + pos) * v..][..v].to_vec();
        for pos in 0..=tp {
            prop_assert_eq!(row(&lx, pos), row(&ly, pos), "logits at {} changed when byte {} changed", pos, tp);
        }
        if tp + 1 < t {
            prop_assert_ne!(row(&lx, tp + 1), row(&ly, tp + 1), "byte {} never reached position {}", tp, tp + 1);
        }
        // Other batch rows are untouched.
        for other in (0..b).filter(|&o| o != bi) {
            prop_assert_eq!(&lx[other * t * v..][..t * v], &ly[other * t * v..][..t * v]);
        }
    }

    /// A batch gives each row exactly the logits it gets alone.
    #[test]
    fn batch_independence(cfg in small_config(), seed: u64, b in 2usize..=3) {
        let t = cfg.context;
        let w = Weights::random(&cfg, seed);
        let x = ids(seed ^ 3, b * t, 256);
        let all = forward(&cfg, &w, &x, b, t).unwrap();
        let v = cfg.vocab;
        for bi in 0..b {
            let alone = forward(&cfg, &w, &x[bi * t..(bi + 1) * t], 1, t).unwrap();
            prop_assert_eq!(&all[bi * t * v..(bi + 1) * t * v], &alone[..]);
        }
    }

    /// Attention probabilities: rows sum to 1, masked entries are exactly 0, none negative.
    #[test]
    fn softmax_rows_sum_to_one(seed: u64, b in 1usize..=2, t in 1usize..=9, nh in 1usize..=3, hs in 1usize..=8, causal: bool) {
        let q: Vec<f32> = uniform(seed, b * t * nh * hs).iter().map(|v| v * 4.0).collect();
        let k: Vec<f32> = uniform(seed ^ 5, b * t * nh * hs).iter().map(|v| v * 4.0).collect();
        let mut probs = vec![f64::NAN; b * nh * t * t];
        let mut lse = vec![f64::NAN; b * nh * t];
        attention_probs(&mut probs, &mut lse, &q, &k, b, t, nh, hs, causal);
        for (r, row) in probs.chunks(t).enumerate() {
            let i = r % t;
            let sum: f64 = row.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-12, "row {} sums to {}", r, sum);
            prop_assert!(row.iter().all(|&p| p >= 0.0));
            if causal {
                prop_assert!(row[i + 1..].iter().all(|&p| p == 0.0), "row {} attends to the future", r);
            }
        }
        prop_assert!(lse.iter().all(|v| v.is_finite()));
    }

    /// The reference attention equals softmax(QKᵀ/√d + M)·V written out with whole matrices,
    /// head by head, and its log-sum-exp equals ln Σ exp(S) over the unmasked scores.
    #[test]
    fn attention_matches_textbook_formula(seed: u64, b in 1usize..=2, t in 1usize..=9, nh in 1usize..=3, hs in 1usize..=8, causal: bool) {
        let n = b * t * nh * hs;
        let (q, k, v) = (uniform(seed, n), uniform(seed ^ 7, n), uniform(seed ^ 8, n));
        let mut out = vec![f32::NAN; n];
        let mut lse = vec![f32::NAN; b * nh * t];
        attention(&mut out, &mut lse, &q, &k, &v, b, t, nh, hs, causal);
        for bi in 0..b {
            for h in 0..nh {
                // Gather the head's matrices: Q, K, V are T × HS.
                let mat = |x: &[f32]| -> Vec<Vec<f64>> {
                    (0..t).map(|i| (0..hs).map(|d| x[((bi * t + i) * nh + h) * hs + d] as f64).collect()).collect()
                };
                let (qm, km, vm) = (mat(&q), mat(&k), mat(&v));
                // S = Q Kᵀ / sqrt(HS) + M, M = -inf above the diagonal when causal.
                let s: Vec<Vec<f64>> = (0..t).map(|i| (0..t).map(|j| {
                    if causal && j > i { f64::NEG_INFINITY } else {
                        (0..hs).map(|d| qm[i][d] * km[j][d]).sum::<f64>() / (hs as f64).sqrt()
                    }
                }).collect()).collect();
                for i in 0..t {
                    let e: Vec<f64> = s[i].iter().map(|x| x.exp()).collect();
                    let z: f64 = e.iter().sum();
                    let want_lse = z.ln();
                    let got_lse = lse[(bi * nh + h) * t + i] as f64;
                    prop_assert!((got_lse - want_lse).abs() <= 1e-6 * (1.0 + want_lse.abs()), "lse {} vs {}", got_lse, want_lse);
                    for d in 0..hs {
                        let want: f64 = (0..t).map(|j| e[j] / z * vm[j][d]).sum();
                        let got = out[((bi * t + i) * nh + h) * hs + d] as f64;
                        prop_assert!((got - want).abs() <= 1e-6, "out[{},{},{},{}] = {} want {}", bi, i, h, d, got, want);
                    }
                }
            }
        }
    }

    /// Patchify-and-shift is a bijection between (the pad, all but the last patch) and its output:
    /// reshaping patches 1..K back to bytes recovers the embeddings of bytes 0..T-P exactly.
    #[test]
    fn patchify_is_a_bijection(seed: u64, b in 1usize..=3, p in 1usize..=5, k in 1usize..=5, c in 1usize..=6) {
        let t = k * p;
        let x = ids(seed, b * t, 256);
        let (wte, wpe, pad) = (uniform(seed ^ 1, 256 * c), uniform(seed ^ 2, t * c), uniform(seed ^ 3, p * c));
        let mut h = vec![f32::NAN; b * t * c];
        byte_embedding(&mut h, &x, &wte, Some(&wpe), b, t, c);
        for bi in 0..b { for ti in 0..t { for ci in 0..c {
            let want = (wte[x[bi * t + ti] as usize * c + ci] as f64 + wpe[ti * c + ci] as f64) as f32;
            prop_assert_eq!(h[(bi * t + ti) * c + ci], want);
        }}}
        let mut g = vec![f32::NAN; b * k * p * c];
        patchify_shift(&mut g, &h, &pad, b, t, p, c);
        for bi in 0..b {
            prop_assert_eq!(&g[bi * k * p * c..][..p * c], &pad[..]);
            // Inverse map: byte ti of the sequence lives in patch ti / P + 1 at slot ti % P.
            for ti in 0..t - p {
                for ci in 0..c {
                    let back = g[((bi * k + ti / p + 1) * p + ti % p) * c + ci];
                    prop_assert_eq!(back, h[(bi * t + ti) * c + ci]);
                }
            }
        }
    }

    /// Equal logits in a row are a uniform predictor: exactly 8 bits per byte over 256 values.
    #[test]
    fn uniform_predictor_is_eight_bits_per_byte(seed: u64, n in 1usize..=50) {
        let mut r = rng(seed);
        let mut logits = Vec::with_capacity(n * 256);
        for _ in 0..n {
            let c: f32 = r.gen_range(-30.0..30.0);
            logits.extend(std::iter::repeat_n(c, 256));
        }
        let targets = ids(seed ^ 9, n, 256);
        let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
        cross_entropy(&mut losses, &mut lse, &logits, &targets, n, 256);
        let bpb = bits_per_byte(&losses);
        prop_assert!((bpb - 8.0).abs() < 1e-12, "uniform predictor gave {} bits per byte", bpb);
    }

    /// The same seed gives the same bytes; top-k = 1 is greedy whatever the temperature.
    #[test]
    fn generator_is_deterministic_for_a_seed(cfg in small_config(), seed: u64, temperature in 0.3f32..2.0, top_p in 0.5f32..=1.0) {
        let w = Weights::random(&cfg, seed);
        let prompt: Vec<u8> = ids(seed ^ 4, cfg.context / 2, 256).iter().map(|&b| b as u8).collect();
        let new = cfg.context - prompt.len();
        let s = Sampling { temperature, top_k: 0, top_p, seed: seed ^ 11 };
        let a = generate(&cfg, &w, &prompt, new, &s).unwrap();
        let b = generate(&cfg, &w, &prompt, new, &s).unwrap();
        prop_assert_eq!(&a, &b);
        let k1 = generate(&cfg, &w, &prompt, new, &Sampling { top_k: 1, ..s.clone() }).unwrap();
        let greedy = generate(&cfg, &w, &prompt, new, &Sampling::greedy()).unwrap();
        prop_assert_eq!(k1, greedy);
        // The batched generator gives prompt i the stream of seed + i.
        let batch = generate_batch(&cfg, &w, &[&prompt, &prompt], new, &s).unwrap();
        prop_assert_eq!(&batch[0], &a);
        let second = generate(&cfg, &w, &prompt, new, &Sampling { seed: s.seed.wrapping_add(1), ..s.clone() }).unwrap();
        prop_assert_eq!(&batch[1], &second);
    }
}

/// Greedy generation picks the argmax of the full forward's logits at the prompt's length.
#[test]
fn greedy_first_byte_is_argmax_of_forward() {
    let cfg = Config::tiny();
    for seed in 0..4u64 {
        let w = Weights::random(&cfg, seed);
        let prompt: Vec<u8> = (0..6).map(|i| (i * 37 + seed as usize) as u8).collect();
        let got = generate(&cfg, &w, &prompt, 1, &Sampling::greedy()).unwrap();
        let mut x: Vec<u32> = prompt.iter().map(|&b| b as u32).collect();
        x.resize(8, 200);
        let logits = forward(&cfg, &w, &x, 1, 8).unwrap();
        let row = &logits[6 * 256..7 * 256];
        let best = (0..256)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(got, vec![best as u8], "seed {seed}");
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_value() {
    let cfg = Config::tiny();
    let w = Weights::init(&cfg, 0);
    let msg = |e: megabyte_reference::Error| e.to_string();
    assert_eq!(
        msg(forward(&cfg, &w, &[1; 6], 1, 6).unwrap_err()),
        "sequence length 6 is not a multiple of the patch size 4"
    );
    assert_eq!(
        msg(forward(&cfg, &w, &[1; 68], 1, 68).unwrap_err()),
        "sequence length 68 exceeds the context of 64 bytes"
    );
    assert_eq!(
        msg(forward(&cfg, &w, &[1; 7], 2, 4).unwrap_err()),
        "input holds 7 ids but batch 2 × sequence 4 needs 8"
    );
    assert_eq!(
        msg(forward(&cfg, &w, &[1, 2, 256, 3], 1, 4).unwrap_err()),
        "id 256 at position 2 is outside the vocabulary of 256"
    );
    let long = vec![b'a'; 60];
    assert_eq!(
        msg(generate(&cfg, &w, &long, 5, &Sampling::greedy()).unwrap_err()),
        "prompt of 60 bytes plus 5 new bytes exceeds the context of 64 bytes"
    );
    let bad = Sampling {
        top_p: 0.0,
        ..Sampling::greedy()
    };
    assert!(msg(generate(&cfg, &w, b"ab", 1, &bad).unwrap_err()).contains("top_p"));
}

//! The reference backward against central finite differences of the reference loss: for every
//! parameter tensor of small models (tied and untied heads, GELU and ReLU, with and without
//! local positions), a seeded sample of elements. This checks every op's backward at once:
//! a wrong gradient anywhere upstream of a parameter shows up in that parameter.

use megabyte_reference::model::{loss_and_grads, loss_bits_per_byte};
use megabyte_reference::{Activation, Config, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn config(variant: u8) -> Config {
    Config {
        patch: 2,
        context: 8,
        d_global: 4,
        d_local: 8,
        layers_global: 2,
        layers_local: 1,
        heads_global: 2,
        heads_local: 2,
        ffn_mult: 2,
        ..Config::tiny()
    }
    .with_variant(variant)
}

/// Mean loss in nats (the reference reports bits per byte).
fn loss(cfg: &Config, w: &Weights, x: &[u32], b: usize, t: usize) -> f64 {
    loss_bits_per_byte(cfg, w, x, b, t).unwrap() * std::f64::consts::LN_2
}

fn check_variant(variant: u8, seed: u64) {
    let cfg = config(variant);
    let (b, t) = (2, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<u32> = (0..b * t)
        .map(|_| rng.gen_range(0..cfg.vocab as u32))
        .collect();
    let w = Weights::random(&cfg, seed);
    let (l0, grads) = loss_and_grads(&cfg, &w, &x, b, t).unwrap();
    assert!(
        (l0 - loss(&cfg, &w, &x, b, t)).abs() < 1e-9,
        "loss differs from the forward's"
    );
    let specs = cfg.tensor_specs();
    let scale = grads
        .tensors()
        .iter()
        .flat_map(|g| g.iter())
        .fold(0f64, |m, &v| m.max((v as f64).abs()));
    let h = 1e-2f64;
    let mut kinks = 0;
    for (ti, (name, _)) in specs.iter().enumerate() {
        let g = grads.tensors()[ti].to_vec();
        // Every element of small tensors, a sample of large ones (biased to nonzero gradients).
        let len = g.len();
        let picks: Vec<usize> = if len <= 16 {
            (0..len).collect()
        } else {
            let mut p: Vec<usize> = (0..6).map(|_| rng.gen_range(0..len)).collect();
            let biggest = (0..len)
                .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
                .unwrap();
            p.push(biggest);
            p
        };
        for i in picks {
            // Loss with element i moved by `s` (rounded to f32), and the actual move.
            let moved = |s: f64| {
                let mut wp = w.clone();
                let orig = wp.tensors_mut()[ti][i];
                wp.tensors_mut()[ti][i] = (orig as f64 + s) as f32;
                let actual = wp.tensors_mut()[ti][i] as f64 - orig as f64;
                (loss(&cfg, &wp, &x, b, t), actual)
            };
            let ((lp, up), (lm, down)) = (moved(h), moved(-h));
            let d = (lp - lm) / (up - down);
            let an = g[i] as f64;
            // Central differences are exact to O(h²) (about 1e-4 relative here) plus the f32
            // storage noise of the loss divided by h (about 1e-5 absolute).
            let tol = 2e-3 * scale + 2e-2 * an.abs();
            if (d - an).abs() <= tol {
                continue;
            }
            // ReLU is not differentiable at 0. When a pre-activation lies within the step of
            // its kink, the central quotient mixes two slopes; a step 8 times smaller avoids
            // kinks that are not right at the point. When one is (as rounding can place it), the
            // two one-sided slopes differ and the backward (which takes ReLU'(0) from the
            // side the rounding puts it on) matches one of them; the central quotient matches
            // neither. Such an element is counted, not failed; anything else is a wrong
            // gradient.
            let hs = h / 8.0;
            let ((lf, sf), (lb, sb)) = (moved(hs), moved(-hs));
            let (fwd, bwd) = ((lf - l0) / sf, (lb - l0) / sb);
            // A kink within h but not within h/8: the smaller step's quotient is clean.
            let small = (lf - lb) / (sf - sb);
            let kink = (small - an).abs() <= tol
                || ((fwd - bwd).abs() > tol
                    && ((fwd - an).abs() <= tol || (bwd - an).abs() <= tol));
            if cfg.activation == Activation::Relu && kink {
                kinks += 1;
                continue;
            }
            panic!(
                "variant {variant} seed {seed}: d loss / d {name}[{i}]: backward {an:.6e}, finite difference {d:.6e} (one-sided {fwd:.6e} / {bwd:.6e}), tolerance {tol:.1e}"
            );
        }
    }
    if kinks > 0 {
        eprintln!("variant {variant} seed {seed}: {kinks} elements checked one-sided (ReLU kinks)");
    }
}

#[test]
fn gelu_tied_with_positions() {
    check_variant(0, 1);
}

#[test]
fn relu_untied() {
    check_variant(3, 2);
}

#[test]
fn untied_with_end_id_and_no_positions() {
    check_variant(6, 3);
}

#[test]
fn gelu_tied_other_seed() {
    check_variant(0, 4);
}

//! Training on the device: the composed backward against the reference backward, a falling
//! loss, bitwise determinism, and resume-from-checkpoint equivalence.
//!
//! Every backward kernel is held to the tolerance rule on its own (`tests/backward.rs`); this
//! file checks how the model wires them together. A wrong index or a missing term moves a
//! gradient by a sizeable fraction of its tensor's scale, f32 roundoff by about 1e-6 of it,
//! so each tensor's gradient must be within 1e-4 of its largest reference value.

use megabyte::checkpoint::{self, StorageDtype};
use megabyte::train::{gradients, TrainConfig, Trainer};
use megabyte_reference::model::loss_and_grads;
use megabyte_reference::{Config, Weights};
use megabyte_tests::{uniform_ids, with_client, TestRuntime};

fn config(p: usize, variant: u8) -> Config {
    Config {
        patch: p,
        context: 4 * p,
        d_global: 8,
        d_local: 16,
        layers_global: 2,
        layers_local: 2,
        heads_global: 2,
        heads_local: 2,
        ffn_mult: 2,
        ..Config::tiny()
    }
    .with_variant(variant)
}

fn gradient_case(cfg: &Config, b: usize, seed: u64) {
    let t = cfg.context;
    let w = Weights::random(cfg, seed);
    let ids = uniform_ids(seed ^ 5, b * t, cfg.vocab);
    let (want_loss, want) = loss_and_grads(cfg, &w, &ids, b, t).unwrap();
    with_client!(TestRuntime, |client| {
        let (loss, got) = gradients(&client, cfg, &w, &ids, b).unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss,
            "{cfg:?}: loss {loss} vs {want_loss}"
        );
        for ((name, _), (g, r)) in cfg
            .tensor_specs()
            .iter()
            .zip(got.tensors().iter().zip(want.tensors()))
        {
            let scale = r.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let worst = g
                .iter()
                .zip(r)
                .enumerate()
                .map(|(i, (&a, &b))| ((a as f64 - b as f64).abs(), i))
                .fold((0f64, 0usize), |m, x| {
                    if x.0 > m.0 || x.0.is_nan() {
                        x
                    } else {
                        m
                    }
                });
            assert!(
                worst.0 <= 1e-4 * scale.max(1e-6) && g.iter().all(|x| x.is_finite()),
                "{cfg:?} seed {seed}: gradient of `{name}`[{}]: device {}, reference {} (tensor scale {scale:.3e})",
                worst.1, g[worst.1], r[worst.1]
            );
        }
    });
}

#[test]
fn gradients_match_the_reference() {
    gradient_case(&Config::tiny(), 2, 1);
    gradient_case(&config(3, 0b011), 2, 2); // ReLU, untied head
    gradient_case(&config(2, 0b110), 3, 3); // untied, 257 ids, no local positions
    gradient_case(&config(1, 0b000), 2, 4); // P = 1: local sequences of one byte
    gradient_case(&config(1, 0b010), 1, 5); // P = 1, untied: E_L only through the pad path
}

fn text() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..200 {
        s.push_str(&format!("fn item_{i}(x: u32) -> u32 {{ x + {i} }}\n"));
    }
    s.into_bytes()
}

fn trainer(
    client: &cubecl::prelude::ComputeClient<TestRuntime>,
    steps: u64,
) -> Trainer<TestRuntime> {
    let cfg = Config::tiny();
    let mut tc = TrainConfig::new(&cfg, steps);
    tc.batch = 4;
    tc.seed = 9;
    Trainer::new(client, &cfg, &Weights::init(&cfg, 3), tc).unwrap()
}

#[test]
fn loss_falls_and_runs_are_deterministic() {
    let data = text();
    with_client!(TestRuntime, |client| {
        let run = || {
            let mut t = trainer(&client, 40);
            let mut losses = Vec::new();
            for step in 1..=40 {
                let ids = t.batch_for(&data, step).unwrap();
                losses.push(t.step(&ids).unwrap().loss);
            }
            (losses, t.model().to_weights().unwrap())
        };
        let (a, wa) = run();
        let first = a[..5].iter().sum::<f64>() / 5.0;
        let last = a[35..].iter().sum::<f64>() / 5.0;
        assert!(
            last < 0.75 * first,
            "mean loss {first:.3} -> {last:.3} nats: not learning"
        );
        let (b, wb) = run();
        assert_eq!(a, b, "same seed and data, different loss curve");
        assert_eq!(wa, wb, "same seed and data, different weights");
    });
}

#[test]
fn resumed_run_ends_with_the_same_weights() {
    let data = text();
    with_client!(TestRuntime, |client| {
        let mut straight = trainer(&client, 8);
        for step in 1..=8 {
            straight
                .step(&straight.batch_for(&data, step).unwrap())
                .unwrap();
        }
        let mut first = trainer(&client, 8);
        for step in 1..=4 {
            first.step(&first.batch_for(&data, step).unwrap()).unwrap();
        }
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resume.safetensors");
        first.save(&path, StorageDtype::F32).unwrap();
        let ckpt = checkpoint::load(&path).unwrap();
        let mut resumed = Trainer::resume(&client, &ckpt, first.train.clone()).unwrap();
        assert_eq!(resumed.steps_done(), 4);
        for step in 5..=8 {
            resumed
                .step(&resumed.batch_for(&data, step).unwrap())
                .unwrap();
        }
        assert_eq!(
            resumed.model().to_weights().unwrap(),
            straight.model().to_weights().unwrap(),
            "stopping and resuming changed the result"
        );
    });
}

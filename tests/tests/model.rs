//! The device model against the reference model with the same weights: forward logits over
//! random configs and inputs, cached decoding's per-step logits against the reference's full
//! forward on the same prefix, greedy generation against the reference generator, and errors.
//!
//! Tolerance: the rule of `megabyte-tests`, with `megabyte_tests::naive_model` (the whole
//! forward naively in f32) as the same-precision naive implementation, its error the larger of
//! its two summation orders' (`naive_model::forward_errors`).

use cubecl::prelude::ComputeClient;
use megabyte::{
    DecodeKernel, Decoder, GenerateOptions, Generator, Model, ReferenceDecoder, ReferenceModel,
    StepDecoder,
};
use megabyte_reference::{generate_batch, Activation, Config, Sampling, Weights};
use megabyte_tests::{check, check_errors, naive_model, uniform_ids, with_client, TestRuntime};
use proptest::prelude::*;

/// Fewest positions (each a row of V logits) on which the naive error is measured.
const NAIVE_POSITIONS: usize = 64;

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Device logits for (B, T) ids against the reference, under the tolerance rule.
fn forward_case(cfg: &Config, b: usize, t: usize, seed: u64) {
    let case = format!("model forward({cfg:?}, B={b}, T={t}, seed={seed})");
    let w = Weights::random(cfg, seed);
    // The case's sequences first, then more from the same distribution so that the naive error
    // is measured on at least NAIVE_POSITIONS positions (see the harness's tolerance rule).
    let b_all = b.max(NAIVE_POSITIONS.div_ceil(t));
    let all_ids = uniform_ids(seed ^ 0x51, b_all * t, cfg.vocab);
    let ids = all_ids[..b * t].to_vec();
    let reference = megabyte_reference::forward(cfg, &w, &all_ids, b_all, t).unwrap();
    let naive = naive_model::forward_errors(cfg, &w, &all_ids, b_all, t, &reference);
    with_client!(TestRuntime, |client| {
        let model = Model::<TestRuntime, f32>::new(&client, cfg, &w).unwrap();
        let logits = model.forward(&ids, b).unwrap();
        check_errors::<f32>(
            &case,
            "logits",
            &to_f64(&logits),
            &naive,
            &to_f64(&reference),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // The loss is the mean over positions of lse - logit[target], in bits.
        let mut nats = 0f64;
        for (i, &id) in ids.iter().enumerate() {
            let row = &reference[i * cfg.vocab..(i + 1) * cfg.vocab];
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
            let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
            nats += lse - row[id as usize] as f64;
        }
        let bits = nats / (b * t) as f64 / std::f64::consts::LN_2;
        let got = model.loss(&ids, b).unwrap();
        assert!(
            (got - bits).abs() < 1e-4 * bits.max(1.0),
            "{case}: loss {got} vs reference {bits}"
        );
    });
}

/// Decodes a random sequence byte by byte (after a prompt of `prompt` bytes) and checks every
/// step's logits against the reference's full forward over the sequence, once with each
/// block kernel.
fn decode_case(cfg: &Config, b: usize, prompt: usize, seed: u64) {
    for kernel in [DecodeKernel::Fused, DecodeKernel::Unfused] {
        decode_case_with(cfg, b, prompt, seed, kernel);
    }
}

fn decode_case_with(cfg: &Config, b: usize, prompt: usize, seed: u64, kernel: DecodeKernel) {
    let case = format!("cached decoding({cfg:?}, B={b}, prompt={prompt}, seed={seed}, {kernel:?})");
    let t = cfg.context;
    let v = cfg.vocab;
    let w = Weights::random(cfg, seed);
    let ids = uniform_ids(seed ^ 0x52, b * t, 256);
    let reference = megabyte_reference::forward(cfg, &w, &ids, b, t).unwrap();
    let naive = naive_model::forward_errors(cfg, &w, &ids, b, t, &reference);
    let reference = to_f64(&reference);
    // Rows (B, V) of position `pos`, followed by every position's logits: the naive error is
    // measured over the whole sequence, not over one step's few rows.
    let at = |all: &[f64], pos: usize| -> Vec<f64> {
        (0..b)
            .flat_map(|bi| all[(bi * t + pos) * v..][..v].to_vec())
            .chain(all.iter().copied())
            .collect()
    };
    with_client!(TestRuntime, |client| {
        let model = Model::<TestRuntime, f32>::new(&client, cfg, &w).unwrap();
        let mut dec = Decoder::with_kernel(&model, b, kernel).unwrap();
        let bytes: Vec<Vec<u8>> = (0..b)
            .map(|bi| ids[bi * t..][..prompt].iter().map(|&x| x as u8).collect())
            .collect();
        let prompts: Vec<&[u8]> = bytes.iter().map(|x| x.as_slice()).collect();
        let mut logits = dec.start(&prompts).unwrap();
        for pos in prompt..t {
            let what = format!("logits at position {pos}");
            check_errors::<f32>(
                &case,
                &what,
                &to_f64(&logits),
                &at(&naive, pos),
                &at(&reference, pos),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            if pos + 1 == t {
                let err = dec.push(&vec![0; b]).unwrap_err();
                assert!(err.to_string().contains("context of"), "{case}: {err}");
                break;
            }
            let next: Vec<u32> = (0..b).map(|bi| ids[bi * t + pos]).collect();
            logits = dec.push(&next).unwrap();
        }
    });
}

fn config(
    p: usize,
    dg: usize,
    dl: usize,
    layers: (usize, usize),
    heads: (usize, usize),
    variant: u8,
) -> Config {
    Config {
        vocab: if variant & 1 == 0 { 256 } else { 257 },
        patch: p,
        context: 4 * p,
        d_global: dg,
        d_local: dl,
        layers_global: layers.0,
        layers_local: layers.1,
        heads_global: heads.0,
        heads_local: heads.1,
        ffn_mult: if variant & 8 == 0 { 4 } else { 2 },
        activation: [Activation::Gelu, Activation::Relu][(variant >> 1 & 1) as usize],
        tied_head: variant & 4 == 0,
        local_positions: variant & 1 == 0,
    }
}

#[test]
fn tiny_preset_forward() {
    forward_case(&Config::tiny(), 2, 64, 1);
    forward_case(&Config::tiny(), 3, 12, 2);
}

/// A buffer cap that splits the local phase into chunks of patches (3 and 4 of 10, each with a
/// last chunk shorter than the others) must not change the logits or the losses.
#[test]
fn chunked_local_phase_matches() {
    let cfg = Config::tiny();
    let (b, t) = (2, 40);
    let w = Weights::random(&cfg, 41);
    let ids = uniform_ids(42, b * t, 256);
    with_client!(TestRuntime, |client| {
        let mut model = Model::<TestRuntime, f32>::new(&client, &cfg, &w).unwrap();
        let (logits, losses) = (
            model.forward(&ids, b).unwrap(),
            model.losses(&ids, b).unwrap(),
        );
        // Widest local buffer per patch: B·P·max(4·D_L, V)·4 bytes = 2·4·256·4.
        for patches in [3, 4] {
            model.set_max_buffer_bytes(patches * 2 * 4 * 256 * 4);
            assert_eq!(
                model.forward(&ids, b).unwrap(),
                logits,
                "{patches} patches per chunk"
            );
            assert_eq!(
                model.losses(&ids, b).unwrap(),
                losses,
                "{patches} patches per chunk"
            );
        }
        // Too small for one patch: an error naming the sizes, not a device panic.
        model.set_max_buffer_bytes(1000);
        let err = model.forward(&ids, b).unwrap_err().to_string();
        assert!(err.contains("allocates at most 1000"), "{err}");
    });
}

#[test]
fn config_variants_forward() {
    // Untied head, no local positions, ReLU, the 257-id vocabulary, odd patch and widths.
    forward_case(&config(3, 8, 24, (1, 2), (2, 3), 0b0111), 2, 12, 3);
    forward_case(&config(5, 4, 16, (2, 1), (1, 2), 0b1010), 1, 20, 4);
    forward_case(&config(1, 16, 8, (1, 1), (2, 1), 0b0001), 3, 3, 5);
    // A proptest case whose first position's hidden state the device rounds to 2.6e-6 against
    // the index-order naive forward's 1.4e-6: within the spread of correct f32 forwards (200
    // naive forwards with random summation orders ranged 0.5e-6 to 2.7e-6 there), and the
    // reason the naive error is taken over both orders.
    forward_case(
        &config(3, 12, 16, (2, 2), (2, 2), 0b1010),
        2,
        3,
        4788922614487606195,
    );
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    decode_case(&Config::tiny(), 2, 0, 11);
    decode_case(&Config::tiny(), 1, 9, 12);
    decode_case(&config(3, 8, 24, (1, 2), (2, 3), 0b0111), 3, 6, 13);
    // Stacks as wide as the fused step's widest presets and deeper: on CPU drivers each
    // step's stacks run as several launches (patch input and final LayerNorm, local input and
    // logits, split over layer ranges).
    decode_case(&wide_deep(), 1, 5, 14);
    // Auto feeds a short prompt's patches through fused steps and a long one's (32 patches or
    // more) through the one-pass blocks, then steps either way.
    decode_case_with(&Config::tiny(), 2, 9, 15, DecodeKernel::Auto);
    let long = Config {
        context: 96,
        ..config(2, 8, 16, (1, 1), (2, 2), 0)
    };
    decode_case_with(&long, 1, 70, 16, DecodeKernel::Auto);
}

/// Global stack 384 wide (6 heads) and 5 deep, local stack 256 wide (4 heads) and 9 deep.
fn wide_deep() -> Config {
    config(4, 96, 256, (5, 9), (6, 4), 0)
}

#[test]
fn greedy_generation_matches_the_reference() {
    greedy_case(&Config::tiny(), &[b"MEGA", b"by", b"te!!", b""], 30);
    greedy_case(&wide_deep(), &[b"MEGA", b"byte"], 12);
}

fn greedy_case(cfg: &Config, prompts: &[&[u8]], max_new: usize) {
    let w = Weights::random(cfg, 21);
    let prompts = prompts.to_vec();
    let want = generate_batch(cfg, &w, &prompts, max_new, &Sampling::greedy()).unwrap();
    with_client!(TestRuntime, |client| {
        let model = Model::<TestRuntime, f32>::new(&client, cfg, &w).unwrap();
        // Fused: greedy decoding on the device; unfused: argmax of read-back logits.
        for kernel in [DecodeKernel::Fused, DecodeKernel::Unfused] {
            let gen = Generator::new(
                &model,
                GenerateOptions {
                    max_new,
                    ..Default::default()
                },
            )
            .unwrap()
            .decode_kernel(kernel);
            let mut streamed = vec![Vec::new(); prompts.len()];
            let got = gen
                .generate(&prompts, |i, byte| streamed[i].push(byte))
                .unwrap();
            assert_eq!(got, want, "{kernel:?}");
            assert_eq!(streamed, want, "{kernel:?}");
        }
    });
}

/// `Generator` on the reference model (what `--device cpu` runs) samples as the reference
/// generator does, with the device generator's stops: prompts of three lengths, sampled with per-prompt seeds, give
/// `generate_batch`'s bytes, streamed as they come; with a stop sequence each row is cut after
/// its first occurrence (and the rows that do not meet it are unchanged); greedy with a stop,
/// it gives the device generator's bytes.
#[test]
fn the_cpu_generator_samples_as_the_reference_and_stops_as_the_device() {
    let cfg = Config::tiny();
    let w = Weights::random(&cfg, 31);
    let sampling = Sampling {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        seed: 9,
    };
    let prompts: [&[u8]; 4] = [b"ab", b"hello", b"cd", b""];
    let opts = GenerateOptions {
        max_new: 30,
        sampling: sampling.clone(),
        stop: vec![],
    };
    let want = generate_batch(&cfg, &w, &prompts, 30, &sampling).unwrap();
    let mut streamed = vec![Vec::new(); prompts.len()];
    let cpu_model = ReferenceModel::new(&cfg, &w).unwrap();
    let got = Generator::new(&cpu_model, opts.clone())
        .unwrap()
        .generate(&prompts, |i, byte| streamed[i].push(byte))
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(streamed, want);
    let stop = want[1][10..12].to_vec();
    let cut = |o: &[u8]| {
        (1..=o.len())
            .find(|&n| o[..n].ends_with(&stop))
            .unwrap_or(o.len())
    };
    let stopped = Generator::new(
        &cpu_model,
        GenerateOptions {
            stop: vec![stop.clone()],
            ..opts
        },
    )
    .unwrap()
    .generate(&prompts, |_, _| {})
    .unwrap();
    assert!(stopped[1].len() <= 12, "{stopped:?}");
    for (s, full) in stopped.iter().zip(&want) {
        assert_eq!(s[..], full[..cut(full)], "stop {stop:?}");
    }
    let greedy = GenerateOptions {
        max_new: 30,
        sampling: Sampling::greedy(),
        stop: vec![b"e".to_vec()],
    };
    let cpu = Generator::new(&cpu_model, greedy.clone())
        .unwrap()
        .generate(&prompts, |_, _| {})
        .unwrap();
    with_client!(TestRuntime, |client| {
        let model = Model::<TestRuntime, f32>::new(&client, &cfg, &w).unwrap();
        let device = Generator::new(&model, greedy.clone())
            .unwrap()
            .generate(&prompts, |_, _| {})
            .unwrap();
        assert_eq!(device, cpu);
        // The host's greedy steps (the trait's default) against the device's.
        let two: [&[u8]; 2] = [b"abcdef", b"ghijkl"];
        let mut host = ReferenceDecoder::new(&cfg, &w, 2).unwrap();
        let mut dev = Decoder::with_kernel(&model, 2, DecodeKernel::Fused).unwrap();
        let first = argmax_rows(&StepDecoder::start(&mut host, &two).unwrap(), cfg.vocab);
        assert_eq!(first, argmax_rows(&dev.start(&two).unwrap(), cfg.vocab));
        let want = dev.push_greedy(&first, 9).unwrap();
        assert_eq!(host.push_greedy(&first, 9).unwrap(), want);
        assert_eq!(host.position(), dev.position());
    });
}

/// The shipped model (`models/small-pydoc.safetensors`, the `small` preset: a global stack 256
/// wide and 4 deep, a local one 128 wide) decodes greedily with `DecodeKernel::Auto` exactly
/// as the reference generator does: 48 new bytes after prompts that end inside a patch, two
/// lengths in one call.
#[test]
fn shipped_model_greedy_matches_the_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/small-pydoc.safetensors"
    );
    let ckpt = megabyte::checkpoint::load(path).unwrap();
    let (cfg, w) = (&ckpt.config, &ckpt.weights);
    let prompts: Vec<&[u8]> = vec![b"The function returns", b"import os\n"];
    let want = generate_batch(cfg, w, &prompts, 48, &Sampling::greedy()).unwrap();
    with_client!(TestRuntime, |client| {
        let model = Model::<TestRuntime, f32>::new(&client, cfg, w).unwrap();
        let options = GenerateOptions {
            max_new: 48,
            ..Default::default()
        };
        let gen = Generator::new(&model, options).unwrap();
        let got = gen.generate(&prompts, |_, _| {}).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(String::from_utf8_lossy(g), String::from_utf8_lossy(w));
        }
        assert_eq!(got, want);
    });
}

/// Argmax of a row of logits, the lowest id among equal maxima.
fn argmax_rows(logits: &[f32], v: usize) -> Vec<u32> {
    logits
        .chunks(v)
        .map(megabyte_reference::generate::argmax)
        .collect()
}

/// Greedy decoding on the device (the argmax in the fused step, bytes read back in blocks)
/// gives the bytes that the argmax of the read-back logits gives, across patch boundaries, in
/// blocks of 1 to 9 bytes; a block past the context is an error.
#[test]
fn greedy_on_device_matches_host_argmax() {
    for (cfg, seed) in [
        (Config::tiny(), 31),
        (config(3, 8, 24, (1, 2), (2, 3), 0b0111), 32),
    ] {
        let (b, prompt) = (2, 5);
        let w = Weights::random(&cfg, seed);
        let ids = uniform_ids(seed, b * prompt, 256);
        let bytes: Vec<Vec<u8>> = ids
            .chunks(prompt)
            .map(|c| c.iter().map(|&x| x as u8).collect())
            .collect();
        let prompts: Vec<&[u8]> = bytes.iter().map(|x| x.as_slice()).collect();
        let steps = cfg.context - prompt;
        with_client!(TestRuntime, |client| {
            let model = Model::<TestRuntime, f32>::new(&client, &cfg, &w).unwrap();
            let mut host = Decoder::with_kernel(&model, b, DecodeKernel::Fused).unwrap();
            let mut next = argmax_rows(&host.start(&prompts).unwrap(), cfg.vocab);
            let mut want = vec![next.clone()];
            for _ in 1..steps {
                next = argmax_rows(&host.push(&next).unwrap(), cfg.vocab);
                want.push(next.clone());
            }
            let mut dev = Decoder::with_kernel(&model, b, DecodeKernel::Fused).unwrap();
            assert!(dev.greedy_on_device());
            let mut next = argmax_rows(&dev.start(&prompts).unwrap(), cfg.vocab);
            let mut got = vec![next.clone()];
            let mut k = 1;
            while got.len() < steps {
                let n = k.min(steps - got.len());
                let block = dev.push_greedy(&next, n).unwrap();
                for t in 0..n {
                    got.push((0..b).map(|j| block[j * n + t]).collect());
                }
                next = got.last().unwrap().clone();
                k += 4;
            }
            assert_eq!(got, want, "{cfg:?}");
            // Device blocks and host steps alternating: the host's copy of the patch bytes
            // follows the device's.
            let mut mix = Decoder::with_kernel(&model, b, DecodeKernel::Fused).unwrap();
            let mut next_mix = argmax_rows(&mix.start(&prompts).unwrap(), cfg.vocab);
            let mut got_mix = vec![next_mix.clone()];
            while got_mix.len() < steps {
                if got_mix.len() % 2 == 1 {
                    let n = 3.min(steps - got_mix.len());
                    let block = mix.push_greedy(&next_mix, n).unwrap();
                    for t in 0..n {
                        got_mix.push((0..b).map(|j| block[j * n + t]).collect());
                    }
                } else {
                    got_mix.push(argmax_rows(&mix.push(&next_mix).unwrap(), cfg.vocab));
                }
                next_mix = got_mix.last().unwrap().clone();
            }
            assert_eq!(got_mix, want, "{cfg:?}: device blocks and host steps");
            let err = dev.push_greedy(&next, 1).unwrap_err();
            assert!(err.to_string().contains("context of"), "{cfg:?}: {err}");
        });
    }
}

/// The tiny preset's config, the test device's client and the model with random weights of
/// `seed`; `None` (skip) where there is no device outside CI.
fn tiny_model(seed: u64) -> Option<(Config, ComputeClient<TestRuntime>, Model<TestRuntime, f32>)> {
    let cfg = Config::tiny();
    let client = megabyte_tests::client::<TestRuntime>()?;
    let model = Model::<TestRuntime, f32>::new(&client, &cfg, &Weights::random(&cfg, seed));
    Some((cfg, client, model.unwrap()))
}

#[test]
fn sampling_is_seeded_and_stops() {
    let Some((_, _, model)) = tiny_model(22) else {
        return;
    };
    let sampling = Sampling {
        temperature: 1.0,
        top_k: 20,
        top_p: 0.9,
        seed: 5,
    };
    let opts = GenerateOptions {
        max_new: 40,
        sampling: sampling.clone(),
        stop: vec![],
    };
    let run = |o: &GenerateOptions| {
        Generator::new(&model, o.clone())
            .unwrap()
            .generate(&[b"ab", b"ab"], |_, _| {})
            .unwrap()
    };
    let a = run(&opts);
    assert_eq!(a, run(&opts), "same seed, same bytes");
    assert_ne!(a[0], a[1], "rows sample with seeds seed + i");
    assert_eq!(a[0].len(), 40);
    // Stop right after the first occurrence of a 1-byte sequence from the first output.
    let stop = vec![a[0][5]];
    let first = a[0].iter().position(|&x| x == stop[0]).unwrap();
    let stopped = run(&GenerateOptions {
        stop: vec![stop],
        ..opts
    });
    assert_eq!(stopped[0], a[0][..=first].to_vec());
}

#[test]
fn bad_input_is_an_error() {
    let Some((cfg, client, model)) = tiny_model(23) else {
        return;
    };
    let err = model.forward(&[1, 2, 3, 4, 5, 6], 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "sequence length 6 is not a multiple of the patch size 4"
    );
    let err = model.forward(&vec![0; 68], 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "sequence length 68 exceeds the context of 64 bytes"
    );
    let err = model.forward(&[1, 2, 3, 256], 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "id 256 at position 3 is outside the vocabulary of 256"
    );
    let gen = Generator::new(
        &model,
        GenerateOptions {
            max_new: 10,
            ..Default::default()
        },
    )
    .unwrap();
    let err = gen.generate(&[&[b'x'; 60]], |_, _| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "prompt of 60 bytes plus 10 new bytes exceeds the context of 64 bytes"
    );
    let mut short = Weights::random(&cfg, 1);
    short.local_pad.pop();
    let err = Model::<TestRuntime, f32>::new(&client, &cfg, &short)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "weights do not match the config: tensor `local.pad` has 31 elements, the config needs 32"
    );
    let bad = Sampling {
        temperature: -1.0,
        ..Sampling::greedy()
    };
    assert!(Generator::new(
        &model,
        GenerateOptions {
            sampling: bad,
            ..Default::default()
        }
    )
    .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_configs_forward(p in 1usize..6, dg in prop::sample::select(vec![4usize, 8, 12]), dl in prop::sample::select(vec![8usize, 16, 24]),
                              lg in 1usize..3, ll in 1usize..3, variant in 0u8..16, b in 1usize..3, k in 1usize..5, seed: u64) {
        let heads_g = if (p * dg) % 2 == 0 { 2 } else { 1 };
        let cfg = config(p, dg, dl, (lg, ll), (heads_g, 2), variant);
        forward_case(&cfg, b, k * p, seed);
    }
}

/// The paper's "million-byte sequences": one forward over 1 MiB (1,048,576 bytes) with P = 64,
/// so the global model attends over 16,384 patches and the local model runs 16,384 sequences of
/// 64 bytes. Causality gives an exact check without running the reference on a megabyte: the
/// first 4,096 positions' losses must equal those of the reference over those 4,096 bytes
/// alone. Every loss must be finite. Slow on lavapipe; run with
/// `cargo test --release -p megabyte-tests --test model -- --ignored million --nocapture`.
#[test]
#[ignore]
fn million_byte_forward() {
    let t = 1 << 20;
    let cfg = Config {
        vocab: 256,
        patch: 64,
        context: t,
        d_global: 8,
        d_local: 64,
        layers_global: 2,
        layers_local: 2,
        heads_global: 8,
        heads_local: 1,
        ffn_mult: 4,
        activation: Activation::Gelu,
        tied_head: true,
        local_positions: true,
    };
    let w = Weights::random(&cfg, 31);
    // Text-like bytes: a seeded walk over printable ASCII.
    let ids = uniform_ids(32, t, 95)
        .iter()
        .map(|&x| x + 32)
        .collect::<Vec<u32>>();
    let head = 4096;
    let small = Config {
        context: head,
        ..cfg.clone()
    };
    let mut w_small = w.clone();
    w_small.global_pos.truncate(head * cfg.d_global);
    let head_losses = |w: &Weights| {
        let logits = megabyte_reference::forward(&small, w, &ids[..head], 1, head).unwrap();
        let (mut loss, mut lse) = (vec![0f64; head], vec![0f64; head]);
        megabyte_reference::cross_entropy::cross_entropy(
            &mut loss,
            &mut lse,
            &logits,
            &ids[..head],
            head,
            256,
        );
        loss
    };
    let ref_loss = head_losses(&w_small);
    let naive_loss: Vec<f64> = naive_model::cross_entropy(
        &naive_model::forward(&small, &w_small, &ids[..head], 1, head),
        &ids[..head],
        256,
    )
    .iter()
    .map(|&l| l as f64)
    .collect();
    with_client!(TestRuntime, |client| {
        let model = Model::<TestRuntime, f32>::new(&client, &cfg, &w).unwrap();
        let start = std::time::Instant::now();
        let losses = model.losses(&ids, 1).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(losses.len(), t);
        assert!(losses.iter().all(|l| l.is_finite()), "a non-finite loss");
        let bits =
            losses.iter().map(|&l| l as f64).sum::<f64>() / t as f64 / std::f64::consts::LN_2;
        let errs = check::<f32>(
            "million_byte_forward",
            "first losses",
            &to_f64(&losses[..head]),
            &naive_loss,
            &ref_loss,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        println!(
            "1 MiB forward: {secs:.1} s, {bits:.4} bits per byte; first {head} losses within {:.2e} of the reference (allowed {:.2e})",
            errs.kernel, errs.allowed
        );
    });
}

/// Cached decoding (`DecodeKernel::Auto`) against `Model::forward` over random models whose
/// stacks are 192 to 512 wide (3 to 8 heads, FFN multiple 2 or 4, 1 to 6 layers, both stacks
/// of one shape): the largest |decode − forward| over every position's logits, f32, below
/// 1e-3. Prints each shape's error.
/// `cargo test --release -p megabyte-tests --test model -- --ignored decode_sweep --nocapture`
#[test]
#[ignore]
fn decode_sweep_wide_stacks() {
    with_client!(TestRuntime, |client| {
        let mut worst = 0f32;
        for (width, heads) in [(192usize, 3usize), (256, 4), (384, 6), (512, 8)] {
            for mult in [2usize, 4] {
                for layers in [1usize, 3, 6] {
                    let mut cfg = config(4, width / 4, width, (layers, layers), (heads, heads), 0);
                    cfg.ffn_mult = mult;
                    let seed = (width * 100 + mult * 10 + layers) as u64;
                    let w = Weights::random(&cfg, seed);
                    let t = cfg.context;
                    let ids = uniform_ids(seed, t, 256);
                    let model = Model::<TestRuntime, f32>::new(&client, &cfg, &w).unwrap();
                    let full = model.forward(&ids, 1).unwrap();
                    let mut dec = Decoder::new(&model, 1).unwrap();
                    let empty: &[u8] = &[];
                    let mut logits = dec.start(&[empty]).unwrap();
                    let mut err = 0f32;
                    for pos in 0..t {
                        let row = &full[pos * cfg.vocab..][..cfg.vocab];
                        for (a, b) in logits.iter().zip(row) {
                            let d = (a - b).abs();
                            err = if d.is_nan() {
                                f32::INFINITY
                            } else {
                                err.max(d)
                            };
                        }
                        if pos + 1 < t {
                            logits = dec.push(&[ids[pos]]).unwrap();
                        }
                    }
                    println!("width {width}, {heads} heads, FFN ×{mult}, {layers} layers: max |decode - forward| = {err:.2e}");
                    worst = worst.max(err);
                }
            }
        }
        assert!(worst < 1e-3, "max |decode - forward| = {worst}");
    });
}

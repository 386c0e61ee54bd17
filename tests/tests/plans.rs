//! Every plan the model launches is one the CUDA check compiles.
//!
//! The test runs each small preset on this device (a forward, cached decoding with the fused
//! and the unfused blocks, greedy decoding on the device, one training step) while
//! `megabyte_ops::record` notes every call the launchers plan. Each call is then planned for
//! sm_80 and sm_90, in f32, f16 and bf16 (training in f32), and the plan must be among those
//! `megabyte_tests::plans` lists, which `tests/cuda_codegen.rs` compiles. A new call in the
//! model (another epilogue, layout or stage) that the list lacks fails here, on any machine,
//! before it can reach a GPU uncompiled.

use megabyte::train::{TrainConfig, Trainer};
use megabyte::{DecodeKernel, Decoder, Model};
use megabyte_ops::cross_entropy::{self, CrossEntropyProblem};
use megabyte_ops::layer_norm::{self, LayerNormProblem};
use megabyte_ops::record::{recording, Planned};
use megabyte_ops::{attention, decode, gemm, Dtype};
use megabyte_reference::{Config, Weights};
use megabyte_tests::plans::{self, cuda_profiles, distinct};
use megabyte_tests::{uniform_ids, with_client, TestRuntime};

/// The presets small enough to run here, widths as built.
const PRESETS: &[&str] = &["tiny", "small"];

/// Every call the model plans for `cfg` at a cut batch and length: (inference calls, training
/// calls).
fn launched(
    client: &cubecl::prelude::ComputeClient<TestRuntime>,
    cfg: &Config,
) -> (Vec<Planned>, Vec<Planned>) {
    let (b, t) = (2, 3 * cfg.patch);
    let w = Weights::random(cfg, 7);
    let ids = uniform_ids(11, b * t, 256);
    let (_, inference) = recording(|| {
        let model = Model::<TestRuntime, f32>::new(client, cfg, &w).unwrap();
        model.losses(&ids, b).unwrap();
        let prompt: Vec<u8> = ids[..cfg.patch + 1].iter().map(|&x| x as u8).collect();
        let prompts = [prompt.as_slice(), prompt.as_slice()];
        for kernel in [DecodeKernel::Fused, DecodeKernel::Unfused] {
            let mut dec = Decoder::with_kernel(&model, b, kernel).unwrap();
            dec.start(&prompts).unwrap();
            dec.push(&[1, 2]).unwrap();
            if dec.greedy_on_device() {
                dec.push_greedy(&[3, 4], cfg.patch).unwrap();
            }
        }
    });
    let (_, training) = recording(|| {
        let mut tc = TrainConfig::new(cfg, 1);
        tc.batch = b;
        tc.seq = t;
        let mut trainer = Trainer::new(client, cfg, &w, tc).unwrap();
        trainer.step(&ids).unwrap();
    });
    (inference, training)
}

/// `Ok` when `plan`, planned for `call`, is among the compiled `set`; otherwise the line that
/// says so.
fn in_set<C: std::fmt::Debug, P: PartialEq + std::fmt::Debug>(
    set: &[P],
    label: &str,
    call: C,
    plan: P,
) -> Result<(), String> {
    if set.contains(&plan) {
        Ok(())
    } else {
        Err(format!("{label} {call:?} -> {plan:?}")
            .trim_start()
            .to_string())
    }
}

/// The CUDA plans of the recorded `calls` (retyped to `dtype`) that the compiled lists lack.
fn missing(calls: &[Planned], dtype: Dtype, cfg: &Config) -> Vec<String> {
    let profiles = cuda_profiles();
    let attention_set = distinct(&plans::attention_plans(dtype, &profiles));
    let gemm_set = distinct(&plans::gemm_plans(dtype, &profiles));
    let local_set = distinct(&plans::local_input_plans(dtype, &profiles));
    let decode_set = distinct(&plans::decode_plans(dtype, &profiles).0);
    let backward_set = distinct(&plans::backward_plans(&profiles));
    let layer_norm_set = distinct(&plans::layer_norm_plans(dtype, &profiles));
    let cross_entropy_set = distinct(&plans::cross_entropy_plans(dtype, &profiles));
    let mut missing = Vec::new();
    for profile in profiles {
        for call in calls {
            let found = match call {
                Planned::Gemm(c) => {
                    let c = gemm::GemmCall { dtype, ..*c };
                    let p = gemm::plan(gemm::GemmKernel::Auto, &c, &profile).unwrap();
                    in_set(&gemm_set, "", c, p)
                }
                Planned::LocalInput(c) => {
                    let c = gemm::GemmCall { dtype, ..*c };
                    let p = gemm::plan_tiled(gemm::GemmKernel::Auto, &c, &profile).unwrap();
                    in_set(&local_set, "local_input", c, p)
                }
                Planned::Attention(c) => {
                    let c = attention::AttentionCall { dtype, ..c.clone() };
                    let p =
                        attention::plan(attention::AttentionKernel::Auto, &c, &profile).unwrap();
                    in_set(&attention_set, "", c, p)
                }
                Planned::LayerNorm(problem) => {
                    let problem = LayerNormProblem { dtype, ..*problem };
                    let p = layer_norm::plan(&problem, &profile);
                    in_set(&layer_norm_set, "", problem, p)
                }
                Planned::CrossEntropy(problem) => {
                    let problem = CrossEntropyProblem { dtype, ..*problem };
                    let p = cross_entropy::plan(&problem, &profile);
                    in_set(&cross_entropy_set, "", problem, p)
                }
                Planned::AttentionBackward(problem) => {
                    let kernel = attention::BackwardKernel::Auto;
                    let p = attention::plan_backward(kernel, problem, &profile).unwrap();
                    in_set(&backward_set, "", problem, p)
                }
                Planned::Decode {
                    problem,
                    step,
                    keys,
                    vocab,
                } => {
                    let problem = decode::DecodeProblem { dtype, ..*problem };
                    match decode::plan(&problem, &profile) {
                        // The decoder runs a refused stack unfused: those calls are recorded
                        // on their own.
                        Err(_) => Ok(()),
                        Ok(p) => {
                            let full = (step.input, step.positions, step.output);
                            let p = plans::with_stages(p, cfg, full);
                            assert_eq!((p.activation, p.d_in), (step.activation, step.d_in));
                            let launches = plans::launch_stages(&p, *keys, problem.layers, *vocab);
                            let missing: Vec<_> = launches
                                .iter()
                                .filter(|l| !decode_set.contains(l))
                                .collect();
                            missing
                                .is_empty()
                                .then_some(())
                                .ok_or(format!("{problem:?} -> {missing:?}"))
                        }
                    }
                }
            };
            if let Err(what) = found {
                let line = format!("{} {}: {what}", profile.name, dtype.name());
                if !missing.contains(&line) {
                    missing.push(line);
                }
            }
        }
    }
    missing
}

#[test]
fn every_launched_plan_is_compiled_for_cuda() {
    with_client!(TestRuntime, |client| {
        let mut missing_all = Vec::new();
        for preset in PRESETS {
            let cfg = Config::preset(preset).unwrap();
            let (inference, training) = launched(&client, &cfg);
            let count =
                |calls: &[Planned], f: fn(&Planned) -> bool| calls.iter().filter(|c| f(c)).count();
            // The recording must have seen every family, or the test checks nothing.
            assert!(
                count(&inference, |c| matches!(c, Planned::Gemm(_))) > 0,
                "{preset}: no GEMM recorded"
            );
            assert!(
                count(&inference, |c| matches!(c, Planned::Attention(_))) > 0,
                "{preset}: no attention recorded"
            );
            assert!(
                count(&inference, |c| matches!(c, Planned::Decode { .. })) > 0,
                "{preset}: no fused step recorded"
            );
            assert!(
                count(&inference, |c| matches!(c, Planned::LocalInput(_))) > 0,
                "{preset}: no local input recorded"
            );
            assert!(
                count(&inference, |c| matches!(c, Planned::LayerNorm(_))) > 0,
                "{preset}: no LayerNorm recorded"
            );
            assert!(
                count(&inference, |c| matches!(c, Planned::CrossEntropy(_))) > 0,
                "{preset}: no cross-entropy recorded"
            );
            assert!(
                count(&training, |c| matches!(c, Planned::Gemm(_))) > 0,
                "{preset}: no training GEMM recorded"
            );
            assert!(
                count(&training, |c| matches!(c, Planned::AttentionBackward(_))) > 0,
                "{preset}: no attention backward recorded"
            );
            for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
                for m in missing(&inference, dtype, &cfg) {
                    missing_all.push(format!("{preset}: {m}"));
                }
            }
            for m in missing(&training, Dtype::F32, &cfg) {
                missing_all.push(format!("{preset} training: {m}"));
            }
        }
        assert!(
            missing_all.is_empty(),
            "plans launched here that the CUDA check does not compile (add their calls to \
             megabyte_tests::plans):\n{}",
            missing_all.join("\n")
        );
    });
}

//! The CUDA path proven without a GPU: every kernel variant the model launches on CUDA is
//! defined (through the wgpu client, which only supplies the builder's device properties),
//! compiled to CUDA C++ by cubecl-cpp's CUDA dialect (the compiler `cubecl-cuda` uses at run
//! time), compiled by NVRTC to PTX for sm_80 and sm_90, and assembled by `ptxas -v` for sm_90,
//! whose register, shared-memory and spill counts go to `target/cuda-resources.md`, with the
//! local-memory instructions `nvdisasm` finds inside loops. A main attention or GEMM variant
//! that touches local memory inside a loop fails `main_variants_keep_local_memory_out_of_loops`
//! (see there for the few bytes ptxas may spill outside loops). A tensor-core (CMMA) variant
//! whose PTX has no `wmma`/`mma` instruction fails the test.
//!
//! NVRTC, ptxas and nvdisasm come from NVIDIA's PyPI wheels, unpacked by
//! `scripts/install-cuda-tools.sh` into the folder named by `MEGABYTE_CUDA_TOOLS`. Without it
//! the test skips, except under `CI=true`, where it fails. Run:
//! `MEGABYTE_CUDA_TOOLS=DIR cargo test -p megabyte-tests --features cuda --test cuda_codegen`.
//! `MEGABYTE_CODEGEN_ONLY=text` keeps only the variants whose name contains `text` (for
//! iterating on one kernel; refused under `CI=true`, where every variant must be checked).
#![cfg(feature = "cuda")]

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};

use cubecl::cuda::CudaCompiler;
use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;
use megabyte_kernels::activation::ActivationKind;
use megabyte_kernels::cross_entropy::CrossEntropyConfig;
use megabyte_kernels::decode::DecodeConfig;
use megabyte_kernels::gemm::{CmmaConfig, GemmConfig};
use megabyte_kernels::layer_norm::LayerNormConfig;
use megabyte_ops::attention::{
    backward_configs, AttentionCall, AttentionKernel, AttentionPlan, AttentionProblem,
};
use megabyte_ops::decode::DecodeProblem;
use megabyte_ops::{DeviceProfile, Dtype};
use megabyte_tests::in_ci;

type W = WgpuRuntime;

/// One kernel variant: its name in the report, whether a spill fails the test, and its
/// definition.
struct Variant {
    name: String,
    main: bool,
    def: KernelDefinition,
}

fn t() -> TensorCompilationArg {
    TensorCompilationArg { inplace: None }
}

fn a() -> ArrayCompilationArg {
    ArrayCompilationArg { inplace: None }
}

fn settings(dim: CubeDim) -> KernelSettings {
    KernelSettings::default()
        .cube_dim(dim)
        .address_type(AddressType::U32)
}

/// CUDA C++ for a kernel definition, as `cubecl-cuda` generates it at run time, and the
/// kernel's dynamic shared memory in bytes (which `ptxas -v` does not see).
fn cuda_source(def: KernelDefinition) -> Result<(String, usize), String> {
    type Options = <CudaCompiler as cubecl::Compiler>::CompilationOptions;
    let opts = Options {
        warp_size: 32,
        ..Default::default()
    };
    let repr = cubecl::Compiler::compile(
        &mut CudaCompiler::default(),
        def,
        &opts,
        ExecutionMode::Unchecked,
        cubecl::ir::StorageType::Scalar(cubecl::ir::ElemType::UInt(cubecl::ir::UIntKind::U32)),
    )
    .map_err(|e| format!("{e:?}"))?;
    Ok((repr.to_string(), repr.shared_memory_size()))
}

/// The element type's short name (`f32`, `f16`, `bf16`) for variant names.
fn type_tag<E>() -> String {
    let name = std::any::type_name::<E>();
    name.rsplit("::").next().unwrap_or(name).to_string()
}

fn elementwise<E: Float + CubeElement>(c: &ComputeClient<W>, out: &mut Vec<Variant>) {
    let ty = type_tag::<E>();
    // The vector width the launchers pick on sm_90 for these shapes (all multiples of 64):
    // 8 for f16/bf16 under 128-bit loads, 4 for f32.
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    let n = DeviceProfile::cuda_sm90().vector_for(dtype, &[64]);
    let dim = CubeDim::new_1d(256);
    for (act, name) in [
        (ActivationKind::Gelu, "gelu"),
        (ActivationKind::Relu, "relu"),
    ] {
        let k = megabyte_kernels::activation::activation::Activation::<E, W>::new(
            settings(dim),
            c.clone(),
            a(),
            a(),
            n,
            act.id(),
        );
        out.push(Variant {
            name: format!("activation_{name}_{ty}"),
            main: false,
            def: k.define(),
        });
    }
    let k = megabyte_kernels::copy::strided_copy::StridedCopy::<E, W>::new(
        settings(dim),
        c.clone(),
        t(),
        t(),
        (),
        (),
        (),
        n,
    );
    out.push(Variant {
        name: format!("strided_copy_{ty}"),
        main: false,
        def: k.define(),
    });
    let k = megabyte_kernels::patch_embed::patch_embed::PatchEmbed::<E, W>::new(
        settings(dim),
        c.clone(),
        t(),
        t(),
        t(),
        t(),
        t(),
        (),
        (),
        (),
        n,
    );
    out.push(Variant {
        name: format!("patch_embed_{ty}"),
        main: false,
        def: k.define(),
    });
    for (width, residual) in [(64usize, false), (2048, true)] {
        let units = (width / n).next_power_of_two().clamp(1, 128);
        let rows = (256 / units).max(1);
        let cfg = LayerNormConfig {
            units,
            rows,
            residual,
        };
        let k = megabyte_kernels::layer_norm::layer_norm::LayerNorm::<E, W>::new(
            settings(CubeDim::new_2d(units as u32, rows as u32)),
            c.clone(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            (),
            n,
            cfg,
        );
        out.push(Variant {
            name: format!("layer_norm_w{width}_res{residual}_{ty}"),
            main: false,
            def: k.define(),
        });
    }
    // As the launcher caps it (`megabyte_ops::cross_entropy::MAX_VECTOR`).
    let ce_vector = n.min(megabyte_ops::cross_entropy::MAX_VECTOR);
    for (vocab, logits) in [(256usize, false), (257, true)] {
        let cfg = CrossEntropyConfig {
            units: 64,
            rows: 8,
            per_unit: vocab.div_ceil(64),
            write_logits: logits,
        };
        let k = megabyte_kernels::cross_entropy::tied_cross_entropy::TiedCrossEntropy::<E, W>::new(
            settings(CubeDim::new_1d(64)),
            c.clone(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            ce_vector,
            cfg,
        );
        out.push(Variant {
            name: format!("cross_entropy_v{vocab}_logits{logits}_{ty}"),
            main: false,
            def: k.define(),
        });
    }
}

/// The CUDA device profiles the checks plan for.
fn cuda_profiles() -> [DeviceProfile; 2] {
    [DeviceProfile::cuda_sm80(), DeviceProfile::cuda_sm90()]
}

/// The fused decoding step exactly as the decoder launches it for every built-in preset's two
/// stacks, planned for sm_80 and sm_90 by the launcher's own planner
/// (`megabyte_ops::decode::plan`: units, keys per chunk, vector width): the global stack behind
/// the patch embedding with the final LayerNorm, the local one behind the local input with the
/// logits, and with the greedy argmax. Plans equal for both profiles or several presets are
/// compiled once, named after all of them. A stack the planner refuses (wider than the fused
/// step takes) is not compiled; the decoder runs it unfused, and `refused` lists it.
fn decode<E: Float + CubeElement>(
    c: &ComputeClient<W>,
    out: &mut Vec<Variant>,
    refused: &mut Vec<String>,
) {
    use megabyte_kernels::decode::{input, output};
    let ty = type_tag::<E>();
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    let mut plans: Vec<(DecodeConfig, Vec<String>)> = Vec::new();
    for preset in megabyte_reference::PRESET_NAMES {
        let cfg = megabyte_reference::Config::preset(preset).unwrap();
        let wg = cfg.global_width();
        let stacks = [
            (
                "global",
                wg,
                cfg.ffn_mult * wg,
                cfg.heads_global,
                cfg.layers_global,
            ),
            (
                "local",
                cfg.d_local,
                cfg.ffn_mult * cfg.d_local,
                cfg.heads_local,
                cfg.layers_local,
            ),
        ];
        for (stack, width, hidden, heads, layers) in stacks {
            for profile in cuda_profiles() {
                let problem = DecodeProblem {
                    width,
                    hidden,
                    heads,
                    layers,
                    dtype,
                };
                let planned = match megabyte_ops::decode::plan(&problem, &profile) {
                    Ok(p) => p,
                    Err(e) => {
                        refused.push(format!(
                            "decode_stack {preset} {stack} {ty} on {}: {e}",
                            profile.name
                        ));
                        continue;
                    }
                };
                let activation = match cfg.activation {
                    megabyte_reference::Activation::Gelu => ActivationKind::Gelu,
                    megabyte_reference::Activation::Relu => ActivationKind::Relu,
                }
                .id();
                let stages: &[(&str, u32, u32, bool)] = if stack == "global" {
                    &[("norm", input::PATCH, output::NORM, true)]
                } else {
                    &[
                        ("logits", input::LOCAL, output::LOGITS, cfg.local_positions),
                        ("argmax", input::LOCAL, output::ARGMAX, cfg.local_positions),
                    ]
                };
                for &(stage, inp, outp, positions) in stages {
                    let k = DecodeConfig {
                        activation,
                        input: inp,
                        output: outp,
                        positions,
                        d_in: cfg.d_global,
                        ..planned
                    };
                    let name = format!("{preset}_{stack}_{stage}");
                    match plans.iter_mut().find(|(p, _)| *p == k) {
                        Some((_, names)) if names.contains(&name) => {}
                        Some((_, names)) => names.push(name),
                        None => plans.push((k, vec![name])),
                    }
                }
            }
        }
    }
    for (cfg, names) in plans {
        let k = megabyte_kernels::decode::decode_stack::DecodeStack::<E, W>::new(
            settings(CubeDim::new_1d(cfg.units as u32)),
            c.clone(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            t(),
            (),
            (),
            (),
            (),
            (),
            (),
            (),
            cfg.vector,
            cfg,
        );
        out.push(Variant {
            name: format!(
                "decode_stack_{}_u{}_v{}_{ty}",
                names.join("+"),
                cfg.units,
                cfg.vector
            ),
            main: false,
            def: k.define(),
        });
    }
}

/// The attention problems the model launches for every built-in preset (each stack's self
/// attention over its real heads and head dim: the global one over up to 2,048 patches, the
/// local one over P bytes for 64 patches; and decoding one position against the cache, which
/// the decoder runs unfused for stacks too wide for the fused step), and those the tests and
/// benches use (head dims 32, 64, 80, 128). Each is (name, problem, keys, C): the vector
/// width must divide the head dim and the strides of q/k/v in the fused projection (C, 3C,
/// S·3C) as the model passes them.
fn attention_problems() -> Vec<(String, AttentionProblem, usize, usize)> {
    let mut problems = Vec::new();
    let mut add = |name: String, batch, seq, heads, head_dim, seq_k| {
        let problem = AttentionProblem {
            batch,
            seq,
            heads,
            head_dim,
            causal: true,
        };
        problems.push((name, problem, seq_k, heads * head_dim));
    };
    for preset in megabyte_reference::PRESET_NAMES {
        let cfg = megabyte_reference::Config::preset(preset).unwrap();
        let (hg, dg) = (cfg.heads_global, cfg.head_dim_global());
        let (hl, dl) = (cfg.heads_local, cfg.head_dim_local());
        let k = cfg.patches().min(2048);
        add(format!("{preset} global"), 1, k, hg, dg, k);
        add(format!("{preset} local"), 64, cfg.patch, hl, dl, cfg.patch);
        add(format!("{preset} global decode"), 1, 1, hg, dg, k);
        add(format!("{preset} local decode"), 64, 1, hl, dl, cfg.patch);
    }
    for d in [32usize, 64, 80, 128] {
        add(format!("test d{d} global"), 1, 256, 4, d, 256);
        add(format!("test d{d} local"), 64, 8, 4, d, 8);
        add(format!("test d{d} decode"), 1, 1, 4, d, 256);
    }
    problems
}

/// The attention forward exactly as `AttentionKernel::Auto` plans it for sm_80 and sm_90
/// (`megabyte_ops::attention::plan`) over [`attention_problems`]: kernel, tiles, planes,
/// rows, splits and vector width. A plan several problems or both profiles share is compiled
/// once; `planned` records which problem got which variant.
fn attention<E: Float + CubeElement>(
    c: &ComputeClient<W>,
    out: &mut Vec<Variant>,
    planned: &mut Vec<String>,
) {
    let ty = type_tag::<E>();
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    let mut plans: Vec<(AttentionPlan, String)> = Vec::new();
    for (what, problem, seq_k, width) in attention_problems() {
        for profile in cuda_profiles() {
            let seq = problem.seq;
            let call = AttentionCall {
                problem,
                seq_k,
                dtype,
                aligned: vec![
                    problem.head_dim,
                    width,
                    3 * width,
                    seq * 3 * width,
                    seq * width,
                ],
            };
            let plan = megabyte_ops::attention::plan(AttentionKernel::Auto, &call, &profile)
                .unwrap_or_else(|e| panic!("{what} {ty} on {}: {e}", profile.name));
            let d = problem.head_dim;
            let name = match plan {
                AttentionPlan::Tiled(c) => format!(
                    "flash_attention_d{d}_tile{}x{}_v{}_{ty}",
                    c.block_q, c.groups, c.vector
                ),
                AttentionPlan::Cmma(c) => format!(
                    "flash_attention_cmma_d{d}_{}planes_k{}_v{}_{ty}",
                    c.planes, c.block_k, c.vector
                ),
                AttentionPlan::Rows(c) => format!(
                    "attention_rows_d{d}_r{}_s{}_v{}_{ty}",
                    c.rows, c.splits, c.vector
                ),
            };
            planned.push(format!(
                "| {what} | attention | {} | {ty} | {name} |",
                profile.name
            ));
            if !plans.iter().any(|(p, _)| *p == plan) {
                plans.push((plan, name));
            }
        }
    }
    for (plan, name) in plans {
        let def = match plan {
            AttentionPlan::Tiled(cfg) => {
                megabyte_kernels::attention::flash_attention::FlashAttention::<E, W>::new(
                    settings(CubeDim::new_3d(
                        cfg.block_k as u32,
                        cfg.block_q as u32,
                        cfg.groups as u32,
                    )),
                    c.clone(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    (),
                    (),
                    (),
                    (),
                    cfg.vector,
                    cfg,
                )
                .define()
            }
            AttentionPlan::Cmma(cfg) => {
                megabyte_kernels::attention::flash_attention_cmma::FlashAttentionCmma::<E, W>::new(
                    settings(CubeDim::new_2d(cfg.plane_size as u32, cfg.planes as u32)),
                    c.clone(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    (),
                    (),
                    (),
                    (),
                    cfg.vector,
                    cfg,
                )
                .define()
            }
            AttentionPlan::Rows(cfg) => {
                megabyte_kernels::attention::flash_attention_rows::FlashAttentionRows::<E, W>::new(
                    settings(CubeDim::new_1d(256)),
                    c.clone(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    (),
                    (),
                    (),
                    (),
                    cfg.vector,
                    cfg,
                )
                .define()
            }
        };
        out.push(Variant {
            name,
            main: true,
            def,
        });
    }
}

fn gemm<E: Float + CubeElement>(c: &ComputeClient<W>, out: &mut Vec<Variant>) {
    let ty = type_tag::<E>();
    // The tiled ladder the CUDA planner picks from: thin blocks for decoding, 64×64 when 128×64
    // blocks would not fill the device, 128×64 otherwise.
    let blocks = [
        (16usize, 64usize, 16usize, 4usize, 4usize),
        (64, 64, 16, 8, 8),
        (128, 64, 16, 16, 8),
    ];
    // Epilogues of the model: fc1 (bias + GELU), fc2/proj (bias + residual), gradients (none,
    // with a transposed operand).
    let epilogues: [(&str, bool, Option<ActivationKind>, bool, bool, bool); 4] = [
        (
            "bias_gelu",
            true,
            Some(ActivationKind::Gelu),
            false,
            true,
            false,
        ),
        ("bias_residual", true, None, true, true, false),
        ("grad_input_bt", false, None, false, true, true),
        ("grad_weight_at", false, None, false, false, false),
    ];
    for (bm, bn, bk, tm, tn) in blocks {
        for (name, bias, activation, residual, a_along_k, b_along_k) in epilogues {
            let cfg = GemmConfig {
                block_m: bm,
                block_n: bn,
                block_k: bk,
                tile_m: tm,
                tile_n: tn,
                vector_a: 4,
                a_along_k,
                vector_b: 4,
                b_along_k,
                vector_out: 4,
                bias,
                activation,
                residual,
                registers: false,
            };
            assert!(cfg.is_valid(), "{cfg:?}");
            let dim = CubeDim::new_2d((bn / tn) as u32, (bm / tm) as u32);
            let k = megabyte_kernels::gemm::gemm::Gemm::<E, W>::new(
                settings(dim),
                c.clone(),
                t(),
                t(),
                t(),
                t(),
                t(),
                (),
                (),
                (),
                4,
                4,
                4,
                4,
                cfg,
            );
            out.push(Variant {
                name: format!("gemm_{bm}x{bn}x{bk}_{tm}x{tn}_{name}_{ty}"),
                main: true,
                def: k.define(),
            });
        }
    }
    // Tensor cores (f16 and bf16): the CMMA kernel's two block shapes, same epilogues.
    if std::mem::size_of::<E>() == 2 {
        for (bm, bn, pm, pn) in [(64usize, 64usize, 2usize, 2usize), (16, 64, 1, 4)] {
            for (name, bias, activation, residual, a_along_k, b_along_k) in epilogues {
                let cfg = CmmaConfig {
                    block_m: bm,
                    block_n: bn,
                    block_k: 32,
                    planes_m: pm,
                    planes_n: pn,
                    plane_size: 32,
                    vector_a: 4,
                    a_along_k,
                    vector_b: 4,
                    b_along_k,
                    vector_out: 4,
                    bias,
                    activation,
                    residual,
                    emulated: false,
                };
                assert!(cfg.is_valid(), "{cfg:?}");
                let dim = CubeDim::new_2d(32, (pm * pn) as u32);
                let k = megabyte_kernels::gemm::gemm_cmma::GemmCmma::<E, W>::new(
                    settings(dim),
                    c.clone(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    (),
                    (),
                    (),
                    4,
                    4,
                    4,
                    cfg,
                );
                out.push(Variant {
                    name: format!("gemm_cmma_{bm}x{bn}x32_{pm}x{pn}planes_{name}_{ty}"),
                    main: true,
                    def: k.define(),
                });
            }
        }
    }
    let cfg = GemmConfig {
        block_m: 64,
        block_n: 64,
        block_k: 16,
        tile_m: 8,
        tile_n: 8,
        vector_a: 4,
        a_along_k: true,
        vector_b: 4,
        b_along_k: false,
        vector_out: 4,
        bias: false,
        activation: None,
        residual: false,
        registers: false,
    };
    let k = megabyte_kernels::local_input::local_input::LocalInput::<E, W>::new(
        settings(CubeDim::new_2d(8, 8)),
        c.clone(),
        t(),
        t(),
        t(),
        t(),
        t(),
        t(),
        t(),
        (),
        4,
        4,
        4,
        4,
        cfg,
        true,
    );
    out.push(Variant {
        name: format!("local_input_{ty}"),
        main: false,
        def: k.define(),
    });
}

/// The training kernels, f32 only (training keeps f32 master weights).
fn backward(c: &ComputeClient<W>, out: &mut Vec<Variant>) {
    let dim = CubeDim::new_1d(256);
    // What `BackwardKernel::Auto` launches on CUDA (plane ops): the split-dims kernels; and, not
    // main (CPU drivers run it), the one-unit-per-row dQ kernel, whose spills sit in its key
    // loop: the table shows what the loop rule catches.
    for (head_dim, split) in [(64usize, true), (128, true), (128, false)] {
        let (cfg_q, cfg_kv) = backward_configs(head_dim, true, split);
        let kind = if split { "" } else { "_rows_in_registers" };
        let k =
            megabyte_kernels::attention::attention_backward_q::AttentionBackwardQ::<f32, W>::new(
                settings(dim),
                c.clone(),
                t(),
                t(),
                t(),
                t(),
                t(),
                t(),
                t(),
                t(),
                (),
                (),
                (),
                (),
                (),
                cfg_q,
            );
        out.push(Variant {
            name: format!("attention_backward_q_d{head_dim}{kind}_f32"),
            main: split,
            def: k.define(),
        });
        if !split {
            continue;
        }
        let k =
            megabyte_kernels::attention::attention_backward_kv::AttentionBackwardKv::<f32, W>::new(
                settings(dim),
                c.clone(),
                t(),
                t(),
                t(),
                t(),
                t(),
                t(),
                t(),
                t(),
                t(),
                (),
                (),
                (),
                (),
                (),
                (),
                cfg_kv,
            );
        out.push(Variant {
            name: format!("attention_backward_kv_d{head_dim}_f32"),
            main: true,
            def: k.define(),
        });
    }
    for act in [ActivationKind::Gelu, ActivationKind::Relu] {
        let k =
            megabyte_kernels::activation::activation_backward::ActivationBackward::<f32, W>::new(
                settings(dim),
                c.clone(),
                a(),
                a(),
                a(),
                4,
                act.id(),
            );
        out.push(Variant {
            name: format!("activation_backward_{act:?}_f32"),
            main: false,
            def: k.define(),
        });
    }
    let k = megabyte_kernels::layer_norm::layer_norm_backward::LayerNormBackward::<f32, W>::new(
        settings(dim),
        c.clone(),
        t(),
        t(),
        t(),
        t(),
        t(),
        t(),
        t(),
        4,
        true,
    );
    out.push(Variant {
        name: "layer_norm_backward_f32".into(),
        main: false,
        def: k.define(),
    });
    let k = megabyte_kernels::layer_norm::layer_norm_backward_params::LayerNormBackwardParams::<
        f32,
        W,
    >::new(settings(dim), c.clone(), t(), t(), t(), t(), t(), t());
    out.push(Variant {
        name: "layer_norm_backward_params_f32".into(),
        main: false,
        def: k.define(),
    });
    let k = megabyte_kernels::cross_entropy::cross_entropy_backward::CrossEntropyBackward::<f32, W>::new(
        settings(dim), c.clone(), t(), t(), t(), (),
    );
    out.push(Variant {
        name: "cross_entropy_backward_f32".into(),
        main: false,
        def: k.define(),
    });
    let k =
        megabyte_kernels::embedding::embedding_backward_by_position::EmbeddingBackwardByPosition::<
            f32,
            W,
        >::new(settings(dim), c.clone(), t(), t(), (), false);
    out.push(Variant {
        name: "embedding_backward_by_position_f32".into(),
        main: false,
        def: k.define(),
    });
    let cfg = megabyte_kernels::embedding::ByIdConfig {
        units: 128,
        chunk: 512,
        cols: 1,
        accumulate: true,
    };
    let k =
        megabyte_kernels::embedding::embedding_backward_by_id::EmbeddingBackwardById::<f32, W>::new(
            settings(CubeDim::new_1d(128)),
            c.clone(),
            t(),
            t(),
            t(),
            (),
            (),
            cfg,
        );
    out.push(Variant {
        name: "embedding_backward_by_id_f32".into(),
        main: false,
        def: k.define(),
    });
    let k = megabyte_kernels::reduce::column_sum::ColumnSum::<f32, W>::new(
        settings(dim),
        c.clone(),
        t(),
        t(),
        (),
        false,
    );
    out.push(Variant {
        name: "column_sum_f32".into(),
        main: false,
        def: k.define(),
    });
    let k = megabyte_kernels::reduce::sum_squares::SumSquares::<f32, W>::new(
        settings(dim),
        c.clone(),
        a(),
        a(),
        (),
        (),
    );
    out.push(Variant {
        name: "sum_squares_f32".into(),
        main: false,
        def: k.define(),
    });
    let k = megabyte_kernels::optim::adamw::Adamw::<W>::new(
        settings(dim),
        c.clone(),
        a(),
        a(),
        a(),
        a(),
        (),
        (),
        (),
        (),
        (),
        (),
        (),
        (),
    );
    out.push(Variant {
        name: "adamw_f32".into(),
        main: false,
        def: k.define(),
    });
}

// ---- NVRTC through its C API, loaded from the wheel ----

type Prog = *mut c_void;

struct Nvrtc {
    _lib: libloading::Library,
    create: unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> c_int,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(Prog, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut Prog) -> c_int,
}

impl Nvrtc {
    fn load(tools: &Path) -> Result<Self, String> {
        let path = tools.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
        // SAFETY: NVRTC's documented C entry points, with their documented signatures; the
        // library stays loaded for as long as `Nvrtc` lives.
        unsafe {
            let lib =
                libloading::Library::new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
                };
            }
            Ok(Nvrtc {
                create: sym!(b"nvrtcCreateProgram"),
                compile: sym!(b"nvrtcCompileProgram"),
                log_size: sym!(b"nvrtcGetProgramLogSize"),
                log: sym!(b"nvrtcGetProgramLog"),
                ptx_size: sym!(b"nvrtcGetPTXSize"),
                ptx: sym!(b"nvrtcGetPTX"),
                destroy: sym!(b"nvrtcDestroyProgram"),
                _lib: lib,
            })
        }
    }

    /// PTX for `source` on `arch` (e.g. "sm_90"), or NVRTC's log.
    fn compile(&self, tools: &Path, source: &str, arch: &str) -> Result<String, String> {
        let src = CString::new(source).map_err(|e| e.to_string())?;
        let name = CString::new("kernel.cu").unwrap();
        let inc = |p: &str| format!("--include-path={}", tools.join(p).display());
        let opts: Vec<CString> = [
            format!("--gpu-architecture={arch}"),
            inc("nvidia/cuda_runtime/include"),
            inc("nvidia/cuda_nvcc/include"),
            inc("nvidia/cuda_cccl/include"),
            "-lineinfo".into(),
        ]
        .into_iter()
        .map(|s| CString::new(s).unwrap())
        .collect();
        let ptrs: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        // SAFETY: every pointer is a live NUL-terminated string for the duration of the calls;
        // buffers are sized from NVRTC's own size queries; the program is destroyed once.
        unsafe {
            let mut prog: Prog = std::ptr::null_mut();
            if (self.create)(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ) != 0
            {
                return Err("nvrtcCreateProgram failed".into());
            }
            let rc = (self.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr());
            let result = if rc == 0 {
                let mut n = 0usize;
                (self.ptx_size)(prog, &mut n);
                let mut buf = vec![0u8; n];
                (self.ptx)(prog, buf.as_mut_ptr() as *mut c_char);
                buf.truncate(n.saturating_sub(1));
                Ok(String::from_utf8_lossy(&buf).into_owned())
            } else {
                let mut n = 0usize;
                (self.log_size)(prog, &mut n);
                let mut buf = vec![0u8; n];
                (self.log)(prog, buf.as_mut_ptr() as *mut c_char);
                Err(String::from_utf8_lossy(&buf)
                    .trim_end_matches('\0')
                    .to_string())
            };
            (self.destroy)(&mut prog);
            result
        }
    }
}

/// Registers, shared memory and spill bytes from `ptxas -v`, and the local-memory
/// instructions inside loops from the disassembly.
#[derive(Debug, Default, PartialEq)]
struct Resources {
    registers: u32,
    shared: u32,
    spill_stores: u32,
    spill_loads: u32,
    local_in_loops: usize,
}

fn parse_ptxas(log: &str) -> Resources {
    let mut r = Resources::default();
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(v) = num_before(line, "registers") {
            r.registers = r.registers.max(v);
        }
        if let Some(v) = num_before(line, "bytes smem") {
            r.shared = r.shared.max(v);
        }
        if let Some(v) = num_before(line, "bytes spill stores") {
            r.spill_stores = r.spill_stores.max(v);
        }
        if let Some(v) = num_before(line, "bytes spill loads") {
            r.spill_loads = r.spill_loads.max(v);
        }
    }
    r
}

/// Local-memory instructions (`LDL`/`STL`: spills and refills, or a register array indexed at
/// run time) inside loops of `nvdisasm -c` output. Outside loops such an instruction runs once
/// per unit; inside, once per iteration. Loops are the natural loops of the control-flow graph
/// (basic blocks split at labels and after branches and exits; a back edge is a branch to a
/// block that dominates it), so code between a loop and a cold block that branches back into
/// it is not counted, while the cold block is. Subroutines reached by `CALL` (ptxas's
/// out-of-line math slow paths) are not followed.
fn local_memory_in_loops(sass: &str) -> usize {
    let mut labels = std::collections::HashMap::new();
    let mut pending = Vec::new();
    let mut code: Vec<String> = Vec::new();
    for line in sass.lines() {
        let line = line.trim();
        if let Some(label) = line.strip_suffix(':').filter(|l| !l.starts_with("/*")) {
            pending.push(label.to_string());
            continue;
        }
        // `/*0a40*/   @P0 BRA `(.L_x_3) ;`
        let Some((_, text)) = line.strip_prefix("/*").and_then(|r| r.split_once("*/")) else {
            continue;
        };
        for label in pending.drain(..) {
            labels.insert(label, code.len());
        }
        code.push(text.trim().to_string());
    }
    let n = code.len();
    // (opcode, predicated, branch target)
    let ins: Vec<(String, bool, Option<usize>)> = code
        .iter()
        .map(|text| {
            let (predicated, body) = match text.strip_prefix('@') {
                Some(rest) => (
                    !rest.starts_with("PT "),
                    rest.split_once(char::is_whitespace).map_or("", |(_, t)| t),
                ),
                None => (false, text.as_str()),
            };
            let op = body.split_whitespace().next().unwrap_or("");
            let op = op.split('.').next().unwrap_or("").to_string();
            let target = (op == "BRA")
                .then(|| body.split("`(").nth(1)?.split(')').next())
                .flatten()
                .and_then(|l| labels.get(l).copied());
            (op, predicated, target)
        })
        .collect();
    let ends_block = |op: &str| matches!(op, "BRA" | "BRX" | "JMP" | "JMX" | "EXIT" | "RET");
    let mut leader = vec![false; n];
    if n > 0 {
        leader[0] = true;
    }
    for (i, (op, _, target)) in ins.iter().enumerate() {
        if let Some(t) = target {
            leader[*t] = true;
        }
        if ends_block(op) && i + 1 < n {
            leader[i + 1] = true;
        }
    }
    let starts: Vec<usize> = (0..n).filter(|&i| leader[i]).collect();
    let block_of = {
        let mut b = vec![0usize; n];
        for (k, &s) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(n);
            b[s..end].fill(k);
        }
        b
    };
    let nb = starts.len();
    let succ: Vec<Vec<usize>> = (0..nb)
        .map(|k| {
            let last = starts.get(k + 1).copied().unwrap_or(n) - 1;
            let (op, predicated, target) = &ins[last];
            let falls_through = !ends_block(op) || *predicated;
            let mut next: Vec<usize> = target.iter().map(|&t| block_of[t]).collect();
            if falls_through && last + 1 < n {
                next.push(block_of[last + 1]);
            }
            next
        })
        .collect();
    // Reverse postorder from the entry, then immediate dominators (Cooper, Harvey, Kennedy).
    let mut order = Vec::new();
    let mut seen = vec![false; nb];
    let mut stack = vec![(0usize, 0usize)];
    if nb > 0 {
        seen[0] = true;
    }
    while let Some((b, i)) = stack.pop() {
        if let Some(&next) = succ[b].get(i) {
            stack.push((b, i + 1));
            if !seen[next] {
                seen[next] = true;
                stack.push((next, 0));
            }
        } else {
            order.push(b);
        }
    }
    order.reverse();
    let mut rank = vec![usize::MAX; nb];
    for (r, &b) in order.iter().enumerate() {
        rank[b] = r;
    }
    let mut pred = vec![Vec::new(); nb];
    for (b, next) in succ.iter().enumerate() {
        for &s in next {
            pred[s].push(b);
        }
    }
    let mut idom = vec![usize::MAX; nb];
    if nb > 0 {
        idom[0] = 0;
    }
    let mut changed = true;
    while changed {
        changed = false;
        for &b in order.iter().skip(1) {
            let mut new = usize::MAX;
            for &p in &pred[b] {
                if idom[p] == usize::MAX {
                    continue;
                }
                new = if new == usize::MAX {
                    p
                } else {
                    let (mut x, mut y) = (p, new);
                    while x != y {
                        while rank[x] > rank[y] {
                            x = idom[x];
                        }
                        while rank[y] > rank[x] {
                            y = idom[y];
                        }
                    }
                    x
                };
            }
            if new != idom[b] {
                idom[b] = new;
                changed = true;
            }
        }
    }
    let dominates = |v: usize, mut u: usize| loop {
        if u == v {
            return true;
        }
        if u == 0 || idom[u] == usize::MAX {
            return false;
        }
        u = idom[u];
    };
    // Natural loops: for each back edge u → v, v and every block that reaches u without v.
    let mut in_loop = vec![false; nb];
    for u in 0..nb {
        if rank[u] == usize::MAX {
            continue;
        }
        for &v in &succ[u] {
            if !dominates(v, u) {
                continue;
            }
            in_loop[v] = true;
            let mut body = vec![false; nb];
            body[v] = true;
            let mut work = vec![u];
            while let Some(x) = work.pop() {
                if !body[x] {
                    body[x] = true;
                    in_loop[x] = true;
                    work.extend(pred[x].iter().copied().filter(|&p| rank[p] != usize::MAX));
                }
            }
        }
    }
    ins.iter()
        .enumerate()
        .filter(|(i, (op, _, _))| matches!(op.as_str(), "LDL" | "STL") && in_loop[block_of[*i]])
        .count()
}

fn run_tool(program: &Path, args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        Ok(log)
    } else {
        Err(log)
    }
}

/// Assembles `ptx` for sm_90 with `ptxas -v`, then disassembles the cubin with `nvdisasm`.
fn ptxas(tools: &Path, ptx: &str, dir: &Path, name: &str) -> Result<Resources, String> {
    let ptx_path = dir.join(format!("{name}.ptx"));
    let cubin = dir.join(format!("{name}.cubin"));
    std::fs::write(&ptx_path, ptx).map_err(|e| e.to_string())?;
    let log = run_tool(
        &tools.join("nvidia/cuda_nvcc/bin/ptxas"),
        &[
            "-arch=sm_90".as_ref(),
            "-v".as_ref(),
            "-o".as_ref(),
            cubin.as_os_str(),
            ptx_path.as_os_str(),
        ],
    )?;
    let sass = run_tool(
        &tools.join("nvidia/cu13/bin/nvdisasm"),
        &["-c".as_ref(), cubin.as_os_str()],
    )?;
    std::fs::write(dir.join(format!("{name}.sass")), &sass).map_err(|e| e.to_string())?;
    Ok(Resources {
        local_in_loops: local_memory_in_loops(&sass),
        ..parse_ptxas(&log)
    })
}

fn tools() -> Option<PathBuf> {
    match std::env::var_os("MEGABYTE_CUDA_TOOLS") {
        Some(p) => {
            let p = PathBuf::from(p);
            for tool in ["nvidia/cuda_nvcc/bin/ptxas", "nvidia/cu13/bin/nvdisasm"] {
                assert!(
                    p.join(tool).exists(),
                    "{} has no {tool}: rerun scripts/install-cuda-tools.sh on it",
                    p.display()
                );
            }
            Some(p)
        }
        None if in_ci() => panic!("CI=true: MEGABYTE_CUDA_TOOLS is not set (scripts/install-cuda-tools.sh installs NVRTC, ptxas and nvdisasm)"),
        None => {
            eprintln!("SKIPPED: set MEGABYTE_CUDA_TOOLS to a folder made by scripts/install-cuda-tools.sh");
            None
        }
    }
}

fn client() -> Option<ComputeClient<W>> {
    megabyte_tests::client::<W>()
}

/// Every variant's name, whether it is main, and its sm_90 resources; compiled once per test
/// process (both tests read it).
type Compiled = Vec<(String, bool, Resources)>;

fn compiled() -> Option<&'static Compiled> {
    // A failed compilation is kept as its message, so the second test reports it instead of
    // compiling everything again.
    static COMPILED: std::sync::OnceLock<Result<Option<Compiled>, String>> =
        std::sync::OnceLock::new();
    let result = COMPILED.get_or_init(|| {
        std::panic::catch_unwind(compile_all).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "compiling the variants panicked".into())
        })
    });
    match result {
        Ok(all) => all.as_ref(),
        Err(message) => panic!("{message}"),
    }
}

/// Compiles every variant (CUDA C++ → NVRTC sm_80 and sm_90 → ptxas sm_90 → nvdisasm), writes
/// the resource table, and returns every variant's resources.
fn compile_all() -> Option<Compiled> {
    let (Some(tools), Some(c)) = (tools(), client()) else {
        return None;
    };
    let nvrtc = Nvrtc::load(&tools).unwrap_or_else(|e| panic!("loading NVRTC: {e}"));
    let mut variants = Vec::new();
    elementwise::<f32>(&c, &mut variants);
    elementwise::<half::f16>(&c, &mut variants);
    elementwise::<half::bf16>(&c, &mut variants);
    let mut planned = Vec::new();
    attention::<f32>(&c, &mut variants, &mut planned);
    attention::<half::f16>(&c, &mut variants, &mut planned);
    attention::<half::bf16>(&c, &mut variants, &mut planned);
    gemm::<f32>(&c, &mut variants);
    gemm::<half::f16>(&c, &mut variants);
    gemm::<half::bf16>(&c, &mut variants);
    backward(&c, &mut variants);
    let mut refused = Vec::new();
    decode::<f32>(&c, &mut variants, &mut refused);
    decode::<half::f16>(&c, &mut variants, &mut refused);
    decode::<half::bf16>(&c, &mut variants, &mut refused);

    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let dir = target.join("cuda-codegen");
    std::fs::create_dir_all(&dir).unwrap();
    let mut table = String::from(
        "# CUDA resources per kernel variant (ptxas -v, sm_90)\n\n\
         Generated by `cargo test -p megabyte-tests --features cuda --test cuda_codegen`.\n\n\
         | variant | registers | shared bytes (static + dynamic) | spill stores | spill loads | local-memory instructions in loops |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut failures = Vec::new();
    let mut results = Vec::new();
    if let Ok(only) = std::env::var("MEGABYTE_CODEGEN_ONLY") {
        assert!(!in_ci(), "MEGABYTE_CODEGEN_ONLY is for local runs, not CI");
        variants.retain(|v| v.name.contains(&only));
    }
    for v in variants {
        let (source, dynamic_shared) = match cuda_source(v.def) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: CUDA codegen failed: {e}", v.name));
                continue;
            }
        };
        std::fs::write(dir.join(format!("{}.cu", v.name)), &source).unwrap();
        let mut sm90 = None;
        for arch in ["sm_80", "sm_90"] {
            match nvrtc.compile(&tools, &source, arch) {
                Ok(ptx) if arch == "sm_90" => sm90 = Some(ptx),
                Ok(_) => {}
                Err(log) => {
                    failures.push(format!("{} ({arch}): NVRTC rejected it:\n{log}", v.name))
                }
            }
        }
        let Some(ptx) = sm90 else { continue };
        if uses_tensor_cores(&v.name) && !has_matrix_instructions(&ptx) {
            failures.push(format!(
                "{}: a tensor-core variant whose sm_90 PTX has no wmma/mma instruction",
                v.name
            ));
        }
        match ptxas(&tools, &ptx, &dir, &v.name) {
            Ok(r) => {
                table += &format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    v.name,
                    r.registers,
                    r.shared + dynamic_shared as u32,
                    r.spill_stores,
                    r.spill_loads,
                    r.local_in_loops
                );
                results.push((v.name, v.main, r));
            }
            Err(log) => failures.push(format!("{}: ptxas failed:\n{log}", v.name)),
        }
    }
    table += "\n## The plan each problem gets\n\n| problem | op | profile | dtype | variant |\n| --- | --- | --- | --- | --- |\n";
    for line in &planned {
        table += line;
        table += "\n";
    }
    if !refused.is_empty() {
        table += "\n## Planned and refused (not compiled; the launcher runs these unfused)\n\n";
        for r in &refused {
            table += &format!("- {r}\n");
        }
    }
    std::fs::write(target.join("cuda-resources.md"), &table).unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Some(results)
}

/// The tensor-core variants, by name.
fn uses_tensor_cores(name: &str) -> bool {
    name.contains("_cmma_")
}

/// True when PTX holds a warp-level matrix multiply (`wmma.mma.sync…` or `mma.sync…`), possibly
/// predicated.
fn has_matrix_instructions(ptx: &str) -> bool {
    ptx.lines().any(|line| {
        let op = line.trim_start();
        let op = match op.strip_prefix('@') {
            Some(rest) => rest
                .split_once(char::is_whitespace)
                .map_or("", |(_, o)| o.trim_start()),
            None => op,
        };
        op.starts_with("wmma.mma.sync") || op.starts_with("mma.sync")
    })
}

#[test]
fn every_kernel_variant_compiles_for_sm80_and_sm90() {
    if let Some(all) = compiled() {
        for (name, main, r) in all {
            if r.spill_stores > 0 || r.spill_loads > 0 || r.local_in_loops > 0 {
                eprintln!(
                    "spill ({}): {name}: {r:?}",
                    if *main { "main" } else { "other" }
                );
            }
        }
    }
}

/// The resource rule: no main attention or GEMM variant touches local memory inside a loop,
/// where a spill would cost once per iteration (per key tile, K step or key).
///
/// ptxas may still spill a few bytes outside loops. When the kernel declares its cube size
/// (`__launch_bounds__(units)`, as cubecl-cuda emits) and its register need sits a little
/// above a step in the number of cubes a multiprocessor can hold, ptxas caps the registers at
/// that step and spills values that are live across the main loop but used only before or
/// after it: one store and one load per unit, for one more resident cube (NVIDIA documents
/// this heuristic with `__launch_bounds__`). Such spills are listed in
/// `target/cuda-resources.md`. They come and go with unrelated edits (in an experiment, not
/// kept, hoisting two stride reads out of the flash kernel's key loop removed its 4-byte spill
/// at head dim 32 and brought 8-byte ones at head dim 128), and even between runs of the same
/// code: cubecl places the shared arrays at offsets that change from process to process, and
/// the flash tile at head dim 32 spills 4 bytes in some runs and none in others.
#[test]
fn main_variants_keep_local_memory_out_of_loops() {
    if let Some(all) = compiled() {
        let bad: Vec<String> = all
            .iter()
            .filter(|(_, main, r)| *main && r.local_in_loops > 0)
            .map(|(n, _, r)| format!("{n}: {r:?}"))
            .collect();
        assert!(
            bad.is_empty(),
            "main variants with local memory inside loops:\n{}",
            bad.join("\n")
        );
    }
}

/// The checker itself: a source NVRTC must reject (an intrinsic that does not exist) is
/// reported as a failure, and the ptxas parser reads the numbers it is given.
#[test]
fn the_checker_catches_a_broken_kernel() {
    assert_eq!(
        parse_ptxas(
            "ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem\n    \
             24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads"
        ),
        Resources {
            registers: 40,
            shared: 4096,
            spill_stores: 8,
            spill_loads: 12,
            local_in_loops: 0
        }
    );
    // The tensor-core rule reads matrix instructions, predicated or not, and nothing else.
    assert!(has_matrix_instructions(
        "\twmma.mma.sync.aligned.row.row.m16n16k16.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    ));
    assert!(has_matrix_instructions(
        "  @%p3 mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    ));
    assert!(!has_matrix_instructions(
        "\tfma.rn.f32 %f3, %f1, %f2, %f3;\n\tld.shared.v4.f32 {%f1, %f2, %f3, %f4}, [%r1];\n// wmma.mma.sync in a comment"
    ));
    assert!(uses_tensor_cores(
        "gemm_cmma_64x64x32_2x2planes_bias_gelu_f16"
    ));
    // Local memory counts inside a loop (label up to a branch back to it, predicated or not)
    // and not before or after it.
    let sass = "        /*0000*/                   STL [R1], R12 ;\n\
                .L_x_3:\n\
                        /*0010*/                   LDS R4, [R2] ;\n\
                        /*0020*/                   LDL.LU R10, [R1+0x4] ;\n\
                        /*0030*/               @P0 BRA `(.L_x_3) ;\n\
                        /*0040*/                   LDL R10, [R1] ;\n\
                .L_x_9:\n\
                        /*0050*/                   BRA `(.L_x_9);\n";
    assert_eq!(local_memory_in_loops(sass), 1);
    for branch in [
        "BRA.U `(.L_x_3)",
        "@!P0 BRA `(.L_x_3)",
        "@P1 BRA.DIV `(.L_x_3)",
    ] {
        let sass = sass.replace("@P0 BRA `(.L_x_3)", branch);
        assert_eq!(local_memory_in_loops(&sass), 1, "{branch}");
    }
    assert_eq!(
        local_memory_in_loops(&sass.replace("@P0 BRA `(.L_x_3)", "@P0 BRA `(.L_x_9)")),
        0
    );
    // A cold block after the kernel's exit that branches back into the loop is in the loop;
    // the code after the loop, between the two, is not.
    let cold = "        /*0000*/                   STL [R1], R12 ;\n\
                .L_x_3:\n\
                        /*0010*/                   LDS R4, [R2] ;\n\
                        /*0020*/               @P0 BRA `(.L_x_7) ;\n\
                .L_x_4:\n\
                        /*0030*/               @P1 BRA `(.L_x_3) ;\n\
                        /*0040*/                   LDL R10, [R1] ;\n\
                        /*0050*/                   EXIT ;\n\
                .L_x_7:\n\
                        /*0060*/                   LDL R11, [R1+0x8] ;\n\
                        /*0070*/                   BRA `(.L_x_4) ;\n";
    assert_eq!(local_memory_in_loops(cold), 1);
    let Some(tools) = tools() else {
        return;
    };
    let nvrtc = Nvrtc::load(&tools).unwrap_or_else(|e| panic!("loading NVRTC: {e}"));
    let good = "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }";
    assert!(nvrtc.compile(&tools, good, "sm_90").is_ok());
    let broken =
        "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] = __no_such_intrinsic(x[0]); }";
    let err = nvrtc.compile(&tools, broken, "sm_90").unwrap_err();
    assert!(err.contains("__no_such_intrinsic"), "{err}");

    // The loop rule: a register array indexed at run time inside a loop lives in local memory,
    // and its loads and stores are found inside the loop; the good kernel has none.
    let dir = std::env::temp_dir().join(format!("megabyte-codegen-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let local = "extern \"C\" __global__ void k(float* x, const int* idx, int n) {\n\
                 float a[64];\n\
                 for (int i = 0; i < 64; i++) a[i] = x[i * blockDim.x + threadIdx.x];\n\
                 float s = 0.0f;\n\
                 for (int i = 0; i < n; i++) { a[idx[i] & 63] += s; s += a[(idx[i] + 7) & 63]; }\n\
                 x[threadIdx.x] = s; }";
    let ptx = nvrtc.compile(&tools, local, "sm_90").unwrap();
    let r = ptxas(&tools, &ptx, &dir, "local_array_in_loop").unwrap();
    assert!(r.local_in_loops > 0, "{r:?}");
    let ptx = nvrtc.compile(&tools, good, "sm_90").unwrap();
    assert_eq!(ptxas(&tools, &ptx, &dir, "good").unwrap().local_in_loops, 0);
    std::fs::remove_dir_all(&dir).ok();
}

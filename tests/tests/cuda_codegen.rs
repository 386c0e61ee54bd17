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
use megabyte_kernels::decode::DecodeConfig;
use megabyte_kernels::gemm::GemmConfig;
use megabyte_ops::attention::{AttentionPlan, BackwardPlan};
use megabyte_ops::cross_entropy::CrossEntropyPlan;
use megabyte_ops::gemm::GemmPlan;
use megabyte_ops::layer_norm::LayerNormPlan;
use megabyte_ops::{DeviceProfile, Dtype};
use megabyte_tests::in_ci;
use megabyte_tests::plans::{self, distinct, Planned};

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

/// Pushes the variant `$name` of kernel type `$kernel` (its launch's compilation arguments
/// after the cube size and the client, in order); `$main` holds it to the loop rule.
macro_rules! variant {
    ($out:expr, $name:expr, $main:expr, $kernel:ty, $dim:expr, $c:expr; $($arg:expr),* $(,)?) => {
        $out.push(Variant {
            name: $name,
            main: $main,
            def: <$kernel>::new(settings($dim), $c.clone(), $($arg),*).define(),
        })
    };
}

/// The element-wise kernels at the vector width the launchers pick on sm_90 for the preset
/// widths (all multiples of 64): 8 for f16/bf16 under 128-bit loads, 4 for f32; LayerNorm and
/// the tied logits + cross-entropy as their planners plan every preset's shapes.
fn elementwise<E: Float + CubeElement>(
    c: &ComputeClient<W>,
    out: &mut Vec<Variant>,
    planned: &mut Vec<String>,
) {
    use megabyte_kernels::{activation, copy, cross_entropy, layer_norm, patch_embed};
    let ty = type_tag::<E>();
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    let n = DeviceProfile::cuda_sm90().vector_for(dtype, &[64]);
    let dim = CubeDim::new_1d(256);
    for act in [ActivationKind::Gelu, ActivationKind::Relu] {
        let name = format!("activation_{act:?}_{ty}").to_lowercase();
        variant! { out, name, false, activation::activation::Activation<E, W>, dim, c; a(), a(), n, act.id() }
    }
    let name = format!("strided_copy_{ty}");
    variant! { out, name, false, copy::strided_copy::StridedCopy<E, W>, dim, c; t(), t(), (), (), (), n }
    let name = format!("patch_embed_{ty}");
    variant! { out, name, false, patch_embed::patch_embed::PatchEmbed<E, W>, dim, c; t(), t(), t(), t(), t(), (), (), (), n }
    let ln = plans::layer_norm_plans(dtype);
    note_plans(planned, "layer_norm", &ty, &ln, |p| layer_norm_name(p, &ty));
    for p in distinct(&ln) {
        let LayerNormPlan { cfg, vector } = p;
        let dim = CubeDim::new_2d(cfg.units as u32, cfg.rows as u32);
        let name = layer_norm_name(&p, &ty);
        variant! { out, name, false, layer_norm::layer_norm::LayerNorm<E, W>, dim, c; t(), t(), t(), t(), t(), t(), t(), t(), (), vector, cfg }
    }
    let ce = plans::cross_entropy_plans(dtype);
    let ce_name = |p: &CrossEntropyPlan| {
        let c = &p.cfg;
        format!(
            "cross_entropy_u{}x{}_r{}_logits{}_v{}_{ty}",
            c.units, c.per_unit, c.rows, c.write_logits, p.vector
        )
    };
    note_plans(planned, "cross_entropy", &ty, &ce, ce_name);
    for p in distinct(&ce) {
        let dim = CubeDim::new_1d(p.cfg.units as u32);
        let name = ce_name(&p);
        variant! { out, name, false, cross_entropy::tied_cross_entropy::TiedCrossEntropy<E, W>, dim, c; t(), t(), t(), t(), t(), t(), p.vector, p.cfg }
    }
}

fn layer_norm_name(p: &LayerNormPlan, ty: &str) -> String {
    let c = &p.cfg;
    format!(
        "layer_norm_u{}_r{}_res{}_v{}_{ty}",
        c.units, c.rows, c.residual, p.vector
    )
}

/// Adds a row per planned problem to the table of plans.
fn note_plans<P>(
    planned: &mut Vec<String>,
    op: &str,
    ty: &str,
    plans: &[Planned<P>],
    name: impl Fn(&P) -> String,
) {
    for p in plans {
        let variant = name(&p.plan);
        planned.push(format!(
            "| {} | {op} | {} | {ty} | {variant} |",
            p.problem, p.profile
        ));
    }
}

/// The fused decoding step as `megabyte_tests::plans::decode_plans` plans it for every
/// preset's two stacks on sm_80 and sm_90 (units, keys per chunk, vector width, and each
/// launch's stages). A stack the planner refuses is not compiled; the decoder runs it
/// unfused, and `refused` lists it.
fn decode<E: Float + CubeElement>(
    c: &ComputeClient<W>,
    out: &mut Vec<Variant>,
    planned: &mut Vec<String>,
    refused: &mut Vec<String>,
) {
    let ty = type_tag::<E>();
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    let (plans, refusals) = plans::decode_plans(dtype);
    refused.extend(
        refusals
            .into_iter()
            .map(|r| format!("decode_stack {ty} {r}")),
    );
    let name = |cfg: &DecodeConfig| {
        format!(
            "decode_stack_c{}_h{}_n{}_in{}_out{}_pos{}_d{}_act{}_u{}_k{}_v{}_{ty}",
            cfg.width,
            cfg.hidden,
            cfg.heads,
            cfg.input,
            cfg.output,
            cfg.positions,
            cfg.d_in,
            cfg.activation,
            cfg.units,
            cfg.chunk,
            cfg.vector
        )
    };
    note_plans(planned, "decode_stack", &ty, &plans, name);
    for cfg in distinct(&plans) {
        let dim = CubeDim::new_1d(cfg.units as u32);
        variant! { out, name(&cfg), false, megabyte_kernels::decode::decode_stack::DecodeStack<E, W>, dim, c;
        t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(),
        (), (), (), (), (), (), (), cfg.vector, cfg }
    }
}

/// The attention forward exactly as `AttentionKernel::Auto` plans it for sm_80 and sm_90
/// (`megabyte_ops::attention::plan`) over `megabyte_tests::plans::attention_calls`: kernel,
/// tiles, planes, rows, splits and vector width. A plan several problems or both profiles
/// share is compiled once; the table lists which problem got which variant.
fn attention<E: Float + CubeElement>(
    c: &ComputeClient<W>,
    out: &mut Vec<Variant>,
    planned: &mut Vec<String>,
) {
    use megabyte_kernels::attention::{
        flash_attention, flash_attention_cmma, flash_attention_rows,
    };
    let ty = type_tag::<E>();
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    let plans = plans::attention_plans(dtype);
    let name = |plan: &AttentionPlan| match plan {
        AttentionPlan::Tiled(c) => format!(
            "flash_attention_d{}_tile{}x{}_v{}_{ty}",
            c.head_dim, c.block_q, c.groups, c.vector
        ),
        AttentionPlan::Cmma(c) => format!(
            "flash_attention_cmma_d{}_{}planes_k{}_v{}_{ty}",
            c.head_dim, c.planes, c.block_k, c.vector
        ),
        AttentionPlan::Rows(c) => format!(
            "attention_rows_d{}_r{}_s{}_v{}_{ty}",
            c.head_dim, c.rows, c.splits, c.vector
        ),
    };
    note_plans(planned, "attention", &ty, &plans, name);
    for plan in distinct(&plans) {
        let name = name(&plan);
        match plan {
            AttentionPlan::Tiled(cfg) => {
                let dim =
                    CubeDim::new_3d(cfg.block_k as u32, cfg.block_q as u32, cfg.groups as u32);
                variant! { out, name, true, flash_attention::FlashAttention<E, W>, dim, c;
                t(), t(), t(), t(), t(), (), (), (), (), cfg.vector, cfg }
            }
            AttentionPlan::Cmma(cfg) => {
                let dim = CubeDim::new_2d(cfg.plane_size as u32, cfg.planes as u32);
                variant! { out, name, true, flash_attention_cmma::FlashAttentionCmma<E, W>, dim, c;
                t(), t(), t(), t(), t(), (), (), (), (), cfg.vector, cfg }
            }
            AttentionPlan::Rows(cfg) => {
                let dim = CubeDim::new_1d(256);
                variant! { out, name, true, flash_attention_rows::FlashAttentionRows<E, W>, dim, c;
                t(), t(), t(), t(), t(), (), (), (), (), cfg.vector, cfg }
            }
        }
    }
}

/// The GEMM exactly as `GemmKernel::Auto` plans it for sm_80 and sm_90
/// (`megabyte_ops::gemm::plan`) over `megabyte_tests::plans::gemm_calls` (the shared-memory
/// tiles in f32, tensor cores in f16/bf16), and the gathering global-to-local GEMM as
/// `plan_tiled` plans it for every preset.
fn gemm<E: Float + CubeElement>(
    c: &ComputeClient<W>,
    out: &mut Vec<Variant>,
    planned: &mut Vec<String>,
) {
    use megabyte_kernels::gemm::{gemm, gemm_cmma, STAGE_VECTOR};
    use megabyte_kernels::local_input::local_input::LocalInput;
    let ty = type_tag::<E>();
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    let plans = plans::gemm_plans(dtype);
    note_plans(planned, "gemm", &ty, &plans, |p| {
        format!("{}_{ty}", p.name())
    });
    for plan in distinct(&plans) {
        let name = format!("{}_{ty}", plan.name());
        let dim = plan.cube_dim();
        match plan {
            GemmPlan::Tiled(cfg) => {
                variant! { out, name, true, gemm::Gemm<E, W>, dim, c;
                t(), t(), t(), t(), t(), (), (), (), cfg.vector_a, cfg.vector_b, cfg.vector_out, STAGE_VECTOR, cfg }
            }
            GemmPlan::Cmma(cfg) => {
                variant! { out, name, true, gemm_cmma::GemmCmma<E, W>, dim, c;
                t(), t(), t(), t(), t(), (), (), (), cfg.vector_a, cfg.vector_b, cfg.vector_out, cfg }
            }
        }
    }
    let local = plans::local_input_plans(dtype);
    let local_name = |cfg: &GemmConfig| {
        format!("local_input_{}", GemmPlan::Tiled(*cfg).name()).replace("_gemm", "") + "_" + &ty
    };
    note_plans(planned, "local_input", &ty, &local, local_name);
    for cfg in distinct(&local) {
        let dim = GemmPlan::Tiled(cfg).cube_dim();
        // With position embeddings (every preset but one adds them; the flag only adds a load).
        // Not main: the thin 16 × 64 f32 block spilled inside its K loop in some runs (72
        // registers, 2 local-memory instructions) and not in others (the shared-array layout
        // changes between processes); listed in the table until it is fixed.
        variant! { out, local_name(&cfg), false, LocalInput<E, W>, dim, c;
        t(), t(), t(), t(), t(), t(), t(), (), cfg.vector_a, cfg.vector_b, cfg.vector_out, STAGE_VECTOR, cfg, true }
    }
}

/// The training kernels, f32 only (training keeps f32 master weights): the attention backward
/// as `megabyte_ops::attention::plan_backward` plans it (split over head dims on CUDA) and,
/// not main (CPU drivers run it), the one-unit-per-row dQ kernel at head dim 128, whose spills
/// sit in its key loop: the table shows what the loop rule catches.
fn backward(c: &ComputeClient<W>, out: &mut Vec<Variant>, planned: &mut Vec<String>) {
    use megabyte_kernels::attention::{attention_backward_kv, attention_backward_q};
    use megabyte_kernels::{activation, cross_entropy, embedding, layer_norm, optim, reduce};
    let dim = CubeDim::new_1d(256);
    let plans = plans::backward_plans();
    let name = |p: &BackwardPlan| {
        format!(
            "attention_backward_d{}_s{}x{}",
            p.q.head_dim, p.q.splits, p.kv.splits
        )
    };
    note_plans(planned, "attention_backward", "f32", &plans, name);
    let rows = megabyte_ops::attention::plan_backward(
        megabyte_ops::attention::BackwardKernel::RowsInRegisters,
        &megabyte_ops::attention::BackwardProblem {
            head_dim: 128,
            causal: true,
        },
        &DeviceProfile::cuda_sm90(),
    )
    .unwrap();
    let all = distinct(&plans)
        .into_iter()
        .map(|p| (p, true))
        .chain([(rows, false)]);
    for (p, main) in all {
        let (q, kv) = (p.q, p.kv);
        let tag = if main {
            String::new()
        } else {
            "_rows_in_registers".into()
        };
        let name_q = format!(
            "attention_backward_q_d{}_s{}{tag}_f32",
            q.head_dim, q.splits
        );
        variant! { out, name_q, main, attention_backward_q::AttentionBackwardQ<f32, W>, dim, c;
        t(), t(), t(), t(), t(), t(), t(), t(), (), (), (), (), (), q }
        if main {
            let name_kv = format!("attention_backward_kv_d{}_s{}_f32", kv.head_dim, kv.splits);
            variant! { out, name_kv, true, attention_backward_kv::AttentionBackwardKv<f32, W>, dim, c;
            t(), t(), t(), t(), t(), t(), t(), t(), t(), (), (), (), (), (), (), kv }
        }
    }
    for act in [ActivationKind::Gelu, ActivationKind::Relu] {
        let name = format!("activation_backward_{act:?}_f32").to_lowercase();
        variant! { out, name, false, activation::activation_backward::ActivationBackward<f32, W>, dim, c; a(), a(), a(), 4, act.id() }
    }
    variant! { out, "layer_norm_backward_f32".into(), false, layer_norm::layer_norm_backward::LayerNormBackward<f32, W>, dim, c;
    t(), t(), t(), t(), t(), t(), t(), 4, true }
    variant! { out, "layer_norm_backward_params_f32".into(), false, layer_norm::layer_norm_backward_params::LayerNormBackwardParams<f32, W>, dim, c;
    t(), t(), t(), t(), t(), t() }
    variant! { out, "cross_entropy_backward_f32".into(), false, cross_entropy::cross_entropy_backward::CrossEntropyBackward<f32, W>, dim, c;
    t(), t(), t(), () }
    variant! { out, "embedding_backward_by_position_f32".into(), false, embedding::embedding_backward_by_position::EmbeddingBackwardByPosition<f32, W>, dim, c;
    t(), t(), (), false }
    let cfg = embedding::ByIdConfig {
        units: 128,
        chunk: 512,
        cols: 1,
        accumulate: true,
    };
    variant! { out, "embedding_backward_by_id_f32".into(), false, embedding::embedding_backward_by_id::EmbeddingBackwardById<f32, W>, CubeDim::new_1d(128), c;
    t(), t(), t(), (), (), cfg }
    variant! { out, "column_sum_f32".into(), false, reduce::column_sum::ColumnSum<f32, W>, dim, c; t(), t(), (), false }
    variant! { out, "sum_squares_f32".into(), false, reduce::sum_squares::SumSquares<f32, W>, dim, c; a(), a(), (), () }
    variant! { out, "adamw_f32".into(), false, optim::adamw::Adamw<W>, dim, c;
    a(), a(), a(), a(), (), (), (), (), (), (), (), () }
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
    let (mut variants, mut planned, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    elementwise::<f32>(&c, &mut variants, &mut planned);
    elementwise::<half::f16>(&c, &mut variants, &mut planned);
    elementwise::<half::bf16>(&c, &mut variants, &mut planned);
    attention::<f32>(&c, &mut variants, &mut planned);
    attention::<half::f16>(&c, &mut variants, &mut planned);
    attention::<half::bf16>(&c, &mut variants, &mut planned);
    gemm::<f32>(&c, &mut variants, &mut planned);
    gemm::<half::f16>(&c, &mut variants, &mut planned);
    gemm::<half::bf16>(&c, &mut variants, &mut planned);
    backward(&c, &mut variants, &mut planned);
    decode::<f32>(&c, &mut variants, &mut planned, &mut refused);
    decode::<half::f16>(&c, &mut variants, &mut planned, &mut refused);
    decode::<half::bf16>(&c, &mut variants, &mut planned, &mut refused);
    let mut names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!(
            "two variants named {}: their names must tell their plans apart",
            w[0]
        );
    }

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

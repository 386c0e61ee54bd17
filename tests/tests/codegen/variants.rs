//! The kernel variants the CUDA and ROCm checks compile, enumerated from the planners: every
//! family's plans for the built-in presets' real shapes (and the tests' and benches'
//! problems) on the given device profiles, each defined through the wgpu client (which only
//! supplies the builder's device properties). Hand-written variant lists have no place here.

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;
use half::{bf16, f16};
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

pub type W = WgpuRuntime;

/// One kernel variant: its name in the report, whether a spill fails the test, and its
/// definition.
pub struct Variant {
    pub name: String,
    pub main: bool,
    pub def: KernelDefinition,
}

/// A variant's name, whether it is main, and its C++ source with its dynamic shared memory in
/// bytes (or why there is none): generated on one thread (kernel definitions are not `Send`),
/// compiled on every core ([`par_map`]).
pub type Source = (String, bool, Result<(String, usize), String>);

pub fn t() -> TensorCompilationArg {
    TensorCompilationArg { inplace: None }
}

pub fn a() -> ArrayCompilationArg {
    ArrayCompilationArg { inplace: None }
}

pub fn settings(dim: CubeDim) -> KernelSettings {
    KernelSettings::default()
        .cube_dim(dim)
        .address_type(AddressType::U32)
}

/// The element type's short name in variant names (`f32`, `f16`, `bf16`) and its dtype.
fn dtype_of<E>() -> (String, Dtype) {
    let name = std::any::type_name::<E>();
    let ty = name.rsplit("::").next().unwrap_or(name).to_string();
    let dtype = Dtype::of_name(&ty).expect("f32, f16 or bf16");
    (ty, dtype)
}

/// What the variant lists below fill: the kernels to compile, the table of which problem got
/// which plan, and the problems a planner refused.
pub struct Sink {
    c: ComputeClient<W>,
    /// The profiles every family is planned for; the last one also picks the element-wise
    /// vector width and the one-off variants.
    profiles: Vec<DeviceProfile>,
    pub variants: Vec<Variant>,
    pub planned: Vec<String>,
    pub refused: Vec<String>,
}

impl Sink {
    fn primary(&self) -> &DeviceProfile {
        self.profiles.last().expect("at least one profile")
    }
}

/// Every variant the planners give the presets' (and the tests' and benches') problems on
/// `profiles`, for f32 (with the training kernels), f16 and bf16; outside CI,
/// `MEGABYTE_CODEGEN_ONLY=text` keeps only the variants whose name contains `text`.
pub fn enumerate(c: ComputeClient<W>, profiles: Vec<DeviceProfile>) -> Sink {
    let mut o = Sink {
        c,
        profiles,
        variants: Vec::new(),
        planned: Vec::new(),
        refused: Vec::new(),
    };
    let families: [fn(&mut Sink); 13] = [
        elementwise::<f32>,
        elementwise::<f16>,
        elementwise::<bf16>,
        attention::<f32>,
        attention::<f16>,
        attention::<bf16>,
        gemm::<f32>,
        gemm::<f16>,
        gemm::<bf16>,
        backward,
        decode::<f32>,
        decode::<f16>,
        decode::<bf16>,
    ];
    for family in families {
        family(&mut o);
    }
    let mut names: Vec<&str> = o.variants.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!(
            "two variants named {}: their names must tell their plans apart",
            w[0]
        );
    }
    // For working on one kernel family; every variant is checked under CI.
    if let Ok(only) = std::env::var("MEGABYTE_CODEGEN_ONLY") {
        assert!(!in_ci(), "MEGABYTE_CODEGEN_ONLY is for local runs, not CI");
        o.variants.retain(|v| v.name.contains(&only));
    }
    o
}

/// Pushes the variant `$name` of kernel type `$kernel` (its launch's compilation arguments
/// after the cube size and the client, in order); `$main` holds it to the loop rule.
macro_rules! variant {
    ($sink:expr, $name:expr, $main:expr, $kernel:ty, $dim:expr; $($arg:expr),* $(,)?) => {
        $sink.variants.push(Variant {
            name: $name,
            main: $main,
            def: <$kernel>::new(settings($dim), $sink.c.clone(), $($arg),*).define(),
        })
    };
}

/// The element-wise kernels at the vector width the launchers pick on the primary profile for
/// the preset widths (all multiples of 64): on sm_90 and gfx90a 8 for f16/bf16 under 128-bit
/// loads, 4 for f32; LayerNorm and the tied logits + cross-entropy as their planners plan
/// every preset's shapes.
fn elementwise<E: Float + CubeElement>(o: &mut Sink) {
    use megabyte_kernels::{activation, copy, cross_entropy, layer_norm, patch_embed};
    let (ty, dtype) = dtype_of::<E>();
    let n = o.primary().vector_for(dtype, &[64]);
    let dim = CubeDim::new_1d(256);
    for act in [ActivationKind::Gelu, ActivationKind::Relu] {
        let name = format!("activation_{act:?}_{ty}").to_lowercase();
        variant! { o, name, false, activation::activation::Activation<E, W>, dim; a(), a(), n, act.id() }
    }
    let name = format!("strided_copy_{ty}");
    variant! { o, name, false, copy::strided_copy::StridedCopy<E, W>, dim; t(), t(), (), (), (), n }
    let name = format!("patch_embed_{ty}");
    variant! { o, name, false, patch_embed::patch_embed::PatchEmbed<E, W>, dim; t(), t(), t(), t(), t(), (), (), (), n }
    let ln = plans::layer_norm_plans(dtype, &o.profiles);
    note_plans(&mut o.planned, "layer_norm", &ty, &ln, |p| {
        layer_norm_name(p, &ty)
    });
    for p in distinct(&ln) {
        let LayerNormPlan { cfg, vector } = p;
        let dim = CubeDim::new_2d(cfg.units as u32, cfg.rows as u32);
        let name = layer_norm_name(&p, &ty);
        variant! { o, name, false, layer_norm::layer_norm::LayerNorm<E, W>, dim; t(), t(), t(), t(), t(), t(), t(), t(), (), vector, cfg }
    }
    let ce = plans::cross_entropy_plans(dtype, &o.profiles);
    let ce_name = |p: &CrossEntropyPlan| {
        let c = &p.cfg;
        format!(
            "cross_entropy_u{}x{}_r{}_logits{}_v{}_{ty}",
            c.units, c.per_unit, c.rows, c.write_logits, p.vector
        )
    };
    note_plans(&mut o.planned, "cross_entropy", &ty, &ce, ce_name);
    for p in distinct(&ce) {
        let dim = CubeDim::new_1d(p.cfg.units as u32);
        let name = ce_name(&p);
        variant! { o, name, false, cross_entropy::tied_cross_entropy::TiedCrossEntropy<E, W>, dim; t(), t(), t(), t(), t(), t(), p.vector, p.cfg }
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
/// preset's two stacks on the profiles (units, keys per chunk, vector width, and each
/// launch's stages). A stack the planner refuses is not compiled; the decoder runs it
/// unfused, and `refused` lists it.
fn decode<E: Float + CubeElement>(o: &mut Sink) {
    let (ty, dtype) = dtype_of::<E>();
    let (plans, refusals) = plans::decode_plans(dtype, &o.profiles);
    o.refused.extend(
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
    note_plans(&mut o.planned, "decode_stack", &ty, &plans, name);
    for cfg in distinct(&plans) {
        let dim = CubeDim::new_1d(cfg.units as u32);
        variant! { o, name(&cfg), false, megabyte_kernels::decode::decode_stack::DecodeStack<E, W>, dim;
        t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(),
        (), (), (), (), (), (), (), cfg.vector, cfg }
    }
}

/// The attention forward exactly as `AttentionKernel::Auto` plans it for the profiles
/// (`megabyte_ops::attention::plan`) over `megabyte_tests::plans::attention_calls`: kernel,
/// tiles, planes, rows, splits and vector width. A plan several problems or both profiles
/// share is compiled once; the table lists which problem got which variant.
fn attention<E: Float + CubeElement>(o: &mut Sink) {
    use megabyte_kernels::attention::{
        flash_attention, flash_attention_cmma, flash_attention_rows, FlashIoCompilationArg,
    };
    // Each kernel's vector size is its own type: the operands' argument is made per kernel.
    macro_rules! flash_io {
        () => {
            FlashIoCompilationArg {
                q: t(),
                k: t(),
                v: t(),
                out: t(),
                lse: t(),
                q_offset: (),
                k_offset: (),
                v_offset: (),
                scale: (),
            }
        };
    }
    let (ty, dtype) = dtype_of::<E>();
    let plans = plans::attention_plans(dtype, &o.profiles);
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
    note_plans(&mut o.planned, "attention", &ty, &plans, name);
    for plan in distinct(&plans) {
        let name = name(&plan);
        match plan {
            AttentionPlan::Tiled(cfg) => {
                let dim =
                    CubeDim::new_3d(cfg.block_k as u32, cfg.block_q as u32, cfg.groups as u32);
                variant! { o, name, true, flash_attention::FlashAttention<E, W>, dim;
                flash_io!(), cfg.vector, cfg }
            }
            AttentionPlan::Cmma(cfg) => {
                let dim = CubeDim::new_2d(cfg.plane_size as u32, cfg.planes as u32);
                variant! { o, name, true, flash_attention_cmma::FlashAttentionCmma<E, W>, dim;
                flash_io!(), cfg.vector, cfg }
            }
            AttentionPlan::Rows(cfg) => {
                let dim = CubeDim::new_1d(256);
                variant! { o, name, true, flash_attention_rows::FlashAttentionRows<E, W>, dim;
                flash_io!(), cfg.vector, cfg }
            }
        }
    }
}

/// The GEMM exactly as `GemmKernel::Auto` plans it for the profiles
/// (`megabyte_ops::gemm::plan`) over `megabyte_tests::plans::gemm_calls` (the shared-memory
/// tiles in f32, tensor cores in f16/bf16), and the gathering global-to-local GEMM as
/// `plan_tiled` plans it for every preset.
fn gemm<E: Float + CubeElement>(o: &mut Sink) {
    use megabyte_kernels::gemm::{gemm, gemm_cmma, GemmIoCompilationArg, STAGE_VECTOR};
    macro_rules! gemm_io {
        () => {
            GemmIoCompilationArg {
                a: t(),
                b: t(),
                bias: t(),
                residual: t(),
                out: t(),
                a_offset: (),
                b_offset: (),
                scale: (),
            }
        };
    }
    use megabyte_kernels::local_input::local_input::LocalInput;
    let (ty, dtype) = dtype_of::<E>();
    let plans = plans::gemm_plans(dtype, &o.profiles);
    note_plans(&mut o.planned, "gemm", &ty, &plans, |p| {
        format!("{}_{ty}", p.name())
    });
    for plan in distinct(&plans) {
        let name = format!("{}_{ty}", plan.name());
        let dim = plan.cube_dim();
        match plan {
            GemmPlan::Tiled(cfg) => {
                variant! { o, name, true, gemm::Gemm<E, W>, dim;
                gemm_io!(), cfg.vector_a, cfg.vector_b, cfg.vector_out, STAGE_VECTOR, cfg }
            }
            GemmPlan::Cmma(cfg) => {
                variant! { o, name, true, gemm_cmma::GemmCmma<E, W>, dim;
                gemm_io!(), cfg.vector_a, cfg.vector_b, cfg.vector_out, cfg }
            }
        }
    }
    let local = plans::local_input_plans(dtype, &o.profiles);
    let local_name = |cfg: &GemmConfig| {
        format!("local_input_{}", GemmPlan::Tiled(*cfg).name()).replace("_gemm", "") + "_" + &ty
    };
    note_plans(&mut o.planned, "local_input", &ty, &local, local_name);
    for cfg in distinct(&local) {
        let dim = GemmPlan::Tiled(cfg).cube_dim();
        // With position embeddings (every preset but one adds them; the flag only adds a load).
        // Not main: the thin 16 × 64 f32 block spilled inside its K loop in some runs (72
        // registers, 2 local-memory instructions) and not in others (the shared-array layout
        // changes between processes); listed in the table until it is fixed.
        variant! { o, local_name(&cfg), false, LocalInput<E, W>, dim;
        t(), t(), t(), t(), t(), t(), t(), (), cfg.vector_a, cfg.vector_b, cfg.vector_out, STAGE_VECTOR, cfg, true }
    }
}

/// The training kernels, f32 only (training keeps f32 master weights): the attention backward
/// as `megabyte_ops::attention::plan_backward` plans it (split over head dims on GPUs) and,
/// not main (CPU drivers run it), the one-unit-per-row dQ kernel at head dim 128, whose spills
/// sit in its key loop: the table shows what the loop rule catches.
fn backward(o: &mut Sink) {
    use megabyte_kernels::attention::{
        attention_backward_kv, attention_backward_q, BackwardIoCompilationArg,
    };
    use megabyte_kernels::{activation, cross_entropy, embedding, layer_norm, optim, reduce};
    let dim = CubeDim::new_1d(256);
    let io = || BackwardIoCompilationArg {
        q: t(),
        k: t(),
        v: t(),
        d_out: t(),
        row_max: t(),
        row_sum: t(),
        delta: t(),
        q_offset: (),
        k_offset: (),
        v_offset: (),
        scale: (),
    };
    let plans = plans::backward_plans(&o.profiles);
    let name = |p: &BackwardPlan| {
        format!(
            "attention_backward_d{}_s{}x{}",
            p.q.head_dim, p.q.splits, p.kv.splits
        )
    };
    note_plans(&mut o.planned, "attention_backward", "f32", &plans, name);
    let rows = megabyte_ops::attention::plan_backward(
        megabyte_ops::attention::BackwardKernel::RowsInRegisters,
        &megabyte_ops::attention::BackwardProblem {
            head_dim: 128,
            causal: true,
        },
        o.primary(),
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
        variant! { o, name_q, main, attention_backward_q::AttentionBackwardQ<f32, W>, dim;
        io(), t(), (), q }
        if main {
            let name_kv = format!("attention_backward_kv_d{}_s{}_f32", kv.head_dim, kv.splits);
            variant! { o, name_kv, true, attention_backward_kv::AttentionBackwardKv<f32, W>, dim;
            io(), t(), t(), (), (), kv }
        }
    }
    for act in [ActivationKind::Gelu, ActivationKind::Relu] {
        let name = format!("activation_backward_{act:?}_f32").to_lowercase();
        variant! { o, name, false, activation::activation_backward::ActivationBackward<f32, W>, dim; a(), a(), a(), 4, act.id() }
    }
    variant! { o, "layer_norm_backward_f32".into(), false, layer_norm::layer_norm_backward::LayerNormBackward<f32, W>, dim;
    t(), t(), t(), t(), t(), t(), t(), 4, true }
    variant! { o, "layer_norm_backward_params_f32".into(), false, layer_norm::layer_norm_backward_params::LayerNormBackwardParams<f32, W>, dim;
    t(), t(), t(), t(), t(), t() }
    variant! { o, "cross_entropy_backward_f32".into(), false, cross_entropy::cross_entropy_backward::CrossEntropyBackward<f32, W>, dim;
    t(), t(), t(), () }
    variant! { o, "embedding_backward_by_position_f32".into(), false, embedding::embedding_backward_by_position::EmbeddingBackwardByPosition<f32, W>, dim;
    t(), t(), (), false }
    let cfg = embedding::ByIdConfig {
        units: 128,
        chunk: 512,
        cols: 1,
        accumulate: true,
    };
    variant! { o, "embedding_backward_by_id_f32".into(), false, embedding::embedding_backward_by_id::EmbeddingBackwardById<f32, W>, CubeDim::new_1d(128);
    t(), t(), t(), (), (), cfg }
    variant! { o, "column_sum_f32".into(), false, reduce::column_sum::ColumnSum<f32, W>, dim; t(), t(), (), false }
    variant! { o, "sum_squares_f32".into(), false, reduce::sum_squares::SumSquares<f32, W>, dim; a(), a(), (), () }
    variant! { o, "adamw_f32".into(), false, optim::adamw::Adamw<W>, dim;
    a(), a(), a(), a(), (), (), (), (), (), (), (), () }
}

// ---- Shared by both checks ----

/// C++ for a kernel definition, as the runtime (`cubecl-cuda`, `cubecl-hip`) generates it with
/// `compiler` for planes of `warp_size` lanes, and the kernel's dynamic shared memory in bytes,
/// which the compiled code's resource counts do not include.
pub fn cpp_source<D: cubecl_cpp::Dialect>(
    mut compiler: cubecl_cpp::shared::CppCompiler<D>,
    warp_size: u32,
    def: KernelDefinition,
) -> Result<(String, usize), String> {
    let opts = cubecl_cpp::shared::CompilationOptions {
        warp_size,
        ..Default::default()
    };
    let repr = cubecl::Compiler::compile(
        &mut compiler,
        def,
        &opts,
        ExecutionMode::Unchecked,
        cubecl::ir::StorageType::Scalar(cubecl::ir::ElemType::UInt(cubecl::ir::UIntKind::U32)),
    )
    .map_err(|e| format!("{e:?}"))?;
    Ok((repr.to_string(), repr.shared_memory_size()))
}

/// The table sections after the resources: which problem got which plan, and what the planners
/// refused.
pub fn plan_sections(planned: &[String], refused: &[String]) -> String {
    let mut out = String::from(
        "\n## The plan each problem gets\n\n| problem | op | profile | dtype | variant |\n| --- | --- | --- | --- | --- |\n",
    );
    for line in planned {
        out += line;
        out += "\n";
    }
    if !refused.is_empty() {
        out += "\n## Planned and refused (not compiled; the launcher runs these unfused)\n\n";
        for r in refused {
            out += &format!("- {r}\n");
        }
    }
    out
}

/// Runs `compile_all` once per test process, for every test of a check to read. A panic is
/// kept as its message, so the second test reports it instead of compiling everything again.
pub fn once<T: Send + Sync>(
    cell: &'static std::sync::OnceLock<Result<Option<T>, String>>,
    compile_all: fn() -> Option<T>,
) -> Option<&'static T> {
    let result = cell.get_or_init(|| {
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

/// `f` over `items` on every core (`std::thread::available_parallelism`), the results in the
/// items' order: NVRTC, ptxas, nvdisasm and hipcc each use one core per variant, and a check
/// compiles a few hundred variants.
pub fn par_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|s| {
        for _ in 0..workers.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else {
                    break;
                };
                let out = f(item);
                done.lock().unwrap().push((i, out));
            });
        }
    });
    let mut done = done.into_inner().unwrap();
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, out)| out).collect()
}

/// Runs a tool: its stderr and stdout, as the result on success and as the error otherwise.
pub fn run_tool(
    program: impl AsRef<std::ffi::OsStr>,
    args: &[&std::ffi::OsStr],
) -> Result<String, String> {
    let program = program.as_ref();
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", program.to_string_lossy()))?;
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        Ok(log)
    } else {
        Err(log)
    }
}

/// Fails naming every main variant whose compiled code touches `what` (local memory, scratch)
/// inside a loop, as `in_loops` counts it.
pub fn assert_main_variants_clean<R: std::fmt::Debug>(
    all: &[(String, bool, R)],
    in_loops: fn(&R) -> usize,
    what: &str,
) {
    let bad: Vec<String> = all
        .iter()
        .filter(|(_, main, r)| *main && in_loops(r) > 0)
        .map(|(n, _, r)| format!("{n}: {r:?}"))
        .collect();
    assert!(
        bad.is_empty(),
        "main variants with {what} inside loops:\n{}",
        bad.join("\n")
    );
}

//! The plans a GPU would launch: every built-in preset's calls (each stack's width, heads,
//! hidden width and P; batch and sequence cut) and the problems the tests and benches use,
//! planned for sm_80 and sm_90 by the launchers' own planners. The CUDA check
//! (`tests/cuda_codegen.rs`) compiles exactly these plans; `tests/plans.rs` records what the
//! model launches and fails on a plan missing here.

use megabyte_kernels::decode::{input, output, DecodeConfig};
use megabyte_kernels::gemm::GemmConfig;
use megabyte_ops::attention::{
    AttentionCall, AttentionKernel, AttentionPlan, AttentionProblem, BackwardKernel, BackwardPlan,
    BackwardProblem,
};
use megabyte_ops::cross_entropy::{CrossEntropyPlan, CrossEntropyProblem};
use megabyte_ops::decode::DecodeProblem;
use megabyte_ops::gemm::{GemmCall, GemmKernel, GemmPlan, GemmProblem, OperandLayout};
use megabyte_ops::layer_norm::{LayerNormPlan, LayerNormProblem};
use megabyte_ops::{ActivationKind, DeviceProfile, Dtype};
use megabyte_reference::{Activation, Config};

/// The CUDA device profiles the CUDA check plans for.
pub fn cuda_profiles() -> Vec<DeviceProfile> {
    vec![DeviceProfile::cuda_sm80(), DeviceProfile::cuda_sm90()]
}

/// The HIP device profile the ROCm check plans for.
pub fn rocm_profiles() -> Vec<DeviceProfile> {
    vec![DeviceProfile::hip_gfx90a()]
}

/// One plan, with the problem it was planned for ("tiny global qkv") and the profile's name.
#[derive(Clone, Debug)]
pub struct Planned<P> {
    pub problem: String,
    pub profile: &'static str,
    pub plan: P,
}

/// Plans every (name, call) on every profile given; a call a profile cannot plan is a bug in
/// the planner or in the list, so it panics naming both.
fn plan_all<C, P>(
    calls: Vec<(String, C)>,
    profiles: &[DeviceProfile],
    plan: impl Fn(&C, &DeviceProfile) -> Result<P, megabyte_ops::OpError>,
) -> Vec<Planned<P>> {
    let mut out = Vec::new();
    for (name, call) in calls {
        for profile in profiles {
            let p =
                plan(&call, profile).unwrap_or_else(|e| panic!("{name} on {}: {e}", profile.name));
            out.push(Planned {
                problem: name.clone(),
                profile: profile.name,
                plan: p,
            });
        }
    }
    out
}

/// The distinct plans `profile` gives a list of calls, each with the cheapest call (by
/// `cost`) that reaches it, in first-seen order: what the kernel tests run on their device
/// (`presets` regimes). A call the profile cannot plan is a bug in the list or the planner.
pub fn representatives<C: Clone, P: PartialEq + Clone>(
    calls: Vec<(String, C)>,
    profile: &DeviceProfile,
    plan: impl Fn(&C, &DeviceProfile) -> Result<P, megabyte_ops::OpError>,
    cost: impl Fn(&C) -> usize,
) -> Vec<(String, C, P)> {
    let mut out: Vec<(String, C, P)> = Vec::new();
    for (name, call) in calls {
        let p = plan(&call, profile).unwrap_or_else(|e| panic!("{name} on {}: {e}", profile.name));
        match out.iter_mut().find(|(_, _, q)| *q == p) {
            Some(slot) if cost(&call) < cost(&slot.1) => *slot = (name, call, p),
            Some(_) => {}
            None => out.push((name, call, p)),
        }
    }
    out
}

/// The distinct plans of a list, in first-seen order.
pub fn distinct<P: PartialEq + Clone>(planned: &[Planned<P>]) -> Vec<P> {
    let mut out: Vec<P> = Vec::new();
    for p in planned {
        if !out.contains(&p.plan) {
            out.push(p.plan.clone());
        }
    }
    out
}

/// The kernels' activation of a config.
pub fn activation(cfg: &Config) -> ActivationKind {
    match cfg.activation {
        Activation::Gelu => ActivationKind::Gelu,
        Activation::Relu => ActivationKind::Relu,
    }
}

/// One of a config's two transformer stacks, as the kernels see it.
#[derive(Clone, Copy, Debug)]
pub struct Stack {
    /// "global" or "local".
    pub name: &'static str,
    /// The stack's width (P·D_G for the global stack, D_L for the local one).
    pub width: usize,
    /// The FFN's hidden width.
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    /// Its sequence length: K patches, or the P bytes of a patch.
    pub seq: usize,
}

impl Stack {
    /// The fused decoding step's problem for this stack.
    pub fn decode_problem(&self, dtype: Dtype) -> DecodeProblem {
        let (width, hidden, heads, layers) = (self.width, self.hidden, self.heads, self.layers);
        DecodeProblem {
            width,
            hidden,
            heads,
            layers,
            dtype,
        }
    }
}

/// A config's global and local stacks.
pub fn stacks(cfg: &Config) -> [Stack; 2] {
    let stack = |name, width: usize, heads, layers, seq| Stack {
        name,
        width,
        hidden: cfg.ffn_mult * width,
        heads,
        layers,
        seq,
    };
    [
        stack(
            "global",
            cfg.global_width(),
            cfg.heads_global,
            cfg.layers_global,
            cfg.patches(),
        ),
        stack(
            "local",
            cfg.d_local,
            cfg.heads_local,
            cfg.layers_local,
            cfg.patch,
        ),
    ]
}

/// The attention problems the model launches for every preset: each stack's self attention
/// over its real heads and head dim, at every sequence length that reaches another tile (see
/// [`seq_rungs`]) up to its full length (2,048 patches at most for the global stack, P bytes
/// for the local one), and one or a few positions against a full cache, which the decoder
/// runs unfused for stacks too wide for the fused step; and the same for the head dims the
/// tests and benches use (32, 64, 80, 128). The vector width must divide the head dim and the
/// strides of q/k/v in the fused projection (C, 3C, S·3C) as the model passes them.
pub fn attention_calls(dtype: Dtype) -> Vec<(String, AttentionCall)> {
    let mut calls = Vec::new();
    let mut add = |name: String, batch, seq, heads, head_dim, seq_k| {
        let width = heads * head_dim;
        let problem = AttentionProblem {
            batch,
            seq,
            heads,
            head_dim,
            causal: true,
        };
        let aligned = vec![head_dim, width, 3 * width, seq * 3 * width, seq * width];
        let call = AttentionCall {
            problem,
            seq_k,
            dtype,
            aligned,
        };
        calls.push((name, call));
    };
    let mut stack = |name: &str, heads, head_dim, full: usize| {
        for seq in seq_rungs(full) {
            add(format!("{name} s{seq}"), 2, seq, heads, head_dim, seq);
        }
        // One position (or a few, prefilling a prompt) against a cache of `full` keys.
        for seq in [1, 3] {
            add(
                format!("{name} s{seq} vs {full} keys"),
                2,
                seq,
                heads,
                head_dim,
                full,
            );
        }
    };
    for (preset, cfg) in crate::preset_configs() {
        let (hg, dg) = (cfg.heads_global, cfg.head_dim_global());
        let (hl, dl) = (cfg.heads_local, cfg.head_dim_local());
        stack(&format!("{preset} global"), hg, dg, cfg.patches().min(2048));
        stack(&format!("{preset} local"), hl, dl, cfg.patch);
    }
    for d in [32usize, 64, 80, 128] {
        stack(&format!("test d{d}"), 4, d, 256);
    }
    calls
}

/// Sequence lengths up to `full` that reach every tile the attention planners pick: the tiled
/// kernel's query tile is the sequence's next power of two up to 16, the tensor-core kernel's
/// planes and key depth grow with each 16 queries up to 64.
fn seq_rungs(full: usize) -> Vec<usize> {
    let mut rungs: Vec<usize> = [1, 2, 3, 5, 9, 17, 33, 49, 65]
        .into_iter()
        .filter(|&s| s < full)
        .collect();
    rungs.push(full);
    rungs
}

/// [`attention_calls`] as `AttentionKernel::Auto` plans them.
pub fn attention_plans(dtype: Dtype, profiles: &[DeviceProfile]) -> Vec<Planned<AttentionPlan>> {
    plan_all(attention_calls(dtype), profiles, |call, profile| {
        megabyte_ops::attention::plan(AttentionKernel::Auto, call, profile)
    })
}

/// The attention backward of every preset's two stacks and of the head dims the tests and
/// benches use (training runs in f32 only).
pub fn backward_calls() -> Vec<(String, BackwardProblem)> {
    let mut calls = Vec::new();
    for (preset, cfg) in crate::preset_configs() {
        for (stack, head_dim) in [
            ("global", cfg.head_dim_global()),
            ("local", cfg.head_dim_local()),
        ] {
            calls.push((format!("{preset} {stack}"), head_dim));
        }
    }
    for d in [32usize, 64, 80, 128] {
        calls.push((format!("test d{d}"), d));
    }
    calls
        .into_iter()
        .map(|(name, head_dim)| {
            (
                name,
                BackwardProblem {
                    head_dim,
                    causal: true,
                },
            )
        })
        .collect()
}

/// [`backward_calls`] as `BackwardKernel::Auto` plans them.
pub fn backward_plans(profiles: &[DeviceProfile]) -> Vec<Planned<BackwardPlan>> {
    plan_all(backward_calls(), profiles, |problem, profile| {
        megabyte_ops::attention::plan_backward(BackwardKernel::Auto, problem, profile)
    })
}

/// The GEMM calls of one stack of width `c` and hidden width `h` over `m` rows: the four
/// linear layers of a block (training runs fc1 without its activation, which the backward
/// applies itself), and, when `train`, each one's input and weight gradients (dX = dY·Wᵀ,
/// dW = Xᵀ·dY).
fn block_gemms(
    out: &mut Vec<(String, GemmCall)>,
    what: &str,
    dtype: Dtype,
    (c, h, m): (usize, usize, usize),
    act: ActivationKind,
    train: bool,
) {
    let linears = [
        ("qkv", c, 3 * c, true, None, false),
        ("proj", c, c, true, None, true),
        ("fc1", c, h, true, Some(act), false),
        ("fc2", h, c, true, None, true),
    ];
    for (name, k, n, bias, activation, residual) in linears {
        let call = |problem, a, b, bias, activation, residual| GemmCall {
            problem,
            dtype,
            a,
            b,
            bias,
            activation,
            residual,
        };
        let p = GemmProblem { batch: 1, m, n, k };
        let (a, b) = (OperandLayout::row_major(k), OperandLayout::row_major(n));
        out.push((
            format!("{what} {name}"),
            call(p, a, b, bias, activation, residual),
        ));
        if train {
            if activation.is_some() {
                out.push((
                    format!("{what} {name} (training)"),
                    call(p, a, b, bias, None, residual),
                ));
            }
            let dx = GemmProblem {
                batch: 1,
                m,
                n: k,
                k: n,
            };
            let dw = GemmProblem {
                batch: 1,
                m: k,
                n,
                k: m,
            };
            let (dy, wt) = (OperandLayout::row_major(n), OperandLayout::transposed(n));
            let xt = OperandLayout::transposed(k);
            out.push((
                format!("{what} {name} dX"),
                call(dx, dy, wt, false, None, false),
            ));
            out.push((
                format!("{what} {name} dW"),
                call(dw, xt, dy, false, None, false),
            ));
        }
    }
}

/// Every GEMM the model runs for every preset: each stack's blocks over its rows (up to
/// 2,048 patches for the global stack, 64 patches of P bytes for the local one) and over a
/// few rows when decoding unfused; in f32 also training's gradients, of the blocks, of the
/// tied head (logits · E_L and its transpose) and of the global-to-local projection. Tests
/// and benches run the same layouts and epilogues at other sizes, which reach the same block
/// ladder.
pub fn gemm_calls(dtype: Dtype) -> Vec<(String, GemmCall)> {
    let mut calls = Vec::new();
    let train = dtype == Dtype::F32;
    for (preset, cfg) in crate::preset_configs() {
        let act = activation(&cfg);
        let (wg, dl) = (cfg.global_width(), cfg.d_local);
        let (kg, ml) = (cfg.patches().min(2048), 64 * cfg.patch);
        let stacks = [
            ("global", wg, cfg.ffn_mult * wg, kg),
            ("local", dl, cfg.ffn_mult * dl, ml),
        ];
        for (stack, c, h, rows) in stacks {
            for m in rungs(rows) {
                let what = format!("{preset} {stack} m{m}");
                block_gemms(&mut calls, &what, dtype, (c, h, m), act, train);
            }
        }
        if train {
            let (v, dg) = (cfg.vocab, cfg.d_global);
            let none = |problem, a, b| GemmCall {
                problem,
                dtype,
                a,
                b,
                bias: false,
                activation: None,
                residual: false,
            };
            let row = OperandLayout::row_major;
            let t = OperandLayout::transposed;
            let gemms = [
                ("head dX", true, (v, dl), row(v), row(dl)),
                ("head dW", false, (v, dl), t(v), row(dl)),
                ("global_to_local dX", true, (dl, dg), row(dl), t(dl)),
                ("global_to_local dW", false, (dg, dl), t(dg), row(dl)),
            ];
            // dX: (rows × K) · (K × N); dW: (M × rows) · (rows × N).
            for (name, dx, (x, n), a, b) in gemms {
                for rows in rungs(ml) {
                    let (m, k) = if dx { (rows, x) } else { (x, rows) };
                    let p = GemmProblem { batch: 1, m, n, k };
                    calls.push((format!("{preset} {name} rows{rows}"), none(p, a, b)));
                }
            }
        }
    }
    calls
}

/// Row counts that reach every block shape the GEMM planners pick from for a stack of
/// `rows` rows at full size: a few (decoding, thin blocks), some (too few full blocks to fill
/// the device) and the full count.
fn rungs(rows: usize) -> [usize; 4] {
    [4, 64, 512, rows]
}

/// [`gemm_calls`] as `GemmKernel::Auto` plans them.
pub fn gemm_plans(dtype: Dtype, profiles: &[DeviceProfile]) -> Vec<Planned<GemmPlan>> {
    plan_all(gemm_calls(dtype), profiles, |call, profile| {
        megabyte_ops::gemm::plan(GemmKernel::Auto, call, profile)
    })
}

/// One launch of the gathering global-to-local GEMM: its GEMM (B·T byte rows of width D_G into
/// D_L) and the patch size P, which the rows are a multiple of (the launcher takes whole
/// patches of ids).
#[derive(Clone, Debug)]
pub struct LocalInputCall {
    pub gemm: GemmCall,
    pub patch: usize,
}

/// The gathering global-to-local GEMM of every preset: 64 patches of rows, and fewer whole
/// patches (a batch of one patch when decoding unfused), as [`rungs`] rounded up to whole
/// patches.
pub fn local_input_calls(dtype: Dtype) -> Vec<(String, LocalInputCall)> {
    let mut calls = Vec::new();
    for (preset, cfg) in crate::preset_configs() {
        let (dg, dl, patch) = (cfg.d_global, cfg.d_local, cfg.patch);
        let mut rows: Vec<usize> = rungs(64 * patch)
            .iter()
            .map(|m| m.next_multiple_of(patch))
            .collect();
        rows.dedup();
        for m in rows {
            let gemm = GemmCall {
                problem: GemmProblem {
                    batch: 1,
                    m,
                    n: dl,
                    k: dg,
                },
                dtype,
                a: OperandLayout::row_major(dg),
                b: OperandLayout::row_major(dl),
                bias: false,
                activation: None,
                residual: false,
            };
            let call = LocalInputCall { gemm, patch };
            calls.push((format!("{preset} local_input m{m}"), call));
        }
    }
    calls
}

/// [`local_input_calls`] as the local-input launcher plans them.
pub fn local_input_plans(dtype: Dtype, profiles: &[DeviceProfile]) -> Vec<Planned<GemmConfig>> {
    plan_all(local_input_calls(dtype), profiles, |call, profile| {
        megabyte_ops::gemm::plan_tiled(GemmKernel::Auto, &call.gemm, profile)
    })
}

/// The configurations of the launches the fused step `step` (its first input and last output
/// stage set) makes at `keys` keys, as `decode_stack` splits it (`decode::plan_launches`):
/// one launch doing both, or a first, middle and last launch; none if one layer does not fit.
pub fn launch_stages(
    step: &DecodeConfig,
    keys: usize,
    layers: usize,
    vocab: usize,
) -> Vec<DecodeConfig> {
    let Ok(launches) = megabyte_ops::decode::plan_launches(step, keys, layers, vocab) else {
        return Vec::new();
    };
    let n = launches.len();
    (0..n)
        .map(|i| DecodeConfig {
            input: if i == 0 { step.input } else { input::ROW },
            positions: step.positions && i == 0,
            output: if i + 1 == n { step.output } else { output::ROW },
            ..*step
        })
        .collect()
}

/// The fused decoding step as the decoder launches it for every preset's two stacks: the
/// planner's shape (`megabyte_ops::decode::plan`: units, keys per chunk, vector width) with
/// each launch's stages (the global stack behind the patch embedding with the final
/// LayerNorm; the local one behind the local input with the logits, the greedy argmax or no
/// output (prompt bytes that only fill the caches);
/// split over launches at long contexts). Also the stacks the planner refuses (wider than the
/// fused step takes), which the decoder runs unfused.
pub fn decode_plans(
    dtype: Dtype,
    profiles: &[DeviceProfile],
) -> (Vec<Planned<DecodeConfig>>, Vec<String>) {
    let (mut plans, mut refused) = (Vec::new(), Vec::new());
    for (preset, cfg) in crate::preset_configs() {
        for s in stacks(&cfg) {
            let (stack, layers) = (s.name, s.layers);
            let problem = s.decode_problem(dtype);
            let stages: &[(&str, (u32, bool), u32)] = if stack == "global" {
                &[("norm", (input::PATCH, true), output::NORM)]
            } else {
                let first = (input::LOCAL, cfg.local_positions);
                // Feeding a prompt's bytes before its last fills the caches only.
                &[
                    ("logits", first, output::LOGITS),
                    ("argmax", first, output::ARGMAX),
                    ("cache only", first, output::ROW),
                ]
            };
            for profile in profiles {
                let planned = match megabyte_ops::decode::plan(&problem, profile) {
                    Ok(p) => p,
                    Err(e) => {
                        refused.push(format!("{preset} {stack} on {}: {e}", profile.name));
                        continue;
                    }
                };
                // Every cache length up to the context, halving.
                let lengths: Vec<usize> =
                    std::iter::successors(Some(s.seq), |k| (*k > 1).then_some(k / 2)).collect();
                for &(stage, (inp, positions), last) in stages {
                    let step = with_stages(planned, &cfg, (inp, positions, last));
                    for &keys in &lengths {
                        for launch in launch_stages(&step, keys, layers, cfg.vocab) {
                            plans.push(Planned {
                                problem: format!("{preset} {stack} {stage}"),
                                profile: profile.name,
                                plan: launch,
                            });
                        }
                    }
                }
            }
        }
    }
    (plans, refused)
}

/// A planned decode shape with a launch's stage fields, as `decode_stack` sets them.
pub fn with_stages(
    planned: DecodeConfig,
    cfg: &Config,
    (input, positions, output): (u32, bool, u32),
) -> DecodeConfig {
    DecodeConfig {
        activation: activation(cfg).id(),
        input,
        output,
        positions,
        d_in: cfg.d_global,
        ..planned
    }
}

/// LayerNorm over every preset's two widths (the global stack's P·D_G, the local D_L), plain
/// and with the fused residual add, over one row and many.
pub fn layer_norm_calls(dtype: Dtype) -> Vec<(String, LayerNormProblem)> {
    let mut calls = Vec::new();
    for (preset, cfg) in crate::preset_configs() {
        for Stack {
            name: stack, width, ..
        } in stacks(&cfg)
        {
            for residual in [false, true] {
                for rows in [1, 4096] {
                    let problem = LayerNormProblem {
                        rows,
                        width,
                        residual,
                        dtype,
                    };
                    calls.push((
                        format!("{preset} {stack} rows{rows} residual {residual}"),
                        problem,
                    ));
                }
            }
        }
    }
    calls
}

/// [`layer_norm_calls`] as the LayerNorm launcher plans them.
pub fn layer_norm_plans(dtype: Dtype, profiles: &[DeviceProfile]) -> Vec<Planned<LayerNormPlan>> {
    plan_all(layer_norm_calls(dtype), profiles, |p, profile| {
        Ok(megabyte_ops::layer_norm::plan(p, profile))
    })
}

/// The tied logits + cross-entropy of every preset (D_L wide, its vocabulary), scoring
/// (logits not stored) and training (stored for the backward), and the 257-entry vocabulary
/// the tests use.
pub fn cross_entropy_calls(dtype: Dtype) -> Vec<(String, CrossEntropyProblem)> {
    let mut calls = Vec::new();
    for (preset, cfg) in crate::preset_configs() {
        for vocab in [cfg.vocab, 257] {
            for write_logits in [false, true] {
                let problem = CrossEntropyProblem {
                    width: cfg.d_local,
                    vocab,
                    write_logits,
                    dtype,
                };
                calls.push((format!("{preset} V{vocab} logits {write_logits}"), problem));
            }
        }
    }
    calls
}

/// [`cross_entropy_calls`] as the cross-entropy launcher plans them.
pub fn cross_entropy_plans(
    dtype: Dtype,
    profiles: &[DeviceProfile],
) -> Vec<Planned<CrossEntropyPlan>> {
    plan_all(cross_entropy_calls(dtype), profiles, |p, profile| {
        Ok(megabyte_ops::cross_entropy::plan(p, profile))
    })
}

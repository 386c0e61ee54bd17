//! Launchers for causal (or full) multi-head attention: the flash kernel and the naive
//! score-materialising baseline.
//!
//! Layout: q, k, v, out are (B, S, H, D); q, k, v may be strided views (unit stride over D),
//! out is a contiguous tensor. lse is a contiguous (B, H, S) f32 tensor. Scores are scaled by
//! 1/sqrt(D).
//!
//! Decoding against a KV cache: k and v may hold S_kv > S positions, (B, S_kv, H, D); query i
//! is then position i + S_kv - S and, when causal, sees keys 0..=i + S_kv - S. That case runs
//! the `Rows` kernel (`RowsSplitDims` on devices with plane operations).

use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;
use megabyte_kernels::attention::{
    flash_attention as flash_kernel, flash_attention_cmma, flash_attention_rows, naive_scores,
    naive_softmax, naive_weighted_sum, BackwardConfig, FlashCmmaConfig, FlashConfig, FlashIoLaunch,
    RowsConfig,
};

use crate::device::{ensure_dtype, grid_1d, launch_1d};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::gemm::CMMA_PLANE;
use crate::profile::{DeviceProfile, Dtype};
use crate::tensor::{Tensor, TensorView};

const OP: &str = "attention";

/// Largest head dim the flash kernel accepts (per-unit registers and shared memory grow with D).
pub const MAX_HEAD_DIM: usize = 256;

/// Which flash kernel runs. All compute the same function with the same online softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `Cmma` for f16/bf16 on devices whose properties list 16×16×16 tensor-core fragments
    /// with f32 accumulation (when queries and keys are the same length); otherwise `Tiled` on
    /// devices with plane (warp) operations, `Rows` on devices without them, which in practice
    /// are CPU drivers such as lavapipe (cubecl's wgpu runtime hides plane ops on CPU
    /// adapters), where barriers are expensive and caches large. Decoding against a longer KV
    /// cache runs `RowsSplitDims` on devices with plane ops and `Rows` on the others.
    Auto,
    /// Groups of units share Q/K/V tiles through shared memory; several short sequences per
    /// cube in the local regime.
    Tiled,
    /// A few query rows per unit (each K/V vector loaded serves them all), registers only, no
    /// barriers.
    Rows,
    /// The `Rows` kernel with one query row per unit group and the row's head dims spread over
    /// the group's units, each accumulating at most 32 floats of output (and recomputing the
    /// row's scores): more units and fewer registers per unit, for decoding on GPUs.
    RowsSplitDims,
    /// QKᵀ and PV on tensor-core (CMMA) fragments, f16/bf16 only, on devices that have them.
    Cmma,
    /// The `Cmma` kernel with each fragment product computed by plain loops over the same
    /// shared tiles: its staging, masking, softmax and accumulator handling on any device
    /// (f16/bf16 only). For tests; slow.
    CmmaEmulated,
}

/// Shared memory the `Cmma` planner aims to stay within, so that two cubes fit on a GPU
/// multiprocessor; it goes beyond only when nothing smaller fits the head dim.
pub const CMMA_SMEM_TARGET: usize = 96 * 1024;

/// Longest sequence `Auto` gives the `Rows` kernel on devices without plane ops.
pub const ROWS_MAX_SEQ: usize = 65_536;

/// Keys per softmax rescale in the `Rows` kernel.
const ROWS_CHUNK: usize = 8;
/// Most query rows per unit in the `Rows` kernel: each K/V vector loaded serves this many rows.
const ROWS_PER_UNIT: usize = 8;
/// Bound on rows × head-dim vectors per unit in the `Rows` kernel. Its loops are unrolled, so
/// this bounds code size (and JIT time) as well as registers.
const ROWS_VECTORS: usize = 128;

/// The shape of an attention call, independent of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionProblem {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl AttentionProblem {
    /// Multiply-adds ×2 of QKᵀ and PV; half of them when causal.
    pub fn flops(&self) -> f64 {
        let full = 4.0
            * (self.batch * self.heads) as f64
            * (self.seq as f64).powi(2)
            * self.head_dim as f64;
        if self.causal {
            full / 2.0
        } else {
            full
        }
    }
}

/// Checks q (B, S, H, D) and k, v (B, S_kv, H, D) with S_kv >= S; returns [B, S, H, D] and S_kv.
fn check_qkv<R: Runtime, E>(
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
) -> Result<([usize; 4], usize), OpError> {
    if q.shape.len() != 4 {
        return Err(OpError::Shape {
            op: OP,
            tensor: "q",
            got: q.shape.clone(),
            expected: vec![0; 4],
        });
    }
    let dims = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let seq_k = k.shape.get(1).copied().unwrap_or(0).max(dims[1]);
    let kv_shape = vec![dims[0], seq_k, dims[2], dims[3]];
    for (name, t) in [("k", k), ("v", v)] {
        if t.shape != kv_shape {
            return Err(OpError::Shape {
                op: OP,
                tensor: name,
                got: t.shape.clone(),
                expected: kv_shape,
            });
        }
    }
    if dims.contains(&0) {
        return Err(OpError::empty(OP, "q", q.shape.clone()));
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.strides[3] != 1 {
            return Err(OpError::unsupported(
                OP,
                "head-dim stride",
                t.strides[3],
                format!("`{name}` must be contiguous along the head dim (stride 1)"),
            ));
        }
    }
    Ok((dims, seq_k))
}

fn check_outputs<R: Runtime, E>(
    dims: [usize; 4],
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
) -> Result<(), OpError> {
    let [b, s, h, _] = dims;
    if out.shape() != dims {
        return Err(OpError::Shape {
            op: OP,
            tensor: "out",
            got: out.shape().to_vec(),
            expected: dims.to_vec(),
        });
    }
    if lse.shape() != [b, h, s] {
        return Err(OpError::Shape {
            op: OP,
            tensor: "lse",
            got: lse.shape().to_vec(),
            expected: vec![b, h, s],
        });
    }
    Ok(())
}

/// The smallest query and key tile of the tiled flash kernel, unless shared memory needs less.
const MIN_TILE: usize = 8;

/// Picks tile sizes and groups per cube for the device: the square tile of the sequence's next
/// power of two between 8 and 16, halved (down to 1) until its shared memory fits, then as
/// many groups as fit in 256 units, the cube-dim limit and shared memory.
pub fn plan_tiled(
    problem: &AttentionProblem,
    profile: &DeviceProfile,
) -> Result<FlashConfig, OpError> {
    let hw = &profile.hardware;
    let smem_words = hw.max_shared_memory_size / 4;
    let d = problem.head_dim;
    if d > MAX_HEAD_DIM {
        return Err(OpError::unsupported(
            OP,
            "head dim",
            d,
            format!("the flash kernel supports head dims up to {MAX_HEAD_DIM}"),
        ));
    }
    // Tiles of 8 × 8 at least: the 4 × 4 tile at head dim 32 (f32, sm_90) spilled inside its
    // key loop (48 registers, 2 local-memory instructions there; `cuda_codegen`), and a
    // sequence shorter than the tile costs only masked rows.
    let mut tile = 16usize.min(problem.seq.next_power_of_two()).max(MIN_TILE);
    let mut cfg = FlashConfig {
        block_q: tile,
        block_k: tile,
        head_dim: d,
        groups: 1,
        causal: problem.causal,
        vector: 1,
    };
    while cfg.shared_words() > smem_words {
        if tile == 1 {
            return Err(OpError::unsupported(
                OP,
                "head dim",
                d,
                format!(
                    "needs {} bytes of shared memory, the device has {}",
                    4 * cfg.shared_words(),
                    hw.max_shared_memory_size
                ),
            ));
        }
        tile /= 2;
        cfg = FlashConfig {
            block_q: tile,
            block_k: tile,
            ..cfg
        };
    }
    // As many groups as the cube holds, however few items there are (the last cube's spare
    // groups idle): the plan then depends on the sequence only through its tile, so a GPU
    // compiles one kernel per tile and head dim rather than one per batch × heads.
    let per_group_words = cfg.shared_words();
    let units = (tile * tile) as u32;
    let by_units = (256.min(hw.max_units_per_cube) / units).max(1) as usize;
    let by_smem = smem_words / per_group_words;
    let by_dim = hw.max_cube_dim.2 as usize;
    cfg.groups = by_units.min(by_smem).min(by_dim).max(1);
    Ok(cfg)
}

/// Picks the `Cmma` kernel's shape: the most planes (16 query rows each, up to 4, no more
/// than the sequence needs) and then the deepest K/V tile (64, 32, 16 keys) whose shared
/// memory fits [`CMMA_SMEM_TARGET`], else the device's limit. `emulated` skips the check for
/// tensor-core fragments.
pub fn plan_cmma(
    problem: &AttentionProblem,
    dtype: Dtype,
    profile: &DeviceProfile,
    vector: usize,
    emulated: bool,
) -> Result<FlashCmmaConfig, OpError> {
    let elem = dtype.bytes();
    if elem != 2 {
        return Err(OpError::unsupported(
            OP,
            "element bytes for the tensor-core kernel",
            elem,
            format!(
                "the CMMA attention takes f16 or bf16, not {}; use AttentionKernel::Auto",
                dtype.name()
            ),
        ));
    }
    if !emulated && !profile.cmma(dtype) {
        return Err(OpError::unsupported(
            OP,
            "tensor-core fragments for element bytes",
            elem,
            format!(
                "this device lists no 16x16x16 {} CMMA with f32 accumulation in 32-unit planes; \
                 use AttentionKernel::Auto",
                dtype.name()
            ),
        ));
    }
    let d = problem.head_dim;
    if d > MAX_HEAD_DIM {
        return Err(OpError::unsupported(
            OP,
            "head dim",
            d,
            format!("the flash kernels support head dims up to {MAX_HEAD_DIM}"),
        ));
    }
    let hw = &profile.hardware;
    let rows = problem.seq.div_ceil(16);
    let keys = problem.seq.next_multiple_of(16);
    let mut candidates = Vec::new();
    for planes in [4usize, 2, 1] {
        for block_k in [64usize, 32, 16] {
            if (planes > 1 && planes > rows) || (block_k > 16 && block_k > keys) {
                continue;
            }
            let cfg = FlashCmmaConfig {
                planes,
                block_k,
                head_dim: d,
                plane_size: CMMA_PLANE,
                causal: problem.causal,
                vector,
                emulated,
            };
            if cfg.is_valid() && cfg.units() <= hw.max_units_per_cube as usize {
                candidates.push(cfg);
            }
        }
    }
    let fits = |cfg: &&FlashCmmaConfig, limit: usize| cfg.shared_bytes(elem) <= limit;
    let target = CMMA_SMEM_TARGET.min(hw.max_shared_memory_size);
    candidates
        .iter()
        .find(|c| fits(c, target))
        .or_else(|| {
            candidates
                .iter()
                .find(|c| fits(c, hw.max_shared_memory_size))
        })
        .copied()
        .ok_or_else(|| {
            OpError::unsupported(
                OP,
                "head dim",
                d,
                format!(
                    "the tensor-core kernel needs at least {} bytes of shared memory at this head \
                 dim, the device has {}",
                    candidates.last().map_or(0, |c| c.shared_bytes(elem)),
                    hw.max_shared_memory_size
                ),
            )
        })
}

/// An attention forward call as its planner sees it: the problem, the keys (more than the
/// queries when decoding against a cache), the element type, and every length the vector
/// width must divide (the head dim, the strides and offsets of q, k, v and out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionCall {
    pub problem: AttentionProblem,
    pub seq_k: usize,
    pub dtype: Dtype,
    pub aligned: Vec<usize>,
}

/// The kernel an attention forward runs, with its comptime shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPlan {
    Tiled(FlashConfig),
    Rows(RowsConfig),
    Cmma(FlashCmmaConfig),
}

impl AttentionPlan {
    /// The vector width the plan loads q, k, v and stores out with.
    pub fn vector(&self) -> usize {
        match self {
            AttentionPlan::Tiled(c) => c.vector,
            AttentionPlan::Rows(c) => c.vector,
            AttentionPlan::Cmma(c) => c.vector,
        }
    }
}

/// The planner of the attention forward: which kernel `kernel` resolves to on this device
/// (`Auto`: the tensor-core kernel where the device has the fragments and a plan fits; else,
/// against a longer cache, `RowsSplitDims` with plane ops and `Rows` without; else `Tiled`
/// with plane ops and `Rows` up to [`ROWS_MAX_SEQ`] without) and its shape. Pure: what it
/// reads of the device is the profile; [`flash_attention_with`] runs what it returns.
pub fn plan(
    kernel: AttentionKernel,
    call: &AttentionCall,
    profile: &DeviceProfile,
) -> Result<AttentionPlan, OpError> {
    let problem = &call.problem;
    let (seq, seq_k, head_dim) = (problem.seq, call.seq_k, problem.head_dim);
    if seq_k != seq
        && matches!(
            kernel,
            AttentionKernel::Tiled | AttentionKernel::Cmma | AttentionKernel::CmmaEmulated
        )
    {
        return Err(OpError::unsupported(OP, "key sequence length", seq_k, format!(
                "the {kernel:?} kernel needs as many keys as queries ({seq}); `Rows`, `RowsSplitDims` or `Auto` decode against a longer cache"
            )));
    }
    // The tiled plan's checks (head dim, shared memory) stand for every kernel.
    let tiled = plan_tiled(problem, profile)?;
    let vector = profile.vector_for(call.dtype, &call.aligned);
    let cmma = match kernel {
        AttentionKernel::Cmma | AttentionKernel::CmmaEmulated => Some(plan_cmma(
            problem,
            call.dtype,
            profile,
            vector,
            kernel == AttentionKernel::CmmaEmulated,
        )?),
        AttentionKernel::Auto if seq_k == seq && profile.cmma(call.dtype) => {
            plan_cmma(problem, call.dtype, profile, vector, false).ok()
        }
        _ => None,
    };
    if let Some(cfg) = cmma {
        return Ok(AttentionPlan::Cmma(cfg));
    }
    let plane_ops = profile.plane_ops;
    let kernel = match kernel {
        AttentionKernel::Auto if seq_k != seq && plane_ops => AttentionKernel::RowsSplitDims,
        AttentionKernel::Auto if seq_k != seq => AttentionKernel::Rows,
        AttentionKernel::Auto if plane_ops => AttentionKernel::Tiled,
        // llvmpipe caps a shader loop at 65,535 iterations per unit; the `Rows` kernel's key
        // loops run S times, the tiled kernel's S / 16.
        AttentionKernel::Auto if seq < ROWS_MAX_SEQ => AttentionKernel::Rows,
        AttentionKernel::Auto => AttentionKernel::Tiled,
        chosen => chosen,
    };
    match kernel {
        AttentionKernel::Rows | AttentionKernel::RowsSplitDims => {
            let split = kernel == AttentionKernel::RowsSplitDims;
            // At least four vectors per row: at head dim 16, 8-wide f16 vectors (two per row)
            // made ptxas spill inside the key loop (sm_90, 9 local-memory instructions there);
            // four 4-wide ones do not (`cuda_codegen`).
            // (A smaller power of two still divides every length the vector divided.)
            let quarter = (head_dim / 4).max(1);
            let vector = vector.min(1 << quarter.ilog2());
            // Split units keep one row each, so their accumulators stay within the split's
            // bound.
            let rows = if split {
                1
            } else {
                (ROWS_VECTORS / (head_dim / vector))
                    .clamp(1, ROWS_PER_UNIT)
                    .min(seq)
            };
            Ok(AttentionPlan::Rows(RowsConfig {
                head_dim,
                vector,
                causal: problem.causal,
                chunk: ROWS_CHUNK,
                rows,
                q_from_memory: RowsConfig::q_from_memory_for(rows, head_dim, plane_ops),
                splits: if split {
                    RowsConfig::splits_for(head_dim, vector)
                } else {
                    1
                },
            }))
        }
        _ => Ok(AttentionPlan::Tiled(FlashConfig { vector, ..tiled })),
    }
}

/// Flash attention: out = softmax(q kᵀ / sqrt(D) + mask) v, and each row's log-sum-exp.
/// Never materialises the S × S scores. Picks the kernel with [`AttentionKernel::Auto`].
pub fn flash_attention<R: Runtime, E: FloatElement>(
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
    causal: bool,
) -> Result<(), OpError> {
    flash_attention_with(AttentionKernel::Auto, q, k, v, out, lse, causal)
}

/// [`flash_attention`] with an explicit kernel choice.
pub fn flash_attention_with<R: Runtime, E: FloatElement>(
    kernel: AttentionKernel,
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
    causal: bool,
) -> Result<(), OpError> {
    let client = q.tensor.client();
    ensure_dtype::<R, E>(client, OP)?;
    let (dims, seq_k) = check_qkv(q, k, v)?;
    check_outputs(dims, out, lse)?;
    let [batch, seq, heads, head_dim] = dims;
    let problem = AttentionProblem {
        batch,
        seq,
        heads,
        head_dim,
        causal,
    };
    // Widest vector that divides the head dim, every stride and every offset.
    let mut aligned: Vec<usize> = vec![head_dim];
    for t in [q, k, v] {
        aligned.extend(&t.strides[..3]);
        aligned.push(t.offset);
    }
    aligned.extend(&out.strides()[..3]);
    let call = AttentionCall {
        problem,
        seq_k,
        dtype: E::DTYPE,
        aligned,
    };
    crate::record::note(|| crate::record::Planned::Attention(call.clone()));
    let planned = plan(kernel, &call, &DeviceProfile::of(client))?;
    let (qo, ko, vo) = (q.offset_u32(OP)?, k.offset_u32(OP)?, v.offset_u32(OP)?);
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let vector = planned.vector();
    // SAFETY (every launch): shapes were validated above; the kernels bounds-check rows
    // against S and work items against their count, `vector` divides D, all strides and all
    // offsets, and the planner checked shared memory against the device's limit.
    macro_rules! launch {
        ($kernel:ident, $count:expr, $dim:expr, $cfg:expr) => {
            unsafe {
                $kernel::launch_unchecked::<E, R>(
                    client,
                    $count,
                    $dim,
                    vector,
                    FlashIoLaunch::new(
                        q.arg(),
                        k.arg(),
                        v.arg(),
                        out.arg(),
                        lse.arg(),
                        qo,
                        ko,
                        vo,
                        scale,
                    ),
                    $cfg,
                )
            }
        };
    }
    match planned {
        AttentionPlan::Rows(cfg) => {
            let rows = batch * heads * seq.div_ceil(cfg.rows);
            let (cube_count, cube_dim) = grid_1d(client, rows * cfg.splits);
            launch!(flash_attention_rows, cube_count, cube_dim, cfg);
        }
        AttentionPlan::Tiled(cfg) => {
            let cubes = (batch * heads * seq.div_ceil(cfg.block_q)).div_ceil(cfg.groups) as u32;
            let cube_dim =
                CubeDim::new_3d(cfg.block_k as u32, cfg.block_q as u32, cfg.groups as u32);
            let count = CubeCountSelection::new(client, cubes).cube_count();
            launch!(flash_kernel, count, cube_dim, cfg);
        }
        AttentionPlan::Cmma(cfg) => {
            let cubes = (batch * heads * seq.div_ceil(cfg.block_q())) as u32;
            let cube_dim = CubeDim::new_2d(cfg.plane_size as u32, cfg.planes as u32);
            let count = CubeCountSelection::new(client, cubes).cube_count();
            launch!(flash_attention_cmma, count, cube_dim, cfg);
        }
    }
    Ok(())
}

/// The naive baseline: materialises the (B, H, S, S) scores in E, softmax in place, then PV.
/// Memory O(S²): for tests and benches only. q, k, v must be contiguous (B, S, H, D).
pub fn naive_attention<R: Runtime, E: FloatElement>(
    q: &Tensor<R, E>,
    k: &Tensor<R, E>,
    v: &Tensor<R, E>,
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
    causal: bool,
) -> Result<(), OpError> {
    let client = q.client();
    ensure_dtype::<R, E>(client, OP)?;
    let (dims, seq_k) = check_qkv(&q.view(), &k.view(), &v.view())?;
    if seq_k != dims[1] {
        return Err(OpError::shape(OP, "k", k.shape(), q.shape().to_vec()));
    }
    check_outputs(dims, out, lse)?;
    let [b, s, h, d] = dims;
    let scores = Tensor::<R, E>::empty(client, &[b, h, s, s])?;
    // SAFETY: all tensors are contiguous with the validated shapes; each kernel bounds-checks
    // ABSOLUTE_POS against its output length.
    unsafe {
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        launch_1d!(naive_scores::launch_unchecked::<E, R>[client, b * h * s * s]
            q.arg(), k.arg(), scores.arg(), scale);
        launch_1d!(naive_softmax::launch_unchecked::<E, R>[client, b * h * s]
            scores.arg(), lse.arg(), causal);
        launch_1d!(naive_weighted_sum::launch_unchecked::<E, R>[client, b * s * h * d]
            scores.arg(), v.arg(), out.arg());
    }
    Ok(())
}

/// How the attention backward kernels spread a row's work over units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackwardKernel {
    /// `SplitDims` on devices with plane (warp) operations (GPUs), `RowsInRegisters` on
    /// devices without them (CPU drivers such as lavapipe, where the extra dot products cost
    /// more than registers do).
    Auto,
    /// One unit per query row (dQ) and per key row (dK, dV), its own operand rows and
    /// accumulators in registers: 2·D and 4·D floats per unit.
    RowsInRegisters,
    /// Several units per row, each accumulating the gradients over a slice of the head dims
    /// (at most 64 floats of accumulators) and recomputing the row's dot products, the row's
    /// operands re-read from cache: no register spills at head dims 64 and 128 on CUDA.
    SplitDims,
}

/// Accumulator floats per unit in the `SplitDims` backward (the forward's `RowsSplitDims`
/// keeps to [`megabyte_kernels::attention::ROWS_SPLIT_ACCUMULATORS`]).
const BACKWARD_SPLIT_ACCUMULATORS: usize = 64;

/// An attention backward call as its planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardProblem {
    pub head_dim: usize,
    pub causal: bool,
}

/// The dQ and the dK/dV kernels' comptime shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardPlan {
    pub q: BackwardConfig,
    pub kv: BackwardConfig,
}

/// The planner of the attention backward: how each row's gradients are spread over units
/// (`Auto`: split over head dims where the profile has plane ops), or why the head dim is not
/// taken.
pub fn plan_backward(
    kernel: BackwardKernel,
    problem: &BackwardProblem,
    profile: &DeviceProfile,
) -> Result<BackwardPlan, OpError> {
    let head_dim = problem.head_dim;
    if head_dim > MAX_HEAD_DIM {
        return Err(OpError::unsupported(
            "attention_backward",
            "head dim",
            head_dim,
            format!("the backward kernels support head dims up to {MAX_HEAD_DIM}"),
        ));
    }
    let split = match kernel {
        BackwardKernel::Auto => profile.plane_ops,
        BackwardKernel::RowsInRegisters => false,
        BackwardKernel::SplitDims => true,
    };
    // dQ accumulates D floats per row, dK and dV 2·D.
    let config = |accumulators: usize| BackwardConfig {
        head_dim,
        causal: problem.causal,
        splits: if split {
            accumulators.div_ceil(BACKWARD_SPLIT_ACCUMULATORS)
        } else {
            1
        },
        rows_in_registers: !split,
    };
    Ok(BackwardPlan {
        q: config(head_dim),
        kv: config(2 * head_dim),
    })
}

/// Attention backward (flash style, no S × S buffer): the softmax statistics are recomputed
/// from q and k (see the kernels for why not from the forward's f32 log-sum-exp). q, k, v and
/// the gradient outputs dq, dk, dv are (B, S, H, D) views (unit stride over D; dq/dk/dv may be
/// column slices of one fused (B·S, 3C) gradient); d_out, the gradient of the forward's
/// output, is contiguous (B, S, H, D). Deterministic: every gradient element is one unit's
/// ordered sum.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<R: Runtime, E: FloatElement>(
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    d_out: &Tensor<R, E>,
    dq: &TensorView<R, E>,
    dk: &TensorView<R, E>,
    dv: &TensorView<R, E>,
    causal: bool,
) -> Result<(), OpError> {
    attention_backward_with(BackwardKernel::Auto, q, k, v, d_out, dq, dk, dv, causal)
}

/// [`attention_backward`] with an explicit choice of how rows are spread over units.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with<R: Runtime, E: FloatElement>(
    kernel: BackwardKernel,
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    d_out: &Tensor<R, E>,
    dq: &TensorView<R, E>,
    dk: &TensorView<R, E>,
    dv: &TensorView<R, E>,
    causal: bool,
) -> Result<(), OpError> {
    const OP: &str = "attention_backward";
    let client = d_out.client();
    ensure_dtype::<R, E>(client, OP)?;
    let (dims, seq_k) = check_qkv(q, k, v)?;
    if seq_k != dims[1] {
        return Err(OpError::shape(OP, "k", &k.shape, q.shape.clone()));
    }
    d_out.expect_shape(OP, "d_out", &dims)?;
    for (name, t) in [("dq", dq), ("dk", dk), ("dv", dv)] {
        if t.shape != dims {
            return Err(OpError::shape(OP, name, &t.shape, dims.to_vec()));
        }
        if t.strides[3] != 1 {
            return Err(OpError::unsupported(
                OP,
                "head-dim stride",
                t.strides[3],
                format!("`{name}` must be contiguous along the head dim (stride 1)"),
            ));
        }
    }
    let [b, s, h, d] = dims;
    let problem = BackwardProblem {
        head_dim: d,
        causal,
    };
    crate::record::note(|| crate::record::Planned::AttentionBackward(problem));
    let BackwardPlan {
        q: cfg_q,
        kv: cfg_kv,
    } = plan_backward(kernel, &problem, &DeviceProfile::of(client))?;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let stats = || Tensor::<R, f32>::empty(client, &[b, h, s]);
    let (row_max, row_sum, delta) = (stats()?, stats()?, stats()?);
    let (count_q, dim_q) = grid_1d(client, b * h * s * cfg_q.splits);
    let (count_kv, dim_kv) = grid_1d(client, b * h * s * cfg_kv.splits);
    // SAFETY: every view was bounds-checked when made and has the validated shape with unit
    // stride over D; the kernels guard on B·H·S·splits units and index only inside those
    // shapes (a chunk's dims past D are skipped).
    unsafe {
        megabyte_kernels::attention::attention_backward_q::launch_unchecked::<E, R>(
            client,
            count_q,
            dim_q,
            q.arg(),
            k.arg(),
            v.arg(),
            d_out.arg(),
            dq.arg(),
            row_max.arg(),
            row_sum.arg(),
            delta.arg(),
            q.offset_u32(OP)?,
            k.offset_u32(OP)?,
            v.offset_u32(OP)?,
            dq.offset_u32(OP)?,
            scale,
            cfg_q,
        );
        megabyte_kernels::attention::attention_backward_kv::launch_unchecked::<E, R>(
            client,
            count_kv,
            dim_kv,
            q.arg(),
            k.arg(),
            v.arg(),
            d_out.arg(),
            row_max.arg(),
            row_sum.arg(),
            delta.arg(),
            dk.arg(),
            dv.arg(),
            q.offset_u32(OP)?,
            k.offset_u32(OP)?,
            v.offset_u32(OP)?,
            dk.offset_u32(OP)?,
            dv.offset_u32(OP)?,
            scale,
            cfg_kv,
        );
    }
    Ok(())
}

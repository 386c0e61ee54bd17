//! The attention planners: which flash kernel the forward runs and with what comptime shape,
//! and how the backward spreads each row's gradients over units.

use megabyte_kernels::attention::{BackwardConfig, FlashCmmaConfig, FlashConfig, RowsConfig};

use super::{check_head_dim, AttentionKernel, AttentionProblem, OP};
use crate::error::OpError;
use crate::gemm::{no_cmma, CMMA_PLANE};
use crate::profile::{DeviceProfile, Dtype};

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
    check_head_dim(OP, d, "the flash kernel supports")?;
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
        return Err(no_cmma(OP, dtype, "AttentionKernel::Auto"));
    }
    let d = problem.head_dim;
    check_head_dim(OP, d, "the flash kernels support")?;
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
/// reads of the device is the profile; [`flash_attention_with`](super::flash_attention_with)
/// runs what it returns.
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
    check_head_dim(
        "attention_backward",
        head_dim,
        "the backward kernels support",
    )?;
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

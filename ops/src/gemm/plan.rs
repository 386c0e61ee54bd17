//! The GEMM's planners: which main loop runs, its tiles and vector widths, and its grid.

use cubecl::prelude::*;
use megabyte_kernels::activation::ActivationKind;
use megabyte_kernels::gemm::{CmmaConfig, GemmConfig, FRAGMENT};

use super::{GemmProblem, OP};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::profile::{DeviceProfile, Dtype};
use crate::tensor::TensorView;

/// One operand of a GEMM call as the planner sees it: element strides (batch, rows, cols; a
/// broadcast batch has stride 0) and the element offset of its first element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OperandLayout {
    pub strides: [usize; 3],
    pub offset: usize,
}

impl OperandLayout {
    /// A contiguous (rows, cols) matrix, broadcast over the batch.
    pub fn row_major(cols: usize) -> Self {
        OperandLayout {
            strides: [0, cols, 1],
            offset: 0,
        }
    }

    /// The transpose of a contiguous (cols, rows) matrix, broadcast over the batch.
    pub fn transposed(rows: usize) -> Self {
        OperandLayout {
            strides: [0, 1, rows],
            offset: 0,
        }
    }

    pub(super) fn of<R: Runtime, E>(v: &TensorView<R, E>) -> Self {
        OperandLayout {
            strides: [v.strides[0], v.strides[1], v.strides[2]],
            offset: v.offset,
        }
    }
}

/// A GEMM call as its planner sees it: the problem, the element type, each operand's layout and
/// which epilogue stages run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmCall {
    pub problem: GemmProblem,
    pub dtype: Dtype,
    pub a: OperandLayout,
    pub b: OperandLayout,
    pub bias: bool,
    pub activation: Option<ActivationKind>,
    pub residual: bool,
}

/// The main loop a GEMM runs, with its comptime shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmPlan {
    /// The shared-memory tiled kernel, or (`registers`) the one streaming from global memory.
    Tiled(GemmConfig),
    /// Tensor-core fragments (or their plain-loop twin, `emulated`).
    Cmma(CmmaConfig),
}

impl GemmPlan {
    /// Output rows and columns per cube.
    pub fn block(&self) -> (usize, usize) {
        match self {
            GemmPlan::Tiled(c) => (c.block_m, c.block_n),
            GemmPlan::Cmma(c) => (c.block_m, c.block_n),
        }
    }

    /// Units per cube.
    pub fn cube_dim(&self) -> CubeDim {
        match self {
            GemmPlan::Tiled(c) => {
                CubeDim::new_2d((c.block_n / c.tile_n) as u32, (c.block_m / c.tile_m) as u32)
            }
            GemmPlan::Cmma(c) => {
                CubeDim::new_2d(c.plane_size as u32, (c.planes_m * c.planes_n) as u32)
            }
        }
    }

    /// A short name for tables: kernel, block, unit tile or planes, vectors, epilogue.
    pub fn name(&self) -> String {
        let epi = |bias: bool, act: Option<ActivationKind>, res: bool| {
            let mut s = String::new();
            if bias {
                s.push_str("_bias");
            }
            if let Some(a) = act {
                s.push_str(&format!("_{a:?}").to_lowercase());
            }
            if res {
                s.push_str("_residual");
            }
            s
        };
        let along = |k: bool| if k { "k" } else { "mn" };
        match self {
            GemmPlan::Tiled(c) => format!(
                "gemm{}_{}x{}x{}_{}x{}_a{}{}_b{}{}_o{}{}",
                if c.registers { "_registers" } else { "" },
                c.block_m,
                c.block_n,
                c.block_k,
                c.tile_m,
                c.tile_n,
                c.vector_a,
                along(c.a_along_k),
                c.vector_b,
                along(c.b_along_k),
                c.vector_out,
                epi(c.bias, c.activation, c.residual)
            ),
            GemmPlan::Cmma(c) => format!(
                "gemm_cmma{}_{}x{}x{}_{}x{}planes_a{}{}_b{}{}_o{}{}",
                if c.emulated { "_emulated" } else { "" },
                c.block_m,
                c.block_n,
                c.block_k,
                c.planes_m,
                c.planes_n,
                c.vector_a,
                along(c.a_along_k),
                c.vector_b,
                along(c.b_along_k),
                c.vector_out,
                epi(c.bias, c.activation, c.residual)
            ),
        }
    }
}

/// The grid of a GEMM with `block_m × block_n` blocks: (N blocks, M blocks × batch over y and
/// z).
pub(crate) fn grid(
    p: &GemmProblem,
    (block_m, block_n): (usize, usize),
) -> Result<CubeCount, OpError> {
    let yz = p.m.div_ceil(block_m) * p.batch;
    let (y, z) = if yz <= MAX_GRID {
        (yz, 1)
    } else {
        (MAX_GRID, yz.div_ceil(MAX_GRID))
    };
    if z > MAX_GRID {
        return Err(OpError::unsupported(
            OP,
            "row blocks × batch",
            yz,
            format!("at most {} fit in one launch", MAX_GRID * MAX_GRID),
        ));
    }
    let nb = p.n.div_ceil(block_n);
    Ok(CubeCount::Static(nb as u32, y as u32, z as u32))
}

/// Most cubes along one grid dimension (the WebGPU and CUDA y/z limit).
const MAX_GRID: usize = 65_535;

/// The widest vector the GEMM kernels load: 4 (their register tiles are sized for it).
pub const MAX_VECTOR: usize = 4;

/// Vector widths of a GEMM's loads and stores, and the direction of each operand's vectors.
struct OperandVectors {
    a: usize,
    a_along_k: bool,
    b: usize,
    b_along_k: bool,
    out: usize,
}

/// Vectors along each operand's unit-stride dimension, when lengths, strides and offset all
/// divide; otherwise scalar loads. The output's vectors run along N.
fn operand_vectors(call: &GemmCall, profile: &DeviceProfile) -> OperandVectors {
    let p = &call.problem;
    let widest = |lengths: &[usize]| {
        profile
            .vector_sizes(call.dtype)
            .filter(|&v| v <= MAX_VECTOR)
            .find(|&v| lengths.iter().all(|&n| n % v == 0))
            .unwrap_or(1)
    };
    let (sa, oa) = (&call.a.strides, call.a.offset);
    let a_along_k = sa[1] != 1 || sa[2] == 1;
    let va = if a_along_k && sa[2] == 1 {
        widest(&[p.k, sa[1], sa[0], oa])
    } else if !a_along_k {
        widest(&[p.m, sa[2], sa[0], oa])
    } else {
        1
    };
    let (sb, ob) = (&call.b.strides, call.b.offset);
    let b_along_k = sb[2] != 1 && sb[1] == 1;
    let vb = if b_along_k {
        widest(&[p.k, sb[2], sb[0], ob])
    } else if sb[2] == 1 {
        widest(&[p.n, sb[1], sb[0], ob])
    } else {
        1
    };
    OperandVectors {
        a: va,
        a_along_k,
        b: vb,
        b_along_k,
        out: widest(&[p.n]),
    }
}

/// `$config { $fields }` (a [`GemmConfig`] or a [`CmmaConfig`]) with the fields both take from
/// the call alike: the vector widths and directions [`operand_vectors`] picks and the epilogue
/// stages.
macro_rules! with_call {
    ($config:ident { $($field:ident $(: $value:expr)?),* $(,)? }, $call:expr, $profile:expr) => {{
        let v = operand_vectors($call, $profile);
        $config {
            $($field $(: $value)?,)*
            vector_a: v.a,
            a_along_k: v.a_along_k,
            vector_b: v.b,
            b_along_k: v.b_along_k,
            vector_out: v.out,
            bias: $call.bias,
            activation: $call.activation,
            residual: $call.residual,
        }
    }};
}

/// Which GEMM main loop runs. All compute the same function with the same epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// `Cmma` for f16 and bf16 on devices whose properties list 16 × 16 × 16 tensor-core
    /// fragments of that type with f32 accumulation and 32-unit planes; otherwise `Registers`
    /// for row-major operands on devices without plane (warp) operations, which in practice are
    /// CPU drivers such as lavapipe; `Tiled` otherwise.
    Auto,
    /// Tensor cores: 16 × 16 × 16 CMMA fragments (f16/bf16 inputs, f32 accumulation) on operand
    /// tiles staged in shared memory. f16 and bf16 only, on a device that has them.
    Cmma,
    /// The `Cmma` kernel with each fragment product computed by plain loops: the same staging,
    /// fragment addressing and epilogue, on any device and any element type. It exists to test
    /// the CMMA path's data movement where there are no tensor cores; it is slow.
    CmmaEmulated,
    /// Operand tiles staged through shared memory, a register tile per unit.
    Tiled,
    /// No shared memory: each unit streams its rows and columns from global memory. Needs A
    /// contiguous along K and B contiguous along N.
    Registers,
}

/// Cubes below which `Registers` shrinks its blocks (a handful per CPU thread is too few).
const MIN_CUBES: usize = 16;

fn shared_memory_error(bytes: usize, profile: &DeviceProfile) -> OpError {
    OpError::unsupported(
        OP,
        "shared memory bytes",
        bytes,
        format!(
            "the device allows {} per cube",
            profile.hardware.max_shared_memory_size
        ),
    )
}

/// The plan of a GEMM call on a device: `Auto` takes tensor cores where the profile has them
/// for the call's dtype (see [`GemmKernel`]). Errors name what the device or the call lacks.
pub fn plan(
    kind: GemmKernel,
    call: &GemmCall,
    profile: &DeviceProfile,
) -> Result<GemmPlan, OpError> {
    let plan = match kind {
        GemmKernel::Auto if profile.cmma(call.dtype) => {
            GemmPlan::Cmma(plan_cmma(call, profile, false)?)
        }
        GemmKernel::Cmma => GemmPlan::Cmma(plan_cmma(call, profile, false)?),
        GemmKernel::CmmaEmulated => GemmPlan::Cmma(plan_cmma(call, profile, true)?),
        other => GemmPlan::Tiled(plan_tiled(other, call, profile)?),
    };
    grid(&call.problem, plan.block())?;
    Ok(plan)
}

/// The shared-memory or registers kernel's tiles and vector widths; what the gathering
/// global-to-local GEMM (`local_input`), which has no CMMA form, runs.
pub fn plan_tiled(
    kind: GemmKernel,
    call: &GemmCall,
    profile: &DeviceProfile,
) -> Result<GemmConfig, OpError> {
    let p = &call.problem;
    let (sa, sb) = (&call.a.strides, &call.b.strides);
    let row_major = sa[2] == 1 && sb[2] == 1;
    let kind = match kind {
        GemmKernel::Auto if row_major && !profile.plane_ops => GemmKernel::Registers,
        GemmKernel::Auto => GemmKernel::Tiled,
        GemmKernel::Cmma | GemmKernel::CmmaEmulated => {
            return Err(OpError::unsupported(
                OP,
                "tensor-core fragment side",
                FRAGMENT,
                format!(
                    "{kind:?}: the gathering global-to-local GEMM has no CMMA form; use \
                     GemmKernel::Auto, Tiled or Registers"
                ),
            ))
        }
        GemmKernel::Registers if !row_major => {
            return Err(OpError::unsupported(
                OP,
                "operand column stride",
                if sa[2] != 1 { sa[2] } else { sb[2] },
                "the registers GEMM needs `a` and `b` contiguous along their last dim; \
                         use GemmKernel::Tiled",
            ))
        }
        other => other,
    };
    let cubes = |bm: usize, bn: usize| p.m.div_ceil(bm) * p.n.div_ceil(bn) * p.batch;
    // Drivers that report no multiprocessor count (lavapipe) count as 8.
    let sms = profile
        .hardware
        .num_streaming_multiprocessors
        .map_or(8, |n| n as usize);
    // (block_m, block_n, block_k, tile_m, tile_n). Registers: a SIMD batch of units on a CPU
    // driver shares each A load across its lanes and each B load across the unit's rows, so
    // tall unit tiles pay (32×16 measured best on lavapipe), as long as there are cubes enough
    // for every thread.
    let (block_m, block_n, block_k, tile_m, tile_n) = match kind {
        GemmKernel::Registers if p.m <= 16 => (16, 64, 4, 4, 8),
        // Narrow outputs: still 8 units across, so a SIMD batch of lanes shares its A rows.
        GemmKernel::Registers if p.n <= 32 => (32, 32, 4, 8, 4),
        GemmKernel::Registers if cubes(256, 128) >= MIN_CUBES => (256, 128, 4, 32, 16),
        GemmKernel::Registers if cubes(64, 128) >= MIN_CUBES => (64, 128, 4, 8, 16),
        GemmKernel::Registers => (32, 64, 4, 8, 8),
        // Few rows (generation, small batches): thin blocks so a cube does not mostly compute
        // padding.
        _ if p.m <= 16 => (16, 64, 16, 4, 4),
        // Too few large blocks to fill the device's multiprocessors: smaller ones.
        _ if cubes(128, 64) < sms => (64, 64, 16, 8, 8),
        _ => (128, 64, 16, 16, 8),
    };
    let cfg = with_call!(
        GemmConfig {
            block_m,
            block_n,
            block_k,
            tile_m,
            tile_n,
            registers: kind == GemmKernel::Registers,
        },
        call,
        profile
    );
    debug_assert!(cfg.is_valid(), "{cfg:?}");
    let smem = cfg.shared_words() * 4;
    if smem > profile.hardware.max_shared_memory_size {
        return Err(shared_memory_error(smem, profile));
    }
    Ok(cfg)
}

/// Units per plane the CMMA kernel is written for: a fragment is shared by one 32-lane warp.
pub(crate) const CMMA_PLANE: usize = 32;

/// The error of a tensor-core plan for `dtype` on a device without its fragments; `auto` is
/// the kernel choice to use instead.
pub(crate) fn no_cmma(op: &'static str, dtype: Dtype, auto: &str) -> OpError {
    OpError::unsupported(
        op,
        "tensor-core fragments for element bytes",
        dtype.bytes(),
        format!(
            "this device lists no 16x16x16 {} CMMA with f32 accumulation in 32-unit planes; \
             use {auto}",
            dtype.name()
        ),
    )
}

/// True when the device multiplies 16 × 16 × 16 fragments of E with f32 accumulation in
/// 32-unit planes (CUDA tensor cores for f16 and bf16).
pub fn cmma_supported<R: Runtime, E: FloatElement>(client: &ComputeClient<R>) -> bool {
    DeviceProfile::of(client).cmma(E::DTYPE)
}

/// The CMMA kernel's tiles and vector widths (`emulated`: the plain-loop fragments).
fn plan_cmma(
    call: &GemmCall,
    profile: &DeviceProfile,
    emulated: bool,
) -> Result<CmmaConfig, OpError> {
    if !emulated && !profile.cmma(call.dtype) {
        return Err(no_cmma(OP, call.dtype, "GemmKernel::Auto"));
    }
    let p = &call.problem;
    // Few rows (generation): one plane-row of fragments; otherwise 2 × 2 planes of 32 × 32.
    let (block_m, planes_m) = if p.m <= FRAGMENT { (16, 1) } else { (64, 2) };
    let (block_n, planes_n) = if p.m <= FRAGMENT { (64, 4) } else { (64, 2) };
    let mut cfg = with_call!(
        CmmaConfig {
            block_m,
            block_n,
            block_k: 2 * FRAGMENT,
            planes_m,
            planes_n,
            plane_size: CMMA_PLANE,
            emulated,
        },
        call,
        profile
    );
    let max_smem = profile.hardware.max_shared_memory_size;
    if cfg.shared_bytes(call.dtype.bytes()) > max_smem {
        cfg.block_k = FRAGMENT;
    }
    let smem = cfg.shared_bytes(call.dtype.bytes());
    if smem > max_smem {
        return Err(shared_memory_error(smem, profile));
    }
    debug_assert!(cfg.is_valid(), "{cfg:?}");
    Ok(cfg)
}

//! GEMM with fused epilogues: `out[b] = act(scale · (A[b] · B[b]) + bias) + residual[b]`, where
//! `A[b]` is (M, K), `B[b]` is (K, N) and `out[b]` is (M, N), for b in 0..batch. A and B are
//! read through arbitrary element strides over (batch, rows, cols) plus an element offset, so
//! transposed operands, a weight broadcast over the batch (stride 0) or a slice of a fused
//! projection need no copy. The output and the residual are contiguous. Out of range rows and
//! columns load as zero, so no size needs to divide a tile.
//!
//! | variant | file | what | `GemmKernel::Auto` picks it |
//! | --- | --- | --- | --- |
//! | [`gemm`] with [`main_loop`] | `tiled.rs` | a cube computes a `block_m × block_n` block, walking K in `block_k` steps: A and B tiles staged in shared memory as f32, each unit accumulating a `tile_m × tile_n` register tile; global loads are vectors along whichever dimension of an operand is contiguous (`a_along_k`, `b_along_k`) | devices with plane ops, or any operand not contiguous along its last dim |
//! | [`gemm`] with [`register_main_loop`] (`registers`) | `registers.rs` | the same tiles with no shared memory and no barriers: each unit streams its rows and columns from cache | row-major operands on devices without plane ops (CPU drivers such as lavapipe) |
//! | [`gemm_cmma`] | `cmma.rs` | operand tiles staged in shared memory as F, products on 16 × 16 × 16 CMMA fragments with f32 accumulation; `emulated` computes the fragments with loops | f16/bf16 on devices whose properties list the fragment and 32-unit planes |
//! | [`gemm_naive`] | `naive.rs` | one unit per output, no epilogue | never: the baseline of tests and benches |
//!
//! Every variant ends in the same fused epilogue (`epilogue.rs`); the global-to-local GEMM
//! (`crate::local_input`) reuses the main loops with a gathering epilogue of its own. The
//! launchers and the planner are `megabyte_ops::gemm`. Tested against
//! `megabyte_reference::gemm` by `cargo test -p megabyte-tests --test gemm`; benched by
//! `cargo bench -p megabyte-benches --bench gemm`. The fragment helpers are in
//! `crate::fragment`.

use cubecl::prelude::*;

mod cmma;
mod epilogue;
mod naive;
mod registers;
mod tiled;

pub use crate::fragment::FRAGMENT;
pub use cmma::*;
pub use epilogue::*;
pub use naive::*;
pub use registers::*;
pub use tiled::*;

use crate::activation::ActivationKind;

/// The operands of both GEMM kernels: A (batch, M, K) and B (batch, K, N) through their strides
/// from their element offsets, the bias (N) and the residual and output (batch, M, N),
/// contiguous, and the scale of the product. The bias and the residual are read only when the
/// config enables them (the launcher passes placeholders otherwise).
#[derive(CubeLaunch, CubeType)]
pub struct GemmIo<F: Float, NA: Size, NB: Size, NO: Size> {
    pub a: Tensor<Vector<F, NA>>,
    pub b: Tensor<Vector<F, NB>>,
    pub bias: Tensor<Vector<F, NO>>,
    pub residual: Tensor<Vector<F, NO>>,
    pub out: Tensor<Vector<F, NO>>,
    pub a_offset: usize,
    pub b_offset: usize,
    pub scale: f32,
}

/// Width of the shared-memory vectors, and the granularity of register tiles.
pub const STAGE_VECTOR: usize = 4;

/// Comptime shape and epilogue of [`gemm()`]. The launcher picks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    /// Output rows per cube.
    pub block_m: usize,
    /// Output columns per cube.
    pub block_n: usize,
    /// Depth of one shared-memory step.
    pub block_k: usize,
    /// Output rows per unit (register tile), a multiple of [`STAGE_VECTOR`].
    pub tile_m: usize,
    /// Output columns per unit (register tile), a multiple of [`STAGE_VECTOR`].
    pub tile_n: usize,
    /// Vector width of A's loads; equals the launch's vector size NA.
    pub vector_a: usize,
    /// A's vectors run along K (A row-major) rather than along M (A transposed).
    pub a_along_k: bool,
    /// Vector width of B's loads; equals NB.
    pub vector_b: usize,
    /// B's vectors run along K (B transposed) rather than along N (B row-major).
    pub b_along_k: bool,
    /// Vector width of the output, bias and residual; equals NO and divides `tile_n`.
    pub vector_out: usize,
    /// Add `bias[n]`.
    pub bias: bool,
    /// Apply an activation after the bias.
    pub activation: Option<ActivationKind>,
    /// Add `residual[b, m, n]` last.
    pub residual: bool,
    /// Run [`register_main_loop()`] instead of the shared-memory loop of [`main_loop()`] (A must
    /// be read with vectors along K and B with vectors along N).
    pub registers: bool,
}

impl GemmConfig {
    pub fn epilogue(&self) -> EpilogueConfig {
        EpilogueConfig {
            vector_out: self.vector_out,
            bias: self.bias,
            activation: self.activation,
            residual: self.residual,
        }
    }

    /// Units per cube.
    pub fn units(&self) -> usize {
        (self.block_m / self.tile_m) * (self.block_n / self.tile_n)
    }

    /// f32 words of shared memory.
    pub fn shared_words(&self) -> usize {
        self.block_k * (self.block_m + self.block_n)
    }

    /// True when the tiles split evenly into units, stage vectors and load vectors, as the
    /// kernel requires.
    pub fn is_valid(&self) -> bool {
        let sv = STAGE_VECTOR;
        let fits = |along_k: bool, v: usize| {
            v <= sv && sv.is_multiple_of(v) && (!along_k || self.block_k.is_multiple_of(v))
        };
        self.block_m.is_multiple_of(self.tile_m)
            && self.block_n.is_multiple_of(self.tile_n)
            && self.tile_m.is_multiple_of(sv)
            && self.tile_n.is_multiple_of(sv)
            && self.tile_n.is_multiple_of(self.vector_out)
            && self.vector_out <= sv
            && fits(self.a_along_k, self.vector_a)
            && fits(self.b_along_k, self.vector_b)
    }
}

/// Where a stage reads one operand's tiles: element (o, k) (o along M for A, along N for B)
/// at scalar index `base + o·s_o + k·s_k`; the cube's tiles start at o = `o0`; elements at
/// o ≥ `o_len` or k ≥ `k_len` stage as zero.
#[derive(CubeType, Clone, Copy)]
pub struct TileSource {
    pub base: usize,
    pub s_o: usize,
    pub s_k: usize,
    pub o0: usize,
    pub o_len: usize,
    pub k_len: usize,
}

/// The comptime shape of one operand's stage: a `block_o × block_k` tile, its global loads in
/// vectors of `nv` along k (`along_k`) or along o, spread over the cube's `units` units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StageShape {
    pub block_o: usize,
    pub block_k: usize,
    pub nv: usize,
    pub along_k: bool,
    pub units: usize,
}

/// A [`TileSource`] from its fields, in their order.
#[cube]
pub fn source(
    base: usize,
    s_o: usize,
    s_k: usize,
    o0: usize,
    o_len: usize,
    k_len: usize,
) -> TileSource {
    TileSource {
        base,
        s_o,
        s_k,
        o0,
        o_len,
        k_len,
    }
}

/// `stage_shapes()` for a GEMM config (both have the block and operand fields it reads): the
/// stage shapes of A (o along M) and B (o along N).
macro_rules! stage_shapes_of {
    ($cfg:ty) => {
        impl $cfg {
            /// The stage shapes of A and B.
            pub fn stage_shapes(&self) -> (StageShape, StageShape) {
                let shape = |block_o, nv, along_k| StageShape {
                    block_o,
                    block_k: self.block_k,
                    nv,
                    along_k,
                    units: self.units(),
                };
                (
                    shape(self.block_m, self.vector_a, self.a_along_k),
                    shape(self.block_n, self.vector_b, self.b_along_k),
                )
            }
        }
    };
}
pub(crate) use stage_shapes_of;

stage_shapes_of!(GemmConfig);

/// Where a cube's block lies: the batch index and the first output row and column.
#[derive(CubeType, Clone, Copy)]
pub struct BlockPos {
    pub batch: usize,
    pub m0: usize,
    pub n0: usize,
}

/// The cube's block, from a grid of (N blocks, M blocks × batch spread over y and z). Past the
/// end (the y·z spread may overshoot) `batch` comes back equal to the batch count.
#[cube]
pub fn block_pos(
    m: usize,
    batch: usize,
    #[comptime] block_m: usize,
    #[comptime] block_n: usize,
) -> BlockPos {
    let m_blocks = m.div_ceil(block_m);
    let yz = CUBE_POS_Z as usize * CUBE_COUNT_Y as usize + CUBE_POS_Y as usize;
    let b = yz / m_blocks;
    BlockPos {
        batch: select(b < batch, b, batch),
        m0: (yz % m_blocks) * block_m,
        n0: CUBE_POS_X as usize * block_n,
    }
}

/// `out[b, m, n] = act(scale · Σ_k A[b, m, k] · B[b, k, n] + bias[n]) + residual[b, m, n]`,
/// through the main loop the config names. `bias` and `residual` are read only when the config
/// enables them (the launcher passes placeholders otherwise). The grid is (N blocks, M blocks ×
/// batch over y and z).
#[cube(launch_unchecked)]
pub fn gemm<F: Float, NA: Size, NB: Size, NO: Size, S: Size>(
    io: &mut GemmIo<F, NA, NB, NO>,
    #[comptime] cfg: GemmConfig,
) {
    let m = io.a.shape(1);
    let n = io.b.shape(2);
    let batch = io.out.shape(0);
    let pos = block_pos(m, batch, cfg.block_m, cfg.block_n);
    // A cube wholly past the end returns before any barrier, as a whole.
    if pos.batch < batch {
        let mut acc =
            Array::<Vector<f32, S>>::new(comptime!(cfg.tile_m * cfg.tile_n / STAGE_VECTOR));
        main_loop::<F, NA, NB, S>(&io.a, &io.b, io.a_offset, io.b_offset, pos, &mut acc, cfg);
        write_tile::<F, NA, NB, NO, S>(io, &acc, pos, m, n, cfg);
    }
}

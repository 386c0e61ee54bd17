//! Tiled GEMM with register blocking and a fused epilogue, and the naive one-unit-per-output
//! GEMM it is measured against.
//!
//! `out[b] = act(scale · (A[b] · B[b]) + bias) + residual[b]`, where `A[b]` is (M, K), `B[b]` is
//! (K, N) and `out[b]` is (M, N), for b in 0..batch. A and B are read through arbitrary element
//! strides over (batch, rows, cols) plus an element offset, so transposed operands, a weight
//! broadcast over the batch (stride 0) or a slice of a fused projection need no copy. The
//! output and the residual are contiguous.
//!
//! A cube computes a `block_m × block_n` block of the output. It walks K in steps of
//! `block_k`: the units load an A tile and a B tile into shared memory (as f32, converted
//! once), synchronise, and each unit accumulates its own `tile_m × tile_n` register tile from
//! them, `tile_m + tile_n` shared loads per `tile_m · tile_n` FMAs. Global loads are vectors
//! along whichever dimension of an operand is contiguous (`a_along_k`, `b_along_k`); out of range
//! rows and columns load as zero, so no size needs to divide a tile.

use cubecl::prelude::*;

use crate::activation::{apply_activation, ActivationKind};

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
    /// Run [`register_main_loop()`] instead of the shared-memory [`gemm_main_loop()`] (A must
    /// be read with vectors along K and B with vectors along N).
    pub registers: bool,
}

impl GemmConfig {
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

/// Stages a `block_k × block_o` tile of an operand into shared memory as f32 vectors of
/// [`STAGE_VECTOR`] along o: `smem[k · block_o/S + o/S]`. Element (o, k) of the operand is at
/// scalar index `base + o·s_o + k·s_k`; out of range elements stage as zero. Global loads are
/// vectors of NV along k (`along_k`) or along o. Along o, `o_len` must be a multiple of NV.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_tile<F: Float, NV: Size, S: Size>(
    t: &Tensor<Vector<F, NV>>,
    smem: &mut SharedMemory<Vector<f32, S>>,
    base: usize,
    s_o: usize,
    s_k: usize,
    o0: usize,
    o_len: usize,
    k0: usize,
    k_len: usize,
    #[comptime] block_o: usize,
    #[comptime] block_k: usize,
    #[comptime] nv: usize,
    #[comptime] along_k: bool,
    #[comptime] units: usize,
) {
    let sv = STAGE_VECTOR;
    let quads = comptime!(block_o / STAGE_VECTOR);
    let unit = UNIT_POS as usize;
    if comptime!(along_k) {
        // A task: one quad of o × nv consecutive k, from STAGE_VECTOR loads along k.
        let groups = comptime!(block_k / nv);
        let tasks = comptime!(quads * (block_k / nv));
        #[unroll]
        for l in 0..comptime!(tasks.div_ceil(units)) {
            let id = l * units + unit;
            if id < tasks {
                let q = id / groups;
                let kg = (id % groups) * nv;
                let gk = k0 + kg;
                let mut rows = Array::<Vector<f32, NV>>::new(sv);
                #[unroll]
                for r in 0..sv {
                    let go = o0 + q * sv + r;
                    let mut v = Vector::<f32, NV>::new(0.0);
                    if go < o_len && gk < k_len {
                        v = Vector::cast_from(t[(base + go * s_o + gk * s_k) / nv]);
                    }
                    rows[r] = v;
                }
                #[unroll]
                for e in 0..nv {
                    let mut quad = Vector::<f32, S>::new(0.0);
                    #[unroll]
                    for r in 0..sv {
                        quad[r] = rows[r][e];
                    }
                    smem[(kg + e) * quads + q] = quad;
                }
            }
        }
    } else {
        // A task: one quad of o at one k, from STAGE_VECTOR / nv loads along o.
        let tasks = comptime!(quads * block_k);
        #[unroll]
        for l in 0..comptime!(tasks.div_ceil(units)) {
            let id = l * units + unit;
            if id < tasks {
                let kk = id / quads;
                let q = id % quads;
                let gk = k0 + kk;
                let mut quad = Vector::<f32, S>::new(0.0);
                #[unroll]
                for r in 0..comptime!(STAGE_VECTOR / nv) {
                    let go = o0 + q * sv + r * nv;
                    let mut v = Vector::<f32, NV>::new(0.0);
                    if go < o_len && gk < k_len {
                        v = Vector::cast_from(t[(base + go * s_o + gk * s_k) / nv]);
                    }
                    #[unroll]
                    for e in 0..nv {
                        quad[r * nv + e] = v[e];
                    }
                }
                smem[kk * quads + q] = quad;
            }
        }
    }
}

/// The main loop: accumulates this unit's `tile_m × tile_n` register tile of `A[b]·B[b]` for the
/// block at (m0, n0) into `acc`: `tile_m` rows of `tile_n / S` vectors along n, zeroed here.
/// `a` is (batch, M, K), `b` is (batch, K, N), both with element offsets. Every unit of the
/// cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn gemm_main_loop<F: Float, NA: Size, NB: Size, S: Size>(
    a: &Tensor<Vector<F, NA>>,
    b: &Tensor<Vector<F, NB>>,
    a_offset: usize,
    b_offset: usize,
    pos: BlockPos,
    acc: &mut Array<Vector<f32, S>>,
    #[comptime] cfg: GemmConfig,
) {
    let sv = STAGE_VECTOR;
    let units = comptime!(cfg.units());
    let qm = comptime!(cfg.block_m / STAGE_VECTOR);
    let qn = comptime!(cfg.block_n / STAGE_VECTOR);
    let tqm = comptime!(cfg.tile_m / STAGE_VECTOR);
    let tqn = comptime!(cfg.tile_n / STAGE_VECTOR);
    let m = a.shape(1);
    let k_len = a.shape(2);
    let n = b.shape(2);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;

    let a_base = a_offset + pos.batch * a.stride(0);
    let b_base = b_offset + pos.batch * b.stride(0);

    let mut a_s =
        SharedMemory::<Vector<f32, S>>::new(comptime!(cfg.block_k * cfg.block_m / STAGE_VECTOR));
    let mut b_s =
        SharedMemory::<Vector<f32, S>>::new(comptime!(cfg.block_k * cfg.block_n / STAGE_VECTOR));
    let mut bq = Array::<Vector<f32, S>>::new(tqn);

    #[unroll]
    for i in 0..comptime!(cfg.tile_m * cfg.tile_n / STAGE_VECTOR) {
        acc[i] = Vector::new(0.0);
    }

    let steps = k_len.div_ceil(cfg.block_k);
    let mut step = 0;
    while step < steps {
        let k0 = step * cfg.block_k;
        stage_tile::<F, NA, S>(
            a,
            &mut a_s,
            a_base,
            a.stride(1),
            a.stride(2),
            pos.m0,
            m,
            k0,
            k_len,
            cfg.block_m,
            cfg.block_k,
            cfg.vector_a,
            cfg.a_along_k,
            units,
        );
        stage_tile::<F, NB, S>(
            b,
            &mut b_s,
            b_base,
            b.stride(2),
            b.stride(1),
            pos.n0,
            n,
            k0,
            k_len,
            cfg.block_n,
            cfg.block_k,
            cfg.vector_b,
            cfg.b_along_k,
            units,
        );
        sync_cube();

        // Row quad by row quad, the whole stage depth at a time: a quad's accumulators stay
        // in registers across the k loop (on SIMD CPU drivers every lane's tile lives in vector
        // registers, and a whole tile does not fit).
        #[unroll]
        for iq in 0..tqm {
            #[unroll]
            for kk in 0..cfg.block_k {
                let a4 = a_s[kk * qm + ty * tqm + iq];
                #[unroll]
                for j in 0..tqn {
                    bq[j] = b_s[kk * qn + tx * tqn + j];
                }
                #[unroll]
                for r in 0..sv {
                    let av = Vector::<f32, S>::new(a4[r]);
                    #[unroll]
                    for j in 0..tqn {
                        acc[(iq * sv + r) * tqn + j] += av * bq[j];
                    }
                }
            }
        }
        sync_cube();
        step += 1;
    }
}

/// Output vector `jv` (NO lanes along n) of row `i` of a unit's register tile, as left by
/// [`gemm_main_loop()`] or [`register_main_loop()`] (rows of `tile_n / STAGE_VECTOR` stage
/// vectors).
#[cube]
pub fn tile_vector<NO: Size, S: Size>(
    acc: &Array<Vector<f32, S>>,
    i: usize,
    jv: usize,
    #[comptime] cfg: GemmConfig,
) -> Vector<f32, NO> {
    let tqn = comptime!(cfg.tile_n / STAGE_VECTOR);
    let vo = cfg.vector_out;
    let sv = STAGE_VECTOR;
    let mut v = Vector::<f32, NO>::new(0.0);
    #[unroll]
    for e in 0..vo {
        let j = jv * vo + e;
        v[e] = acc[i * tqn + j / sv][j % sv];
    }
    v
}

/// The fused epilogue of one output vector: `out[at] = act(scale · acc + bias[n]) +
/// residual[at]`, where `n` is the vector's first column and `at` its vector index in `out`
/// (and in the residual). `vo` is NO.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_epilogue<F: Float, NO: Size>(
    acc: Vector<f32, NO>,
    bias: &Tensor<Vector<F, NO>>,
    residual: &Tensor<Vector<F, NO>>,
    out: &mut Tensor<Vector<F, NO>>,
    n: usize,
    at: usize,
    scale: f32,
    #[comptime] vo: usize,
    #[comptime] has_bias: bool,
    #[comptime] activation: Option<ActivationKind>,
    #[comptime] has_residual: bool,
) {
    let mut v = acc * Vector::new(scale);
    if comptime!(has_bias) {
        v += Vector::cast_from(bias[n / vo]);
    }
    if comptime!(activation.is_some()) {
        v = apply_activation::<f32, NO>(v, comptime!(activation.unwrap().id()));
    }
    if comptime!(has_residual) {
        v += Vector::cast_from(residual[at]);
    }
    out[at] = Vector::cast_from(v);
}

/// The fused epilogue: writes a unit's register tile (as left by [`gemm_main_loop()`]) to
/// `out[b, m, n] = act(scale · acc + bias[n]) + residual[b, m, n]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn write_tile<F: Float, NO: Size, S: Size>(
    acc: &Array<Vector<f32, S>>,
    bias: &Tensor<Vector<F, NO>>,
    residual: &Tensor<Vector<F, NO>>,
    out: &mut Tensor<Vector<F, NO>>,
    pos: BlockPos,
    m: usize,
    n: usize,
    scale: f32,
    #[comptime] cfg: GemmConfig,
) {
    let vo = cfg.vector_out;
    let row0 = pos.m0 + UNIT_POS_Y as usize * cfg.tile_m;
    let col0 = pos.n0 + UNIT_POS_X as usize * cfg.tile_n;
    let out_base = pos.batch * out.stride(0);
    #[unroll]
    for i in 0..cfg.tile_m {
        let gm = row0 + i;
        #[unroll]
        for jv in 0..comptime!(cfg.tile_n / cfg.vector_out) {
            let gn = col0 + jv * vo;
            // N is a multiple of the output vector: a vector is wholly in or out.
            if gm < m && gn < n {
                store_epilogue::<F, NO>(
                    tile_vector::<NO, S>(acc, i, jv, cfg),
                    bias,
                    residual,
                    out,
                    gn,
                    (out_base + gm * out.stride(1) + gn) / vo,
                    scale,
                    vo,
                    cfg.bias,
                    cfg.activation,
                    cfg.residual,
                );
            }
        }
    }
}

/// `out[b, m, n] = act(scale · Σ_k A[b, m, k] · B[b, k, n] + bias[n]) + residual[b, m, n]`,
/// through the main loop the config names. `bias` and `residual` are read only when the config
/// enables them (the launcher passes placeholders otherwise). The grid is (N blocks, M blocks ×
/// batch over y and z).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gemm<F: Float, NA: Size, NB: Size, NO: Size, S: Size>(
    a: &Tensor<Vector<F, NA>>,
    b: &Tensor<Vector<F, NB>>,
    bias: &Tensor<Vector<F, NO>>,
    residual: &Tensor<Vector<F, NO>>,
    out: &mut Tensor<Vector<F, NO>>,
    a_offset: usize,
    b_offset: usize,
    scale: f32,
    #[comptime] cfg: GemmConfig,
) {
    let m = a.shape(1);
    let n = b.shape(2);
    let batch = out.shape(0);
    let pos = block_pos(m, batch, cfg.block_m, cfg.block_n);
    // A cube wholly past the end returns before any barrier, as a whole.
    if pos.batch < batch {
        let mut acc =
            Array::<Vector<f32, S>>::new(comptime!(cfg.tile_m * cfg.tile_n / STAGE_VECTOR));
        main_loop::<F, NA, NB, S>(a, b, a_offset, b_offset, pos, &mut acc, cfg);
        write_tile::<F, NO, S>(&acc, bias, residual, out, pos, m, n, scale, cfg);
    }
}

/// The naive GEMM: one unit per output element, a sequential f32 dot product over K, no
/// epilogue. `a` is (batch, M, K), `b` (batch, K, N), both strided with offsets; `out` is
/// contiguous (batch, M, N).
#[cube(launch_unchecked)]
pub fn gemm_naive<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    out: &mut Tensor<F>,
    a_offset: usize,
    b_offset: usize,
) {
    let m = a.shape(1);
    let k_len = a.shape(2);
    let n = b.shape(2);
    if ABSOLUTE_POS < out.len() {
        let j = ABSOLUTE_POS % n;
        let i = (ABSOLUTE_POS / n) % m;
        let bi = ABSOLUTE_POS / (n * m);
        let a_at = a_offset + bi * a.stride(0) + i * a.stride(1);
        let b_at = b_offset + bi * b.stride(0) + j * b.stride(2);
        let mut dot = f32::new(0.0);
        for k in 0..k_len {
            dot += f32::cast_from(a[a_at + k * a.stride(2)])
                * f32::cast_from(b[b_at + k * b.stride(1)]);
        }
        out[ABSOLUTE_POS] = F::cast_from(dot);
    }
}

/// The main loop of [`gemm()`] with `cfg.registers`: no shared memory and no barriers; each
/// unit streams its rows of A (vectors along k) and its columns of B (vectors along n)
/// straight from global memory, four k at a time, and accumulates its register tile.
/// Neighbouring units read the same rows and columns, which caches serve; on CPU drivers, where
/// barriers are expensive and caches large, this beats staging through shared memory.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn register_main_loop<F: Float, NA: Size, NB: Size, S: Size>(
    a: &Tensor<Vector<F, NA>>,
    b: &Tensor<Vector<F, NB>>,
    a_offset: usize,
    b_offset: usize,
    pos: BlockPos,
    acc: &mut Array<Vector<f32, S>>,
    #[comptime] cfg: GemmConfig,
) {
    let sv = STAGE_VECTOR;
    let tqn = comptime!(cfg.tile_n / STAGE_VECTOR);
    let va = cfg.vector_a;
    let vb = cfg.vector_b;
    let m = a.shape(1);
    let k_len = a.shape(2);
    let n = b.shape(2);
    let row0 = pos.m0 + UNIT_POS_Y as usize * cfg.tile_m;
    let col0 = pos.n0 + UNIT_POS_X as usize * cfg.tile_n;
    let a_base = a_offset + pos.batch * a.stride(0);
    let b_base = b_offset + pos.batch * b.stride(0);
    let sam = a.stride(1);
    let sbk = b.stride(1);
    #[unroll]
    for i in 0..comptime!(cfg.tile_m * cfg.tile_n / STAGE_VECTOR) {
        acc[i] = Vector::new(0.0);
    }
    let mut ak = Array::<Vector<f32, S>>::new(cfg.tile_m);
    let mut bq = Array::<Vector<f32, S>>::new(tqn);
    let steps = k_len.div_ceil(sv);
    let mut step = 0;
    while step < steps {
        let k0 = step * sv;
        #[unroll]
        for r in 0..cfg.tile_m {
            let gm = row0 + r;
            let mut quad = Vector::<f32, S>::new(0.0);
            #[unroll]
            for c in 0..comptime!(STAGE_VECTOR / cfg.vector_a) {
                let gk = k0 + c * va;
                let mut v = Vector::<f32, NA>::new(0.0);
                if gm < m && gk < k_len {
                    v = Vector::cast_from(a[(a_base + gm * sam + gk) / va]);
                }
                #[unroll]
                for e in 0..va {
                    quad[c * va + e] = v[e];
                }
            }
            ak[r] = quad;
        }
        #[unroll]
        for kk in 0..sv {
            let gk = k0 + kk;
            #[unroll]
            for j in 0..tqn {
                let mut quad = Vector::<f32, S>::new(0.0);
                #[unroll]
                for c in 0..comptime!(STAGE_VECTOR / cfg.vector_b) {
                    let gn = col0 + j * sv + c * vb;
                    let mut v = Vector::<f32, NB>::new(0.0);
                    if gk < k_len && gn < n {
                        v = Vector::cast_from(b[(b_base + gk * sbk + gn) / vb]);
                    }
                    #[unroll]
                    for e in 0..vb {
                        quad[c * vb + e] = v[e];
                    }
                }
                bq[j] = quad;
            }
            #[unroll]
            for r in 0..cfg.tile_m {
                let av = Vector::<f32, S>::new(ak[r][kk]);
                #[unroll]
                for j in 0..tqn {
                    acc[r * tqn + j] += av * bq[j];
                }
            }
        }
        step += 1;
    }
}

/// The main loop the config names: [`register_main_loop()`] or [`gemm_main_loop()`].
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn main_loop<F: Float, NA: Size, NB: Size, S: Size>(
    a: &Tensor<Vector<F, NA>>,
    b: &Tensor<Vector<F, NB>>,
    a_offset: usize,
    b_offset: usize,
    pos: BlockPos,
    acc: &mut Array<Vector<f32, S>>,
    #[comptime] cfg: GemmConfig,
) {
    if comptime!(cfg.registers) {
        register_main_loop::<F, NA, NB, S>(a, b, a_offset, b_offset, pos, acc, cfg);
    } else {
        gemm_main_loop::<F, NA, NB, S>(a, b, a_offset, b_offset, pos, acc, cfg);
    }
}

/// Side of the square tensor-core fragment (16 × 16 × 16, the shape every CMMA device with f16
/// and bf16 offers).
pub const FRAGMENT: usize = 16;

/// Alignment in bytes of [`gemm_cmma()`]'s shared tiles: fragment loads and stores need 256-bit
/// aligned addresses.
pub(crate) const SMEM_ALIGN: usize = 128;

/// Comptime shape and epilogue of [`gemm_cmma()`].
///
/// A cube of `planes_m × planes_n` planes of `plane_size` units computes a `block_m × block_n`
/// output block; each plane owns a `block_m/planes_m × block_n/planes_n` sub-block of 16 × 16
/// fragments. Operand tiles are staged in shared memory as F (row-major A `[m][k]`, row-major
/// B `[k][n]`), the fragments multiply them with f32 accumulation, and the accumulators go
/// through a shared f32 output tile to the same fused epilogue as [`gemm()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CmmaConfig {
    pub block_m: usize,
    pub block_n: usize,
    /// Depth of one shared-memory step, a multiple of [`FRAGMENT`].
    pub block_k: usize,
    pub planes_m: usize,
    pub planes_n: usize,
    /// Units per plane (the warp size, 32 on CUDA).
    pub plane_size: usize,
    /// Vector width of A's loads (NA) and whether they run along K.
    pub vector_a: usize,
    pub a_along_k: bool,
    /// Vector width of B's loads (NB) and whether they run along K.
    pub vector_b: usize,
    pub b_along_k: bool,
    /// Vector width of the output, bias and residual (NO).
    pub vector_out: usize,
    pub bias: bool,
    pub activation: Option<ActivationKind>,
    pub residual: bool,
    /// Compute each fragment product with plain loops over the same shared tiles, fragment
    /// offsets and strides instead of the tensor-core instructions: the staging, fragment
    /// addressing and epilogue of the CMMA path, runnable on devices without CMMA.
    pub emulated: bool,
}

impl CmmaConfig {
    pub fn units(&self) -> usize {
        self.plane_size * self.planes_m * self.planes_n
    }

    /// Rows and columns of one plane's sub-block.
    pub fn sub_m(&self) -> usize {
        self.block_m / self.planes_m
    }

    pub fn sub_n(&self) -> usize {
        self.block_n / self.planes_n
    }

    /// Shared memory in bytes for an element of `elem_bytes` bytes (operand tiles in F, the
    /// output tile in f32).
    pub fn shared_bytes(&self, elem_bytes: usize) -> usize {
        self.block_k * (self.block_m + self.block_n) * elem_bytes + self.block_m * self.block_n * 4
    }

    /// True when fragments, planes and vectors tile the blocks evenly.
    pub fn is_valid(&self) -> bool {
        let f = FRAGMENT;
        let divides = |v: usize, len: usize| v >= 1 && len.is_multiple_of(v);
        self.block_m.is_multiple_of(self.planes_m)
            && self.block_n.is_multiple_of(self.planes_n)
            && self.sub_m().is_multiple_of(f)
            && self.sub_n().is_multiple_of(f)
            && self.block_k.is_multiple_of(f)
            && (FRAGMENT * FRAGMENT).is_multiple_of(self.plane_size)
            && divides(
                self.vector_a,
                if self.a_along_k {
                    self.block_k
                } else {
                    self.block_m
                },
            )
            && divides(
                self.vector_b,
                if self.b_along_k {
                    self.block_k
                } else {
                    self.block_n
                },
            )
            && divides(self.vector_out, self.block_n)
    }
}

/// Stages a tile of an operand into shared memory as F, unconverted. Element (o, k) of the
/// operand is at scalar index `base + o·s_o + k·s_k` and lands at `o·block_k + k` (`k_major`
/// false: A's `[m][k]`) or `k·block_o + o` (`k_major`: B's `[k][n]`). Out of range elements
/// stage as zero; vectors of NV run along k (`along_k`) or along o, and lie wholly in or out of
/// range because the launcher only vectorises lengths NV divides.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_raw<F: Float, NV: Size>(
    t: &Tensor<Vector<F, NV>>,
    smem: &mut SharedMemory<F>,
    base: usize,
    s_o: usize,
    s_k: usize,
    o0: usize,
    o_len: usize,
    k0: usize,
    k_len: usize,
    #[comptime] block_o: usize,
    #[comptime] block_k: usize,
    #[comptime] nv: usize,
    #[comptime] along_k: bool,
    #[comptime] k_major: bool,
    #[comptime] units: usize,
) {
    let unit = UNIT_POS as usize;
    // Consecutive units take consecutive vectors along the contiguous dimension.
    let per_line = comptime!(if along_k { block_k / nv } else { block_o / nv });
    let tasks = comptime!(block_o * block_k / nv);
    #[unroll]
    for l in 0..comptime!(tasks.div_ceil(units)) {
        let id = l * units + unit;
        if id < tasks {
            let line = id / per_line;
            let at = (id % per_line) * nv;
            let (o, k) = if comptime!(along_k) {
                (line, at)
            } else {
                (at, line)
            };
            let (go, gk) = (o0 + o, k0 + k);
            let mut v = Vector::<F, NV>::new(F::new(0.0));
            if go < o_len && gk < k_len {
                v = t[(base + go * s_o + gk * s_k) / nv];
            }
            #[unroll]
            for e in 0..nv {
                let (eo, ek) = if comptime!(along_k) {
                    (o, k + e)
                } else {
                    (o + e, k)
                };
                let dst = if comptime!(k_major) {
                    ek * block_o + eo
                } else {
                    eo * block_k + ek
                };
                smem[dst] = v[e];
            }
        }
    }
}

/// Where fragment (i, j) of this plane's sub-block starts in the output tile (stride
/// `block_n`), and where its A rows (stride `block_k`) and B columns (stride `block_n`) start
/// at depth `kk` of the stage. The CMMA and emulated paths both address through these.
#[cube]
fn fragment_offsets(
    plane: usize,
    i: usize,
    j: usize,
    kk: usize,
    #[comptime] cfg: CmmaConfig,
) -> (usize, usize, usize) {
    let f = FRAGMENT;
    let row = (plane / cfg.planes_n) * cfg.sub_m() + i * f;
    let col = (plane % cfg.planes_n) * cfg.sub_n() + j * f;
    (
        row * cfg.block_n + col,
        row * cfg.block_k + kk * f,
        kk * f * cfg.block_n + col,
    )
}

/// Loads a 16 × 16 CMMA operand fragment (`ident` A or B) of F from `smem` at `at`, rows
/// `stride` apart (`col_major`: the fragment is stored transposed, columns `stride` apart).
#[cube]
pub(crate) fn load_fragment<F: Float>(
    smem: &SharedMemory<F>,
    at: usize,
    #[comptime] stride: usize,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] col_major: bool,
) -> cmma::Matrix<F> {
    let layout = comptime!(if col_major {
        cmma::MatrixLayout::ColMajor
    } else {
        cmma::MatrixLayout::RowMajor
    });
    let frag =
        unsafe { cmma::Matrix::<F>::uninitialized(ident, FRAGMENT, FRAGMENT, FRAGMENT, layout) };
    cmma::load(
        &frag,
        &smem.slice(at, at + comptime!((FRAGMENT - 1) * stride + FRAGMENT)),
        u32::new(comptime!(stride as i64)),
    );
    frag
}

/// A 16 × 16 f32 CMMA accumulator holding zeros.
#[cube]
pub(crate) fn zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        FRAGMENT,
        FRAGMENT,
        FRAGMENT,
        cmma::MatrixLayout::Undefined,
        0.0,
    )
}

/// The tensor-core GEMM: the same function, operands and epilogue as [`gemm()`], with the
/// products on CMMA fragments (16 × 16 × 16, F inputs, f32 accumulation). F is f16 or bf16 on
/// a device whose properties list that CMMA shape; the launcher checks. With `cfg.emulated`
/// the fragments are computed by plain loops. Cube: (`plane_size`, planes) units; grid as
/// [`gemm()`]'s.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gemm_cmma<F: Float, NA: Size, NB: Size, NO: Size>(
    a: &Tensor<Vector<F, NA>>,
    b: &Tensor<Vector<F, NB>>,
    bias: &Tensor<Vector<F, NO>>,
    residual: &Tensor<Vector<F, NO>>,
    out: &mut Tensor<Vector<F, NO>>,
    a_offset: usize,
    b_offset: usize,
    scale: f32,
    #[comptime] cfg: CmmaConfig,
) {
    let m = a.shape(1);
    let k_len = a.shape(2);
    let n = b.shape(2);
    let batch = out.shape(0);
    let f = FRAGMENT;
    let units = comptime!(cfg.units());
    let (fm, fnn) = comptime!((cfg.sub_m() / FRAGMENT, cfg.sub_n() / FRAGMENT));
    let pos = block_pos(m, batch, cfg.block_m, cfg.block_n);
    let (bi, m0, n0) = (pos.batch, pos.m0, pos.n0);
    // A cube wholly past the end returns before any barrier, as a whole.
    if bi < batch {
        let plane = UNIT_POS_Y as usize;
        let lane = UNIT_POS_X as usize;
        let a_base = a_offset + bi * a.stride(0);
        let b_base = b_offset + bi * b.stride(0);
        let mut a_s =
            SharedMemory::<F>::new_aligned(comptime!(cfg.block_m * cfg.block_k), SMEM_ALIGN);
        let mut b_s =
            SharedMemory::<F>::new_aligned(comptime!(cfg.block_k * cfg.block_n), SMEM_ALIGN);
        let mut c_s =
            SharedMemory::<f32>::new_aligned(comptime!(cfg.block_m * cfg.block_n), SMEM_ALIGN);

        let mut accs = Sequence::<cmma::Matrix<f32>>::new();
        if comptime!(cfg.emulated) {
            // Each lane owns the same elements of every fragment of its plane. The emulation's
            // loops stay loops: unrolled, they make shaders that CPU drivers compile slowly.
            for i in 0..fm {
                for j in 0..fnn {
                    let (c0, _, _) = fragment_offsets(plane, i, j, 0, cfg);
                    for r in 0..comptime!(FRAGMENT * FRAGMENT / cfg.plane_size) {
                        let e = r * cfg.plane_size + lane;
                        c_s[c0 + (e / f) * cfg.block_n + e % f] = 0.0;
                    }
                }
            }
        } else {
            #[unroll]
            for _ in 0..comptime!(fm * fnn) {
                accs.push(zero_accumulator());
            }
        }

        let steps = k_len.div_ceil(cfg.block_k);
        let mut step = 0;
        while step < steps {
            let k0 = step * cfg.block_k;
            stage_raw::<F, NA>(
                a,
                &mut a_s,
                a_base,
                a.stride(1),
                a.stride(2),
                m0,
                m,
                k0,
                k_len,
                cfg.block_m,
                cfg.block_k,
                cfg.vector_a,
                cfg.a_along_k,
                false,
                units,
            );
            stage_raw::<F, NB>(
                b,
                &mut b_s,
                b_base,
                b.stride(2),
                b.stride(1),
                n0,
                n,
                k0,
                k_len,
                cfg.block_n,
                cfg.block_k,
                cfg.vector_b,
                cfg.b_along_k,
                true,
                units,
            );
            sync_cube();
            #[unroll]
            for kk in 0..comptime!(cfg.block_k / FRAGMENT) {
                if comptime!(cfg.emulated) {
                    for i in 0..fm {
                        for j in 0..fnn {
                            let (c0, a0, b0) = fragment_offsets(plane, i, j, kk, cfg);
                            for r in 0..comptime!(FRAGMENT * FRAGMENT / cfg.plane_size) {
                                let e = r * cfg.plane_size + lane;
                                let (fr, fc) = (e / f, e % f);
                                let mut dot = f32::new(0.0);
                                for x in 0..FRAGMENT {
                                    dot += f32::cast_from(a_s[a0 + fr * cfg.block_k + x])
                                        * f32::cast_from(b_s[b0 + x * cfg.block_n + fc]);
                                }
                                c_s[c0 + fr * cfg.block_n + fc] += dot;
                            }
                        }
                    }
                } else {
                    let mut bs = Sequence::<cmma::Matrix<F>>::new();
                    #[unroll]
                    for j in 0..fnn {
                        let (_, _, b0) = fragment_offsets(plane, 0, j, kk, cfg);
                        bs.push(load_fragment::<F>(
                            &b_s,
                            b0,
                            cfg.block_n,
                            cmma::MatrixIdent::B,
                            false,
                        ));
                    }
                    #[unroll]
                    for i in 0..fm {
                        let (_, a0, _) = fragment_offsets(plane, i, 0, kk, cfg);
                        let frag =
                            load_fragment::<F>(&a_s, a0, cfg.block_k, cmma::MatrixIdent::A, false);
                        #[unroll]
                        for j in 0..fnn {
                            let acc = accs.index(i * fnn + j);
                            cmma::execute::<F, F, f32, f32>(&frag, bs.index(j), acc, acc);
                        }
                    }
                }
            }
            sync_cube();
            step += 1;
        }

        if comptime!(!cfg.emulated) {
            #[unroll]
            for i in 0..fm {
                #[unroll]
                for j in 0..fnn {
                    let (c0, _, _) = fragment_offsets(plane, i, j, 0, cfg);
                    cmma::store(
                        &mut c_s
                            .slice_mut(c0, c0 + comptime!((FRAGMENT - 1) * cfg.block_n + FRAGMENT)),
                        accs.index(i * fnn + j),
                        u32::new(comptime!(cfg.block_n as i64)),
                        cmma::MatrixLayout::RowMajor,
                    );
                }
            }
        }
        sync_cube();

        // The epilogue, vector by vector of the output tile.
        let vo = cfg.vector_out;
        let per_row = comptime!(cfg.block_n / cfg.vector_out);
        let tasks = comptime!(cfg.block_m * cfg.block_n / cfg.vector_out);
        let unit = UNIT_POS as usize;
        let out_base = bi * out.stride(0);
        for l in 0..comptime!(tasks.div_ceil(units)) {
            let id = l * units + unit;
            let (row, cv) = (id / per_row, id % per_row);
            let (gm, gn) = (m0 + row, n0 + cv * vo);
            // N is a multiple of the output vector: a vector is wholly in or out.
            if id < tasks && gm < m && gn < n {
                let mut v = Vector::<f32, NO>::new(0.0);
                #[unroll]
                for e in 0..vo {
                    v[e] = c_s[row * cfg.block_n + cv * vo + e];
                }
                store_epilogue::<F, NO>(
                    v,
                    bias,
                    residual,
                    out,
                    gn,
                    (out_base + gm * out.stride(1) + gn) / vo,
                    scale,
                    vo,
                    cfg.bias,
                    cfg.activation,
                    cfg.residual,
                );
            }
        }
    }
}

//! The tensor-core GEMM on 16 × 16 × 16 CMMA fragments, and its emulated twin.

use cubecl::prelude::*;

use super::{
    block_pos, source, stage_shapes_of, store_epilogue, EpilogueConfig, GemmIo, StageShape,
    TileSource,
};
use crate::activation::ActivationKind;
use crate::fragment::{
    fragment_mma_emulated, load_fragment, zero_accumulator, FRAGMENT, SMEM_ALIGN,
};

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
    pub fn epilogue(&self) -> EpilogueConfig {
        EpilogueConfig {
            vector_out: self.vector_out,
            bias: self.bias,
            activation: self.activation,
            residual: self.residual,
        }
    }

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

stage_shapes_of!(CmmaConfig);

/// Stages the tile at depth `k0` of an operand into shared memory as F, unconverted, read from
/// `src`. Element (o, k) of the tile lands at `o·block_k + k` (`k_major` false: A's `[m][k]`)
/// or `k·block_o + o` (`k_major`: B's `[k][n]`). Out of range elements stage as zero; vectors
/// of NV run along k (`shape.along_k`) or along o, and lie wholly in or out of range because
/// the launcher only vectorises lengths NV divides.
#[cube]
fn stage_raw<F: Float, NV: Size>(
    t: &Tensor<Vector<F, NV>>,
    smem: &mut SharedMemory<F>,
    src: &TileSource,
    k0: usize,
    #[comptime] shape: StageShape,
    #[comptime] k_major: bool,
) {
    let unit = UNIT_POS as usize;
    // Consecutive units take consecutive vectors along the contiguous dimension.
    let per_line = comptime!(if shape.along_k {
        shape.block_k / shape.nv
    } else {
        shape.block_o / shape.nv
    });
    let tasks = comptime!(shape.block_o * shape.block_k / shape.nv);
    #[unroll]
    for l in 0..comptime!(tasks.div_ceil(shape.units)) {
        let id = l * shape.units + unit;
        if id < tasks {
            let line = id / per_line;
            let at = (id % per_line) * shape.nv;
            let (o, k) = if comptime!(shape.along_k) {
                (line, at)
            } else {
                (at, line)
            };
            let (go, gk) = (src.o0 + o, k0 + k);
            let mut v = Vector::<F, NV>::new(F::new(0.0));
            if go < src.o_len && gk < src.k_len {
                v = t[(src.base + go * src.s_o + gk * src.s_k) / shape.nv];
            }
            #[unroll]
            for e in 0..shape.nv {
                let (eo, ek) = if comptime!(shape.along_k) {
                    (o, k + e)
                } else {
                    (o + e, k)
                };
                let dst = if comptime!(k_major) {
                    ek * shape.block_o + eo
                } else {
                    eo * shape.block_k + ek
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

/// The tensor-core GEMM: the same function, operands and epilogue as [`gemm()`], with the
/// products on CMMA fragments (16 × 16 × 16, F inputs, f32 accumulation). F is f16 or bf16 on
/// a device whose properties list that CMMA shape; the launcher checks. With `cfg.emulated`
/// the fragments are computed by plain loops. Cube: (`plane_size`, planes) units; grid as
/// [`gemm()`]'s.
#[cube(launch_unchecked)]
pub fn gemm_cmma<F: Float, NA: Size, NB: Size, NO: Size>(
    io: &mut GemmIo<F, NA, NB, NO>,
    #[comptime] cfg: CmmaConfig,
) {
    let m = io.a.shape(1);
    let k_len = io.a.shape(2);
    let n = io.b.shape(2);
    let batch = io.out.shape(0);
    let f = FRAGMENT;
    let units = comptime!(cfg.units());
    let (fm, fnn) = comptime!((cfg.sub_m() / FRAGMENT, cfg.sub_n() / FRAGMENT));
    let pos = block_pos(m, batch, cfg.block_m, cfg.block_n);
    let (bi, m0, n0) = (pos.batch, pos.m0, pos.n0);
    // A cube wholly past the end returns before any barrier, as a whole.
    if bi < batch {
        let plane = UNIT_POS_Y as usize;
        let lane = UNIT_POS_X as usize;
        let a_base = io.a_offset + bi * io.a.stride(0);
        let b_base = io.b_offset + bi * io.b.stride(0);
        let (stage_a, stage_b) = comptime!(cfg.stage_shapes());
        let a_src = source(a_base, io.a.stride(1), io.a.stride(2), m0, m, k_len);
        let b_src = source(b_base, io.b.stride(2), io.b.stride(1), n0, n, k_len);
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
            stage_raw::<F, NA>(&io.a, &mut a_s, &a_src, k0, stage_a, false);
            stage_raw::<F, NB>(&io.b, &mut b_s, &b_src, k0, stage_b, true);
            sync_cube();
            #[unroll]
            for kk in 0..comptime!(cfg.block_k / FRAGMENT) {
                if comptime!(cfg.emulated) {
                    for i in 0..fm {
                        for j in 0..fnn {
                            let (c0, a0, b0) = fragment_offsets(plane, i, j, kk, cfg);
                            fragment_mma_emulated::<F>(
                                &a_s,
                                a0,
                                cfg.block_k,
                                &b_s,
                                b0,
                                cfg.block_n,
                                false,
                                &mut c_s,
                                c0,
                                cfg.block_n,
                                lane,
                                cfg.plane_size,
                            );
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
                store_epilogue::<F, NA, NB, NO>(io, v, (bi, gm, gn), cfg.epilogue());
            }
        }
    }
}

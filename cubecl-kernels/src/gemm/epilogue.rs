//! The fused epilogue every GEMM variant ends with: scale, bias, activation, residual.

use cubecl::prelude::*;

use super::{BlockPos, GemmConfig, GemmIo, STAGE_VECTOR};
use crate::activation::{apply_activation, ActivationKind};

/// Output vector `jv` (NO lanes along n) of row `i` of a unit's register tile, as left by
/// [`main_loop()`] or [`register_main_loop()`] (rows of `tile_n / STAGE_VECTOR` stage
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

/// The fused epilogue's comptime part: which terms it adds, and the output's vector width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EpilogueConfig {
    /// NO: the vector width of the output, bias and residual.
    pub vector_out: usize,
    pub bias: bool,
    pub activation: Option<ActivationKind>,
    pub residual: bool,
}

/// The fused epilogue of the output vector at `at` = (batch element, row, column):
/// `out[..] = act(scale · acc + bias[column..]) + residual[..]` (the residual indexed as `out`).
#[cube]
pub fn store_epilogue<F: Float, NA: Size, NB: Size, NO: Size>(
    io: &mut GemmIo<F, NA, NB, NO>,
    acc: Vector<f32, NO>,
    at: (usize, usize, usize),
    #[comptime] ep: EpilogueConfig,
) {
    let vo = ep.vector_out;
    let (batch, gm, gn) = at;
    let at = (batch * io.out.stride(0) + gm * io.out.stride(1) + gn) / vo;
    let mut v = acc * Vector::new(io.scale);
    if comptime!(ep.bias) {
        v += Vector::cast_from(io.bias[gn / vo]);
    }
    if comptime!(ep.activation.is_some()) {
        v = apply_activation::<f32, NO>(v, comptime!(ep.activation.unwrap().id()));
    }
    if comptime!(ep.residual) {
        v += Vector::cast_from(io.residual[at]);
    }
    io.out[at] = Vector::cast_from(v);
}

/// The fused epilogue: writes a unit's register tile (as left by [`main_loop()`]) to
/// `out[b, m, n] = act(scale · acc + bias[n]) + residual[b, m, n]`.
#[cube]
pub fn write_tile<F: Float, NA: Size, NB: Size, NO: Size, S: Size>(
    io: &mut GemmIo<F, NA, NB, NO>,
    acc: &Array<Vector<f32, S>>,
    pos: BlockPos,
    m: usize,
    n: usize,
    #[comptime] cfg: GemmConfig,
) {
    let vo = cfg.vector_out;
    let row0 = pos.m0 + UNIT_POS_Y as usize * cfg.tile_m;
    let col0 = pos.n0 + UNIT_POS_X as usize * cfg.tile_n;
    #[unroll]
    for i in 0..cfg.tile_m {
        let gm = row0 + i;
        #[unroll]
        for jv in 0..comptime!(cfg.tile_n / cfg.vector_out) {
            let gn = col0 + jv * vo;
            // N is a multiple of the output vector: a vector is wholly in or out.
            if gm < m && gn < n {
                let v = tile_vector::<NO, S>(acc, i, jv, cfg);
                store_epilogue::<F, NA, NB, NO>(io, v, (pos.batch, gm, gn), cfg.epilogue());
            }
        }
    }
}

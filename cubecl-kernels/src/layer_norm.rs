//! LayerNorm over the last dimension, statistics in f32, saving mean and rstd for the backward
//! pass.
//!
//! A row is handled by `units` units (a power of two) of one cube, `rows` rows per cube. Each
//! unit strides over the row in vectors; partial sums meet in shared memory in a tree. Two
//! passes over the row (mean, then the centred sum of squares) instead of one pass of sum and
//! sum of squares, which cancels catastrophically when |mean| is large against the spread.

use cubecl::prelude::*;

/// Comptime shape of [`layer_norm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerNormConfig {
    /// Units per row, a power of two.
    pub units: usize,
    /// Rows per cube.
    pub rows: usize,
    /// Normalise `input + residual` and write that sum to `sum`.
    pub residual: bool,
}

/// Row element i as normalised: `input[i]`, or with the residual add `F(input[i] +
/// residual[i])`, rounded to F as it is stored in `sum`, so the statistics are those of the
/// stored residual stream.
#[cube]
fn load<F: Float, N: Size>(
    input: &Tensor<Vector<F, N>>,
    residual: &Tensor<Vector<F, N>>,
    at: usize,
    #[comptime] add: bool,
) -> Vector<f32, N> {
    if comptime!(add) {
        let s = Vector::<F, N>::cast_from(
            Vector::<f32, N>::cast_from(input[at]) + Vector::<f32, N>::cast_from(residual[at]),
        );
        Vector::<f32, N>::cast_from(s)
    } else {
        Vector::<f32, N>::cast_from(input[at])
    }
}

/// Tree-sums `smem[base .. base + CUBE_DIM_X]` into `smem[base]`; every unit of the cube calls
/// it. CUBE_DIM_X is a power of two.
#[cube]
fn tree_sum(smem: &mut SharedMemory<f32>, base: usize, x: usize) -> f32 {
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if x < half {
            smem[base + x] += smem[base + x + half];
        }
        sync_cube();
        half /= 2;
    }
    let total = smem[base];
    // The slot is reused by the next reduction.
    sync_cube();
    total
}

/// out[r, :] = (x[r, :] - mean) · rstd · weight + bias; mean[r], rstd[r] = 1/sqrt(var + eps),
/// where x = input, or x = input + residual (then also written to `sum`) when `cfg.residual`.
/// `residual` and `sum` are placeholders otherwise. Input, residual, sum and out share one
/// row stride.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm<F: Float, N: Size>(
    input: &Tensor<Vector<F, N>>,
    residual: &Tensor<Vector<F, N>>,
    sum_out: &mut Tensor<Vector<F, N>>,
    weight: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    eps: f32,
    #[comptime] cfg: LayerNormConfig,
) {
    let nv = N::value();
    let n_rows = input.shape(0);
    let width = input.shape(1);
    let cv = width / nv;
    let x = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let row = CUBE_POS * cfg.rows + y;
    let active = row < n_rows;
    let row_c = select(active, row, 0);
    let in_at = row_c * input.stride(0) / nv;
    let out_at = row_c * out.stride(0) / nv;
    let mut smem = SharedMemory::<f32>::new(cfg.rows * cfg.units);
    let base = y * cfg.units;

    let mut sum = f32::new(0.0);
    let mut i = x;
    while i < cv {
        let v = load::<F, N>(input, residual, in_at + i, cfg.residual);
        #[unroll]
        for l in 0..nv {
            sum += v[l];
        }
        i += cfg.units;
    }
    smem[base + x] = sum;
    let mu = tree_sum(&mut smem, base, x) / f32::cast_from(width);

    let mut sq = f32::new(0.0);
    let mut i = x;
    while i < cv {
        let d = load::<F, N>(input, residual, in_at + i, cfg.residual) - Vector::new(mu);
        #[unroll]
        for l in 0..nv {
            sq += d[l] * d[l];
        }
        i += cfg.units;
    }
    smem[base + x] = sq;
    let var = tree_sum(&mut smem, base, x) / f32::cast_from(width);
    let rs = 1.0 / (var + eps).sqrt();

    if active {
        let mut i = x;
        while i < cv {
            let v = load::<F, N>(input, residual, in_at + i, cfg.residual);
            if comptime!(cfg.residual) {
                sum_out[out_at + i] = Vector::cast_from(v);
            }
            let w = Vector::<f32, N>::cast_from(weight[i]);
            let b = Vector::<f32, N>::cast_from(bias[i]);
            out[out_at + i] = Vector::cast_from((v - Vector::new(mu)) * Vector::new(rs) * w + b);
            i += cfg.units;
        }
        if x == 0 {
            mean[row] = mu;
            rstd[row] = rs;
        }
    }
}

//! LayerNorm over the last dimension, statistics in f32, saving mean and rstd for the backward
//! pass.
//!
//! A row is handled by `units` units (a power of two) of one cube, `rows` rows per cube. Each
//! unit strides over the row in vectors; partial sums meet in shared memory in a tree. Two
//! passes over the row (mean, then the centred sum of squares) instead of one pass of sum and
//! sum of squares, which cancels catastrophically when |mean| is large against the spread.

use cubecl::prelude::*;

/// Comptime shape of [`layer_norm()`].
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

/// `out[r, :] = (x[r, :] - mean) · rstd · weight + bias`; `mean[r]`,
/// `rstd[r] = 1/sqrt(var + eps)`, where x = input, or x = input + residual (then also written
/// to `sum`) when `cfg.residual`. `residual` and `sum` are placeholders otherwise. Input,
/// residual, sum and out share one row stride.
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

/// LayerNorm backward for the input, one unit per row (N lanes along the row): with
/// x̂ = (x - mean)·rstd and g = d_out·weight,
/// d_input = residual + rstd·(g - mean(g) - x̂·mean(g·x̂)).
/// `residual` (the gradient arriving through the skip connection) is added when
/// `add_residual`; otherwise it is not read. All (rows, C) tensors are contiguous.
#[cube(launch_unchecked)]
pub fn layer_norm_backward<F: Float, N: Size>(
    input: &Tensor<Vector<F, N>>,
    d_out: &Tensor<Vector<F, N>>,
    weight: &Tensor<Vector<F, N>>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    residual: &Tensor<Vector<F, N>>,
    d_input: &mut Tensor<Vector<F, N>>,
    #[comptime] add_residual: bool,
) {
    let nv = N::value();
    let rows = input.shape(0);
    let cv = input.shape(1) / nv;
    let row = ABSOLUTE_POS;
    if row < rows {
        let m = mean[row];
        let s = rstd[row];
        let at = row * cv;
        let mut sum_g = f32::new(0.0);
        let mut sum_gx = f32::new(0.0);
        for i in 0..cv {
            let x = Vector::<f32, N>::cast_from(input[at + i]);
            let g = Vector::<f32, N>::cast_from(d_out[at + i]) * Vector::cast_from(weight[i]);
            let xhat = (x - Vector::new(m)) * Vector::new(s);
            #[unroll]
            for l in 0..nv {
                sum_g += g[l];
                sum_gx += g[l] * xhat[l];
            }
        }
        let width = f32::cast_from(cv * nv);
        let mean_g = sum_g / width;
        let mean_gx = sum_gx / width;
        for i in 0..cv {
            let x = Vector::<f32, N>::cast_from(input[at + i]);
            let g = Vector::<f32, N>::cast_from(d_out[at + i]) * Vector::cast_from(weight[i]);
            let xhat = (x - Vector::new(m)) * Vector::new(s);
            let mut d = Vector::new(s) * (g - Vector::new(mean_g) - xhat * Vector::new(mean_gx));
            if comptime!(add_residual) {
                d += Vector::<f32, N>::cast_from(residual[at + i]);
            }
            d_input[at + i] = Vector::cast_from(d);
        }
    }
}

/// LayerNorm backward for the parameters, one unit per column c, summing over rows in order
/// (deterministic): `d_weight[c] = Σ_r d_out[r, c]·x̂[r, c]`, `d_bias[c] = Σ_r d_out[r, c]`.
#[cube(launch_unchecked)]
pub fn layer_norm_backward_params<F: Float>(
    input: &Tensor<F>,
    d_out: &Tensor<F>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    d_weight: &mut Tensor<F>,
    d_bias: &mut Tensor<F>,
) {
    let rows = input.shape(0);
    let width = input.shape(1);
    let c = ABSOLUTE_POS;
    if c < width {
        let mut dw = f32::new(0.0);
        let mut db = f32::new(0.0);
        for r in 0..rows {
            let dy = f32::cast_from(d_out[r * width + c]);
            let xhat = (f32::cast_from(input[r * width + c]) - mean[r]) * rstd[r];
            dw += dy * xhat;
            db += dy;
        }
        d_weight[c] = F::cast_from(dw);
        d_bias[c] = F::cast_from(db);
    }
}

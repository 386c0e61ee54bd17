//! Launcher for LayerNorm over the last dimension.

use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;
use megabyte_kernels::layer_norm::{
    layer_norm as layer_norm_kernel, layer_norm_backward as backward_kernel,
    layer_norm_backward_params as params_kernel, LayerNormConfig,
};

use crate::device::{ensure_dtype, launch_1d, vector_size_for};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::profile::{DeviceProfile, Dtype};
use crate::tensor::Tensor;

const OP: &str = "layer_norm";

/// LayerNorm epsilon of the model (the reference uses the same value).
pub const EPS: f32 = 1e-5;

/// out = LN(input) · weight + bias over the last dim of a contiguous (rows, C) input; writes the
/// per-row mean and rstd (f32, (rows)) for the backward pass.
pub fn layer_norm<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
    weight: &Tensor<R, E>,
    bias: &Tensor<R, E>,
    out: &Tensor<R, E>,
    mean: &Tensor<R, f32>,
    rstd: &Tensor<R, f32>,
) -> Result<(), OpError> {
    launch(input, None, weight, bias, out, mean, rstd)
}

/// The pre-LN residual step fused into one pass: sum = input + residual (rounded to E, the
/// new residual stream), out = LN(sum) · weight + bias, with mean and rstd as in
/// [`layer_norm`]. All (rows, C) tensors are contiguous and distinct.
#[allow(clippy::too_many_arguments)]
pub fn add_layer_norm<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
    residual: &Tensor<R, E>,
    weight: &Tensor<R, E>,
    bias: &Tensor<R, E>,
    sum: &Tensor<R, E>,
    out: &Tensor<R, E>,
    mean: &Tensor<R, f32>,
    rstd: &Tensor<R, f32>,
) -> Result<(), OpError> {
    launch(input, Some((residual, sum)), weight, bias, out, mean, rstd)
}

/// A LayerNorm forward as its planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerNormProblem {
    pub rows: usize,
    pub width: usize,
    /// The fused residual add ([`add_layer_norm`]).
    pub residual: bool,
    pub dtype: Dtype,
}

/// The LayerNorm kernel's comptime shape and vector width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerNormPlan {
    pub cfg: LayerNormConfig,
    pub vector: usize,
}

/// The planner of the LayerNorm forward: vectors along the row, enough units per row to cover
/// it in a few strides (at most 128), and as many rows per cube as fill 256 units, however few
/// rows there are (the kernel masks rows past the end): the plan depends on the width alone,
/// so a GPU compiles one kernel per width, not one per batch size.
pub fn plan(problem: &LayerNormProblem, profile: &DeviceProfile) -> LayerNormPlan {
    let vector = profile.vector_for(problem.dtype, &[problem.width]);
    let units = (problem.width / vector).next_power_of_two().clamp(1, 128);
    let rows = (256 / units).max(1);
    let cfg = LayerNormConfig {
        units,
        rows,
        residual: problem.residual,
    };
    LayerNormPlan { cfg, vector }
}

fn launch<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
    residual: Option<(&Tensor<R, E>, &Tensor<R, E>)>,
    weight: &Tensor<R, E>,
    bias: &Tensor<R, E>,
    out: &Tensor<R, E>,
    mean: &Tensor<R, f32>,
    rstd: &Tensor<R, f32>,
) -> Result<(), OpError> {
    let client = input.client();
    ensure_dtype::<R, E>(client, OP)?;
    if input.shape().len() != 2 {
        return Err(OpError::shape(OP, "input", input.shape(), vec![0, 0]));
    }
    let (rows, width) = (input.shape()[0], input.shape()[1]);
    if rows == 0 || width == 0 {
        return Err(OpError::empty(OP, "input", input.shape().to_vec()));
    }
    for (name, t, expected) in [
        ("weight", weight, vec![width]),
        ("bias", bias, vec![width]),
        ("out", out, vec![rows, width]),
        ("residual", residual.map_or(out, |r| r.0), vec![rows, width]),
        ("sum", residual.map_or(out, |r| r.1), vec![rows, width]),
    ] {
        t.expect_shape(OP, name, &expected)?;
    }
    mean.expect_shape(OP, "mean", &[rows])?;
    rstd.expect_shape(OP, "rstd", &[rows])?;
    let problem = LayerNormProblem {
        rows,
        width,
        residual: residual.is_some(),
        dtype: E::DTYPE,
    };
    crate::record::note(|| crate::record::Planned::LayerNorm(problem));
    let LayerNormPlan { cfg, vector } = plan(&problem, &DeviceProfile::of(client));
    let (units, rows_per_cube) = (cfg.units, cfg.rows);
    let cubes = rows.div_ceil(rows_per_cube) as u32;
    // SAFETY: shapes validated above; rows past the end are masked in the kernel, `vector`
    // divides the row width, and every unit reaches every barrier.
    unsafe {
        layer_norm_kernel::launch_unchecked::<E, R>(
            client,
            CubeCountSelection::new(client, cubes).cube_count(),
            CubeDim::new_2d(units as u32, rows_per_cube as u32),
            vector,
            input.arg(),
            residual.map_or(input, |r| r.0).arg(),
            residual.map_or(out, |r| r.1).arg(),
            weight.arg(),
            bias.arg(),
            out.arg(),
            mean.arg(),
            rstd.arg(),
            EPS,
            cfg,
        );
    }
    Ok(())
}

/// LayerNorm backward from the forward's input and saved statistics (all (rows, C) tensors
/// contiguous): d_input = residual + ∂LN/∂input · d_out (residual optional: the gradient
/// arriving through the skip connection), d_weight and d_bias (C) overwritten.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
    d_out: &Tensor<R, E>,
    weight: &Tensor<R, E>,
    mean: &Tensor<R, f32>,
    rstd: &Tensor<R, f32>,
    residual: Option<&Tensor<R, E>>,
    d_input: &Tensor<R, E>,
    d_weight: &Tensor<R, E>,
    d_bias: &Tensor<R, E>,
) -> Result<(), OpError> {
    const OP: &str = "layer_norm_backward";
    let client = input.client();
    ensure_dtype::<R, E>(client, OP)?;
    if input.shape().len() != 2 || input.is_empty() {
        return Err(OpError::shape(OP, "input", input.shape(), vec![1, 1]));
    }
    let (rows, width) = (input.shape()[0], input.shape()[1]);
    for (name, t) in [("d_out", d_out), ("d_input", d_input)] {
        t.expect_shape(OP, name, &[rows, width])?;
    }
    if let Some(r) = residual {
        r.expect_shape(OP, "residual", &[rows, width])?;
    }
    for (name, t) in [
        ("weight", weight),
        ("d_weight", d_weight),
        ("d_bias", d_bias),
    ] {
        t.expect_shape(OP, name, &[width])?;
    }
    mean.expect_shape(OP, "mean", &[rows])?;
    rstd.expect_shape(OP, "rstd", &[rows])?;
    let vector = vector_size_for::<R, E>(client, &[width]);
    let d_residual = residual.unwrap_or(d_out);
    // SAFETY: shapes validated above; the kernels guard rows and columns; `vector` divides C.
    unsafe {
        launch_1d!(backward_kernel::launch_unchecked::<E, R>[client, rows]
            vector, input.arg(), d_out.arg(), weight.arg(), mean.arg(), rstd.arg(),
            d_residual.arg(), d_input.arg(), residual.is_some());
        launch_1d!(params_kernel::launch_unchecked::<E, R>[client, width]
            input.arg(), d_out.arg(), mean.arg(), rstd.arg(), d_weight.arg(), d_bias.arg());
    }
    Ok(())
}

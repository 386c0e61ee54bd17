//! Launchers for the deterministic reductions: column sums and squared norms.

use cubecl::prelude::*;
use megabyte_kernels::reduce::{column_sum as column_sum_kernel, sum_squares};

use crate::device::{ensure_dtype, launch_1d};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::tensor::{Tensor, TensorView};

/// out (cols) = Σ over rows of a (rows, cols) view, plus out's own values when `accumulate`:
/// a bias gradient from the output gradient.
pub fn column_sum<R: Runtime, E: FloatElement>(
    input: &TensorView<R, E>,
    out: &Tensor<R, E>,
    accumulate: bool,
) -> Result<(), OpError> {
    const OP: &str = "column_sum";
    let client = out.client();
    ensure_dtype::<R, E>(client, OP)?;
    if input.shape.len() != 2 || input.shape.contains(&0) {
        return Err(OpError::shape(OP, "input", &input.shape, vec![1, 1]));
    }
    out.expect_shape(OP, "out", &[input.shape[1]])?;
    let offset = input.offset_u32(OP)?;
    // SAFETY: the view was bounds-checked when made; the kernel guards columns.
    unsafe {
        launch_1d!(column_sum_kernel::launch_unchecked::<E, R>[client, input.shape[1]]
            input.arg(), out.arg(), offset, accumulate);
    }
    Ok(())
}

/// Σ x² over all the given tensors, summed on the host in f64 in a fixed order (the same
/// inputs always give the same bits): the squared global norm for gradient clipping. One
/// read-back for all tensors.
pub fn squared_norm<R: Runtime, E: FloatElement>(
    tensors: &[&Tensor<R, E>],
) -> Result<f64, OpError> {
    const OP: &str = "squared_norm";
    let Some(first) = tensors.first() else {
        return Ok(0.0);
    };
    let client = first.client();
    ensure_dtype::<R, E>(client, OP)?;
    // Each unit's loop stays well inside llvmpipe's 65,535-iteration cap.
    let units: Vec<usize> = tensors
        .iter()
        .map(|t| {
            if t.is_empty() {
                0
            } else {
                64.max(t.len().div_ceil(32_768))
            }
        })
        .collect();
    let total: usize = units.iter().sum();
    let partials = Tensor::<R, f32>::empty(client, &[total.max(1)])?;
    let mut at = 0usize;
    for (t, &u) in tensors.iter().zip(&units) {
        if t.is_empty() {
            continue;
        }
        // SAFETY: the kernel reads t's `len()` elements and writes `u` partials at `at`, inside
        // the `total` allocated.
        unsafe {
            launch_1d!(sum_squares::launch_unchecked::<E, R>[client, u]
                t.array(), ArrayArg::from_raw_parts(partials.handle().clone(), total), at as u32,
                u as u32);
        }
        at += u;
    }
    let values = partials.to_vec()?;
    Ok(values[..total].iter().map(|&v| v as f64).sum())
}

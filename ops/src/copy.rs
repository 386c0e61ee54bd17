//! Launcher for the strided copy between views.

use cubecl::prelude::*;
use megabyte_kernels::copy::strided_copy;

use crate::device::{ensure_dtype, launch_1d};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::tensor::TensorView;

const OP: &str = "copy";

/// Copies every element of `src` into `dst`, two views of the same shape (any rank >= 1) whose
/// last dimension has stride 1. `dst` must not overlap `src`. Through views this appends rows
/// to a KV cache or gathers one position out of a batch.
pub fn copy<R: Runtime, E: FloatElement>(
    src: &TensorView<R, E>,
    dst: &TensorView<R, E>,
) -> Result<(), OpError> {
    ensure_dtype::<R, E>(dst.tensor.client(), OP)?;
    copy_any(src, dst)
}

/// [`copy`] for u32 ids.
pub fn copy_ids<R: Runtime>(
    src: &TensorView<R, u32>,
    dst: &TensorView<R, u32>,
) -> Result<(), OpError> {
    copy_any(src, dst)
}

fn copy_any<R: Runtime, T: Numeric + CubeElement>(
    src: &TensorView<R, T>,
    dst: &TensorView<R, T>,
) -> Result<(), OpError> {
    let client = dst.tensor.client();
    if src.shape != dst.shape {
        return Err(OpError::shape(OP, "dst", &dst.shape, src.shape.clone()));
    }
    let rank = dst.shape.len();
    if rank == 0 || dst.shape.contains(&0) {
        return Err(OpError::empty(OP, "src", src.shape.clone()));
    }
    for (name, view) in [("src", src), ("dst", dst)] {
        if view.strides[rank - 1] != 1 {
            return Err(OpError::unsupported(
                OP,
                "last-dimension stride",
                view.strides[rank - 1],
                format!("`{name}` must be contiguous along its last dimension"),
            ));
        }
    }
    let (so, d_o) = (src.offset_u32(OP)?, dst.offset_u32(OP)?);
    let mut aligned = vec![dst.shape[rank - 1], src.offset, dst.offset];
    aligned.extend(&src.strides[..rank - 1]);
    aligned.extend(&dst.strides[..rank - 1]);
    let vector = client
        .io_optimized_vector_sizes(std::mem::size_of::<T>())
        .find(|&v| aligned.iter().all(|&n| n % v == 0))
        .unwrap_or(1);
    let units = dst.shape.iter().product::<usize>() / vector;
    // SAFETY: both views were bounds-checked when they were made and have the same shape;
    // `vector` divides the last dimension, every other stride and both offsets; the kernel
    // guards on `units`.
    unsafe {
        launch_1d!(strided_copy::launch_unchecked::<T, R>[client, units]
            vector, src.arg(), dst.arg(), so, d_o, units);
    }
    Ok(())
}

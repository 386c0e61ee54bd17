//! Launcher for the elementwise GELU / ReLU kernel.

use cubecl::prelude::*;
use megabyte_kernels::activation::{activation as activation_kernel, ActivationKind};

use crate::device::{ensure_dtype, grid_1d, vector_size_for};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::tensor::Tensor;

const OP: &str = "activation";

/// output = act(input), elementwise. Shapes must be equal; any rank, any length >= 1.
pub fn activation_into<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
    output: &Tensor<R, E>,
    act: ActivationKind,
) -> Result<(), OpError> {
    let client = input.client();
    ensure_dtype::<R, E>(client, OP)?;
    if input.is_empty() {
        return Err(OpError::empty(OP, "input", input.shape().to_vec()));
    }
    output.expect_shape(OP, "output", input.shape())?;
    let n = input.len();
    let vector = vector_size_for::<R, E>(client, &[n]);
    let units = n / vector;
    let (cube_count, cube_dim) = grid_1d(client, units);
    // SAFETY: both arrays hold exactly `n` elements of E (checked above), the kernel guards
    // every access with `ABSOLUTE_POS < input.len()`, and `vector` divides `n`.
    unsafe {
        activation_kernel::launch_unchecked::<E, R>(
            client,
            cube_count,
            cube_dim,
            vector,
            input.array(),
            output.array(),
            act.id(),
        );
    }
    Ok(())
}

/// act(input) in a new tensor.
pub fn activation<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
    act: ActivationKind,
) -> Result<Tensor<R, E>, OpError> {
    let output = Tensor::empty(input.client(), input.shape())?;
    activation_into(input, &output, act)?;
    Ok(output)
}

/// Exact GELU of `input` in a new tensor.
pub fn gelu<R: Runtime, E: FloatElement>(input: &Tensor<R, E>) -> Result<Tensor<R, E>, OpError> {
    activation(input, ActivationKind::Gelu)
}

/// ReLU of `input` in a new tensor.
pub fn relu<R: Runtime, E: FloatElement>(input: &Tensor<R, E>) -> Result<Tensor<R, E>, OpError> {
    activation(input, ActivationKind::Relu)
}

/// Launches the naive GELU kernel (scalar, the backend's `erf`, no care for accuracy): the
/// baseline of the accuracy tests and benches, not for model use.
pub fn gelu_naive<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
) -> Result<Tensor<R, E>, OpError> {
    let client = input.client();
    ensure_dtype::<R, E>(client, "gelu_naive")?;
    if input.is_empty() {
        return Err(OpError::empty(
            "gelu_naive",
            "input",
            input.shape().to_vec(),
        ));
    }
    let n = input.len();
    let output = Tensor::empty(client, input.shape())?;
    let (cube_count, cube_dim) = grid_1d(client, n);
    // SAFETY: both arrays hold `n` elements and the kernel bounds-checks every access.
    unsafe {
        megabyte_kernels::activation::gelu_naive::launch_unchecked::<E, R>(
            client,
            cube_count,
            cube_dim,
            input.array(),
            output.array(),
        );
    }
    Ok(output)
}

/// d_input = d_output · act'(pre), elementwise (GELU' = Φ + x·φ, ReLU'(0) = 0). All three
/// tensors have the same shape; d_input may be d_output's buffer only if it is the same tensor
/// passed twice (each element is read before it is written).
pub fn activation_backward<R: Runtime, E: FloatElement>(
    pre: &Tensor<R, E>,
    d_output: &Tensor<R, E>,
    d_input: &Tensor<R, E>,
    act: ActivationKind,
) -> Result<(), OpError> {
    let client = pre.client();
    ensure_dtype::<R, E>(client, OP)?;
    if pre.is_empty() {
        return Err(OpError::empty(OP, "pre", pre.shape().to_vec()));
    }
    d_output.expect_shape(OP, "d_output", pre.shape())?;
    d_input.expect_shape(OP, "d_input", pre.shape())?;
    let n = pre.len();
    let vector = vector_size_for::<R, E>(client, &[n]);
    let (cube_count, cube_dim) = grid_1d(client, n / vector);
    // SAFETY: all three hold exactly n elements; the kernel guards on the length; `vector`
    // divides n.
    unsafe {
        megabyte_kernels::activation::activation_backward::launch_unchecked::<E, R>(
            client,
            cube_count,
            cube_dim,
            vector,
            pre.array(),
            d_output.array(),
            d_input.array(),
            act.id(),
        );
    }
    Ok(())
}

//! Launcher for the elementwise GELU / ReLU kernel.

use cubecl::prelude::*;
use megabyte_kernels::activation::{
    activation as activation_kernel, activation_backward as backward_kernel,
    gelu_naive as gelu_naive_kernel, ActivationKind,
};

use crate::device::{ensure_dtype, launch_1d, vector_size_for};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::tensor::Tensor;

const OP: &str = "activation";

/// The checks of an elementwise launch: the device takes `E`, the first tensor is not empty and
/// every other has its shape. Returns the element count and the vector width (it divides the
/// count).
fn elementwise<R: Runtime, E: FloatElement>(
    op: &'static str,
    tensors: &[(&'static str, &Tensor<R, E>)],
) -> Result<(usize, usize), OpError> {
    let (first_name, first) = tensors[0];
    ensure_dtype::<R, E>(first.client(), op)?;
    if first.is_empty() {
        return Err(OpError::empty(op, first_name, first.shape().to_vec()));
    }
    for (name, t) in &tensors[1..] {
        t.expect_shape(op, name, first.shape())?;
    }
    let n = first.len();
    Ok((n, vector_size_for::<R, E>(first.client(), &[n])))
}

/// output = act(input), elementwise. Shapes must be equal; any rank, any length >= 1.
pub fn activation_into<R: Runtime, E: FloatElement>(
    input: &Tensor<R, E>,
    output: &Tensor<R, E>,
    act: ActivationKind,
) -> Result<(), OpError> {
    let (n, vector) = elementwise(OP, &[("input", input), ("output", output)])?;
    // SAFETY: both arrays hold exactly `n` elements of E (checked above), the kernel guards
    // every access with `ABSOLUTE_POS < input.len()`, and `vector` divides `n`.
    unsafe {
        launch_1d!(activation_kernel::launch_unchecked::<E, R>[input.client(), n / vector]
            vector, input.array(), output.array(), act.id());
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
    let (n, _) = elementwise("gelu_naive", &[("input", input)])?;
    let output = Tensor::empty(input.client(), input.shape())?;
    // SAFETY: both arrays hold `n` elements and the kernel bounds-checks every access.
    unsafe {
        launch_1d!(gelu_naive_kernel::launch_unchecked::<E, R>[input.client(), n]
            input.array(), output.array());
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
    let tensors = [("pre", pre), ("d_output", d_output), ("d_input", d_input)];
    let (n, vector) = elementwise(OP, &tensors)?;
    // SAFETY: all three hold exactly n elements; the kernel guards on the length; `vector`
    // divides n.
    unsafe {
        launch_1d!(backward_kernel::launch_unchecked::<E, R>[pre.client(), n / vector]
            vector, pre.array(), d_output.array(), d_input.array(), act.id());
    }
    Ok(())
}

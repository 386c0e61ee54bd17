//! The GEMM's launchers: the planned main loop with its epilogue, the layers built on it, and
//! the naive baseline.

use cubecl::prelude::*;
use megabyte_kernels::activation::ActivationKind;
use megabyte_kernels::gemm::{
    gemm as gemm_kernel, gemm_cmma as cmma_kernel, gemm_naive as naive_kernel, GemmIoLaunch,
    STAGE_VECTOR,
};

use super::plan::{grid, plan, GemmCall, GemmKernel, GemmPlan, OperandLayout};
use super::{check_operands, operand, Epilogue, GemmProblem, OP};
use crate::device::{ensure_dtype, launch_1d};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::profile::DeviceProfile;
use crate::tensor::{Tensor, TensorView};

/// Checks the element type against the device and the shapes of a, b and out; returns the
/// problem, the output's shape and a, b, out seen as rank 3.
fn checked_operands<'a, R: Runtime, E: FloatElement>(
    a: &TensorView<'a, R, E>,
    b: &TensorView<'a, R, E>,
    out: &'a Tensor<R, E>,
) -> Result<(GemmProblem, Vec<usize>, [TensorView<'a, R, E>; 3]), OpError> {
    ensure_dtype::<R, E>(out.client(), OP)?;
    let (p, out_shape) = check_operands(a, b)?;
    out.expect_shape(OP, "out", &out_shape)?;
    let views = [
        operand(a, p.batch),
        operand(b, p.batch),
        operand(&out.view(), p.batch),
    ];
    Ok((p, out_shape, views))
}

/// out = act(scale · a·b + bias) + residual, see the module docs for shapes. `out` must not
/// alias `a`, `b` or the residual.
pub fn gemm<R: Runtime, E: FloatElement>(
    a: &TensorView<R, E>,
    b: &TensorView<R, E>,
    out: &Tensor<R, E>,
    epilogue: &Epilogue<R, E>,
) -> Result<(), OpError> {
    gemm_with(GemmKernel::Auto, a, b, out, epilogue)
}

/// [`gemm`] with a chosen main loop.
pub fn gemm_with<R: Runtime, E: FloatElement>(
    kind: GemmKernel,
    a: &TensorView<R, E>,
    b: &TensorView<R, E>,
    out: &Tensor<R, E>,
    epilogue: &Epilogue<R, E>,
) -> Result<(), OpError> {
    let client = out.client();
    let (p, out_shape, [a3, b3, out3]) = checked_operands(a, b, out)?;
    if let Some(bias) = epilogue.bias {
        bias.expect_shape(OP, "bias", &[p.n])?;
    }
    if let Some(res) = epilogue.residual {
        res.expect_shape(OP, "residual", &out_shape)?;
    }
    let call = GemmCall {
        problem: p,
        dtype: E::DTYPE,
        a: OperandLayout::of(&a3),
        b: OperandLayout::of(&b3),
        bias: epilogue.bias.is_some(),
        activation: epilogue.activation,
        residual: epilogue.residual.is_some(),
    };
    crate::record::note(|| crate::record::Planned::Gemm(call));
    let plan = plan(kind, &call, &DeviceProfile::of(client))?;
    let (count, dim) = (grid(&p, plan.block())?, plan.cube_dim());
    // The launch of either main loop (`$stage`: the tiled kernel's stage vector); each kernel's
    // vector sizes are types of its own, so each arm builds the operands.
    macro_rules! launch {
        ($kernel:ident, $cfg:expr $(, $stage:expr)?) => {
            $kernel::launch_unchecked::<E, R>(
                client,
                count,
                dim,
                $cfg.vector_a,
                $cfg.vector_b,
                $cfg.vector_out,
                $($stage,)?
                GemmIoLaunch::new(
                    a3.arg(),
                    b3.arg(),
                    epilogue.bias.unwrap_or(out).arg(),
                    epilogue.residual.map_or_else(|| out3.arg(), |r| r.arg()),
                    out3.arg(),
                    a3.offset,
                    b3.offset,
                    epilogue.scale,
                ),
                $cfg,
            )
        };
    }
    match plan {
        // SAFETY: as for the tiled kernel below; in addition every fragment's shared-memory
        // rows lie inside the tiles (`CmmaConfig::is_valid`) and the device has the fragment
        // shape (`plan_cmma` checks, unless emulated).
        GemmPlan::Cmma(cfg) => unsafe { launch!(cmma_kernel, cfg) },
        // SAFETY: operands were shape-checked and their views bounds-checked when made; vector
        // widths divide every length, stride and offset they step over (see `plan`); loads
        // outside (M, N, K) are masked in the kernel and stores outside (M, N) skipped; every
        // unit of a cube reaches every barrier.
        GemmPlan::Tiled(cfg) => unsafe { launch!(gemm_kernel, cfg, STAGE_VECTOR) },
    }
    Ok(())
}

/// a·b into a new tensor (shapes as in [`gemm`]).
pub fn matmul<R: Runtime, E: FloatElement>(
    a: &TensorView<R, E>,
    b: &TensorView<R, E>,
) -> Result<Tensor<R, E>, OpError> {
    let (_, shape) = check_operands(a, b)?;
    let out = Tensor::empty(a.tensor.client(), &shape)?;
    gemm(a, b, &out, &Epilogue::none())?;
    Ok(out)
}

/// A linear layer over the last dim: x (rows, in) · weight (in, out) + bias, then the
/// activation, into a new (rows, out) tensor.
pub fn linear<R: Runtime, E: FloatElement>(
    x: &Tensor<R, E>,
    weight: &Tensor<R, E>,
    bias: Option<&Tensor<R, E>>,
    activation: Option<ActivationKind>,
) -> Result<Tensor<R, E>, OpError> {
    let (_, shape) = check_operands(&x.view(), &weight.view())?;
    let out = Tensor::empty(x.client(), &shape)?;
    let epi = Epilogue {
        scale: 1.0,
        bias,
        activation,
        residual: None,
    };
    gemm(&x.view(), &weight.view(), &out, &epi)?;
    Ok(out)
}

/// The naive baseline: one unit per output element, f32 dot products, no epilogue.
pub fn gemm_naive<R: Runtime, E: FloatElement>(
    a: &TensorView<R, E>,
    b: &TensorView<R, E>,
    out: &Tensor<R, E>,
) -> Result<(), OpError> {
    let (_, _, [a3, b3, out3]) = checked_operands(a, b, out)?;
    // SAFETY: shapes checked; every unit guards on `out.len()` and reads inside the views.
    unsafe {
        launch_1d!(naive_kernel::launch_unchecked::<E, R>[out.client(), out.len()]
            a3.arg(), b3.arg(), out3.arg(), a3.offset, b3.offset);
    }
    Ok(())
}

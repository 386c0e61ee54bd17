//! Launcher for the fused global→local input: one GEMM over every byte row with a gather
//! epilogue.

use cubecl::prelude::*;
use megabyte_kernels::gemm::STAGE_VECTOR;
use megabyte_kernels::local_input::local_input as local_input_kernel;

use crate::device::ensure_dtype;
use crate::element::FloatElement;
use crate::error::OpError;
use crate::gemm::{
    grid, operand, plan_tiled, GemmCall, GemmKernel, GemmPlan, GemmProblem, OperandLayout,
};
use crate::profile::DeviceProfile;
use crate::tensor::{Tensor, TensorView};

const OP: &str = "local_input";

/// `out[b, t, :] = g[b, k, p·D_G .. (p+1)·D_G] · W_GL + (p == 0 ? lpad : E_L[ids[b, t - 1]]) +
/// lpos[p]`, with t = k·P + p: the global model's output for each byte position, projected to
/// the local width, plus the previous byte's local embedding (the learned pad at the start of
/// each patch) and the local position embedding. Shapes: g (B, K, P·D_G), ids (B, T = K·P),
/// w_gl (D_G, D_L), e_l (V, D_L), lpad (D_L), lpos (P, D_L), out (B, T, D_L).
///
/// Ids are not checked on the host; an id >= V turns the row that gathers it into NaN.
#[allow(clippy::too_many_arguments)]
pub fn local_input<R: Runtime, E: FloatElement>(
    g: &Tensor<R, E>,
    ids: &Tensor<R, u32>,
    w_gl: &Tensor<R, E>,
    e_l: &Tensor<R, E>,
    lpad: &Tensor<R, E>,
    lpos: Option<&Tensor<R, E>>,
    out: &Tensor<R, E>,
) -> Result<(), OpError> {
    local_input_with(GemmKernel::Auto, g, ids, w_gl, e_l, lpad, lpos, out)
}

/// [`local_input`] with a chosen GEMM main loop.
#[allow(clippy::too_many_arguments)]
pub fn local_input_with<R: Runtime, E: FloatElement>(
    kind: GemmKernel,
    g: &Tensor<R, E>,
    ids: &Tensor<R, u32>,
    w_gl: &Tensor<R, E>,
    e_l: &Tensor<R, E>,
    lpad: &Tensor<R, E>,
    lpos: Option<&Tensor<R, E>>,
    out: &Tensor<R, E>,
) -> Result<(), OpError> {
    let client = out.client();
    ensure_dtype::<R, E>(client, OP)?;
    for (name, t) in [("w_gl", w_gl), ("e_l", e_l)] {
        if t.shape().len() != 2 {
            return Err(OpError::shape(OP, name, t.shape(), vec![0, 0]));
        }
    }
    let (dg, dl) = (w_gl.shape()[0], w_gl.shape()[1]);
    if ids.shape().len() != 2 {
        return Err(OpError::shape(OP, "ids", ids.shape(), vec![0, 0]));
    }
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    if g.shape().len() != 3 || g.shape()[0] != b || !g.shape()[2].is_multiple_of(dg.max(1)) {
        return Err(OpError::shape(OP, "g", g.shape(), vec![b, 0, dg]));
    }
    let (k, width) = (g.shape()[1], g.shape()[2]);
    let p = width / dg.max(1);
    if [b, t, dg, dl, k, e_l.shape()[0]].contains(&0) {
        return Err(OpError::empty(
            OP,
            if b * t == 0 { "ids" } else { "g" },
            if b * t == 0 {
                ids.shape().to_vec()
            } else {
                g.shape().to_vec()
            },
        ));
    }
    if k * p != t {
        return Err(OpError::shape(
            OP,
            "g",
            g.shape(),
            vec![b, t / p.max(1), p * dg],
        ));
    }
    if e_l.shape()[1] != dl {
        return Err(OpError::shape(OP, "e_l", e_l.shape(), vec![256, dl]));
    }
    lpad.expect_shape(OP, "lpad", &[dl])?;
    if let Some(lpos) = lpos {
        lpos.expect_shape(OP, "lpos", &[p, dl])?;
    }
    out.expect_shape(OP, "out", &[b, t, dl])?;

    let rows = b * t;
    let problem = GemmProblem {
        batch: 1,
        m: rows,
        n: dl,
        k: dg,
    };
    let gv = TensorView {
        tensor: g,
        offset: 0,
        shape: vec![rows, dg],
        strides: vec![dg, 1],
    };
    let a3 = operand(&gv, 1);
    let b3 = operand(&w_gl.view(), 1);
    let call = GemmCall {
        problem,
        dtype: E::DTYPE,
        a: OperandLayout::row_major(dg),
        b: OperandLayout::row_major(dl),
        bias: false,
        activation: None,
        residual: false,
    };
    crate::record::note(|| crate::record::Planned::LocalInput(call));
    let cfg = plan_tiled(kind, &call, &DeviceProfile::of(client))?;
    let plan = GemmPlan::Tiled(cfg);
    let (count, dim) = (grid(&problem, plan.block())?, plan.cube_dim());
    let outv = TensorView {
        tensor: out,
        offset: 0,
        shape: vec![rows, dl],
        strides: vec![dl, 1],
    };
    let out3 = operand(&outv, 1);
    // SAFETY: shapes checked above; `plan` picks vector widths dividing every length and
    // stride they step over (the output's divides D_L, so E_L, lpad and lpos rows too); loads
    // outside (rows, D_L, D_G) are masked and stores skipped; E_L is read only at ids < V and
    // ids only at r - 1 >= 0; every unit of a cube reaches every barrier.
    unsafe {
        local_input_kernel::launch_unchecked::<E, R>(
            client,
            count,
            dim,
            cfg.vector_a,
            cfg.vector_b,
            cfg.vector_out,
            STAGE_VECTOR,
            a3.arg(),
            b3.arg(),
            ids.arg(),
            e_l.arg(),
            lpad.arg(),
            lpos.unwrap_or(lpad).arg(),
            out3.arg(),
            p,
            cfg,
            lpos.is_some(),
        );
    }
    Ok(())
}

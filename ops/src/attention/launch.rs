//! The attention launchers: the flash kernels and the naive baseline of the forward, and the
//! backward's dQ and dK/dV kernels.

use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;
use megabyte_kernels::attention::{
    attention_backward_kv, attention_backward_q, flash_attention as flash_kernel,
    flash_attention_cmma, flash_attention_rows, naive_scores, naive_softmax, naive_weighted_sum,
    BackwardIoLaunch, FlashIoLaunch,
};

use super::{
    check_head_stride, check_outputs, check_qkv, check_qkv_no_cache, plan, plan_backward,
    score_scale, AttentionCall, AttentionKernel, AttentionPlan, AttentionProblem, BackwardKernel,
    BackwardPlan, BackwardProblem, OP,
};
use crate::device::{ensure_dtype, grid_1d, launch_1d};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::profile::DeviceProfile;
use crate::tensor::{Tensor, TensorView};

/// Flash attention: out = softmax(q kᵀ / sqrt(D) + mask) v, and each row's log-sum-exp.
/// Never materialises the S × S scores. Picks the kernel with [`AttentionKernel::Auto`].
pub fn flash_attention<R: Runtime, E: FloatElement>(
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
    causal: bool,
) -> Result<(), OpError> {
    flash_attention_with(AttentionKernel::Auto, q, k, v, out, lse, causal)
}

/// [`flash_attention`] with an explicit kernel choice.
pub fn flash_attention_with<R: Runtime, E: FloatElement>(
    kernel: AttentionKernel,
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
    causal: bool,
) -> Result<(), OpError> {
    let client = q.tensor.client();
    ensure_dtype::<R, E>(client, OP)?;
    let (dims, seq_k) = check_qkv(q, k, v)?;
    check_outputs(dims, out, lse)?;
    let [batch, seq, heads, head_dim] = dims;
    let problem = AttentionProblem {
        batch,
        seq,
        heads,
        head_dim,
        causal,
    };
    // Widest vector that divides the head dim, every stride and every offset.
    let mut aligned: Vec<usize> = vec![head_dim];
    for t in [q, k, v] {
        aligned.extend(&t.strides[..3]);
        aligned.push(t.offset);
    }
    aligned.extend(&out.strides()[..3]);
    let call = AttentionCall {
        problem,
        seq_k,
        dtype: E::DTYPE,
        aligned,
    };
    crate::record::note(|| crate::record::Planned::Attention(call.clone()));
    let planned = plan(kernel, &call, &DeviceProfile::of(client))?;
    let (qo, ko, vo) = (q.offset_u32(OP)?, k.offset_u32(OP)?, v.offset_u32(OP)?);
    let scale = score_scale(head_dim);
    let vector = planned.vector();
    // SAFETY (every launch): shapes were validated above; the kernels bounds-check rows
    // against S and work items against their count, `vector` divides D, all strides and all
    // offsets, and the planner checked shared memory against the device's limit.
    macro_rules! launch {
        ($kernel:ident, $count:expr, $dim:expr, $cfg:expr) => {
            unsafe {
                $kernel::launch_unchecked::<E, R>(
                    client,
                    $count,
                    $dim,
                    vector,
                    FlashIoLaunch::new(
                        q.arg(),
                        k.arg(),
                        v.arg(),
                        out.arg(),
                        lse.arg(),
                        qo,
                        ko,
                        vo,
                        scale,
                    ),
                    $cfg,
                )
            }
        };
    }
    match planned {
        AttentionPlan::Rows(cfg) => {
            let rows = batch * heads * seq.div_ceil(cfg.rows);
            let (cube_count, cube_dim) = grid_1d(client, rows * cfg.splits);
            launch!(flash_attention_rows, cube_count, cube_dim, cfg);
        }
        AttentionPlan::Tiled(cfg) => {
            let cubes = (batch * heads * seq.div_ceil(cfg.block_q)).div_ceil(cfg.groups) as u32;
            let cube_dim =
                CubeDim::new_3d(cfg.block_k as u32, cfg.block_q as u32, cfg.groups as u32);
            let count = CubeCountSelection::new(client, cubes).cube_count();
            launch!(flash_kernel, count, cube_dim, cfg);
        }
        AttentionPlan::Cmma(cfg) => {
            let cubes = (batch * heads * seq.div_ceil(cfg.block_q())) as u32;
            let cube_dim = CubeDim::new_2d(cfg.plane_size as u32, cfg.planes as u32);
            let count = CubeCountSelection::new(client, cubes).cube_count();
            launch!(flash_attention_cmma, count, cube_dim, cfg);
        }
    }
    Ok(())
}

/// The naive baseline: materialises the (B, H, S, S) scores in E, softmax in place, then PV.
/// Memory O(S²): for tests and benches only. q, k, v must be contiguous (B, S, H, D).
pub fn naive_attention<R: Runtime, E: FloatElement>(
    q: &Tensor<R, E>,
    k: &Tensor<R, E>,
    v: &Tensor<R, E>,
    out: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
    causal: bool,
) -> Result<(), OpError> {
    let client = q.client();
    ensure_dtype::<R, E>(client, OP)?;
    let dims = check_qkv_no_cache(OP, &q.view(), &k.view(), &v.view())?;
    check_outputs(dims, out, lse)?;
    let [b, s, h, d] = dims;
    let scores = Tensor::<R, E>::empty(client, &[b, h, s, s])?;
    // SAFETY: all tensors are contiguous with the validated shapes; each kernel bounds-checks
    // ABSOLUTE_POS against its output length.
    unsafe {
        let scale = score_scale(d);
        launch_1d!(naive_scores::launch_unchecked::<E, R>[client, b * h * s * s]
            q.arg(), k.arg(), scores.arg(), scale);
        launch_1d!(naive_softmax::launch_unchecked::<E, R>[client, b * h * s]
            scores.arg(), lse.arg(), causal);
        launch_1d!(naive_weighted_sum::launch_unchecked::<E, R>[client, b * s * h * d]
            scores.arg(), v.arg(), out.arg());
    }
    Ok(())
}

/// Attention backward (flash style, no S × S buffer): the softmax statistics are recomputed
/// from q and k (see the kernels for why not from the forward's f32 log-sum-exp). q, k, v and
/// the gradient outputs dq, dk, dv are (B, S, H, D) views (unit stride over D; dq/dk/dv may be
/// column slices of one fused (B·S, 3C) gradient); d_out, the gradient of the forward's
/// output, is contiguous (B, S, H, D). Deterministic: every gradient element is one unit's
/// ordered sum.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<R: Runtime, E: FloatElement>(
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    d_out: &Tensor<R, E>,
    dq: &TensorView<R, E>,
    dk: &TensorView<R, E>,
    dv: &TensorView<R, E>,
    causal: bool,
) -> Result<(), OpError> {
    attention_backward_with(BackwardKernel::Auto, q, k, v, d_out, dq, dk, dv, causal)
}

/// [`attention_backward`] with an explicit choice of how rows are spread over units.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with<R: Runtime, E: FloatElement>(
    kernel: BackwardKernel,
    q: &TensorView<R, E>,
    k: &TensorView<R, E>,
    v: &TensorView<R, E>,
    d_out: &Tensor<R, E>,
    dq: &TensorView<R, E>,
    dk: &TensorView<R, E>,
    dv: &TensorView<R, E>,
    causal: bool,
) -> Result<(), OpError> {
    const OP: &str = "attention_backward";
    let client = d_out.client();
    ensure_dtype::<R, E>(client, OP)?;
    let dims = check_qkv_no_cache(OP, q, k, v)?;
    d_out.expect_shape(OP, "d_out", &dims)?;
    for (name, t) in [("dq", dq), ("dk", dk), ("dv", dv)] {
        if t.shape != dims {
            return Err(OpError::shape(OP, name, &t.shape, dims.to_vec()));
        }
        check_head_stride(OP, name, t)?;
    }
    let [b, s, h, d] = dims;
    let problem = BackwardProblem {
        head_dim: d,
        causal,
    };
    crate::record::note(|| crate::record::Planned::AttentionBackward(problem));
    let BackwardPlan {
        q: cfg_q,
        kv: cfg_kv,
    } = plan_backward(kernel, &problem, &DeviceProfile::of(client))?;
    let scale = score_scale(d);
    let stats = || Tensor::<R, f32>::empty(client, &[b, h, s]);
    let (row_max, row_sum, delta) = (stats()?, stats()?, stats()?);
    let (count_q, dim_q) = grid_1d(client, b * h * s * cfg_q.splits);
    let (count_kv, dim_kv) = grid_1d(client, b * h * s * cfg_kv.splits);
    let (qo, ko, vo) = (q.offset_u32(OP)?, k.offset_u32(OP)?, v.offset_u32(OP)?);
    let (dqo, dko, dvo) = (dq.offset_u32(OP)?, dk.offset_u32(OP)?, dv.offset_u32(OP)?);
    let io = || {
        BackwardIoLaunch::new(
            q.arg(),
            k.arg(),
            v.arg(),
            d_out.arg(),
            row_max.arg(),
            row_sum.arg(),
            delta.arg(),
            qo,
            ko,
            vo,
            scale,
        )
    };
    // SAFETY: every view was bounds-checked when made and has the validated shape with unit
    // stride over D; the kernels guard on B·H·S·splits units and index only inside those
    // shapes (a chunk's dims past D are skipped).
    unsafe {
        attention_backward_q::launch_unchecked::<E, R>(
            client,
            count_q,
            dim_q,
            io(),
            dq.arg(),
            dqo,
            cfg_q,
        );
        attention_backward_kv::launch_unchecked::<E, R>(
            client,
            count_kv,
            dim_kv,
            io(),
            dk.arg(),
            dv.arg(),
            dko,
            dvo,
            cfg_kv,
        );
    }
    Ok(())
}

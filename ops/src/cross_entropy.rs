//! Launcher for the fused tied-head logits + cross-entropy, and the bits-per-byte mean.

use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;
use megabyte_kernels::cross_entropy::{
    cross_entropy_backward as ce_backward_kernel, tied_cross_entropy as ce_kernel,
    CrossEntropyConfig,
};

use crate::device::{ensure_dtype, launch_1d};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::profile::{DeviceProfile, Dtype};
use crate::tensor::Tensor;

const OP: &str = "cross_entropy";

/// Rows per cube: each table vector a unit loads serves this many rows.
const CE_ROWS: usize = 8;

/// Widest vector the tied logits + cross-entropy kernel loads rows and the table with. At 8
/// (f16/bf16 under CUDA's 128-bit loads) ptxas spilled about 1.5 KB per unit, with 178-319
/// local-memory instructions inside its loops (sm_90, `cuda_codegen`); at 4 it does not.
pub const MAX_VECTOR: usize = 4;

/// A tied logits + cross-entropy call as its planner sees it: the row width D, the
/// vocabulary V, whether the logits are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CrossEntropyProblem {
    pub width: usize,
    pub vocab: usize,
    pub write_logits: bool,
    pub dtype: Dtype,
}

/// The kernel's comptime shape and vector width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CrossEntropyPlan {
    pub cfg: CrossEntropyConfig,
    pub vector: usize,
}

/// The planner: [`CE_ROWS`] rows per cube, one unit per vocabulary entry up to 64 (each then
/// takes several), vectors along D up to [`MAX_VECTOR`].
pub fn plan(problem: &CrossEntropyProblem, profile: &DeviceProfile) -> CrossEntropyPlan {
    let vector = profile
        .vector_for(problem.dtype, &[problem.width])
        .min(MAX_VECTOR);
    let units = problem.vocab.next_power_of_two().clamp(CE_ROWS, 64);
    let cfg = CrossEntropyConfig {
        units,
        rows: CE_ROWS,
        per_unit: problem.vocab.div_ceil(units),
        write_logits: problem.write_logits,
    };
    CrossEntropyPlan { cfg, vector }
}

/// For each row r of x (rows, D): the logits `z = x[r] · tableᵀ` against the (V, D) embedding
/// table, `lse[r] = log Σ exp z` and `loss[r] = lse[r] - z[targets[r]]` in nats (both f32,
/// (rows)).
/// `logits` (rows, V), when given, receives z; otherwise the logits are never stored.
/// Targets are not checked on the host; a target >= V gives a NaN loss.
pub fn tied_cross_entropy<R: Runtime, E: FloatElement>(
    x: &Tensor<R, E>,
    table: &Tensor<R, E>,
    targets: &Tensor<R, u32>,
    loss: &Tensor<R, f32>,
    lse: &Tensor<R, f32>,
    logits: Option<&Tensor<R, E>>,
) -> Result<(), OpError> {
    let client = x.client();
    ensure_dtype::<R, E>(client, OP)?;
    if x.shape().len() != 2 {
        return Err(OpError::shape(OP, "x", x.shape(), vec![0, 0]));
    }
    let (rows, d) = (x.shape()[0], x.shape()[1]);
    if table.shape().len() != 2 || table.shape()[1] != d {
        return Err(OpError::shape(OP, "table", table.shape(), vec![256, d]));
    }
    let vocab = table.shape()[0];
    if rows == 0 || d == 0 || vocab == 0 {
        let (name, shape) = if vocab == 0 {
            ("table", table.shape())
        } else {
            ("x", x.shape())
        };
        return Err(OpError::empty(OP, name, shape.to_vec()));
    }
    loss.expect_shape(OP, "loss", &[rows])?;
    lse.expect_shape(OP, "lse", &[rows])?;
    targets.expect_shape(OP, "targets", &[rows])?;
    if let Some(l) = logits {
        l.expect_shape(OP, "logits", &[rows, vocab])?;
    }
    let problem = CrossEntropyProblem {
        width: d,
        vocab,
        write_logits: logits.is_some(),
        dtype: E::DTYPE,
    };
    crate::record::note(|| crate::record::Planned::CrossEntropy(problem));
    let CrossEntropyPlan { cfg, vector } = plan(&problem, &DeviceProfile::of(client));
    let units = cfg.units;
    let count = CubeCountSelection::new(client, rows.div_ceil(CE_ROWS) as u32).cube_count();
    // SAFETY: shapes checked above; `vector` divides D; cubes wholly past the end skip every
    // barrier together, rows and vocabulary entries past the end are clamped on reads and
    // skipped on writes.
    unsafe {
        ce_kernel::launch_unchecked::<E, R>(
            client,
            count,
            CubeDim::new_1d(units as u32),
            vector,
            x.arg(),
            table.arg(),
            targets.arg(),
            loss.arg(),
            lse.arg(),
            logits.unwrap_or(x).arg(),
            cfg,
        );
    }
    Ok(())
}

/// The mean of per-position losses (nats), read back and summed in f64, in bits per byte.
pub fn bits_per_byte<R: Runtime>(loss: &Tensor<R, f32>) -> Result<f64, OpError> {
    if loss.is_empty() {
        return Err(OpError::empty(OP, "loss", loss.shape().to_vec()));
    }
    let values = loss.to_f32_vec()?;
    let nats = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    Ok(nats / std::f64::consts::LN_2)
}

/// Cross-entropy backward in place: `logits` (rows, V), as the tied head computed them,
/// become d_logits = (softmax - one-hot(target)) · scale (scale = 1/rows for a mean loss),
/// using the forward's per-row log-sum-exp.
pub fn cross_entropy_backward<R: Runtime, E: FloatElement>(
    logits: &Tensor<R, E>,
    lse: &Tensor<R, f32>,
    targets: &Tensor<R, u32>,
    scale: f32,
) -> Result<(), OpError> {
    const OP: &str = "cross_entropy_backward";
    let client = logits.client();
    ensure_dtype::<R, E>(client, OP)?;
    if logits.shape().len() != 2 || logits.is_empty() {
        return Err(OpError::shape(OP, "logits", logits.shape(), vec![1, 256]));
    }
    let rows = logits.shape()[0];
    lse.expect_shape(OP, "lse", &[rows])?;
    targets.expect_shape(OP, "targets", &[rows])?;
    // SAFETY: shapes checked; one unit per element, guarded on the length; targets >= V
    // simply match no column.
    unsafe {
        launch_1d!(ce_backward_kernel::launch_unchecked::<E, R>[client, logits.len()]
            logits.arg(), lse.arg(), targets.arg(), scale);
    }
    Ok(())
}

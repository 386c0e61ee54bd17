//! Launcher for the deterministic embedding backward.

use cubecl::prelude::*;
use megabyte_kernels::embedding::{
    embedding_backward_by_id as by_id_kernel, embedding_backward_by_position as by_position_kernel,
    ByIdConfig,
};

use crate::device::{ensure_dtype, launch_1d};
use crate::element::FloatElement;
use crate::error::OpError;
use crate::tensor::{Tensor, TensorView};

const OP: &str = "embedding_backward";

/// Sums gradient rows (B, S, D) back into a table out (V, D): with `ids` (B, S), row (b, s)
/// goes to `out[ids[b, s]]` (a byte embedding); without, to `out[s]` (a position embedding;
/// rows of out past S get zero). `accumulate` adds to out's values instead of overwriting.
/// Deterministic: each output element is one ordered sum. Ids >= V match no row.
pub fn embedding_backward<R: Runtime, E: FloatElement>(
    rows: &TensorView<R, E>,
    ids: Option<&TensorView<R, u32>>,
    out: &Tensor<R, E>,
    accumulate: bool,
) -> Result<(), OpError> {
    let client = out.client();
    ensure_dtype::<R, E>(client, OP)?;
    if rows.shape.len() != 3 || rows.shape.contains(&0) {
        return Err(OpError::shape(OP, "rows", &rows.shape, vec![1, 1, 1]));
    }
    let (b, s, d) = (rows.shape[0], rows.shape[1], rows.shape[2]);
    if out.shape().len() != 2 || out.shape()[1] != d {
        return Err(OpError::shape(OP, "out", out.shape(), vec![0, d]));
    }
    if let Some(ids) = ids {
        if ids.shape != [b, s] {
            return Err(OpError::shape(OP, "ids", &ids.shape, vec![b, s]));
        }
    }
    let rows_offset = rows.offset_u32(OP)?;
    if let Some(ids) = ids {
        let ids_offset = ids.offset_u32(OP)?;
        // One cube per table row, enough units to cover D in a few columns each.
        let max_units = client.properties().hardware.max_units_per_cube.max(1) as usize;
        let units = d.next_power_of_two().clamp(32, 256).min(max_units);
        let cfg = ByIdConfig {
            units,
            chunk: units.max(512),
            cols: d.div_ceil(units),
            accumulate,
        };
        let max_cubes = client.properties().hardware.max_cube_count.0;
        let vocab = u32::try_from(out.shape()[0])
            .ok()
            .filter(|&v| v <= max_cubes)
            .ok_or_else(|| {
                OpError::unsupported(
                    OP,
                    "table rows",
                    out.shape()[0],
                    format!("one cube per row; the device launches at most {max_cubes}"),
                )
            })?;
        // SAFETY: views were bounds-checked when made; one cube per row of out, columns
        // guarded by D, rows and ids read only inside their shapes; every unit reaches every
        // barrier (the pass count depends only on B·S).
        unsafe {
            by_id_kernel::launch_unchecked::<E, R>(
                client,
                CubeCount::Static(vocab, 1, 1),
                CubeDim::new_1d(units as u32),
                rows.arg(),
                ids.arg(),
                out.arg(),
                rows_offset,
                ids_offset,
                cfg,
            );
        }
        return Ok(());
    }
    // SAFETY: the view was bounds-checked when made; the kernel guards on out's length and
    // reads rows only inside their shape.
    unsafe {
        launch_1d!(by_position_kernel::launch_unchecked::<E, R>[client, out.len()]
            rows.arg(), out.arg(), rows_offset, accumulate);
    }
    Ok(())
}

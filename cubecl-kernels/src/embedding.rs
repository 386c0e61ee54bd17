//! Embedding backward: gradients of gathered rows summed back into their tables,
//! deterministically (no atomics).

use cubecl::prelude::*;

/// out[v, d] (+)= Σ over (b, s) with key(b, s) = v of rows[b, s, d], one unit per output
/// element, summing in (b, s) order. With `by_id` the key is ids[b, s] (a byte's embedding
/// row); without it the key is s (a position's row), and rows v >= S get zero (or keep their
/// value when accumulating). rows (B, S, D) and ids (B, S) are strided views whose offsets are
/// passed separately; out (V, D) is contiguous.
#[cube(launch_unchecked)]
pub fn embedding_backward<F: Float>(
    rows: &Tensor<F>,
    ids: &Tensor<u32>,
    out: &mut Tensor<F>,
    rows_offset: u32,
    ids_offset: u32,
    #[comptime] by_id: bool,
    #[comptime] accumulate: bool,
) {
    let batch = rows.shape(0);
    let seq = rows.shape(1);
    let width = rows.shape(2);
    let vocab = out.shape(0);
    if ABSOLUTE_POS < vocab * width {
        let v = ABSOLUTE_POS / width;
        let d = ABSOLUTE_POS % width;
        let mut acc = f32::new(0.0);
        if comptime!(accumulate) {
            acc = f32::cast_from(out[ABSOLUTE_POS]);
        }
        let base = rows_offset as usize + d * rows.stride(2);
        if comptime!(by_id) {
            for b in 0..batch {
                for s in 0..seq {
                    let id = ids[ids_offset as usize + b * ids.stride(0) + s * ids.stride(1)];
                    if id as usize == v {
                        acc += f32::cast_from(rows[base + b * rows.stride(0) + s * rows.stride(1)]);
                    }
                }
            }
        } else if v < seq {
            for b in 0..batch {
                acc += f32::cast_from(rows[base + b * rows.stride(0) + v * rows.stride(1)]);
            }
        }
        out[ABSOLUTE_POS] = F::cast_from(acc);
    }
}

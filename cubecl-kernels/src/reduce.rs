//! Deterministic reductions for the backward pass and the optimiser: column sums (bias
//! gradients) and partial sums of squares (the global gradient norm).

use cubecl::prelude::*;

/// `out[c] = Σ_r input[r, c]` (plus `out[c]` when `accumulate`), one unit per column, rows
/// summed in order. `input` is a (rows, cols) view with any strides.
#[cube(launch_unchecked)]
pub fn column_sum<F: Float>(
    input: &Tensor<F>,
    out: &mut Tensor<F>,
    input_offset: u32,
    #[comptime] accumulate: bool,
) {
    let rows = input.shape(0);
    let cols = input.shape(1);
    let c = ABSOLUTE_POS;
    if c < cols {
        let mut acc = f32::new(0.0);
        if comptime!(accumulate) {
            acc = f32::cast_from(out[c]);
        }
        let base = input_offset as usize + c * input.stride(1);
        for r in 0..rows {
            acc += f32::cast_from(input[base + r * input.stride(0)]);
        }
        out[c] = F::cast_from(acc);
    }
}

/// `out[out_offset + u] = Σ input[i]²` over i ≡ u (mod units), for each of `units` units: the
/// partial sums of one tensor's squared norm, added up on the host in a fixed order.
#[cube(launch_unchecked)]
pub fn sum_squares<F: Float>(input: &Array<F>, out: &mut Array<f32>, out_offset: u32, units: u32) {
    let u = ABSOLUTE_POS;
    if u < units as usize {
        let mut acc = f32::new(0.0);
        let mut i = u;
        while i < input.len() {
            let v = f32::cast_from(input[i]);
            acc += v * v;
            i += units as usize;
        }
        out[out_offset as usize + u] = acc;
    }
}

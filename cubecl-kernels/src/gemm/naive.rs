//! The naive GEMM, one unit per output: the baseline the others are measured against.

use cubecl::prelude::*;

/// The naive GEMM: one unit per output element, a sequential f32 dot product over K, no
/// epilogue. `a` is (batch, M, K), `b` (batch, K, N), both strided with offsets; `out` is
/// contiguous (batch, M, N).
#[cube(launch_unchecked)]
pub fn gemm_naive<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    out: &mut Tensor<F>,
    a_offset: usize,
    b_offset: usize,
) {
    let m = a.shape(1);
    let k_len = a.shape(2);
    let n = b.shape(2);
    if ABSOLUTE_POS < out.len() {
        let j = ABSOLUTE_POS % n;
        let i = (ABSOLUTE_POS / n) % m;
        let bi = ABSOLUTE_POS / (n * m);
        let a_at = a_offset + bi * a.stride(0) + i * a.stride(1);
        let b_at = b_offset + bi * b.stride(0) + j * b.stride(2);
        let mut dot = f32::new(0.0);
        for k in 0..k_len {
            dot += f32::cast_from(a[a_at + k * a.stride(2)])
                * f32::cast_from(b[b_at + k * b.stride(1)]);
        }
        out[ABSOLUTE_POS] = F::cast_from(dot);
    }
}

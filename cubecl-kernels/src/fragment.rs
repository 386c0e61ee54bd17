//! The 16 × 16 × 16 tensor-core fragment helpers both CMMA kernels (`gemm::gemm_cmma`,
//! `attention::flash_attention_cmma`) build on: loading operand fragments from shared memory, a
//! zero accumulator, one fragment product on the tensor cores ([`mma_b`]) and the same product
//! as plain loops ([`fragment_mma_emulated`]), which the emulated twins run on devices without
//! CMMA. Both paths address the same shared tiles with the same offsets and strides.

use cubecl::prelude::*;

/// Side of the square tensor-core fragment (16 × 16 × 16, the shape every CMMA device with f16
/// and bf16 offers).
pub const FRAGMENT: usize = 16;

/// Alignment in bytes of the CMMA kernels' shared tiles: fragment loads and stores need 256-bit
/// aligned addresses.
pub(crate) const SMEM_ALIGN: usize = 128;

/// Loads a 16 × 16 CMMA operand fragment (`ident` A or B) of F from `smem` at `at`, rows
/// `stride` apart (`col_major`: the fragment is stored transposed, columns `stride` apart).
#[cube]
pub(crate) fn load_fragment<F: Float>(
    smem: &SharedMemory<F>,
    at: usize,
    #[comptime] stride: usize,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] col_major: bool,
) -> cmma::Matrix<F> {
    let layout = comptime!(if col_major {
        cmma::MatrixLayout::ColMajor
    } else {
        cmma::MatrixLayout::RowMajor
    });
    let frag =
        unsafe { cmma::Matrix::<F>::uninitialized(ident, FRAGMENT, FRAGMENT, FRAGMENT, layout) };
    cmma::load(
        &frag,
        &smem.slice(at, at + comptime!((FRAGMENT - 1) * stride + FRAGMENT)),
        u32::new(comptime!(stride as i64)),
    );
    frag
}

/// A 16 × 16 f32 CMMA accumulator holding zeros.
#[cube]
pub(crate) fn zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        FRAGMENT,
        FRAGMENT,
        FRAGMENT,
        cmma::MatrixLayout::Undefined,
        0.0,
    )
}

/// acc += a · B on one 16 × 16 × 16 fragment, B at `b0` (stride `b_stride`), row-major
/// `[k][n]` or, with `b_col_major`, stored `[n][k]`.
#[cube]
pub(crate) fn mma_b<F: Float>(
    a: &cmma::Matrix<F>,
    b_s: &SharedMemory<F>,
    b0: usize,
    #[comptime] b_stride: usize,
    #[comptime] b_col_major: bool,
    acc: &cmma::Matrix<f32>,
) {
    let b = load_fragment::<F>(b_s, b0, b_stride, cmma::MatrixIdent::B, b_col_major);
    cmma::execute::<F, F, f32, f32>(a, &b, acc, acc);
}

/// One fragment product `C += A · B` (A row-major, B as [`mma_b`] reads it) as plain loops,
/// the accumulator in shared memory (row-major at `c0`, stride `c_stride`): lane `lane` of the
/// plane owns elements lane, lane + plane_size, ... of the fragment.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fragment_mma_emulated<F: Float>(
    a_s: &SharedMemory<F>,
    a0: usize,
    #[comptime] a_stride: usize,
    b_s: &SharedMemory<F>,
    b0: usize,
    #[comptime] b_stride: usize,
    #[comptime] b_col_major: bool,
    c_s: &mut SharedMemory<f32>,
    c0: usize,
    #[comptime] c_stride: usize,
    lane: usize,
    #[comptime] plane_size: usize,
) {
    let f = FRAGMENT;
    for r in 0..comptime!(FRAGMENT * FRAGMENT / plane_size) {
        let e = r * plane_size + lane;
        let (fr, fc) = (e / f, e % f);
        let mut dot = f32::new(0.0);
        for x in 0..FRAGMENT {
            let bv = if comptime!(b_col_major) {
                b_s[b0 + fc * b_stride + x]
            } else {
                b_s[b0 + x * b_stride + fc]
            };
            dot += f32::cast_from(a_s[a0 + fr * a_stride + x]) * f32::cast_from(bv);
        }
        c_s[c0 + fr * c_stride + fc] += dot;
    }
}

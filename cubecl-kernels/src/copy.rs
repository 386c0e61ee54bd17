//! Strided copy between two views of device buffers: how the model appends new keys and values
//! to its KV caches and picks single rows out of batched tensors without a host round trip.

use cubecl::prelude::*;

/// dst[dst_offset + Σ c_i·dst.stride(i)] = src[src_offset + Σ c_i·src.stride(i)] for every
/// coordinate c of dst's shape (src has the same shape).
///
/// One unit per vector of N elements along the last dimension; the launcher guarantees that
/// both last strides are 1 and that N divides the last dimension, every other stride and both
/// offsets (all in elements). `units` is the number of vectors.
#[cube(launch_unchecked)]
pub fn strided_copy<T: Numeric, N: Size>(
    src: &Tensor<Vector<T, N>>,
    dst: &mut Tensor<Vector<T, N>>,
    src_offset: u32,
    dst_offset: u32,
    units: usize,
) {
    if ABSOLUTE_POS < units {
        let nv = N::value();
        let rank = dst.rank();
        let last = rank - 1;
        let mut rem = ABSOLUTE_POS;
        // The last coordinate counts vectors; the others count elements.
        let per_row = dst.shape(last) / nv;
        let mut s = src_offset as usize / nv + rem % per_row;
        let mut d = dst_offset as usize / nv + rem % per_row;
        rem /= per_row;
        let mut axis = last;
        while axis > 0 {
            axis -= 1;
            let n = dst.shape(axis);
            let c = rem % n;
            rem /= n;
            s += c * src.stride(axis) / nv;
            d += c * dst.stride(axis) / nv;
        }
        dst[d] = src[s];
    }
}

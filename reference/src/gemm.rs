//! Linear layers: matrix multiply plus bias.

/// `out[n, o] = sum_c inp[n, c] · weight[c, o] + bias[o]`, accumulated in f64.
pub fn linear(
    out: &mut [f32],      // (N, OC)
    inp: &[f32],          // (N, C)
    weight: &[f32],       // (C, OC)
    bias: Option<&[f32]>, // (OC)
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(out.len(), n * oc);
    assert_eq!(inp.len(), n * c);
    assert_eq!(weight.len(), c * oc);
    if let Some(b) = bias {
        assert_eq!(b.len(), oc);
    }
    let mut acc = vec![0f64; oc];
    for row in 0..n {
        match bias {
            Some(b) => acc.iter_mut().zip(b).for_each(|(a, &b)| *a = b as f64),
            None => acc.fill(0.0),
        }
        let x = &inp[row * c..(row + 1) * c];
        for (i, &xi) in x.iter().enumerate() {
            let xi = xi as f64;
            let w = &weight[i * oc..(i + 1) * oc];
            for (a, &wv) in acc.iter_mut().zip(w) {
                *a += xi * wv as f64;
            }
        }
        for (o, &a) in out[row * oc..(row + 1) * oc].iter_mut().zip(&acc) {
            *o = a as f32;
        }
    }
}

/// The transpose of a row-major (R, C) matrix, as a new (C, R) one.
pub fn transpose(x: &[f32] /* (R, C) */, r: usize, c: usize) -> Vec<f32> {
    assert_eq!(x.len(), r * c);
    let mut out = vec![0f32; r * c]; // (C, R)
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = x[i * c + j];
        }
    }
    out
}

/// Backward of [`linear`]: d_inp = d_out · weightᵀ, and (accumulated) d_weight += inpᵀ · d_out,
/// d_bias += Σ_n d_out[n, :].
pub fn linear_backward(
    d_inp: &mut [f32],          // (N, C)
    d_weight: &mut [f32],       // (C, OC)
    d_bias: Option<&mut [f32]>, // (OC)
    d_out: &[f32],              // (N, OC)
    inp: &[f32],                // (N, C)
    weight: &[f32],             // (C, OC)
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!((d_inp.len(), inp.len()), (n * c, n * c));
    assert_eq!(
        (d_weight.len(), weight.len(), d_out.len()),
        (c * oc, c * oc, n * oc)
    );
    for row in 0..n {
        let g = &d_out[row * oc..][..oc];
        for i in 0..c {
            let w = &weight[i * oc..][..oc];
            d_inp[row * c + i] = g
                .iter()
                .zip(w)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    for i in 0..c {
        for o in 0..oc {
            let mut acc = d_weight[i * oc + o] as f64;
            for row in 0..n {
                acc += inp[row * c + i] as f64 * d_out[row * oc + o] as f64;
            }
            d_weight[i * oc + o] = acc as f32;
        }
    }
    if let Some(db) = d_bias {
        assert_eq!(db.len(), oc);
        for o in 0..oc {
            let mut acc = db[o] as f64;
            for row in 0..n {
                acc += d_out[row * oc + o] as f64;
            }
            db[o] = acc as f32;
        }
    }
}

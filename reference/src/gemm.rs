//! Linear layers: matrix multiply plus bias.

/// out[n, o] = sum_c inp[n, c] · weight[c, o] + bias[o], accumulated in f64.
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

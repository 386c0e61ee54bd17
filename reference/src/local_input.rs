//! The local model's input: global output projected to the local width, plus the byte
//! embedding of the previous byte in the patch (a learned pad at p = 0) and local positions.

/// out[b, k, p, :] = g[b, k, p·D_G .. (p+1)·D_G] · W_GL
///                   + (p == 0 ? lpad : E_L[x[b, k·P + p - 1]]) + E_lpos[p]
pub fn local_input(
    out: &mut [f32],      // (B, K, P, D_L)
    g: &[f32],            // (B, K, P·D_G)
    x: &[u32],            // (B, T = K·P)
    w_gl: &[f32],         // (D_G, D_L)
    e_l: &[f32],          // (V, D_L)
    lpad: &[f32],         // (D_L)
    lpos: Option<&[f32]>, // (P, D_L)
    b: usize,
    k: usize,
    p: usize,
    dg: usize,
    dl: usize,
) {
    let t = k * p;
    assert_eq!(out.len(), b * t * dl);
    assert_eq!(g.len(), b * k * p * dg);
    assert_eq!(x.len(), b * t);
    assert_eq!(w_gl.len(), dg * dl);
    let mut acc = vec![0f64; dl];
    for bi in 0..b {
        for ki in 0..k {
            for pi in 0..p {
                let row = (bi * k + ki) * p + pi;
                let gs = &g[row * dg..][..dg];
                let prev = if pi == 0 {
                    lpad
                } else {
                    let id = x[bi * t + ki * p + pi - 1] as usize;
                    &e_l[id * dl..][..dl]
                };
                for o in 0..dl {
                    acc[o] = prev[o] as f64 + lpos.map_or(0.0, |e| e[pi * dl + o] as f64);
                }
                for (i, &gv) in gs.iter().enumerate() {
                    let wrow = &w_gl[i * dl..][..dl];
                    for o in 0..dl {
                        acc[o] += gv as f64 * wrow[o] as f64;
                    }
                }
                for (o, &a) in out[row * dl..][..dl].iter_mut().zip(&acc) {
                    *o = a as f32;
                }
            }
        }
    }
}

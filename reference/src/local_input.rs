//! The local model's input: global output projected to the local width, plus the byte
//! embedding of the previous byte in the patch (a learned pad at p = 0) and local positions.

/// ```text
/// out[b, k, p, :] = g[b, k, p·D_G .. (p+1)·D_G] · W_GL
///                   + (p == 0 ? lpad : E_L[x[b, k·P + p - 1]]) + E_lpos[p]
/// ```
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

/// Backward of [`local_input`]: writes d_g (B, K, P·D_G) = d_out · W_GLᵀ (per byte slice) and
/// accumulates `d_w_gl += Σ g_sliceᵀ · d_out`, `d_lpad` (p = 0 rows), `d_e_l[x[t - 1]]` (other
/// rows), `d_lpos[p]`.
pub fn local_input_backward(
    d_g: &mut [f32],            // (B, K, P·D_G)
    d_w_gl: &mut [f32],         // (D_G, D_L)
    d_e_l: &mut [f32],          // (V, D_L)
    d_lpad: &mut [f32],         // (D_L)
    d_lpos: Option<&mut [f32]>, // (P, D_L)
    d_out: &[f32],              // (B, K, P, D_L)
    g: &[f32],                  // (B, K, P·D_G)
    x: &[u32],                  // (B, T)
    w_gl: &[f32],               // (D_G, D_L)
    b: usize,
    k: usize,
    p: usize,
    dg: usize,
    dl: usize,
) {
    let t = k * p;
    let rows = b * t;
    crate::gemm::linear_backward(d_g, d_w_gl, None, d_out, g, w_gl, rows, dg, dl);
    let mut d_lpos = d_lpos;
    for r in 0..rows {
        let pi = r % p;
        let dy = &d_out[r * dl..][..dl];
        if pi == 0 {
            d_lpad.iter_mut().zip(dy).for_each(|(a, &g)| *a += g);
        } else {
            let id = x[r - 1] as usize;
            d_e_l[id * dl..][..dl]
                .iter_mut()
                .zip(dy)
                .for_each(|(a, &g)| *a += g);
        }
        if let Some(lp) = d_lpos.as_deref_mut() {
            lp[pi * dl..][..dl]
                .iter_mut()
                .zip(dy)
                .for_each(|(a, &g)| *a += g);
        }
    }
}

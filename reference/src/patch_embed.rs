//! The global model's input: byte embedding, then patchify and shift right by one patch.

/// out[b, t, :] = wte[x[b, t], :] + wpe[t, :] (wpe omitted when None).
pub fn byte_embedding(
    out: &mut [f32],     // (B, T, C)
    x: &[u32],           // (B, T)
    wte: &[f32],         // (V, C)
    wpe: Option<&[f32]>, // (T_max >= T, C)
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!(out.len(), b * t * c);
    assert_eq!(x.len(), b * t);
    for bi in 0..b {
        for ti in 0..t {
            let id = x[bi * t + ti] as usize;
            let e = &wte[id * c..(id + 1) * c];
            let o = &mut out[(bi * t + ti) * c..][..c];
            for i in 0..c {
                let pos = wpe.map_or(0.0, |wpe| wpe[ti * c + i] as f64);
                o[i] = (e[i] as f64 + pos) as f32;
            }
        }
    }
}

/// Views h as (B, K, P·C) and shifts it right by one patch: out[b, 0] = pad,
/// out[b, k] = h[b, k-1] for k >= 1. The last patch of h is not used.
pub fn patchify_shift(
    out: &mut [f32], // (B, K, P·C)
    h: &[f32],       // (B, T = K·P, C)
    pad: &[f32],     // (P·C)
    b: usize,
    t: usize,
    p: usize,
    c: usize,
) {
    assert_eq!(t % p, 0, "T must be a multiple of P");
    let k = t / p;
    let w = p * c;
    assert_eq!(out.len(), b * k * w);
    assert_eq!(h.len(), b * t * c);
    assert_eq!(pad.len(), w);
    for bi in 0..b {
        out[bi * k * w..][..w].copy_from_slice(pad);
        for ki in 1..k {
            // Patch k-1 of h is bytes (k-1)·P .. k·P, already contiguous as P·C values.
            let src = &h[(bi * t + (ki - 1) * p) * c..][..w];
            out[(bi * k + ki) * w..][..w].copy_from_slice(src);
        }
    }
}

/// The whole global input: `patchify_shift(byte_embedding(x))`, (B, K, P·D_G).
pub fn global_input(
    out: &mut [f32], // (B, K, P·C)
    x: &[u32],       // (B, T)
    wte: &[f32],     // (V, C)
    wpe: &[f32],     // (T_max, C)
    pad: &[f32],     // (P·C)
    b: usize,
    t: usize,
    p: usize,
    c: usize,
) {
    let mut h = vec![0f32; b * t * c];
    byte_embedding(&mut h, x, wte, Some(wpe), b, t, c);
    patchify_shift(out, &h, pad, b, t, p, c);
}

/// Backward of [`global_input`], accumulated: d_pad += Σ_b d_out[b, 0]; for k >= 1 and byte
/// t = (k-1)·P + p, `d_wte[x[b, t]]` and `d_wpe[t] += d_out[b, k, p·C ..]`. The bytes of the last
/// patch feed nothing and get no gradient.
pub fn global_input_backward(
    d_wte: &mut [f32], // (V, C)
    d_wpe: &mut [f32], // (T_max, C)
    d_pad: &mut [f32], // (P·C)
    d_out: &[f32],     // (B, K, P·C)
    x: &[u32],         // (B, T)
    b: usize,
    t: usize,
    p: usize,
    c: usize,
) {
    let k = t / p;
    let w = p * c;
    assert_eq!(d_out.len(), b * k * w);
    for bi in 0..b {
        for i in 0..w {
            d_pad[i] += d_out[bi * k * w + i];
        }
        for ki in 1..k {
            for pi in 0..p {
                let ti = (ki - 1) * p + pi;
                let id = x[bi * t + ti] as usize;
                for i in 0..c {
                    let g = d_out[(bi * k + ki) * w + pi * c + i];
                    d_wte[id * c + i] += g;
                    d_wpe[ti * c + i] += g;
                }
            }
        }
    }
}

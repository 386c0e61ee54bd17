//! Fused logits and cross-entropy for the tied head: each row's logits against the byte
//! embedding table, their log-sum-exp and the loss, without writing the (rows, V) logits
//! unless asked to.

use cubecl::prelude::*;

/// Comptime shape of [`tied_cross_entropy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CrossEntropyConfig {
    /// Units per row (one cube per row), a power of two.
    pub units: usize,
    /// Also store the logits.
    pub write_logits: bool,
}

/// Large negative stand-in for -inf: `exp(NEG - NEG)` stays finite.
const NEG: f32 = -1.0e30;

/// For each row r: z[v] = x[r, :] · table[v, :] (f32), lse[r] = log Σ_v exp z[v] and
/// loss[r] = lse[r] - z[targets[r]] in nats; logits[r, v] = z[v] when `cfg.write_logits`
/// (a placeholder otherwise). Unit u of a row's cube scores v = u, u + units, ... keeping a
/// running (max, sum) pair; the pairs meet in shared memory in a tree. A target >= V gives a
/// NaN loss.
#[cube(launch_unchecked)]
pub fn tied_cross_entropy<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    table: &Tensor<Vector<F, N>>,
    targets: &Tensor<u32>,
    loss: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    logits: &mut Tensor<F>,
    #[comptime] cfg: CrossEntropyConfig,
) {
    let rows = x.shape(0);
    let row = CUBE_POS;
    // Uniform over the cube: a cube past the end skips every barrier together.
    if row < rows {
        let nv = N::value();
        let dv = x.shape(1) / nv;
        let vocab = table.shape(0);
        let u = UNIT_POS as usize;
        let target_id = targets[row];
        let target = target_id as usize;
        let mut m_s = SharedMemory::<f32>::new(cfg.units);
        let mut s_s = SharedMemory::<f32>::new(cfg.units);
        let mut t_s = SharedMemory::<f32>::new(1usize);
        if u == 0 {
            // A NaN from the bits of a runtime value: WGSL has no NaN literal. It stays
            // unless the target's logit is scored (a target >= V never is).
            t_s[0usize] = f32::reinterpret(0x7FC0_0000u32 | (target_id & 1u32));
        }
        sync_cube();

        let mut m = f32::new(NEG);
        let mut s = f32::new(0.0);
        let mut v = u;
        while v < vocab {
            let mut acc = Vector::<f32, N>::new(0.0);
            for c in 0..dv {
                acc += Vector::<f32, N>::cast_from(x[row * dv + c])
                    * Vector::<f32, N>::cast_from(table[v * dv + c]);
            }
            let mut z = f32::new(0.0);
            #[unroll]
            for l in 0..nv {
                z += acc[l];
            }
            if comptime!(cfg.write_logits) {
                logits[row * vocab + v] = F::cast_from(z);
            }
            if v == target {
                t_s[0usize] = z;
            }
            let m_new = max(m, z);
            s = s * (m - m_new).exp() + (z - m_new).exp();
            m = m_new;
            v += cfg.units;
        }
        m_s[u] = m;
        s_s[u] = s;
        sync_cube();
        let mut half = CUBE_DIM as usize / 2;
        while half > 0 {
            if u < half {
                let m1 = m_s[u];
                let m2 = m_s[u + half];
                let mm = max(m1, m2);
                s_s[u] = s_s[u] * (m1 - mm).exp() + s_s[u + half] * (m2 - mm).exp();
                m_s[u] = mm;
            }
            sync_cube();
            half /= 2;
        }
        if u == 0 {
            let total = m_s[0usize] + s_s[0usize].ln();
            lse[row] = total;
            loss[row] = total - t_s[0usize];
        }
    }
}

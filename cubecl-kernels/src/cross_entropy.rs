//! Fused logits and cross-entropy for the tied head: each row's logits against the byte
//! embedding table, their log-sum-exp and the loss, without writing the (rows, V) logits
//! unless asked to.

use cubecl::prelude::*;

/// Comptime shape of [`tied_cross_entropy()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CrossEntropyConfig {
    /// Units per cube, a power of two; unit u scores the entries v = u + j·units.
    pub units: usize,
    /// Rows per cube: each table vector loaded serves all of them.
    pub rows: usize,
    /// Vocabulary entries per unit, ceil(V / units).
    pub per_unit: usize,
    /// Also store the logits.
    pub write_logits: bool,
}

/// Large negative stand-in for -inf: `exp(NEG - NEG)` stays finite.
const NEG: f32 = -1.0e30;

/// For each row r: `z[v] = x[r, :] · table[v, :]` (f32), `lse[r] = log Σ_v exp z[v]` and
/// `loss[r] = lse[r] - z[targets[r]]` in nats; `logits[r, v] = z[v]` when `cfg.write_logits`
/// (a placeholder otherwise).
///
/// A cube takes `rows` rows. Unit u accumulates the dot products of its `per_unit` vocabulary
/// entries with every row of the cube at once (a register tile: each table vector loaded serves
/// `rows` rows, each row vector `per_unit` entries), then folds them into a running (max, sum)
/// pair per row; the pairs of the units meet in shared memory in a tree. A target >= V gives a
/// NaN loss.
// A comptime branch holds a run-time one: collapsed into one `if`, the comptime flag would
// become a run-time test and the store would be emitted with the flag off.
#[allow(clippy::collapsible_if)]
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
    let n_rows = x.shape(0);
    let rr = cfg.rows;
    let pu = cfg.per_unit;
    let row0 = CUBE_POS * rr;
    // Uniform over the cube: a cube past the end skips every barrier together.
    if row0 < n_rows {
        let nv = N::value();
        let dv = x.shape(1) / nv;
        let vocab = table.shape(0);
        let u = UNIT_POS as usize;
        let mut m_s = SharedMemory::<f32>::new(comptime!(cfg.rows * cfg.units));
        let mut s_s = SharedMemory::<f32>::new(comptime!(cfg.rows * cfg.units));
        let mut t_s = SharedMemory::<f32>::new(cfg.rows);
        if u < rr {
            // A NaN from the bits of a runtime value (WGSL has no NaN literal); it stays unless
            // the target's logit is scored, which a target >= V never is.
            let row = min(row0 + u, n_rows - 1);
            t_s[u] = f32::reinterpret(0x7FC0_0000u32 | (targets[row] & 1u32));
        }
        sync_cube();

        let mut acc = Array::<Vector<f32, N>>::new(comptime!(cfg.rows * cfg.per_unit));
        #[unroll]
        for i in 0..comptime!(cfg.rows * cfg.per_unit) {
            acc[i] = Vector::new(0.0);
        }
        let mut xr = Array::<Vector<f32, N>>::new(rr);
        for c in 0..dv {
            #[unroll]
            for r in 0..rr {
                let row = min(row0 + r, n_rows - 1);
                xr[r] = Vector::cast_from(x[row * dv + c]);
            }
            #[unroll]
            for j in 0..pu {
                let v = min(u + j * cfg.units, vocab - 1);
                let e = Vector::<f32, N>::cast_from(table[v * dv + c]);
                #[unroll]
                for r in 0..rr {
                    acc[r * pu + j] += xr[r] * e;
                }
            }
        }

        #[unroll]
        for r in 0..rr {
            let row = row0 + r;
            let mut m = f32::new(NEG);
            let mut s = f32::new(0.0);
            let mut target = vocab;
            if row < n_rows {
                target = targets[row] as usize;
            }
            #[unroll]
            for j in 0..pu {
                let v = u + j * cfg.units;
                if v < vocab {
                    let mut z = f32::new(0.0);
                    #[unroll]
                    for l in 0..nv {
                        z += acc[r * pu + j][l];
                    }
                    if comptime!(cfg.write_logits) {
                        if row < n_rows {
                            logits[row * vocab + v] = F::cast_from(z);
                        }
                    }
                    if v == target {
                        t_s[r] = z;
                    }
                    let m_new = max(m, z);
                    s = s * (m - m_new).exp() + (z - m_new).exp();
                    m = m_new;
                }
            }
            m_s[r * cfg.units + u] = m;
            s_s[r * cfg.units + u] = s;
        }
        sync_cube();
        let mut half = CUBE_DIM as usize / 2;
        while half > 0 {
            if u < half {
                #[unroll]
                for r in 0..rr {
                    let a = r * cfg.units + u;
                    let m1 = m_s[a];
                    let m2 = m_s[a + half];
                    let mm = max(m1, m2);
                    s_s[a] = s_s[a] * (m1 - mm).exp() + s_s[a + half] * (m2 - mm).exp();
                    m_s[a] = mm;
                }
            }
            sync_cube();
            half /= 2;
        }
        if u < rr {
            let row = row0 + u;
            if row < n_rows {
                let total = m_s[u * cfg.units] + s_s[u * cfg.units].ln();
                lse[row] = total;
                loss[row] = total - t_s[u];
            }
        }
    }
}

/// Cross-entropy backward in place: logits (rows, V) become
/// `d_logits = (exp(z - lse[r]) - [v == target[r]]) · scale`, the probabilities never stored
/// on their own. One unit per element; `lse` is the forward's.
#[cube(launch_unchecked)]
pub fn cross_entropy_backward<F: Float>(
    logits: &mut Tensor<F>,
    lse: &Tensor<f32>,
    targets: &Tensor<u32>,
    scale: f32,
) {
    let vocab = logits.shape(1);
    if ABSOLUTE_POS < logits.shape(0) * vocab {
        let r = ABSOLUTE_POS / vocab;
        let id = ABSOLUTE_POS % vocab;
        let p = (f32::cast_from(logits[ABSOLUTE_POS]) - lse[r]).exp();
        let hit = select(targets[r] as usize == id, f32::new(1.0), f32::new(0.0));
        logits[ABSOLUTE_POS] = F::cast_from((p - hit) * scale);
    }
}

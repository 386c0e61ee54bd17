//! Embedding backward: gradients of gathered rows summed back into their tables,
//! deterministically (no atomics): every output element is one sum in (b, s) order.

use cubecl::prelude::*;

/// out[s, d] (+)= Σ_b rows[b, s, d], one unit per output element, summing in b order (a
/// position embedding's gradient); rows s >= S get zero (or keep their value when
/// accumulating). rows (B, S, D) is a strided view whose offset is passed separately; out
/// (V, D) is contiguous.
#[cube(launch_unchecked)]
pub fn embedding_backward_by_position<F: Float>(
    rows: &Tensor<F>,
    out: &mut Tensor<F>,
    rows_offset: u32,
    #[comptime] accumulate: bool,
) {
    let batch = rows.shape(0);
    let seq = rows.shape(1);
    let width = rows.shape(2);
    let vocab = out.shape(0);
    if ABSOLUTE_POS < vocab * width {
        let v = ABSOLUTE_POS / width;
        let d = ABSOLUTE_POS % width;
        let mut acc = f32::new(0.0);
        if comptime!(accumulate) {
            acc = f32::cast_from(out[ABSOLUTE_POS]);
        }
        if v < seq {
            let base = rows_offset as usize + d * rows.stride(2) + v * rows.stride(1);
            for b in 0..batch {
                acc += f32::cast_from(rows[base + b * rows.stride(0)]);
            }
        }
        out[ABSOLUTE_POS] = F::cast_from(acc);
    }
}

/// Comptime shape of [`embedding_backward_by_id()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByIdConfig {
    /// Units per cube.
    pub units: usize,
    /// Rows whose ids are matched per pass, a multiple of `units`.
    pub chunk: usize,
    /// Columns per unit: D ≤ units · cols.
    pub cols: usize,
    pub accumulate: bool,
}

/// out[v, :] (+)= Σ over (b, s) with ids[b, s] = v of rows[b, s, :], one cube per table row v,
/// summing in (b, s) order; each cube reads the ids once, not once per column. Per pass the
/// units load `chunk` ids, unit 0 lists the matching rows in order, and unit u adds those
/// rows' columns u, u + units, ... (long passes: few barriers, which CPU drivers pay for per
/// lane group). rows (B, S, D) and ids (B, S) are strided views (offsets passed separately);
/// out (V, D) is contiguous.
// A comptime branch holds a run-time one: collapsed into one `if`, the comptime flag would
// become a run-time test and the store would be emitted with the flag off.
#[allow(clippy::collapsible_if)]
#[cube(launch_unchecked)]
pub fn embedding_backward_by_id<F: Float>(
    rows: &Tensor<F>,
    ids: &Tensor<u32>,
    out: &mut Tensor<F>,
    rows_offset: u32,
    ids_offset: u32,
    #[comptime] cfg: ByIdConfig,
) {
    let seq = rows.shape(1);
    let n_rows = rows.shape(0) * seq;
    let width = rows.shape(2);
    let v = CUBE_POS;
    let u = UNIT_POS as usize;
    let mut matched = SharedMemory::<u32>::new(cfg.chunk);
    let mut list = SharedMemory::<u32>::new(cfg.chunk);
    let mut count = SharedMemory::<u32>::new(1usize);
    let mut acc = Array::<f32>::new(cfg.cols);
    #[unroll]
    for k in 0..cfg.cols {
        let d = u + k * cfg.units;
        acc[k] = f32::new(0.0);
        if comptime!(cfg.accumulate) {
            if d < width {
                acc[k] = f32::cast_from(out[v * width + d]);
            }
        }
    }
    let mut n0 = 0;
    while n0 < n_rows {
        let mut t = u;
        while t < cfg.chunk {
            let n = n0 + t;
            let mut hit = 0u32;
            if n < n_rows {
                let id = ids
                    [ids_offset as usize + (n / seq) * ids.stride(0) + (n % seq) * ids.stride(1)];
                hit = u32::cast_from(id as usize == v);
            }
            matched[t] = hit;
            t += cfg.units;
        }
        sync_cube();
        if u == 0 {
            let mut c = 0u32;
            for t in 0..cfg.chunk {
                if matched[t] == 1 {
                    list[c as usize] = (n0 + t) as u32;
                    c += 1;
                }
            }
            count[0] = c;
        }
        sync_cube();
        for i in 0..count[0] {
            let m = list[i as usize] as usize;
            let at = rows_offset as usize + (m / seq) * rows.stride(0) + (m % seq) * rows.stride(1);
            #[unroll]
            for k in 0..cfg.cols {
                let d = u + k * cfg.units;
                if d < width {
                    acc[k] += f32::cast_from(rows[at + d * rows.stride(2)]);
                }
            }
        }
        // `matched`, `list` and `count` are rewritten by the next pass.
        sync_cube();
        n0 += cfg.chunk;
    }
    #[unroll]
    for k in 0..cfg.cols {
        let d = u + k * cfg.units;
        if d < width {
            out[v * width + d] = F::cast_from(acc[k]);
        }
    }
}

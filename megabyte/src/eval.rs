//! Bits per byte of a byte string, window by window, for any backend.
//!
//! The data is cut into consecutive windows of the context length; each window is predicted
//! from its own bytes only (position 0 of a window from nothing). The last, shorter window is
//! padded with zeros to a whole number of patches; causality keeps the padding from affecting
//! the real positions, and only those are counted.

use crate::error::Error;

/// Total cross-entropy of a byte string.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    pub bytes: usize,
    /// Sum of per-byte cross-entropies in nats.
    pub nats: f64,
}

impl Evaluation {
    pub fn bits_per_byte(&self) -> f64 {
        self.nats / self.bytes.max(1) as f64 / std::f64::consts::LN_2
    }
}

/// Evaluates `data` in windows of `context` bytes, `batch` full windows per call of `losses`.
/// `losses(ids, batch, seq)` returns per-position nats for ids (batch, seq); `progress` is
/// told how many bytes are done after each call.
pub fn evaluate(
    data: &[u8],
    context: usize,
    patch: usize,
    batch: usize,
    mut losses: impl FnMut(&[u32], usize, usize) -> Result<Vec<f32>, Error>,
    mut progress: impl FnMut(usize),
) -> Result<Evaluation, Error> {
    let batch = batch.max(1);
    let mut eval = Evaluation {
        bytes: 0,
        nats: 0.0,
    };
    let full = data.len() / context;
    let mut w = 0;
    while w < full {
        let n = batch.min(full - w);
        let ids: Vec<u32> = data[w * context..(w + n) * context]
            .iter()
            .map(|&b| b as u32)
            .collect();
        let l = losses(&ids, n, context)?;
        eval.nats += l.iter().map(|&x| x as f64).sum::<f64>();
        eval.bytes += n * context;
        w += n;
        progress(eval.bytes);
    }
    let rest = &data[full * context..];
    if !rest.is_empty() {
        let seq = rest.len().div_ceil(patch) * patch;
        let mut ids: Vec<u32> = rest.iter().map(|&b| b as u32).collect();
        ids.resize(seq, 0);
        let l = losses(&ids, 1, seq)?;
        eval.nats += l[..rest.len()].iter().map(|&x| x as f64).sum::<f64>();
        eval.bytes += rest.len();
        progress(eval.bytes);
    }
    Ok(eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_byte_once_and_padding_is_not_counted() {
        let data: Vec<u8> = (0..50).collect();
        let mut seen = Vec::new();
        let e = evaluate(
            &data,
            16,
            4,
            2,
            |ids, b, t| {
                assert_eq!(ids.len(), b * t);
                assert_eq!(t % 4, 0);
                seen.push((b, t));
                // Each position's "loss" is its byte value + 1, padding included.
                Ok(ids.iter().map(|&x| x as f32 + 1.0).collect())
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(seen, vec![(2, 16), (1, 16), (1, 4)]);
        assert_eq!(e.bytes, 50);
        assert_eq!(e.nats, (1..=50).sum::<u32>() as f64);
    }
}

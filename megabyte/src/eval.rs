//! Bits per byte of a byte string, window by window, for any backend.
//!
//! Windows of the context length start every `stride` bytes. The first window scores all its
//! bytes; each later one scores only the bytes past the previous window's end, so every byte
//! is scored exactly once, and past the first window with at least `context - stride` bytes
//! of the window before it. With `stride == context` the windows are consecutive and each is
//! predicted from its own bytes only (position 0 of a window from nothing). The last window
//! may be shorter: it is padded with zeros to a whole number of patches; causality keeps the
//! padding from affecting the real positions, and only those are counted.

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

/// Checks an evaluation window and stride for a model of `context` bytes and patches of
/// `patch`: the window a whole number of patches, at most the context; the stride between 1
/// and the window.
pub fn check_window(
    window: usize,
    stride: usize,
    patch: usize,
    context: usize,
) -> Result<(), Error> {
    if window == 0 || !window.is_multiple_of(patch) || window > context {
        return Err(Error::EvalWindow {
            window,
            patch,
            context,
        });
    }
    if stride == 0 || stride > window {
        return Err(Error::EvalStride {
            stride,
            context: window,
        });
    }
    Ok(())
}

/// Evaluates `data` in consecutive windows of `context` bytes, `batch` full windows per call of
/// `losses` ([`evaluate_strided`] with `stride == context`).
pub fn evaluate(
    data: &[u8],
    context: usize,
    patch: usize,
    batch: usize,
    losses: impl FnMut(&[u32], usize, usize) -> Result<Vec<f32>, Error>,
    progress: impl FnMut(usize),
) -> Result<Evaluation, Error> {
    evaluate_strided(data, context, context, patch, batch, losses, progress)
}

/// Evaluates `data` in windows of `context` bytes starting every `stride` bytes (see the
/// module docs), `batch` full windows per call of `losses`. `losses(ids, batch, seq)` returns
/// per-position nats for ids (batch, seq); `progress` is told how many bytes are scored after
/// each call. A stride outside 1..=context, or a window that is not a whole number of patches,
/// is an error ([`check_window`]).
pub fn evaluate_strided(
    data: &[u8],
    context: usize,
    stride: usize,
    patch: usize,
    batch: usize,
    mut losses: impl FnMut(&[u32], usize, usize) -> Result<Vec<f32>, Error>,
    mut progress: impl FnMut(usize),
) -> Result<Evaluation, Error> {
    check_window(context, stride, patch, context)?;
    if batch == 0 {
        return Err(Error::Argument {
            name: "batch",
            value: "0".into(),
            reason: "score at least one window per call",
        });
    }
    let mut eval = Evaluation {
        bytes: 0,
        nats: 0.0,
    };
    // Full windows start at k·stride for k < full; the scored part of window k > 0 is its last
    // `stride` bytes.
    let full = if data.len() >= context {
        (data.len() - context) / stride + 1
    } else {
        0
    };
    let mut k = 0;
    while k < full {
        let n = batch.min(full - k);
        let mut ids = Vec::with_capacity(n * context);
        for w in k..k + n {
            ids.extend(
                data[w * stride..w * stride + context]
                    .iter()
                    .map(|&b| b as u32),
            );
        }
        let l = losses(&ids, n, context)?;
        for (i, w) in (k..k + n).enumerate() {
            let from = if w == 0 { 0 } else { context - stride };
            eval.nats += l[i * context + from..(i + 1) * context]
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>();
            eval.bytes += context - from;
        }
        k += n;
        progress(eval.bytes);
    }
    // The rest: one shorter window starting at the next stride, scored past the last full
    // window's end.
    let (start, scored_from) = if full == 0 {
        (0, 0)
    } else {
        (full * stride, (full - 1) * stride + context)
    };
    if scored_from < data.len() {
        let rest = &data[start..];
        let seq = rest.len().div_ceil(patch) * patch;
        let mut ids: Vec<u32> = rest.iter().map(|&b| b as u32).collect();
        ids.resize(seq, 0);
        let l = losses(&ids, 1, seq)?;
        eval.nats += l[scored_from - start..rest.len()]
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        eval.bytes += data.len() - scored_from;
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

    /// Byte i of the data is i, so a window's first id is its start and a loss of f(id) sums
    /// to Σ f over the scored positions: with f(x) = x + 1 and f(x) = (x + 1)², both sums
    /// equal the whole data's only if every byte is scored once.
    #[test]
    fn strided_windows_score_every_byte_once_with_the_promised_context() {
        for (len, context, stride, patch, batch) in [
            (50usize, 16usize, 4usize, 4usize, 3usize),
            (50, 16, 16, 4, 2),
            (16, 16, 4, 4, 1),
            (17, 16, 4, 4, 1),
            (9, 16, 8, 4, 2),
            (200, 32, 12, 8, 5),
            (200, 32, 1, 8, 7),
        ] {
            let data: Vec<u8> = (0..len as u8).collect();
            let case = format!("len {len}, context {context}, stride {stride}");
            for power in [1, 2] {
                let mut starts = Vec::new();
                let e = evaluate_strided(
                    &data,
                    context,
                    stride,
                    patch,
                    batch,
                    |ids, b, t| {
                        assert_eq!(ids.len(), b * t, "{case}");
                        assert_eq!(t % patch, 0, "{case}");
                        assert!(t <= context.next_multiple_of(patch), "{case}");
                        starts.extend((0..b).map(|i| ids[i * t] as usize));
                        Ok(ids.iter().map(|&x| (x as f32 + 1.0).powi(power)).collect())
                    },
                    |_| {},
                )
                .unwrap();
                assert_eq!(e.bytes, len, "{case}");
                let want: f64 = (1..=len).map(|x| (x as f64).powi(power)).sum();
                assert_eq!(e.nats, want, "{case}");
                // Windows start every `stride` bytes; after the first, each scores bytes with at
                // least context - stride bytes before them in the window.
                let expect: Vec<usize> = (0..starts.len()).map(|k| k * stride).collect();
                assert_eq!(starts, expect, "{case}");
                assert!(starts.last().unwrap() + context >= len, "{case}");
            }
        }
    }

    #[test]
    fn a_stride_outside_the_context_is_an_error() {
        for stride in [0, 17] {
            let err = evaluate_strided(&[1, 2, 3], 16, stride, 4, 1, |_, _, _| Ok(vec![]), |_| {})
                .unwrap_err();
            assert!(matches!(err, Error::EvalStride { .. }), "{err}");
            assert!(err.to_string().contains(&stride.to_string()), "{err}");
        }
    }
}

//! [`ReferenceDecoder`]: the decoding steps on the CPU through the reference model, so that
//! `--device cpu` samples, streams and stops through the same [`super::Generator`] as the
//! devices.

use megabyte_reference::model::forward;
use megabyte_reference::{Config, Error as InputError, Weights};

use super::{check_push, check_start, DecodeKernel, DecodeModel, StepDecoder};
use crate::error::Error;
use crate::weights::check_lengths;

/// [`StepDecoder`] on the CPU: each step re-runs `megabyte_reference::model::forward` on the
/// whole prefix (padded to whole patches; causality keeps the padding out of the position
/// read), as `megabyte_reference::generate` does, so it decodes the reference's bytes.
pub struct ReferenceDecoder<'w> {
    cfg: &'w Config,
    weights: &'w Weights,
    batch: usize,
    /// Each row's bytes so far, (B, n) row-major.
    seqs: Vec<u32>,
    /// Bytes consumed: the position whose logits the last call returned.
    pos: usize,
}

impl<'w> ReferenceDecoder<'w> {
    /// A decoder for `batch` sequences of a validated `cfg` and weights that match it.
    pub fn new(cfg: &'w Config, weights: &'w Weights, batch: usize) -> Result<Self, Error> {
        cfg.validate()?;
        check_lengths(cfg, weights)?;
        if batch == 0 {
            return Err(InputError::EmptyBatch { batch }.into());
        }
        Ok(ReferenceDecoder {
            cfg,
            weights,
            batch,
            seqs: Vec::new(),
            pos: 0,
        })
    }

    /// The position whose logits the last call returned (= bytes consumed so far).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The logits (B, V) of position `pos` from the full forward over the prefix.
    fn logits(&self) -> Result<Vec<f32>, Error> {
        let (b, n, p, v) = (self.batch, self.pos, self.cfg.patch, self.cfg.vocab);
        let t = (n + 1).div_ceil(p) * p;
        let mut x = vec![0u32; b * t];
        for row in 0..b {
            x[row * t..row * t + n].copy_from_slice(&self.seqs[row * n..(row + 1) * n]);
        }
        let all = forward(self.cfg, self.weights, &x, b, t)?;
        let mut out = Vec::with_capacity(b * v);
        for row in 0..b {
            out.extend_from_slice(&all[(row * t + n) * v..][..v]);
        }
        Ok(out)
    }
}

impl StepDecoder for ReferenceDecoder<'_> {
    fn start(&mut self, prompts: &[&[u8]]) -> Result<Vec<f32>, Error> {
        let n = check_start(prompts, self.batch, self.cfg.context)?;
        self.seqs = prompts
            .iter()
            .flat_map(|q| q.iter().map(|&x| x as u32))
            .collect();
        self.pos = n;
        self.logits()
    }

    fn push(&mut self, bytes: &[u32]) -> Result<Vec<f32>, Error> {
        let (cfg, n) = (self.cfg, self.pos);
        check_push(bytes, self.batch, cfg.vocab, n, 1, cfg.context)?;
        let mut seqs = Vec::with_capacity(self.batch * (n + 1));
        for (row, &x) in bytes.iter().enumerate() {
            seqs.extend_from_slice(&self.seqs[row * n..(row + 1) * n]);
            seqs.push(x);
        }
        self.seqs = seqs;
        self.pos = n + 1;
        self.logits()
    }
}

/// The reference model on the CPU as a [`DecodeModel`]: `Generator::new(&ReferenceModel::new(
/// &cfg, &weights)?, options)` generates with the same options, seeds, streaming and stops
/// as on a device, each step through [`ReferenceDecoder`].
pub struct ReferenceModel<'w> {
    cfg: &'w Config,
    weights: &'w Weights,
}

impl<'w> ReferenceModel<'w> {
    /// Checks `cfg` and that `weights` match it.
    pub fn new(cfg: &'w Config, weights: &'w Weights) -> Result<Self, Error> {
        cfg.validate()?;
        check_lengths(cfg, weights)?;
        Ok(ReferenceModel { cfg, weights })
    }
}

impl DecodeModel for ReferenceModel<'_> {
    type Decoder<'a>
        = ReferenceDecoder<'a>
    where
        Self: 'a;

    fn config(&self) -> &Config {
        self.cfg
    }

    fn decoder(&self, batch: usize, _: DecodeKernel) -> Result<ReferenceDecoder<'_>, Error> {
        ReferenceDecoder::new(self.cfg, self.weights, batch)
    }
}

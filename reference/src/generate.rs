//! Sampling and the naive generator, which re-runs the full forward pass for every byte.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::Config;
use crate::error::Error;
use crate::model::forward;
use crate::weights::Weights;

/// How the next id is drawn from a row of logits.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax, lowest id on ties); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely ids; 0 turns the filter off.
    pub top_k: usize,
    /// Keep the smallest set of most likely ids whose probability reaches p; 1 turns it off.
    pub top_p: f32,
    /// Seed of the sampler's random stream. Prompt i of a batch uses `seed + i`.
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::Sampling {
                name: "temperature",
                value: t as f64,
                reason: "must be finite and >= 0",
            });
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::Sampling {
                name: "top_p",
                value: p as f64,
                reason: "must be in (0, 1]",
            });
        }
        Ok(())
    }
}

/// A seeded sampler: the same seed and logits always give the same ids.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Result<Self, Error> {
        cfg.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    /// Draws one id from a row of logits (V).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature as f64;
        // Candidates by decreasing logit; ties keep the lower id first.
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 {
            ids.truncate(self.cfg.top_k);
        }
        let max = logits[ids[0]] as f64 * inv_t;
        let mut probs: Vec<f64> = ids
            .iter()
            .map(|&i| (logits[i] as f64 * inv_t - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.cfg.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, &p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            ids.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let u: f64 = self.rng.gen::<f64>() * total;
        let mut cum = 0.0;
        for (&id, &p) in ids.iter().zip(&probs) {
            cum += p;
            if u < cum {
                return id as u32;
            }
        }
        *ids.last().unwrap() as u32
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates up to `max_new` bytes after `prompt`, re-running the full forward pass on the whole
/// prefix for every byte. Stops early at the end id (256) when the vocabulary has one.
pub fn generate(
    cfg: &Config,
    w: &Weights,
    prompt: &[u8],
    max_new: usize,
    sampling: &Sampling,
) -> Result<Vec<u8>, Error> {
    cfg.validate()?;
    // Byte n is predicted at position n, so the last new byte sits at prompt + max_new - 1.
    if prompt.len().saturating_add(max_new) > cfg.context {
        return Err(Error::PromptTooLong {
            prompt: prompt.len(),
            new: max_new,
            context: cfg.context,
        });
    }
    let mut sampler = Sampler::new(sampling.clone())?;
    let mut seq: Vec<u32> = prompt.iter().map(|&b| b as u32).collect();
    let mut out = Vec::with_capacity(max_new);
    for _ in 0..max_new {
        let n = seq.len();
        // Pad to whole patches; causality makes the padding invisible at position n.
        let t = (n + 1).div_ceil(cfg.patch) * cfg.patch;
        let mut x = seq.clone();
        x.resize(t, 0);
        let logits = forward(cfg, w, &x, 1, t)?;
        let id = sampler.sample(&logits[n * cfg.vocab..(n + 1) * cfg.vocab]);
        if id >= 256 {
            break;
        }
        seq.push(id);
        out.push(id as u8);
    }
    Ok(out)
}

/// [`generate`] for a batch of prompts; prompt i samples with seed `sampling.seed + i`.
pub fn generate_batch(
    cfg: &Config,
    w: &Weights,
    prompts: &[&[u8]],
    max_new: usize,
    sampling: &Sampling,
) -> Result<Vec<Vec<u8>>, Error> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = Sampling {
                seed: sampling.seed.wrapping_add(i as u64),
                ..sampling.clone()
            };
            generate(cfg, w, p, max_new, &s)
        })
        .collect()
}

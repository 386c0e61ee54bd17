//! Training on the device: a forward pass that keeps what the backward needs, the backward
//! through every kernel, global-norm clipping and a fused AdamW step.
//!
//! Weights, gradients and both Adam moments are f32 device tensors (the model's weights are the
//! master copy). Every kernel of a step is deterministic (ordered sums, no atomics), so the same
//! weights and batch give the same bits; batches are drawn from a seed and the step number, so
//! a run stopped and resumed from a checkpoint ends with the same weights as an uninterrupted
//! one.

use cubecl::prelude::*;
use megabyte_ops::cross_entropy::{cross_entropy_backward, tied_cross_entropy};
use megabyte_ops::embedding::embedding_backward;
use megabyte_ops::gemm::{gemm, Epilogue};
use megabyte_ops::layer_norm::layer_norm_backward;
use megabyte_ops::optim::{adamw, AdamW};
use megabyte_ops::reduce::squared_norm;
use megabyte_ops::Tensor;
use megabyte_reference::{Config, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::block::block_backward;
use crate::checkpoint::{self, StorageDtype, OPTIMIZER_PREFIX};
use crate::error::Error;
use crate::model::{activation_kind, Model};
use crate::weights::DeviceWeights;

/// Optimiser and schedule settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate, reached after `warmup` steps.
    pub lr: f32,
    /// Final learning rate of the decay.
    pub min_lr: f32,
    pub warmup: u64,
    /// Total steps: the decay ends here.
    pub steps: u64,
    /// Cosine (true) or linear decay after warmup.
    pub cosine: bool,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay on linear-layer weights (not on norms, biases, embeddings, pads).
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    pub clip: f32,
    pub batch: usize,
    /// Bytes per training sequence (a multiple of P, at most the context).
    pub seq: usize,
    /// Seed of the batch sampler.
    pub seed: u64,
}

impl TrainConfig {
    pub fn new(cfg: &Config, steps: u64) -> Self {
        TrainConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: (steps / 20).max(1),
            steps,
            cosine: true,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: 1.0,
            batch: 8,
            seq: cfg.context,
            seed: 0,
        }
    }

    /// Checks every numeric setting: the learning rates finite with 0 <= `min_lr` <= `lr` and
    /// `lr` > 0, betas in [0, 1), `eps` finite and > 0, weight decay and clipping finite and
    /// >= 0, at least one step and one sequence per batch. The error names the setting.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |name, value: String, reason| {
            Err(Error::Argument {
                name,
                value,
                reason,
            })
        };
        let f = |v: f32| format!("{v}");
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", f(self.lr), "must be finite and > 0");
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(
                "min_lr",
                f(self.min_lr),
                "must be finite, >= 0 and at most lr",
            );
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(name, f(v), "must be in [0, 1)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", f(self.eps), "must be finite and > 0");
        }
        for (name, v) in [("weight_decay", self.weight_decay), ("clip", self.clip)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(name, f(v), "must be finite and >= 0");
            }
        }
        if self.steps == 0 {
            return bad("steps", "0".into(), "train at least one step");
        }
        if self.batch == 0 {
            return bad("batch", "0".into(), "a batch holds at least one sequence");
        }
        Ok(())
    }

    /// Learning rate at step t (1-based): linear warmup, then cosine or linear decay to
    /// `min_lr` at `steps`.
    pub fn lr_at(&self, t: u64) -> f32 {
        if t <= self.warmup {
            return self.lr * t as f32 / self.warmup as f32;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let frac = ((t - self.warmup) as f64 / span).min(1.0);
        let shape = if self.cosine {
            0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
        } else {
            1.0 - frac
        };
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * shape) as f32
    }
}

/// What one step measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub step: u64,
    /// Mean cross-entropy of the batch in nats, before the update.
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f32,
}

impl StepStats {
    pub fn bits_per_byte(&self) -> f64 {
        self.loss / std::f64::consts::LN_2
    }
}

/// A model being trained: f32 weights, gradients and Adam moments on the device.
pub struct Trainer<R: Runtime> {
    model: Model<R, f32>,
    grads: DeviceWeights<R, f32>,
    m: DeviceWeights<R, f32>,
    v: DeviceWeights<R, f32>,
    /// Weight decay applies to this tensor (by position in `DeviceWeights::tensors`).
    decay: Vec<bool>,
    pub train: TrainConfig,
    /// Steps taken so far.
    step: u64,
}

impl<R: Runtime> Trainer<R> {
    pub fn new(
        client: &ComputeClient<R>,
        cfg: &Config,
        weights: &Weights,
        train: TrainConfig,
    ) -> Result<Self, Error> {
        train.validate()?;
        megabyte_reference::model::check_shape(cfg, train.batch, train.seq)?;
        check_training_buffers(client, cfg, train.batch, train.seq)?;
        let model = Model::<R, f32>::new(client, cfg, weights)?;
        let grads = model.w.zeros_like(cfg)?;
        let m = model.w.zeros_like(cfg)?;
        let v = model.w.zeros_like(cfg)?;
        let decay = cfg
            .tensor_specs()
            .iter()
            .map(|(name, _)| {
                name.ends_with(".weight")
                    && (name.contains(".attn.")
                        || name.contains(".ffn.")
                        || name.starts_with("global_to_local")
                        || name.starts_with("head"))
            })
            .collect();
        Ok(Trainer {
            model,
            grads,
            m,
            v,
            decay,
            train,
            step: 0,
        })
    }

    /// Restores the optimiser state and step count saved by [`Trainer::save`].
    pub fn resume(
        client: &ComputeClient<R>,
        ckpt: &checkpoint::Checkpoint,
        train: TrainConfig,
    ) -> Result<Self, Error> {
        let mut t = Trainer::new(client, &ckpt.config, &ckpt.weights, train)?;
        let find = |name: &str| {
            ckpt.optimizer
                .iter()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| Error::Checkpoint {
                    path: ckpt.source.clone(),
                    reason: format!(
                        "optimizer tensor `{name}` is missing: not a training checkpoint"
                    ),
                })
        };
        let (_, _, step) = find("optimizer.step")?;
        // One whole number of steps, as `save` writes it (exact in f32 up to 2^24).
        t.step = match step.as_slice() {
            [s] if s.is_finite() && *s >= 0.0 && s.fract() == 0.0 && *s <= 16_777_216.0 => {
                *s as u64
            }
            other => {
                return Err(Error::Checkpoint {
                    path: ckpt.source.clone(),
                    reason: format!(
                        "optimizer tensor `optimizer.step` holds {other:?}: expected one whole number of steps >= 0"
                    ),
                })
            }
        };
        let specs = ckpt.config.tensor_specs();
        for (moments, key) in [(&t.m, "m"), (&t.v, "v")] {
            for ((name, _), dst) in specs.iter().zip(moments.tensors()) {
                let (_, shape, data) = find(&format!("{OPTIMIZER_PREFIX}{key}.{name}"))?;
                if shape != dst.shape() {
                    return Err(Error::Checkpoint {
                        path: ckpt.source.clone(),
                        reason: format!(
                            "optimizer tensor `{key}.{name}` has shape {shape:?}, expected {:?}",
                            dst.shape()
                        ),
                    });
                }
                let fresh = Tensor::<R, f32>::from_f32(client, data, shape)?;
                megabyte_ops::copy::copy(&fresh.view(), &dst.view())?;
            }
        }
        Ok(t)
    }

    pub fn model(&self) -> &Model<R, f32> {
        &self.model
    }

    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The batch of step t (1-based): `batch` windows of `seq` bytes at offsets drawn from
    /// (seed, t), so a resumed run sees the same batches.
    pub fn batch_for(&self, data: &[u8], t: u64) -> Result<Vec<u32>, Error> {
        let (b, s) = (self.train.batch, self.train.seq);
        if data.len() < s {
            return Err(Error::Data {
                path: "(the training part)".into(),
                reason: format!("{} bytes is shorter than one sequence of {s}", data.len()),
            });
        }
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.train.seed ^ t.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut ids = Vec::with_capacity(b * s);
        for _ in 0..b {
            let at = rng.gen_range(0..=data.len() - s);
            ids.extend(data[at..at + s].iter().map(|&x| x as u32));
        }
        Ok(ids)
    }

    /// One optimisation step on ids (batch, seq): forward, backward, clip, AdamW.
    pub fn step(&mut self, ids: &[u32]) -> Result<StepStats, Error> {
        let cfg = self.model.config().clone();
        let (b, t) = (self.train.batch, self.train.seq);
        megabyte_reference::model::check_input(&cfg, ids, b, t)?;
        let client = self.model.client().clone();
        let ids_t = Tensor::from_ids(&client, ids, &[b, t])?;
        let loss = self.forward_backward(&ids_t)?;
        let grads: Vec<&Tensor<R, f32>> = self.grads.tensors();
        let norm = squared_norm(&grads)?.sqrt();
        if !(loss.is_finite() && norm.is_finite()) {
            return Err(Error::Diverged {
                step: self.step + 1,
                what: format!("loss {loss}, gradient norm {norm}: the update was not applied"),
            });
        }
        let clip = self.train.clip as f64;
        let scale = if clip > 0.0 && norm > clip {
            clip / norm
        } else {
            1.0
        };
        self.step += 1;
        let lr = self.train.lr_at(self.step);
        let params = self.model.w.tensors();
        let (ms, vs) = (self.m.tensors(), self.v.tensors());
        for (i, p) in params.iter().enumerate() {
            let hp = AdamW {
                lr,
                beta1: self.train.beta1,
                beta2: self.train.beta2,
                eps: self.train.eps,
                weight_decay: if self.decay[i] {
                    self.train.weight_decay
                } else {
                    0.0
                },
            };
            adamw(p, grads[i], ms[i], vs[i], &hp, self.step, scale as f32)?;
        }
        Ok(StepStats {
            step: self.step,
            loss,
            grad_norm: norm,
            lr,
        })
    }

    /// Mean loss in nats of ids (batch, seq) and every gradient, written to `self.grads`.
    fn forward_backward(&mut self, ids: &Tensor<R, u32>) -> Result<f64, Error> {
        let cfg = self.model.config().clone();
        let client = self.model.client().clone();
        let w = &self.model.w;
        let g = &self.grads;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let (p, dg, dl, v) = (cfg.patch, cfg.d_global, cfg.d_local, cfg.vocab);
        let (k, c) = (t / p, cfg.global_width());
        let n = b * t;
        let act = activation_kind(cfg.activation);
        let (gs, ls) = (self.model.global_stack(), self.model.local_stack());

        // Forward, keeping each block's intermediates.
        let global = self.model.global_forward(ids, true)?;
        let (h, gout, gmean, grstd) = (&global.h, &global.out, &global.mean, &global.rstd);
        let local = self
            .model
            .local_forward(&gout.clone().reshape(&[b, k, c])?, ids, true)?;
        let (l, lout, lmean, lrstd) = (&local.h, &local.out, &local.mean, &local.rstd);
        let logits = Tensor::<R, f32>::empty(&client, &[n, v])?;
        let (loss, lse) = (Tensor::empty(&client, &[n])?, Tensor::empty(&client, &[n])?);
        let targets = ids.clone().reshape(&[n])?;
        tied_cross_entropy(lout, w.head_table(), &targets, &loss, &lse, Some(&logits))?;

        // Backward. The logits become their gradient in place.
        cross_entropy_backward(&logits, &lse, &targets, 1.0 / n as f32)?;
        let d_lout = Tensor::<R, f32>::empty(&client, &[n, dl])?;
        gemm(
            &logits.view(),
            &w.head_table().view(),
            &d_lout,
            &Epilogue::none(),
        )?;
        // The output table's gradient (E_L's head part when tied; the local-input part is
        // added below).
        gemm(
            &logits.view().t(),
            &lout.view(),
            g.head_table(),
            &Epilogue::none(),
        )?;
        let d_l = Tensor::<R, f32>::empty(&client, &[n, dl])?;
        let (lw, lb) = (&g.local_ln_f.weight, &g.local_ln_f.bias);
        layer_norm_backward(
            l,
            &d_lout,
            &w.local_ln_f.weight,
            lmean,
            lrstd,
            None,
            &d_l,
            lw,
            lb,
        )?;
        let mut d_l = d_l;
        for (i, blk) in w.local_blocks.iter().enumerate().rev() {
            d_l = block_backward(&d_l, &local.saved[i], blk, &g.local_blocks[i], ls, act)?;
        }
        // Global → local input: d_g rows (B·T, D_G) are d_gout (B·K, C) in the same memory.
        let d_gout = Tensor::<R, f32>::empty(&client, &[n, dg])?;
        gemm(
            &d_l.view(),
            &w.global_to_local.view().t(),
            &d_gout,
            &Epilogue::none(),
        )?;
        let g_rows = gout.strided(0, &[n, dg], &[dg, 1])?;
        gemm(
            &g_rows.t(),
            &d_l.view(),
            &g.global_to_local,
            &Epilogue::none(),
        )?;
        let bk = b * k;
        if p > 1 {
            let rows = d_l.strided(dl, &[bk, p - 1, dl], &[p * dl, dl, 1])?;
            let prev = ids.strided(0, &[bk, p - 1], &[p, 1])?;
            embedding_backward(&rows, Some(&prev), &g.local_embed, cfg.tied_head)?;
        } else if !cfg.tied_head {
            zero(&g.local_embed)?;
        }
        let pad_rows = d_l.strided(0, &[bk, 1, dl], &[p * dl, dl, 1])?;
        embedding_backward(
            &pad_rows,
            None,
            &g.local_pad.clone().reshape(&[1, dl])?,
            false,
        )?;
        if let Some(lpos) = &g.local_pos {
            let all = d_l.strided(0, &[bk, p, dl], &[p * dl, dl, 1])?;
            embedding_backward(&all, None, lpos, false)?;
        }
        let d_h = Tensor::<R, f32>::empty(&client, &[bk, c])?;
        let d_gout = d_gout.reshape(&[bk, c])?;
        let (gw, gb) = (&g.global_ln_f.weight, &g.global_ln_f.bias);
        layer_norm_backward(
            h,
            &d_gout,
            &w.global_ln_f.weight,
            gmean,
            grstd,
            None,
            &d_h,
            gw,
            gb,
        )?;
        let mut d_h = d_h;
        for (i, blk) in w.global_blocks.iter().enumerate().rev() {
            d_h = block_backward(&d_h, &global.saved[i], blk, &g.global_blocks[i], gs, act)?;
        }
        // Patch embedding: patch 0 is the pad; patch k >= 1 holds bytes (k-1)·P .. k·P.
        let pad_rows = d_h.strided(0, &[b, 1, c], &[k * c, c, 1])?;
        embedding_backward(
            &pad_rows,
            None,
            &g.global_pad.clone().reshape(&[1, c])?,
            false,
        )?;
        if k > 1 {
            let rows = d_h.strided(c, &[b, (k - 1) * p, dg], &[k * c, dg, 1])?;
            let bytes = ids.strided(0, &[b, (k - 1) * p], &[t, 1])?;
            embedding_backward(&rows, Some(&bytes), &g.global_embed, false)?;
            embedding_backward(&rows, None, &g.global_pos, false)?;
        } else {
            zero(&g.global_embed)?;
            zero(&g.global_pos)?;
        }
        let losses = loss.to_f32_vec()?;
        Ok(losses.iter().map(|&x| x as f64).sum::<f64>() / n as f64)
    }

    /// The weights (read back) and a checkpoint that also holds the optimiser state.
    pub fn save(&self, path: &std::path::Path, dtype: StorageDtype) -> Result<(), Error> {
        let cfg = self.model.config();
        let weights = self.model.to_weights()?;
        let specs = cfg.tensor_specs();
        let mut extra = vec![(
            format!("{OPTIMIZER_PREFIX}step"),
            vec![1],
            vec![self.step as f32],
        )];
        for (moments, key) in [(&self.m, "m"), (&self.v, "v")] {
            for ((name, _), tensor) in specs.iter().zip(moments.tensors()) {
                extra.push((
                    format!("{OPTIMIZER_PREFIX}{key}.{name}"),
                    tensor.shape().to_vec(),
                    tensor.to_f32_vec()?,
                ));
            }
        }
        let bytes = checkpoint::to_bytes(cfg, &weights, dtype, &extra)?;
        checkpoint::write_atomic(path, &bytes)
    }
}

/// Refuses a batch whose largest training buffers (the logits and FFN activations of every
/// byte, the global FFN activations of every patch) pass the device's largest buffer, before
/// anything is allocated, naming the buffer and what to lower.
fn check_training_buffers<R: Runtime>(
    client: &ComputeClient<R>,
    cfg: &Config,
    batch: usize,
    seq: usize,
) -> Result<(), Error> {
    let hint = "lower --batch or --seq";
    let rows = batch.checked_mul(seq);
    let patches = rows.map(|n| n / cfg.patch);
    let wg = cfg.global_width();
    for (buffer, rows, width) in [
        ("training logits", rows, cfg.vocab),
        ("local FFN activations", rows, cfg.ffn_mult * cfg.d_local),
        ("global FFN activations", patches, cfg.ffn_mult * wg),
    ] {
        // An overflowing row count is as refused as a too-large one.
        let shape = [rows.unwrap_or(usize::MAX), width];
        megabyte_ops::tensor::check_buffer::<R, f32>(client, buffer, &shape, hint)?;
    }
    Ok(())
}

fn zero<R: Runtime>(t: &Tensor<R, f32>) -> Result<(), Error> {
    let z = Tensor::<R, f32>::full(t.client(), t.shape(), 0.0)?;
    megabyte_ops::copy::copy(&z.view(), &t.view())?;
    Ok(())
}

/// Gradients of the mean loss on ids (batch, seq) as host `Weights` (checkpoint layout), for
/// tests against the reference backward.
pub fn gradients<R: Runtime>(
    client: &ComputeClient<R>,
    cfg: &Config,
    weights: &Weights,
    ids: &[u32],
    batch: usize,
) -> Result<(f64, Weights), Error> {
    let seq = ids.len() / batch.max(1);
    let mut train = TrainConfig::new(cfg, 1);
    train.batch = batch;
    train.seq = seq;
    let mut t = Trainer::new(client, cfg, weights, train)?;
    megabyte_reference::model::check_input(cfg, ids, batch, seq)?;
    let ids_t = Tensor::from_ids(client, ids, &[batch, seq])?;
    let loss = t.forward_backward(&ids_t)?;
    let out = t.grads.to_host(cfg)?;
    Ok((loss, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let cfg = Config::tiny();
        let mut tc = TrainConfig::new(&cfg, 100);
        tc.warmup = 10;
        tc.lr = 1.0;
        tc.min_lr = 0.1;
        assert!((tc.lr_at(1) - 0.1).abs() < 1e-6);
        assert!((tc.lr_at(10) - 1.0).abs() < 1e-6);
        // Cosine: halfway through the decay is halfway between peak and floor.
        assert!((tc.lr_at(55) - 0.55).abs() < 1e-6, "{}", tc.lr_at(55));
        assert!((tc.lr_at(100) - 0.1).abs() < 1e-6);
        assert!(
            (tc.lr_at(150) - 0.1).abs() < 1e-6,
            "stays at the floor past the end"
        );
        tc.cosine = false;
        assert!((tc.lr_at(55) - 0.55).abs() < 1e-6);
        assert!((tc.lr_at(32) - (0.1 + 0.9 * (1.0 - 22.0 / 90.0))).abs() < 1e-6);
    }
}

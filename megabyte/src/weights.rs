//! The model's parameters on the device: the reference crate's parameter layout
//! ([`Params`], [`Block`], `Norm`, `Linear`) holding device tensors, built by name from the
//! checkpoint layout ([`Params::build`]), so host and device walk one list of names.

use std::ops::Deref;

use cubecl::prelude::*;
use megabyte_ops::{FloatElement, OpError, Tensor};
use megabyte_reference::gemm::transpose;
use megabyte_reference::weights::Block;
use megabyte_reference::{Config, Params, Weights};

use crate::error::Error;

/// One pre-LN block's parameters on the device; linear weights are (in, out).
pub(crate) type DeviceBlock<R, E> = Block<Tensor<R, E>>;

/// Every parameter of the model on the device. An untied head is held as its (V, D_L) output
/// table, the transpose of the checkpoint's (D_L, V) `head.weight`, so that one fused logits +
/// cross-entropy kernel serves a tied and an untied head ([`DeviceWeights::head_table`]).
pub(crate) struct DeviceWeights<R: Runtime, E>(Params<Tensor<R, E>>);

impl<R: Runtime, E> Deref for DeviceWeights<R, E> {
    type Target = Params<Tensor<R, E>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Checks every tensor's length against the config's layout, naming the first mismatch.
pub(crate) fn check_lengths(cfg: &Config, weights: &Weights) -> Result<(), Error> {
    let specs = cfg.tensor_specs();
    let tensors = weights.tensors();
    if tensors.len() != specs.len() {
        return Err(Error::WeightsMismatch {
            name: "(tensor count)".into(),
            got: tensors.len(),
            expected: specs.len(),
        });
    }
    for ((name, shape), t) in specs.iter().zip(&tensors) {
        let expected: usize = shape.iter().product();
        if t.len() != expected {
            return Err(Error::WeightsMismatch {
                name: name.clone(),
                got: t.len(),
                expected,
            });
        }
    }
    Ok(())
}

impl<R: Runtime, E: FloatElement> DeviceWeights<R, E> {
    /// Uploads `weights` for a validated `cfg`; every tensor's length is checked against the
    /// config first, and the first mismatch is named.
    pub fn upload(
        client: &ComputeClient<R>,
        cfg: &Config,
        weights: &Weights,
    ) -> Result<Self, Error> {
        check_lengths(cfg, weights)?;
        let (v, dl) = (cfg.vocab, cfg.d_local);
        let mut host = weights.tensors().into_iter();
        let params = Params::build(cfg, |name, shape| {
            let data = host.next().expect("the walk yields one tensor per spec");
            if name == "head.weight" {
                // (D_L, V) -> (V, D_L)
                Tensor::<R, E>::from_f32(client, &transpose(data, dl, v), &[v, dl])
            } else {
                Tensor::<R, E>::from_f32(client, data, shape)
            }
        })?;
        Ok(DeviceWeights(params))
    }

    /// The output table (V, D_L): E_L itself when the head is tied, the untied head transposed
    /// otherwise.
    pub fn head_table(&self) -> &Tensor<R, E> {
        self.head.as_ref().unwrap_or(&self.local_embed)
    }

    /// Every tensor read back as f32 into `Weights` of the checkpoint layout: an untied head's
    /// (V, D_L) table becomes the (D_L, V) `head.weight`.
    pub fn to_host(&self, cfg: &Config) -> Result<Weights, Error> {
        let mut device = self.tensors().into_iter();
        let mut w = Params::build(cfg, |_, _| {
            device.next().expect("one tensor per spec").to_f32_vec()
        })?;
        if let Some(head) = w.head.as_mut() {
            *head = transpose(head, cfg.vocab, cfg.d_local);
        }
        Ok(w)
    }

    /// Zero tensors of the same shapes (gradients, optimiser moments); a tied head stays the
    /// embedding (its gradient accumulates into the embedding's).
    pub fn zeros_like(&self, cfg: &Config) -> Result<Self, OpError> {
        let mut device = self.tensors().into_iter();
        let params = Params::build(cfg, |_, _| {
            let t = device.next().expect("one tensor per spec");
            Tensor::full(t.client(), t.shape(), 0.0)
        })?;
        Ok(DeviceWeights(params))
    }
}

//! Key and value caches for cached decoding: one (L, B, S_max, C) buffer pair per stack, and
//! the view of one layer's cache a block decodes against.

use cubecl::prelude::*;
use megabyte_ops::{max_buffer_bytes, FloatElement, OpError, Tensor};

/// Layer `layer`'s key and value cache inside its stack's two (L, B, S_max, C) buffers (one
/// buffer per stack, so a fused decoding step binds the whole stack's cache at once).
pub(crate) struct LayerCache<R: Runtime, E> {
    pub k: Tensor<R, E>,
    pub v: Tensor<R, E>,
    pub layer: usize,
}

impl<R: Runtime, E: FloatElement> LayerCache<R, E> {
    /// The caches of a stack of `layers` layers, sharing two buffers; `buffer` names them in
    /// the error when they are larger than the device allows, which says how many sequences
    /// would fit.
    pub fn stack(
        client: &ComputeClient<R>,
        buffer: &'static str,
        layers: usize,
        batch: usize,
        capacity: usize,
        width: usize,
    ) -> Result<Vec<Self>, OpError> {
        let shape = [layers, batch, capacity, width];
        let per_sequence = (layers * capacity * width).max(1) * std::mem::size_of::<E>();
        let fit = max_buffer_bytes(client) / per_sequence;
        let hint = if fit == 0 {
            format!(
                "one sequence's cache ({per_sequence} bytes) does not fit{}",
                if E::NAME == "f32" {
                    "; f16 weights (--dtype f16) halve it"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "at most {fit} sequences fit in one batch on this device (--samples){}",
                if E::NAME == "f32" {
                    ", twice as many in f16 (--dtype f16)"
                } else {
                    ""
                }
            )
        };
        let k = Tensor::empty_named(client, &shape, buffer, &hint)?;
        let v = Tensor::empty_named(client, &shape, buffer, &hint)?;
        Ok((0..layers)
            .map(|layer| LayerCache {
                k: k.clone(),
                v: v.clone(),
                layer,
            })
            .collect())
    }
}

/// A KV cache to decode against: the layer's cache and the position of the block's first row.
pub(crate) struct CacheAt<'a, R: Runtime, E> {
    pub cache: &'a LayerCache<R, E>,
    pub start: usize,
}

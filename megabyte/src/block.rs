//! One pre-LN transformer block, forward and backward, for both stacks and every caller:
//! the forward writes into [`BlockBuffers`], which say what is kept. Inference and decoding
//! reuse one stack's [`Scratch`] for every layer and update the residual stream in place (and
//! decoding writes its keys and values to a [`CacheAt`]); training allocates fresh buffers per
//! block and keeps them all, with the FFN's pre-activation, for [`block_backward`].

use cubecl::prelude::*;
use megabyte_ops::activation::{activation_backward, activation_into};
use megabyte_ops::attention::{attention_backward, flash_attention};
use megabyte_ops::copy::copy;
use megabyte_ops::gemm::{gemm, Epilogue};
use megabyte_ops::layer_norm::{layer_norm, layer_norm_backward};
use megabyte_ops::reduce::column_sum;
use megabyte_ops::{ActivationKind, FloatElement, OpError, Tensor};
use megabyte_reference::weights::Norm;

use crate::cache::CacheAt;
use crate::error::Error;
use crate::weights::DeviceBlock;

/// The width, depth and attention shape of one of the two transformers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stack {
    /// Channels C.
    pub width: usize,
    /// FFN hidden width H.
    pub hidden: usize,
    pub heads: usize,
}

/// Scratch buffers for one stack over `batch` sequences of `seq` positions (N = batch·seq rows),
/// shared by all its layers.
pub(crate) struct Scratch<R: Runtime, E> {
    pub batch: usize,
    pub seq: usize,
    /// LayerNorm output (N, C).
    pub normed: Tensor<R, E>,
    /// Fused projection (N, 3C): [q | k | v], each NH heads of HS.
    pub qkv: Tensor<R, E>,
    /// Attention output (B, S, NH, HS).
    pub attn: Tensor<R, E>,
    /// Per-row log-sum-exp (B, NH, S).
    pub lse: Tensor<R, f32>,
    /// LayerNorm statistics (N).
    pub mean: Tensor<R, f32>,
    pub rstd: Tensor<R, f32>,
    /// FFN hidden activations (N, H).
    pub hidden: Tensor<R, E>,
    /// The residual stream between the attention and the FFN sublayer (N, C).
    pub mid: Tensor<R, E>,
}

impl<R: Runtime, E: FloatElement> Scratch<R, E> {
    /// The buffers for `batch` sequences of `seq` positions; `hint` says what to change when
    /// one is larger than the device allows (the error names the buffer).
    pub fn new(
        client: &ComputeClient<R>,
        stack: Stack,
        batch: usize,
        seq: usize,
        hint: &str,
    ) -> Result<Self, OpError> {
        let n = batch * seq;
        let c = stack.width;
        let hs = c / stack.heads;
        Ok(Scratch {
            batch,
            seq,
            normed: Tensor::empty_named(client, &[n, c], "LayerNorm output", hint)?,
            qkv: Tensor::empty_named(client, &[n, 3 * c], "q/k/v projection", hint)?,
            attn: Tensor::empty_named(
                client,
                &[batch, seq, stack.heads, hs],
                "attention output",
                hint,
            )?,
            lse: Tensor::empty_named(
                client,
                &[batch, stack.heads, seq],
                "attention log-sum-exp",
                hint,
            )?,
            mean: Tensor::empty_named(client, &[n], "LayerNorm mean", hint)?,
            rstd: Tensor::empty_named(client, &[n], "LayerNorm rstd", hint)?,
            hidden: Tensor::empty_named(client, &[n, stack.hidden], "FFN activations", hint)?,
            mid: Tensor::empty_named(client, &[n, c], "residual stream", hint)?,
        })
    }
}

/// Where one block's forward writes, over `batch` sequences of `seq` positions (N rows):
/// every intermediate its backward reads. For inference several are one buffer (`x1` and `x2`,
/// the statistics) and `out` is `h_in` itself.
pub(crate) struct BlockBuffers<R: Runtime, E> {
    pub batch: usize,
    pub seq: usize,
    /// The block's input, the residual stream (N, C).
    pub h_in: Tensor<R, E>,
    /// LN1(h_in) and its statistics (N).
    pub x1: Tensor<R, E>,
    pub mean1: Tensor<R, f32>,
    pub rstd1: Tensor<R, f32>,
    /// The fused projection (N, 3C): [q | k | v], each NH heads of HS.
    pub qkv: Tensor<R, E>,
    /// Attention output (B, S, NH, HS) and its log-sum-exp (B, NH, S).
    pub attn: Tensor<R, E>,
    pub lse: Tensor<R, f32>,
    /// The residual stream between the attention and the FFN sublayer (N, C).
    pub h_mid: Tensor<R, E>,
    /// LN2(h_mid) and its statistics.
    pub x2: Tensor<R, E>,
    pub mean2: Tensor<R, f32>,
    pub rstd2: Tensor<R, f32>,
    /// The FFN pre-activation (N, H), kept for the backward; `None` fuses the activation into
    /// the first FFN GEMM.
    pub u: Option<Tensor<R, E>>,
    /// The FFN activation (N, H).
    pub z: Tensor<R, E>,
    /// The block's output (N, C).
    pub out: Tensor<R, E>,
}

impl<R: Runtime, E: FloatElement> BlockBuffers<R, E> {
    /// Fresh buffers for a block that keeps everything its backward needs, reading `h_in`.
    pub fn kept(
        stack: Stack,
        batch: usize,
        seq: usize,
        h_in: &Tensor<R, E>,
    ) -> Result<Self, OpError> {
        let client = h_in.client();
        let (n, c, nh) = (batch * seq, stack.width, stack.heads);
        let e = |shape: &[usize]| Tensor::<R, E>::empty(client, shape);
        let f = |shape: &[usize]| Tensor::<R, f32>::empty(client, shape);
        Ok(BlockBuffers {
            batch,
            seq,
            h_in: h_in.clone(),
            x1: e(&[n, c])?,
            mean1: f(&[n])?,
            rstd1: f(&[n])?,
            qkv: e(&[n, 3 * c])?,
            attn: e(&[batch, seq, nh, c / nh])?,
            lse: f(&[batch, nh, seq])?,
            h_mid: e(&[n, c])?,
            x2: e(&[n, c])?,
            mean2: f(&[n])?,
            rstd2: f(&[n])?,
            u: Some(e(&[n, stack.hidden])?),
            z: e(&[n, stack.hidden])?,
            out: e(&[n, c])?,
        })
    }
}

impl<R: Runtime, E: FloatElement> Scratch<R, E> {
    /// The stack's scratch as one block's buffers, updating `h` in place.
    pub fn block(&self, h: &Tensor<R, E>) -> BlockBuffers<R, E> {
        BlockBuffers {
            batch: self.batch,
            seq: self.seq,
            h_in: h.clone(),
            x1: self.normed.clone(),
            mean1: self.mean.clone(),
            rstd1: self.rstd.clone(),
            qkv: self.qkv.clone(),
            attn: self.attn.clone(),
            lse: self.lse.clone(),
            h_mid: self.mid.clone(),
            x2: self.normed.clone(),
            mean2: self.mean.clone(),
            rstd2: self.rstd.clone(),
            u: None,
            z: self.hidden.clone(),
            out: h.clone(),
        }
    }
}

/// A stack's forward: every block, then the final LayerNorm, with what the backward reads.
pub(crate) struct StackForward<R: Runtime, E> {
    /// The last block's output (N, C): the final LayerNorm's input.
    pub h: Tensor<R, E>,
    /// LN_f(h) (N, C) and its statistics (N).
    pub out: Tensor<R, E>,
    pub mean: Tensor<R, f32>,
    pub rstd: Tensor<R, f32>,
    /// Each block's buffers when kept for the backward; empty otherwise.
    pub saved: Vec<BlockBuffers<R, E>>,
}

/// Runs `blocks` of `stack` over `h` (N = batch·seq rows, C), then `ln_f`. With `keep`, each
/// block writes fresh buffers that are returned for [`block_backward`]; without, the stack
/// shares one [`Scratch`] (buffers too large for the device are refused naming them, with
/// `hint`) and updates `h` in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stack_forward<R: Runtime, E: FloatElement>(
    stack: Stack,
    blocks: &[DeviceBlock<R, E>],
    ln_f: &Norm<Tensor<R, E>>,
    h: Tensor<R, E>,
    (batch, seq): (usize, usize),
    act: ActivationKind,
    keep: bool,
    hint: &str,
) -> Result<StackForward<R, E>, Error> {
    let client = h.client().clone();
    let n = batch * seq;
    let mut h = h;
    let mut saved = Vec::new();
    let (out, mean, rstd) = if keep {
        for blk in blocks {
            let bufs = BlockBuffers::kept(stack, batch, seq, &h)?;
            block_forward(blk, &bufs, act, None)?;
            h = bufs.out.clone();
            saved.push(bufs);
        }
        let out = Tensor::<R, E>::empty(&client, &[n, stack.width])?;
        (
            out,
            Tensor::empty(&client, &[n])?,
            Tensor::empty(&client, &[n])?,
        )
    } else {
        let scratch = Scratch::new(&client, stack, batch, seq, hint)?;
        for blk in blocks {
            block_forward(blk, &scratch.block(&h), act, None)?;
        }
        (scratch.normed, scratch.mean, scratch.rstd)
    };
    layer_norm(&h, &ln_f.weight, &ln_f.bias, &out, &mean, &rstd)?;
    Ok(StackForward {
        h,
        out,
        mean,
        rstd,
        saved,
    })
}

/// One pre-LN block over `s.batch` sequences of `s.seq` positions:
/// out = h_mid + fc2(act(fc1(LN2(h_mid)))), h_mid = h_in + proj(attn(LN1(h_in))).
///
/// With a cache, the block's keys and values are first written to positions `start ..
/// start + seq` of it and the queries attend to positions `0 .. start + seq` (causally), so
/// a decoding step runs the block on the new positions only.
pub(crate) fn block_forward<R: Runtime, E: FloatElement>(
    w: &DeviceBlock<R, E>,
    s: &BlockBuffers<R, E>,
    act: ActivationKind,
    cache: Option<CacheAt<'_, R, E>>,
) -> Result<(), Error> {
    let (b, seq) = (s.batch, s.seq);
    let n = b * seq;
    let c = s.h_in.shape()[1];
    let nh = s.attn.shape()[2];
    let hs = c / nh;
    layer_norm(
        &s.h_in,
        &w.ln1.weight,
        &w.ln1.bias,
        &s.x1,
        &s.mean1,
        &s.rstd1,
    )?;
    gemm(
        &s.x1.view(),
        &w.qkv.weight.view(),
        &s.qkv,
        &Epilogue::none().bias(&w.qkv.bias),
    )?;
    // q, k, v straight out of the fused projection: (B, S, NH, HS) views, no copies.
    let qkv_strides = [seq * 3 * c, 3 * c, hs, 1];
    let part = |i: usize| s.qkv.strided(i * c, &[b, seq, nh, hs], &qkv_strides);
    match cache {
        None => flash_attention(&part(0)?, &part(1)?, &part(2)?, &s.attn, &s.lse, true)?,
        Some(CacheAt { cache, start }) => {
            // (L, B, S_max, C): this layer's (B, S_max, C) block.
            let cap = cache.k.shape()[2];
            let base = cache.layer * cache.k.shape()[1] * cap * c;
            let rows = |i: usize| s.qkv.strided(i * c, &[b, seq, c], &[seq * 3 * c, 3 * c, 1]);
            let slot_strides = [cap * c, c, 1];
            let k_slot = cache
                .k
                .strided(base + start * c, &[b, seq, c], &slot_strides)?;
            let v_slot = cache
                .v
                .strided(base + start * c, &[b, seq, c], &slot_strides)?;
            copy(&rows(1)?, &k_slot)?;
            copy(&rows(2)?, &v_slot)?;
            let len = start + seq;
            let kv_strides = [cap * c, c, hs, 1];
            let k = cache.k.strided(base, &[b, len, nh, hs], &kv_strides)?;
            let v = cache.v.strided(base, &[b, len, nh, hs], &kv_strides)?;
            flash_attention(&part(0)?, &k, &v, &s.attn, &s.lse, true)?;
        }
    }
    gemm(
        &s.attn.strided(0, &[n, c], &[c, 1])?,
        &w.proj.weight.view(),
        &s.h_mid,
        &Epilogue::none().bias(&w.proj.bias).residual(&s.h_in),
    )?;
    layer_norm(
        &s.h_mid,
        &w.ln2.weight,
        &w.ln2.bias,
        &s.x2,
        &s.mean2,
        &s.rstd2,
    )?;
    let fc1 = Epilogue::none().bias(&w.fc1.bias);
    match &s.u {
        None => gemm(
            &s.x2.view(),
            &w.fc1.weight.view(),
            &s.z,
            &fc1.activation(act),
        )?,
        Some(u) => {
            gemm(&s.x2.view(), &w.fc1.weight.view(), u, &fc1)?;
            activation_into(u, &s.z, act)?;
        }
    }
    gemm(
        &s.z.view(),
        &w.fc2.weight.view(),
        &s.out,
        &Epilogue::none().bias(&w.fc2.bias).residual(&s.h_mid),
    )?;
    Ok(())
}

/// Backward of [`block_forward`] from the buffers it kept ([`BlockBuffers::kept`]): from the
/// gradient of the block's output, writes every parameter gradient into `g` and returns the
/// gradient of its input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_backward<R: Runtime>(
    d_out: &Tensor<R, f32>,
    s: &BlockBuffers<R, f32>,
    w: &DeviceBlock<R, f32>,
    g: &DeviceBlock<R, f32>,
    stack: Stack,
    act: ActivationKind,
) -> Result<Tensor<R, f32>, Error> {
    let client = d_out.client();
    let (batch, seq) = (s.batch, s.seq);
    let n = batch * seq;
    let u =
        s.u.as_ref()
            .expect("training blocks keep the FFN pre-activation (BlockBuffers::kept)");
    let c = stack.width;
    let (nh, hs) = (stack.heads, c / stack.heads);
    let e = |shape: &[usize]| Tensor::<R, f32>::empty(client, shape);
    let none = Epilogue::none;
    // FFN: out = h_mid + z·W2 + b2, z = act(u), u = x2·W1 + b1, x2 = LN2(h_mid).
    let dz = e(&[n, stack.hidden])?;
    gemm(&d_out.view(), &w.fc2.weight.view().t(), &dz, &none())?;
    gemm(&s.z.view().t(), &d_out.view(), &g.fc2.weight, &none())?;
    column_sum(&d_out.view(), &g.fc2.bias, false)?;
    let du = e(&[n, stack.hidden])?;
    activation_backward(u, &dz, &du, act)?;
    let dx2 = e(&[n, c])?;
    gemm(&du.view(), &w.fc1.weight.view().t(), &dx2, &none())?;
    gemm(&s.x2.view().t(), &du.view(), &g.fc1.weight, &none())?;
    column_sum(&du.view(), &g.fc1.bias, false)?;
    let d_mid = e(&[n, c])?;
    layer_norm_backward(
        &s.h_mid,
        &dx2,
        &w.ln2.weight,
        &s.mean2,
        &s.rstd2,
        Some(d_out),
        &d_mid,
        &g.ln2.weight,
        &g.ln2.bias,
    )?;
    // Attention: h_mid = h_in + attn·Wp + bp.
    let dy = e(&[n, c])?;
    gemm(&d_mid.view(), &w.proj.weight.view().t(), &dy, &none())?;
    gemm(
        &s.attn.strided(0, &[n, c], &[c, 1])?.t(),
        &d_mid.view(),
        &g.proj.weight,
        &none(),
    )?;
    column_sum(&d_mid.view(), &g.proj.bias, false)?;
    let dqkv = e(&[n, 3 * c])?;
    let strides = [seq * 3 * c, 3 * c, hs, 1];
    let shape = [batch, seq, nh, hs];
    attention_backward(
        &s.qkv.strided(0, &shape, &strides)?,
        &s.qkv.strided(c, &shape, &strides)?,
        &s.qkv.strided(2 * c, &shape, &strides)?,
        &dy.reshape(&shape)?,
        &dqkv.strided(0, &shape, &strides)?,
        &dqkv.strided(c, &shape, &strides)?,
        &dqkv.strided(2 * c, &shape, &strides)?,
        true,
    )?;
    let dx1 = e(&[n, c])?;
    gemm(&dqkv.view(), &w.qkv.weight.view().t(), &dx1, &none())?;
    gemm(&s.x1.view().t(), &dqkv.view(), &g.qkv.weight, &none())?;
    column_sum(&dqkv.view(), &g.qkv.bias, false)?;
    let d_in = e(&[n, c])?;
    layer_norm_backward(
        &s.h_in,
        &dx1,
        &w.ln1.weight,
        &s.mean1,
        &s.rstd1,
        Some(&d_mid),
        &d_in,
        &g.ln1.weight,
        &g.ln1.bias,
    )?;
    Ok(d_in)
}

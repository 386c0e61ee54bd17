//! The MEGABYTE forward pass on the device, composed from the `megabyte-ops` launchers in the
//! order `docs/DESIGN.md` states it:
//!
//! fused patch embedding → L_G global blocks (fused QKV projection, flash attention over K
//! patches, FFN) → final LayerNorm → global→local input (one GEMM with a gather epilogue) →
//! L_L local blocks over B·K sequences of P bytes → final LayerNorm → fused tied logits and
//! cross-entropy.
//!
//! The forward makes no host round trip: ids go up once, logits (or per-position losses) come
//! back once. Each stack's scratch buffers are allocated once per call and reused by every
//! layer; blocks (`crate::block`) update the residual stream in place.

use cubecl::prelude::*;
use megabyte_ops::copy::{copy, copy_ids};
use megabyte_ops::cross_entropy::tied_cross_entropy;
use megabyte_ops::local_input::local_input;
use megabyte_ops::patch_embed::patch_embed;
use megabyte_ops::{max_buffer_bytes, ActivationKind, FloatElement, OpError, Tensor};
use megabyte_reference::model::{check_input, check_shape};
use megabyte_reference::{Activation, Config, Weights};

use crate::block::{stack_forward, Stack, StackForward};
use crate::error::Error;
use crate::weights::DeviceWeights;

/// What to change when a forward's buffer is too large for the device.
const SCORE_HINT: &str = "score fewer or shorter sequences at once (eval --batch, --window)";

/// A MEGABYTE model whose weights live on a device of runtime `R`, stored as `E` (f32 or f16;
/// kernels accumulate in f32 either way).
pub struct Model<R: Runtime, E: FloatElement = f32> {
    cfg: Config,
    client: ComputeClient<R>,
    pub(crate) w: DeviceWeights<R, E>,
    /// Largest buffer the forward allocates, in bytes: the device's limit unless lowered.
    max_buffer: usize,
}

pub(crate) fn activation_kind(act: Activation) -> ActivationKind {
    match act {
        Activation::Gelu => ActivationKind::Gelu,
        Activation::Relu => ActivationKind::Relu,
    }
}

impl<R: Runtime, E: FloatElement> Model<R, E> {
    /// Uploads `weights` for a validated `cfg`; every tensor's length is checked against the
    /// config first, and the first mismatch is named.
    pub fn new(client: &ComputeClient<R>, cfg: &Config, weights: &Weights) -> Result<Self, Error> {
        cfg.validate()?;
        megabyte_ops::ensure_dtype::<R, E>(client, "model")?;
        let w = DeviceWeights::upload(client, cfg, weights)?;
        Ok(Model {
            cfg: cfg.clone(),
            client: client.clone(),
            w,
            max_buffer: max_buffer_bytes(client),
        })
    }

    /// Caps the largest buffer a forward pass allocates (never above the device's limit). The
    /// local phase then runs in more, smaller chunks of patches: less peak memory, same result.
    pub fn set_max_buffer_bytes(&mut self, bytes: usize) {
        self.max_buffer = bytes.min(max_buffer_bytes(&self.client));
    }

    /// The weights read back to the host as f32, in the checkpoint layout.
    pub fn to_weights(&self) -> Result<Weights, Error> {
        self.w.to_host(&self.cfg)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    pub(crate) fn global_stack(&self) -> Stack {
        let c = self.cfg.global_width();
        Stack {
            width: c,
            hidden: self.cfg.ffn_mult * c,
            heads: self.cfg.heads_global,
        }
    }

    pub(crate) fn local_stack(&self) -> Stack {
        let c = self.cfg.d_local;
        Stack {
            width: c,
            hidden: self.cfg.ffn_mult * c,
            heads: self.cfg.heads_local,
        }
    }

    /// Logits (B, T, V) as f32 on the host for ids (B, T) given row-major in `ids`; T a positive
    /// multiple of P up to the context, every id < V.
    pub fn forward(&self, ids: &[u32], batch: usize) -> Result<Vec<f32>, Error> {
        let seq = self.checked_seq(ids, batch)?;
        let (p, v) = (self.cfg.patch, self.cfg.vocab);
        let ids = Tensor::from_ids(&self.client, ids, &[batch, seq])?;
        let mut logits = vec![0f32; batch * seq * v];
        // Each chunk's logits (B, n·P, V) go to rows k0·P .. (k0 + n)·P of every sequence.
        let mut place = |k0: usize, n: usize, chunk: Tensor<R, E>| -> Result<(), Error> {
            let values = chunk.to_f32_vec()?;
            let rows = n * p * v;
            for bi in 0..batch {
                logits[(bi * seq + k0 * p) * v..][..rows]
                    .copy_from_slice(&values[bi * rows..][..rows]);
            }
            Ok(())
        };
        self.run(&ids, Some(&mut place))?;
        Ok(logits)
    }

    /// Per-position cross-entropy in nats, (B·T): position t's target is `ids[t]`, predicted from
    /// `ids[..t]`. The logits are never stored.
    pub fn losses(&self, ids: &[u32], batch: usize) -> Result<Vec<f32>, Error> {
        let seq = self.checked_seq(ids, batch)?;
        let ids = Tensor::from_ids(&self.client, ids, &[batch, seq])?;
        Ok(self.run(&ids, None)?.to_f32_vec()?)
    }

    /// The mean cross-entropy over all B·T positions in bits per byte.
    pub fn loss(&self, ids: &[u32], batch: usize) -> Result<f64, Error> {
        let losses = self.losses(ids, batch)?;
        let nats = losses.iter().map(|&l| l as f64).sum::<f64>() / losses.len() as f64;
        Ok(nats / std::f64::consts::LN_2)
    }

    /// The forward on ids already on the device, (B, T): logits (B, T, V) in E. Shapes are
    /// checked; ids are not (that would need a read-back): an id >= V gives NaN logits in the
    /// rows that read it.
    pub fn forward_device(&self, ids: &Tensor<R, u32>) -> Result<Tensor<R, E>, Error> {
        self.check_device_ids(ids)?;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let v = self.cfg.vocab;
        self.check_buffer("the logits", b * t * v, std::mem::size_of::<E>(), t)?;
        let mut out = None;
        let mut keep = |_: usize, _: usize, chunk: Tensor<R, E>| -> Result<(), Error> {
            out = Some(chunk);
            Ok(())
        };
        self.run(ids, Some(&mut keep))?;
        Ok(out
            .expect("one chunk when the logits fit one buffer")
            .reshape(&[b, t, v])?)
    }

    fn checked_seq(&self, ids: &[u32], batch: usize) -> Result<usize, Error> {
        let seq = ids.len().checked_div(batch).unwrap_or(0);
        check_input(&self.cfg, ids, batch, seq)?;
        Ok(seq)
    }

    fn check_device_ids(&self, ids: &Tensor<R, u32>) -> Result<(), Error> {
        let shape = ids.shape();
        if shape.len() != 2 {
            return Err(megabyte_ops::OpError::shape("model", "ids", shape, vec![0, 0]).into());
        }
        check_shape(&self.cfg, shape[0], shape[1])?;
        Ok(())
    }

    /// A buffer of `elems` elements of `elem_bytes` must fit the device's largest allocation.
    fn check_buffer(
        &self,
        what: &str,
        elems: usize,
        elem_bytes: usize,
        seq: usize,
    ) -> Result<(), Error> {
        let max = self.max_buffer;
        let bytes = elems.saturating_mul(elem_bytes);
        if bytes > max {
            return Err(OpError::unsupported(
                "model",
                "sequence length",
                seq,
                format!(
                    "{what} need {bytes} bytes in one buffer; the device allocates at most {max}"
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Patches per chunk of the local phase: as many as keep its largest buffer (FFN hidden,
    /// qkv, or logits) within the device's largest allocation.
    fn local_chunk(&self, b: usize, k: usize, want_logits: bool) -> Result<usize, Error> {
        let cfg = &self.cfg;
        let widest = (cfg.ffn_mult * cfg.d_local)
            .max(3 * cfg.d_local)
            .max(if want_logits { cfg.vocab } else { 0 });
        let per_patch = b * cfg.patch * widest * std::mem::size_of::<E>();
        let chunk = (self.max_buffer / per_patch.max(1)).min(k);
        if chunk == 0 {
            self.check_buffer("one patch's local activations", per_patch, 1, b * cfg.patch)?;
        }
        Ok(chunk.max(1))
    }

    /// The whole forward over ids (B, T): returns the per-position losses in nats (B·T), and
    /// hands each chunk's logits (B, n·P, V) for patches k0 .. k0 + n to `on_logits` when
    /// given. The local phase runs in chunks of patches when one pass would exceed the
    /// device's largest buffer (a million-byte sequence on a 128 MiB-buffer device).
    fn run(
        &self,
        ids: &Tensor<R, u32>,
        mut on_logits: Option<&mut dyn FnMut(usize, usize, Tensor<R, E>) -> Result<(), Error>>,
    ) -> Result<Tensor<R, f32>, Error> {
        let client = &self.client;
        let cfg = &self.cfg;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let (p, wg) = (cfg.patch, cfg.global_width());
        let k = t / p;
        let elem = std::mem::size_of::<E>();
        let hidden = cfg.ffn_mult * wg;
        self.check_buffer(
            "the global model's activations",
            b * k * hidden.max(3 * wg),
            elem,
            t,
        )?;
        self.check_buffer("the per-byte losses", b * t, 4, t)?;
        let g = self.global(ids)?;
        let loss = Tensor::<R, f32>::empty(client, &[b, t])?;
        let chunk = self.local_chunk(b, k, on_logits.is_some())?;
        if chunk == k {
            let l = self.local(&g.reshape(&[b, k, wg])?, ids, on_logits.is_some(), &loss)?;
            if let (Some(f), Some(l)) = (on_logits.as_mut(), l) {
                f(0, k, l)?;
            }
            return Ok(loss.reshape(&[b * t])?);
        }
        let mut k0 = 0;
        while k0 < k {
            let n = chunk.min(k - k0);
            let g_c = Tensor::<R, E>::empty(client, &[b, n, wg])?;
            copy(
                &g.strided(k0 * wg, &[b, n, wg], &[k * wg, wg, 1])?,
                &g_c.view(),
            )?;
            let ids_c = Tensor::<R, u32>::empty(client, &[b, n * p])?;
            copy_ids(&ids.strided(k0 * p, &[b, n * p], &[t, 1])?, &ids_c.view())?;
            let loss_c = Tensor::<R, f32>::empty(client, &[b, n * p])?;
            let l = self.local(&g_c, &ids_c, on_logits.is_some(), &loss_c)?;
            copy(&loss_c.view(), &loss.strided(k0 * p, &[b, n * p], &[t, 1])?)?;
            if let (Some(f), Some(l)) = (on_logits.as_mut(), l) {
                f(k0, n, l)?;
            }
            k0 += n;
        }
        Ok(loss.reshape(&[b * t])?)
    }

    /// Steps 1–3: ids (B, T) → the global model's normalised output g (B·K, P·D_G).
    fn global(&self, ids: &Tensor<R, u32>) -> Result<Tensor<R, E>, Error> {
        Ok(self.global_forward(ids, false)?.out)
    }

    /// Steps 1–3 with what the backward reads when `keep`: the global stack over the
    /// shifted patches of ids (B, T), its `out` being g (B·K, P·D_G).
    pub(crate) fn global_forward(
        &self,
        ids: &Tensor<R, u32>,
        keep: bool,
    ) -> Result<StackForward<R, E>, Error> {
        let cfg = &self.cfg;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let (p, wg) = (cfg.patch, cfg.global_width());
        let k = t / p;
        // 1–2. Bytes → shifted patches (B, K, P·D_G).
        let h = Tensor::<R, E>::empty_named(&self.client, &[b, k, wg], "global input", SCORE_HINT)?;
        let w = &self.w;
        patch_embed(ids, &w.global_embed, &w.global_pos, &w.global_pad, &h, p)?;
        // 3. Global transformer over K patches, then the final LayerNorm.
        let h = h.reshape(&[b * k, wg])?;
        let act = activation_kind(cfg.activation);
        let (blocks, ln_f) = (&w.global_blocks, &w.global_ln_f);
        stack_forward(
            self.global_stack(),
            blocks,
            ln_f,
            h,
            (b, k),
            act,
            keep,
            SCORE_HINT,
        )
    }

    /// Steps 4–6 with what the backward reads when `keep`: the local stack over the local
    /// input of patches with global output g (B, n, P·D_G) and ids (B, n·P), its `out` the
    /// normalised (B·n·P, D_L) rows the head reads.
    pub(crate) fn local_forward(
        &self,
        g: &Tensor<R, E>,
        ids: &Tensor<R, u32>,
        keep: bool,
    ) -> Result<StackForward<R, E>, Error> {
        let cfg = &self.cfg;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let (p, dl) = (cfg.patch, cfg.d_local);
        let w = &self.w;
        // 4–5. Global → local input (B, T, D_L).
        let l = Tensor::<R, E>::empty_named(&self.client, &[b, t, dl], "local input", SCORE_HINT)?;
        let pos = w.local_pos.as_ref();
        local_input(
            g,
            ids,
            &w.global_to_local,
            &w.local_embed,
            &w.local_pad,
            pos,
            &l,
        )?;
        // 6. Local transformer: B·K sequences of P bytes, then the final LayerNorm.
        let l = l.reshape(&[b * t, dl])?;
        let act = activation_kind(cfg.activation);
        let (blocks, ln_f) = (&w.local_blocks, &w.local_ln_f);
        let seqs = (b * (t / p), p);
        stack_forward(
            self.local_stack(),
            blocks,
            ln_f,
            l,
            seqs,
            act,
            keep,
            SCORE_HINT,
        )
    }

    /// Steps 4–7 for patches with global output g (B, n, P·D_G) and ids (B, n·P): writes the
    /// per-position losses (B, n·P) and returns the logits (B·n·P, V) when asked.
    fn local(
        &self,
        g: &Tensor<R, E>,
        ids: &Tensor<R, u32>,
        want_logits: bool,
        loss: &Tensor<R, f32>,
    ) -> Result<Option<Tensor<R, E>>, Error> {
        let client = &self.client;
        let (b, t, v) = (ids.shape()[0], ids.shape()[1], self.cfg.vocab);
        let out = self.local_forward(g, ids, false)?.out;
        // 7. Logits and the loss against the ids themselves.
        let n = b * t;
        let logits = want_logits
            .then(|| Tensor::<R, E>::empty_named(client, &[n, v], "logits", SCORE_HINT))
            .transpose()?;
        let lse = Tensor::<R, f32>::empty(client, &[n])?;
        tied_cross_entropy(
            &out,
            self.w.head_table(),
            &ids.clone().reshape(&[n])?,
            &loss.clone().reshape(&[n])?,
            &lse,
            logits.as_ref(),
        )?;
        Ok(logits)
    }
}

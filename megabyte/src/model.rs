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
//! layer; blocks update the residual stream in place.

use cubecl::prelude::*;
use megabyte_ops::attention::flash_attention;
use megabyte_ops::copy::{copy, copy_ids};
use megabyte_ops::cross_entropy::tied_cross_entropy;
use megabyte_ops::decode::BlockWeights;
use megabyte_ops::gemm::{gemm, Epilogue};
use megabyte_ops::layer_norm::layer_norm;
use megabyte_ops::local_input::local_input;
use megabyte_ops::patch_embed::patch_embed;
use megabyte_ops::{max_buffer_bytes, ActivationKind, FloatElement, OpError, Tensor};
use megabyte_reference::gemm::transpose;
use megabyte_reference::model::{check_input, check_shape};
use megabyte_reference::weights::Block;
use megabyte_reference::{Activation, Config, Weights};

use crate::error::Error;

/// One pre-LN block's parameters on the device; linear weights are (in, out).
pub(crate) struct DeviceBlock<R: Runtime, E> {
    pub ln1: (Tensor<R, E>, Tensor<R, E>),
    pub qkv: (Tensor<R, E>, Tensor<R, E>),
    pub proj: (Tensor<R, E>, Tensor<R, E>),
    pub ln2: (Tensor<R, E>, Tensor<R, E>),
    pub fc1: (Tensor<R, E>, Tensor<R, E>),
    pub fc2: (Tensor<R, E>, Tensor<R, E>),
}

/// Every parameter of the model on the device.
pub(crate) struct DeviceWeights<R: Runtime, E> {
    /// E_G (V, D_G), E_pos (T, D_G), E_gpad (P·D_G).
    pub global_embed: Tensor<R, E>,
    pub global_pos: Tensor<R, E>,
    pub global_pad: Tensor<R, E>,
    pub global_blocks: Vec<DeviceBlock<R, E>>,
    pub global_ln_f: (Tensor<R, E>, Tensor<R, E>),
    /// W_GL (D_G, D_L).
    pub global_to_local: Tensor<R, E>,
    /// E_L (V, D_L), E_lpad (D_L), E_lpos (P, D_L).
    pub local_embed: Tensor<R, E>,
    pub local_pad: Tensor<R, E>,
    pub local_pos: Option<Tensor<R, E>>,
    pub local_blocks: Vec<DeviceBlock<R, E>>,
    pub local_ln_f: (Tensor<R, E>, Tensor<R, E>),
    /// The output table (V, D_L): E_L itself when the head is tied, the untied head transposed
    /// otherwise, so that one fused logits + cross-entropy kernel serves both.
    pub head_table: Tensor<R, E>,
    /// Whether `head_table` is `local_embed` (the same buffer).
    pub tied: bool,
}

impl<R: Runtime, E: FloatElement> DeviceBlock<R, E> {
    fn tensors(&self) -> [&Tensor<R, E>; 12] {
        [
            &self.ln1.0,
            &self.ln1.1,
            &self.qkv.0,
            &self.qkv.1,
            &self.proj.0,
            &self.proj.1,
            &self.ln2.0,
            &self.ln2.1,
            &self.fc1.0,
            &self.fc1.1,
            &self.fc2.0,
            &self.fc2.1,
        ]
    }

    /// The block's parameters as the fused decoding step takes them.
    pub fn step_weights(&self) -> BlockWeights<'_, R, E> {
        BlockWeights::from_tensors(self.tensors())
    }

    fn zeros_like(&self) -> Result<Self, OpError> {
        let z = |t: &Tensor<R, E>| Tensor::full(t.client(), t.shape(), 0.0);
        let pair = |p: &(Tensor<R, E>, Tensor<R, E>)| Ok::<_, OpError>((z(&p.0)?, z(&p.1)?));
        Ok(DeviceBlock {
            ln1: pair(&self.ln1)?,
            qkv: pair(&self.qkv)?,
            proj: pair(&self.proj)?,
            ln2: pair(&self.ln2)?,
            fc1: pair(&self.fc1)?,
            fc2: pair(&self.fc2)?,
        })
    }
}

impl<R: Runtime, E: FloatElement> DeviceWeights<R, E> {
    /// Every parameter in the order of `Config::tensor_specs`; an untied head appears as its
    /// (V, D_L) table, the transpose of the checkpoint's (D_L, V) `head.weight`.
    pub fn tensors(&self) -> Vec<&Tensor<R, E>> {
        let mut out = vec![&self.global_embed, &self.global_pos, &self.global_pad];
        for b in &self.global_blocks {
            out.extend(b.tensors());
        }
        out.extend([
            &self.global_ln_f.0,
            &self.global_ln_f.1,
            &self.global_to_local,
        ]);
        out.extend([&self.local_embed, &self.local_pad]);
        if let Some(p) = &self.local_pos {
            out.push(p);
        }
        for b in &self.local_blocks {
            out.extend(b.tensors());
        }
        out.extend([&self.local_ln_f.0, &self.local_ln_f.1]);
        if !self.tied {
            out.push(&self.head_table);
        }
        out
    }

    /// Every tensor read back as f32 into `Weights` of the checkpoint layout: an untied head's
    /// (V, D_L) table becomes the (D_L, V) `head.weight`.
    pub fn to_host(&self, cfg: &Config) -> Result<Weights, Error> {
        let mut w = Weights::zeros(cfg);
        for (dst, src) in w.tensors_mut().into_iter().zip(self.tensors()) {
            *dst = src.to_f32_vec()?;
        }
        if let Some(head) = w.head.as_mut() {
            *head = transpose(head, cfg.vocab, cfg.d_local);
        }
        Ok(w)
    }

    /// Zero tensors of the same shapes (gradients, optimiser moments); a tied table stays
    /// shared with the embedding.
    pub fn zeros_like(&self) -> Result<Self, OpError> {
        let z = |t: &Tensor<R, E>| Tensor::full(t.client(), t.shape(), 0.0);
        let local_embed = z(&self.local_embed)?;
        Ok(DeviceWeights {
            global_embed: z(&self.global_embed)?,
            global_pos: z(&self.global_pos)?,
            global_pad: z(&self.global_pad)?,
            global_blocks: self
                .global_blocks
                .iter()
                .map(DeviceBlock::zeros_like)
                .collect::<Result<_, _>>()?,
            global_ln_f: (z(&self.global_ln_f.0)?, z(&self.global_ln_f.1)?),
            global_to_local: z(&self.global_to_local)?,
            head_table: if self.tied {
                local_embed.clone()
            } else {
                z(&self.head_table)?
            },
            local_embed,
            local_pad: z(&self.local_pad)?,
            local_pos: self.local_pos.as_ref().map(z).transpose()?,
            local_blocks: self
                .local_blocks
                .iter()
                .map(DeviceBlock::zeros_like)
                .collect::<Result<_, _>>()?,
            local_ln_f: (z(&self.local_ln_f.0)?, z(&self.local_ln_f.1)?),
            tied: self.tied,
        })
    }
}

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
        let up = |data: &[f32], shape: &[usize]| Tensor::<R, E>::from_f32(client, data, shape);
        let (v, p, t) = (cfg.vocab, cfg.patch, cfg.context);
        let (dg, dl, wg) = (cfg.d_global, cfg.d_local, cfg.global_width());
        let block = |b: &Block, c: usize| -> Result<DeviceBlock<R, E>, Error> {
            let h = b.fc1.bias.len();
            Ok(DeviceBlock {
                ln1: (up(&b.ln1.weight, &[c])?, up(&b.ln1.bias, &[c])?),
                qkv: (up(&b.qkv.weight, &[c, 3 * c])?, up(&b.qkv.bias, &[3 * c])?),
                proj: (up(&b.proj.weight, &[c, c])?, up(&b.proj.bias, &[c])?),
                ln2: (up(&b.ln2.weight, &[c])?, up(&b.ln2.bias, &[c])?),
                fc1: (up(&b.fc1.weight, &[c, h])?, up(&b.fc1.bias, &[h])?),
                fc2: (up(&b.fc2.weight, &[h, c])?, up(&b.fc2.bias, &[c])?),
            })
        };
        let local_embed = up(&weights.local_embed, &[v, dl])?;
        let head_table = match &weights.head {
            None => local_embed.clone(),
            // (D_L, V) -> (V, D_L)
            Some(head) => up(&transpose(head, dl, v), &[v, dl])?,
        };
        let w = DeviceWeights {
            global_embed: up(&weights.global_embed, &[v, dg])?,
            global_pos: up(&weights.global_pos, &[t, dg])?,
            global_pad: up(&weights.global_pad, &[wg])?,
            global_blocks: weights
                .global_blocks
                .iter()
                .map(|b| block(b, wg))
                .collect::<Result<_, _>>()?,
            global_ln_f: (
                up(&weights.global_ln_f.weight, &[wg])?,
                up(&weights.global_ln_f.bias, &[wg])?,
            ),
            global_to_local: up(&weights.global_to_local, &[dg, dl])?,
            local_embed,
            local_pad: up(&weights.local_pad, &[dl])?,
            local_pos: match &weights.local_pos {
                Some(pos) => Some(up(pos, &[p, dl])?),
                None => None,
            },
            local_blocks: weights
                .local_blocks
                .iter()
                .map(|b| block(b, dl))
                .collect::<Result<_, _>>()?,
            local_ln_f: (
                up(&weights.local_ln_f.weight, &[dl])?,
                up(&weights.local_ln_f.bias, &[dl])?,
            ),
            head_table,
            tied: weights.head.is_none(),
        };
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
        let client = &self.client;
        let cfg = &self.cfg;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let (p, wg) = (cfg.patch, cfg.global_width());
        let k = t / p;
        let act = activation_kind(cfg.activation);
        // 1–2. Bytes → shifted patches (B, K, P·D_G).
        let h = Tensor::<R, E>::empty_named(client, &[b, k, wg], "global input", SCORE_HINT)?;
        patch_embed(
            ids,
            &self.w.global_embed,
            &self.w.global_pos,
            &self.w.global_pad,
            &h,
            p,
        )?;
        // 3. Global transformer over K patches, then the final LayerNorm.
        let h = h.reshape(&[b * k, wg])?;
        let scratch = Scratch::new(client, self.global_stack(), b, k, SCORE_HINT)?;
        for blk in &self.w.global_blocks {
            block(&h, blk, &scratch, act, None)?;
        }
        let g = Tensor::<R, E>::empty(client, &[b * k, wg])?;
        let (lw, lb) = &self.w.global_ln_f;
        layer_norm(&h, lw, lb, &g, &scratch.mean, &scratch.rstd)?;
        Ok(g)
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
        let cfg = &self.cfg;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let (p, dl, v) = (cfg.patch, cfg.d_local, cfg.vocab);
        let k = t / p;
        let act = activation_kind(cfg.activation);
        // 4–5. Global → local input (B, T, D_L).
        let l = Tensor::<R, E>::empty(client, &[b, t, dl])?;
        local_input(
            g,
            ids,
            &self.w.global_to_local,
            &self.w.local_embed,
            &self.w.local_pad,
            self.w.local_pos.as_ref(),
            &l,
        )?;
        // 6. Local transformer: B·K sequences of P bytes, then the final LayerNorm.
        let l = l.reshape(&[b * t, dl])?;
        let scratch = Scratch::new(client, self.local_stack(), b * k, p, SCORE_HINT)?;
        for blk in &self.w.local_blocks {
            block(&l, blk, &scratch, act, None)?;
        }
        let out = scratch.normed.clone();
        let (lw, lb) = &self.w.local_ln_f;
        layer_norm(&l, lw, lb, &out, &scratch.mean, &scratch.rstd)?;
        // 7. Logits and the loss against the ids themselves.
        let n = b * t;
        let logits = want_logits
            .then(|| Tensor::<R, E>::empty_named(client, &[n, v], "logits", SCORE_HINT))
            .transpose()?;
        let lse = Tensor::<R, f32>::empty(client, &[n])?;
        tied_cross_entropy(
            &out,
            &self.w.head_table,
            &ids.clone().reshape(&[n])?,
            &loss.clone().reshape(&[n])?,
            &lse,
            logits.as_ref(),
        )?;
        Ok(logits)
    }
}

/// A KV cache to decode against: the layer's cache and the position of the block's first row.
pub(crate) struct CacheAt<'a, R: Runtime, E> {
    pub cache: &'a LayerCache<R, E>,
    pub start: usize,
}

/// One pre-LN block over `scratch.batch` sequences of `scratch.seq` positions, updating the
/// residual stream `h` (N, C) in place:
/// h += proj(attn(LN1(h))); h += fc2(act(fc1(LN2(h)))).
///
/// With a cache, the block's keys and values are first written to positions `start ..
/// start + seq` of it and the queries attend to positions `0 .. start + seq` (causally), so
/// a decoding step runs the block on the new positions only.
pub(crate) fn block<R: Runtime, E: FloatElement>(
    h: &Tensor<R, E>,
    w: &DeviceBlock<R, E>,
    s: &Scratch<R, E>,
    act: ActivationKind,
    cache: Option<CacheAt<'_, R, E>>,
) -> Result<(), Error> {
    let (b, seq) = (s.batch, s.seq);
    let n = b * seq;
    let c = h.shape()[1];
    let nh = s.attn.shape()[2];
    let hs = c / nh;
    layer_norm(h, &w.ln1.0, &w.ln1.1, &s.normed, &s.mean, &s.rstd)?;
    gemm(
        &s.normed.view(),
        &w.qkv.0.view(),
        &s.qkv,
        &Epilogue::none().bias(&w.qkv.1),
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
        &w.proj.0.view(),
        &s.mid,
        &Epilogue::none().bias(&w.proj.1).residual(h),
    )?;
    layer_norm(&s.mid, &w.ln2.0, &w.ln2.1, &s.normed, &s.mean, &s.rstd)?;
    gemm(
        &s.normed.view(),
        &w.fc1.0.view(),
        &s.hidden,
        &Epilogue::none().bias(&w.fc1.1).activation(act),
    )?;
    gemm(
        &s.hidden.view(),
        &w.fc2.0.view(),
        h,
        &Epilogue::none().bias(&w.fc2.1).residual(&s.mid),
    )?;
    Ok(())
}

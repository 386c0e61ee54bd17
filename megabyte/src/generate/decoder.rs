//! [`Decoder`]: step-level cached decoding on a device.

use cubecl::prelude::*;
use megabyte_ops::copy::copy;
use megabyte_ops::cross_entropy::tied_cross_entropy;
use megabyte_ops::decode::{
    decode_stack, decode_stack_max_keys, LocalInputStep, PackedStack, PatchInputStep, StepInput,
    StepOutput,
};
use megabyte_ops::layer_norm::layer_norm;
use megabyte_ops::local_input::local_input;
use megabyte_ops::patch_embed::patch_embed_window;
use megabyte_ops::{FloatElement, Tensor};
use megabyte_reference::Error as InputError;

use super::{check_push, check_start, StepDecoder};

use crate::block::{block_forward, Scratch, Stack};
use crate::cache::{CacheAt, LayerCache};
use crate::error::Error;
use crate::model::{activation_kind, Model};
use crate::weights::DeviceBlock;
use megabyte_ops::decode::BlockWeights;
use megabyte_reference::weights::Norm;

/// What to change when a decoding buffer is too large for the device.
const BATCH_HINT: &str = "decode fewer sequences at once (--samples)";
const PREFILL_HINT: &str =
    "decode fewer sequences at once (--samples) or start from a shorter prompt";

/// Most complete prompt patches that [`DecodeKernel::Auto`] feeds through the global stack
/// as fused steps, one launch each; longer prompts go through the forward's blocks in one
/// pass. Steps launch only the kernel that decoding launches anyway: on a CPU driver, where
/// each new kernel is compiled at its first launch, the one-pass blocks cost seconds before
/// the first byte.
const STEP_PREFILL_PATCHES: usize = 32;

/// How a decoding step runs the blocks of one stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeKernel {
    /// Fused where the device and the stack's width allow it, unfused otherwise.
    #[default]
    Auto,
    /// One launch per step of each stack (`megabyte_ops::decode::decode_stack`); an error
    /// where the device or the width does not allow it.
    Fused,
    /// The forward's blocks on the new rows: nine launches per block.
    Unfused,
}

/// Step-by-step decoding of a batch of equally long byte sequences with KV caches.
pub struct Decoder<'m, R: Runtime, E: FloatElement> {
    model: &'m Model<R, E>,
    batch: usize,
    kernel: DecodeKernel,
    /// Each stack's packed parameters, when its steps use the fused kernel.
    global_fused: Option<PackedStack<R, E>>,
    local_fused: Option<PackedStack<R, E>>,
    /// Most keys of a fused global step (`decode_stack_max_keys`; unbounded with
    /// [`DecodeKernel::Fused`]); past it, global steps run the unfused blocks.
    global_fused_keys: usize,
    /// Per global layer, in (L_G, B, K, P·D_G) buffers.
    global_cache: Vec<LayerCache<R, E>>,
    /// Per local layer, in (L_L, B, P, D_L) buffers.
    local_cache: Vec<LayerCache<R, E>>,
    global_step: Scratch<R, E>,
    local_step: Scratch<R, E>,
    /// The global model's output for the current patch, (B, 1, P·D_G).
    g: Tensor<R, E>,
    /// Local inputs of the current patch (B, P, D_L) and the current position's row (B, D_L).
    local_in: Tensor<R, E>,
    local_row: Tensor<R, E>,
    logits: Tensor<R, E>,
    /// Where host-sampled local steps write the argmax they compute anyway, (B, 1).
    argmax: Tensor<R, u32>,
    loss: Tensor<R, f32>,
    lse: Tensor<R, f32>,
    targets: Tensor<R, u32>,
    /// Bytes of the current patch so far, (B, P) row-major.
    patch_bytes: Vec<u32>,
    /// Bytes consumed: the position whose logits the last call returned.
    pos: usize,
}

impl<'m, R: Runtime, E: FloatElement> Decoder<'m, R, E> {
    /// Caches and buffers for `batch` sequences of up to the model's context.
    pub fn new(model: &'m Model<R, E>, batch: usize) -> Result<Self, Error> {
        Self::with_kernel(model, batch, DecodeKernel::Auto)
    }

    /// [`Decoder::new`] with the choice of block kernel for the steps.
    pub fn with_kernel(
        model: &'m Model<R, E>,
        batch: usize,
        kernel: DecodeKernel,
    ) -> Result<Self, Error> {
        if batch == 0 {
            return Err(InputError::EmptyBatch { batch }.into());
        }
        let cfg = model.config();
        let client = model.client();
        let (p, dl, wg, v) = (cfg.patch, cfg.d_local, cfg.global_width(), cfg.vocab);
        let w = &model.w;
        // A stack is fused if the kernel takes its shape and, for the local stack, all P keys
        // of a patch; the global stack's steps past `global_fused_keys` run unfused (Auto) or
        // fail (Fused).
        let fused = |stack: Stack,
                     blocks: &[DeviceBlock<R, E>],
                     ln_f: &Norm<Tensor<R, E>>,
                     d_in: usize,
                     keys: usize|
         -> Result<(Option<PackedStack<R, E>>, usize), Error> {
            let (width, hidden, heads, layers) =
                (stack.width, stack.hidden, stack.heads, blocks.len());
            let ok = decode_stack_max_keys::<R, E>(client, width, hidden, heads, layers, d_in, v)
                .and_then(|max_keys| {
                    if max_keys >= keys {
                        Ok(max_keys)
                    } else {
                        Err(megabyte_ops::OpError::unsupported("decode_stack", "keys", keys, format!(
                                "a fused step of this stack takes at most {max_keys} keys on this device"
                            )))
                    }
                });
            let max_keys = match (kernel, ok) {
                (DecodeKernel::Unfused, _) | (DecodeKernel::Auto, Err(_)) => None,
                (_, ok) => Some(ok?),
            };
            let Some(max_keys) = max_keys else {
                return Ok((None, 0));
            };
            let steps: Vec<_> = blocks
                .iter()
                .map(|b| BlockWeights::from_tensors(b.tensors()))
                .collect();
            let packed = PackedStack::pack(&steps, stack.heads, Some((&ln_f.weight, &ln_f.bias)))?;
            // Fused: every step fused, an error past the kernel's limit.
            let limit = if kernel == DecodeKernel::Fused {
                usize::MAX
            } else {
                max_keys
            };
            Ok((Some(packed), limit))
        };
        let (global_fused, global_fused_keys) =
            fused(model.global_stack(), &w.global_blocks, &w.global_ln_f, 0, 1)?;
        let (local_fused, _) = fused(
            model.local_stack(),
            &w.local_blocks,
            &w.local_ln_f,
            cfg.d_global,
            p,
        )?;
        Ok(Decoder {
            model,
            batch,
            kernel,
            global_fused,
            local_fused,
            global_fused_keys,
            global_cache: LayerCache::stack(
                client,
                "KV cache of the global stack",
                cfg.layers_global,
                batch,
                cfg.patches(),
                wg,
            )?,
            local_cache: LayerCache::stack(
                client,
                "KV cache of the local stack",
                cfg.layers_local,
                batch,
                p,
                dl,
            )?,
            global_step: Scratch::new(client, model.global_stack(), batch, 1, BATCH_HINT)?,
            local_step: Scratch::new(client, model.local_stack(), batch, 1, BATCH_HINT)?,
            g: Tensor::empty(client, &[batch, 1, wg])?,
            local_in: Tensor::empty(client, &[batch, p, dl])?,
            local_row: Tensor::empty(client, &[batch, dl])?,
            logits: Tensor::empty(client, &[batch, v])?,
            argmax: Tensor::empty(client, &[batch, 1])?,
            loss: Tensor::empty(client, &[batch])?,
            lse: Tensor::empty(client, &[batch])?,
            targets: Tensor::from_ids(client, &vec![0; batch], &[batch])?,
            patch_bytes: vec![0; batch * p],
            pos: 0,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The position whose logits the last call returned (= bytes consumed so far).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Restarts from `prompts` (one per batch row, all of the same length n, possibly 0) and
    /// returns the logits (B, V) of byte n. The pad and the complete patches of the prompt fill
    /// the global cache as fused steps, one per patch (with [`DecodeKernel::Fused`], and with
    /// `Auto` below 32 patches), or in one pass of the forward's blocks;
    /// the bytes of the last, partial patch go through the local model one by one.
    pub fn start(&mut self, prompts: &[&[u8]]) -> Result<Vec<f32>, Error> {
        let cfg = self.model.config().clone();
        let (b, p) = (self.batch, cfg.patch);
        let n = check_start(prompts, b, cfg.context)?;
        // Global positions 0 ..= kc from the kc complete patches.
        let kc = n / p;
        let by_steps = match self.kernel {
            DecodeKernel::Fused => true,
            DecodeKernel::Auto => kc < STEP_PREFILL_PATCHES,
            DecodeKernel::Unfused => false,
        };
        if by_steps && self.global_fused.is_some() && kc < self.global_fused_keys {
            self.global_pad_step()?;
            for k in 1..=kc {
                self.load_patch(prompts, k - 1);
                self.global(k)?;
            }
        } else {
            self.prefill(prompts, kc)?;
        }

        // The partial patch through the local model, then the logits of byte n.
        self.load_patch(prompts, kc);
        let r = n - kc * p;
        for i in 0..r {
            self.local(i, false)?;
        }
        self.pos = n;
        self.local(r, true)
    }

    /// Sets `patch_bytes` to patch `patch` of each prompt: its bytes, zeros past the prompt's end.
    fn load_patch(&mut self, prompts: &[&[u8]], patch: usize) {
        let p = self.model.config().patch;
        self.patch_bytes.fill(0);
        for (row, q) in prompts.iter().enumerate() {
            let bytes = &q[(patch * p).min(q.len())..((patch + 1) * p).min(q.len())];
            for (i, &x) in bytes.iter().enumerate() {
                self.patch_bytes[row * p + i] = x as u32;
            }
        }
    }

    /// Global positions 0 ..= kc from the first kc patches of `prompts` in one pass of the
    /// forward's blocks, which fills the global cache and leaves the current patch's g.
    fn prefill(&mut self, prompts: &[&[u8]], kc: usize) -> Result<(), Error> {
        let cfg = self.model.config().clone();
        let (b, p) = (self.batch, cfg.patch);
        let client = self.model.client().clone();
        let w = &self.model.w;
        let act = activation_kind(cfg.activation);
        let wg = cfg.global_width();

        let history: Vec<u32> = prompts
            .iter()
            .flat_map(|q| q[..kc * p].iter().map(|&x| x as u32))
            .collect();
        let ids = if kc == 0 {
            // Global position 0 is the pad and reads no byte.
            Tensor::from_ids(&client, &vec![0; b], &[b, 1])?
        } else {
            Tensor::from_ids(&client, &history, &[b, kc * p])?
        };
        let h =
            Tensor::<R, E>::empty_named(&client, &[b, kc + 1, wg], "prompt patches", PREFILL_HINT)?;
        patch_embed_window(
            &ids,
            0,
            &w.global_embed,
            &w.global_pos,
            &w.global_pad,
            &h,
            p,
            0,
        )?;
        let h = h.reshape(&[b * (kc + 1), wg])?;
        let scratch = Scratch::new(&client, self.model.global_stack(), b, kc + 1, PREFILL_HINT)?;
        for (blk, cache) in w.global_blocks.iter().zip(&self.global_cache) {
            block_forward(
                blk,
                &scratch.block(&h),
                act,
                Some(CacheAt { cache, start: 0 }),
            )?;
        }
        // Only the last position's output is needed: the current patch's g.
        let last = Tensor::<R, E>::empty(&client, &[b, 1, wg])?;
        copy(
            &h.strided(kc * wg, &[b, 1, wg], &[(kc + 1) * wg, wg, 1])?,
            &last.view(),
        )?;
        let ln = &w.global_ln_f;
        let (mean, rstd) = (&self.global_step.mean, &self.global_step.rstd);
        let g = self.g.clone().reshape(&[b, wg])?;
        layer_norm(
            &last.reshape(&[b, wg])?,
            &ln.weight,
            &ln.bias,
            &g,
            mean,
            rstd,
        )?;
        Ok(())
    }

    /// Global position 0, the pad (which reads no byte), as a fused step of the same launch
    /// configuration as every other global step: its patch input reads the pad as a table of
    /// P rows (ids 0 .. P) and adds zero positions.
    fn global_pad_step(&mut self) -> Result<(), Error> {
        let cfg = self.model.config();
        let (b, p, dg) = (self.batch, cfg.patch, cfg.d_global);
        let client = self.model.client();
        let w = &self.model.w;
        let table = w.global_pad.clone().reshape(&[p, dg])?;
        let zeros = Tensor::<R, E>::from_f32(client, &vec![0.0; p * dg], &[p, dg])?;
        let slots: Vec<u32> = (0..b * p).map(|i| (i % p) as u32).collect();
        let ids = Tensor::from_ids(client, &slots, &[b, p])?;
        let input = StepInput::Patch(PatchInputStep {
            embed: &table,
            positions: &zeros,
            ids: &ids,
            first_byte: 0,
        });
        self.launch_global(0, &input)
    }

    /// The fused global step at global position k with its patch input: every global block
    /// against the cache, the normalised output into `g`.
    fn launch_global(&self, k: usize, input: &StepInput<R, E>) -> Result<(), Error> {
        let cfg = self.model.config();
        let (b, wg) = (self.batch, cfg.global_width());
        let stack = self.global_fused.as_ref().expect("checked by the caller");
        let g = self.g.clone().reshape(&[b, wg])?;
        let h = Tensor::<R, E>::empty(self.model.client(), &[b, wg])?;
        let cache = &self.global_cache[0];
        let act = activation_kind(cfg.activation);
        decode_stack(
            &h,
            stack,
            &cache.k,
            &cache.v,
            k,
            act,
            input,
            &StepOutput::Norm(&g),
        )?;
        Ok(())
    }

    /// Appends one byte per batch row at the current position and returns the logits (B, V)
    /// of the next one. Runs the global model first when the byte completes a patch.
    pub fn push(&mut self, bytes: &[u32]) -> Result<Vec<f32>, Error> {
        self.check_push(bytes, 1)?;
        let p = self.model.config().patch;
        self.append(bytes);
        if self.pos.is_multiple_of(p) {
            self.global(self.pos / p)?;
            self.patch_bytes.fill(0);
        }
        self.local(self.pos % p, true)
    }

    /// Whether [`Decoder::push_greedy`] can run: the local step is fused.
    pub fn greedy_on_device(&self) -> bool {
        self.local_fused.is_some()
    }

    /// Greedy decoding on the device: appends `bytes` (one per row, as [`Decoder::push`]),
    /// then `steps` times takes the argmax of the next position's logits (the lowest id among
    /// equal maxima, as `reference::generate::argmax`) and appends it, with no host round trip
    /// until the end. Returns the `steps` bytes of each row ((B, steps), row-major); the
    /// decoder has consumed all but the last, which the next call appends. Needs the fused
    /// local step ([`Decoder::greedy_on_device`]).
    pub fn push_greedy(&mut self, bytes: &[u32], steps: usize) -> Result<Vec<u32>, Error> {
        if steps == 0 {
            return Err(megabyte_ops::OpError::unsupported(
                "push_greedy",
                "steps",
                0,
                "decode at least one byte",
            )
            .into());
        }
        if self.local_fused.is_none() {
            return Err(megabyte_ops::OpError::unsupported(
                "push_greedy",
                "local width",
                self.model.config().d_local,
                "greedy decoding on the device needs the fused local step",
            )
            .into());
        }
        self.check_push(bytes, steps)?;
        let cfg = self.model.config();
        let (b, p) = (self.batch, cfg.patch);
        let client = self.model.client().clone();
        self.append(bytes);
        // The current patch's bytes live on the device from here: each step reads byte p - 1
        // from it and writes its argmax at p; a global step reads the completed patch.
        let ids = Tensor::from_ids(&client, &self.patch_bytes, &[b, p])?;
        let generated = Tensor::<R, u32>::empty(&client, &[b, steps])?;
        let first = self.pos;
        for i in 0..steps {
            if self.pos.is_multiple_of(p) {
                self.global_with(self.pos / p, &ids)?;
            }
            self.local_fused_step(self.pos % p, &ids, Some((&generated, i)))?;
            if i + 1 < steps {
                self.pos += 1;
            }
        }
        let out = generated.to_ids()?;
        // Step i wrote its byte at slot (first + i) % P of the device's patch bytes; the host
        // copy follows without reading them back.
        for i in 0..steps {
            let slot = (first + i) % p;
            for row in 0..b {
                self.patch_bytes[row * p + slot] = out[row * steps + i];
            }
        }
        Ok(out)
    }

    /// Records one byte per row (checked) at the current position and moves past it.
    fn append(&mut self, bytes: &[u32]) {
        let p = self.model.config().patch;
        let slot = self.pos % p;
        for (row, &x) in bytes.iter().enumerate() {
            self.patch_bytes[row * p + slot] = x;
        }
        self.pos += 1;
    }

    /// Checks a push of one byte per row followed by `more - 1` further positions.
    fn check_push(&self, bytes: &[u32], more: usize) -> Result<(), Error> {
        let cfg = self.model.config();
        check_push(bytes, self.batch, cfg.vocab, self.pos, more, cfg.context)
    }

    /// One global step: embeds patch k - 1 (the bytes in `patch_bytes`) as global position k,
    /// runs every global block against the cache, and leaves the normalised output in `g`.
    fn global(&mut self, k: usize) -> Result<(), Error> {
        let (b, p) = (self.batch, self.model.config().patch);
        let ids = Tensor::from_ids(self.model.client(), &self.patch_bytes, &[b, p])?;
        self.global_with(k, &ids)
    }

    /// [`Decoder::global`] with the patch's bytes (B, P) given on the device.
    fn global_with(&mut self, k: usize, ids: &Tensor<R, u32>) -> Result<(), Error> {
        let cfg = self.model.config();
        let (b, p, wg) = (self.batch, cfg.patch, cfg.global_width());
        let client = self.model.client();
        let w = &self.model.w;
        let act = activation_kind(cfg.activation);
        if self.global_fused.is_some() && k < self.global_fused_keys {
            let input = StepInput::Patch(PatchInputStep {
                embed: &w.global_embed,
                positions: &w.global_pos,
                ids,
                first_byte: (k - 1) * p,
            });
            return self.launch_global(k, &input);
        }
        let h = Tensor::<R, E>::empty(client, &[b, 1, wg])?;
        patch_embed_window(
            ids,
            (k - 1) * p,
            &w.global_embed,
            &w.global_pos,
            &w.global_pad,
            &h,
            p,
            k,
        )?;
        let h = h.reshape(&[b, wg])?;
        for (blk, cache) in w.global_blocks.iter().zip(&self.global_cache) {
            let at = CacheAt { cache, start: k };
            block_forward(blk, &self.global_step.block(&h), act, Some(at))?;
        }
        let (ln, s) = (&w.global_ln_f, &self.global_step);
        let g = self.g.clone().reshape(&[b, wg])?;
        layer_norm(&h, &ln.weight, &ln.bias, &g, &s.mean, &s.rstd)?;
        Ok(())
    }

    /// One local step at position `p` of the current patch: its input from `g` and byte p - 1,
    /// every local block against the cache, then (if asked) the logits (B, V) of byte p.
    fn local(&mut self, p: usize, want_logits: bool) -> Result<Vec<f32>, Error> {
        if self.local_fused.is_some() {
            return self.local_fused(p, want_logits);
        }
        let cfg = self.model.config();
        let (b, patch, dl) = (self.batch, cfg.patch, cfg.d_local);
        let client = self.model.client();
        let w = &self.model.w;
        let act = activation_kind(cfg.activation);
        // The local input of the whole patch from the bytes known so far; row p reads only
        // byte p - 1, which is known.
        let ids = Tensor::from_ids(client, &self.patch_bytes, &[b, patch])?;
        local_input(
            &self.g,
            &ids,
            &w.global_to_local,
            &w.local_embed,
            &w.local_pad,
            w.local_pos.as_ref(),
            &self.local_in,
        )?;
        copy(
            &self
                .local_in
                .strided(p * dl, &[b, 1, dl], &[patch * dl, dl, 1])?,
            &self.local_row.strided(0, &[b, 1, dl], &[dl, dl, 1])?,
        )?;
        let x = &self.local_row;
        for (blk, cache) in w.local_blocks.iter().zip(&self.local_cache) {
            let at = CacheAt { cache, start: p };
            block_forward(blk, &self.local_step.block(x), act, Some(at))?;
        }
        if !want_logits {
            return Ok(Vec::new());
        }
        let s = &self.local_step;
        let ln = &w.local_ln_f;
        layer_norm(x, &ln.weight, &ln.bias, &s.normed, &s.mean, &s.rstd)?;
        tied_cross_entropy(
            &s.normed,
            w.head_table(),
            &self.targets,
            &self.loss,
            &self.lse,
            Some(&self.logits),
        )?;
        Ok(self.logits.to_f32_vec()?)
    }

    /// [`Decoder::local`] in one fused launch: the input row from `g` and byte p - 1, every
    /// local block, and (when logits are wanted) the final LayerNorm and the logits.
    fn local_fused(&mut self, p: usize, want_logits: bool) -> Result<Vec<f32>, Error> {
        let (b, patch) = (self.batch, self.model.config().patch);
        let ids = Tensor::from_ids(self.model.client(), &self.patch_bytes, &[b, patch])?;
        // The logits even when they are not read, and their argmax into a scratch slot: one
        // launch configuration for every local step, of a prompt, sampled or greedy (each
        // configuration is compiled at its first launch). The argmax also lands in this
        // call's copy of the patch bytes, which is dropped.
        let w = &self.model.w;
        let out = StepOutput::Argmax {
            table: w.head_table(),
            logits: &self.logits,
            generated: &self.argmax,
            at: 0,
        };
        self.launch_local(p, &ids, &out)?;
        if !want_logits {
            return Ok(Vec::new());
        }
        Ok(self.logits.to_f32_vec()?)
    }

    /// The fused local step at patch position p with the patch's bytes `ids` (B, P) on the
    /// device; with `greedy` = (generated, i), the logits' argmax goes to `ids[:, p]` and to
    /// `generated[:, i]`.
    fn local_fused_step(
        &self,
        p: usize,
        ids: &Tensor<R, u32>,
        greedy: Option<(&Tensor<R, u32>, usize)>,
    ) -> Result<(), Error> {
        let w = &self.model.w;
        let out = match greedy {
            None => StepOutput::Row,
            Some((generated, at)) => StepOutput::Argmax {
                table: w.head_table(),
                logits: &self.logits,
                generated,
                at,
            },
        };
        self.launch_local(p, ids, &out)
    }

    fn launch_local(
        &self,
        p: usize,
        ids: &Tensor<R, u32>,
        out: &StepOutput<R, E>,
    ) -> Result<(), Error> {
        let cfg = self.model.config();
        let (b, wg) = (self.batch, cfg.global_width());
        let w = &self.model.w;
        let act = activation_kind(cfg.activation);
        let g = self.g.clone().reshape(&[b, wg])?;
        let input = StepInput::Local(LocalInputStep {
            g: &g,
            global_to_local: &w.global_to_local,
            embed: &w.local_embed,
            pad: &w.local_pad,
            positions: w.local_pos.as_ref(),
            ids,
            slot: p,
        });
        let stack = self.local_fused.as_ref().expect("checked by the caller");
        let cache = &self.local_cache[0];
        decode_stack(
            &self.local_row,
            stack,
            &cache.k,
            &cache.v,
            p,
            act,
            &input,
            out,
        )?;
        Ok(())
    }
}

impl<R: Runtime, E: FloatElement> StepDecoder for Decoder<'_, R, E> {
    fn start(&mut self, prompts: &[&[u8]]) -> Result<Vec<f32>, Error> {
        Decoder::start(self, prompts)
    }

    fn push(&mut self, bytes: &[u32]) -> Result<Vec<f32>, Error> {
        Decoder::push(self, bytes)
    }

    fn greedy_on_device(&self) -> bool {
        Decoder::greedy_on_device(self)
    }

    fn push_greedy(&mut self, bytes: &[u32], steps: usize) -> Result<Vec<u32>, Error> {
        Decoder::push_greedy(self, bytes, steps)
    }
}

//! Cached generation: the global model runs once per completed patch, the local model once per
//! byte, each against its KV cache.
//!
//! | item | file | what |
//! | --- | --- | --- |
//! | [`Decoder`], [`DecodeKernel`] | `decoder.rs` | the step-level interface on a device: feed bytes, get the next position's logits (or greedy bytes decoded on the device) |
//! | [`ReferenceModel`], [`ReferenceDecoder`] | `reference.rs` | the same steps on the CPU through `megabyte_reference`'s full forward, for `--device cpu` |
//! | [`StepDecoder`], [`DecodeModel`], [`Generator`], [`GenerateOptions`] | here | sampling with per-prompt seeds, streaming, the end id and stop sequences: one implementation whichever model runs the steps |
//!
//! Position t = k·P + p is predicted from global position k (which saw patches < k) and local
//! position p (which saw bytes k·P .. t of its own patch). So:
//! - the global KV cache holds one entry per global position; when patch k - 1 is complete,
//!   one global step embeds it as global position k and produces `g` for patch k;
//! - the local KV cache holds at most P entries and restarts at each patch; local step p reads
//!   byte t - 1 (the local pad at p = 0) and yields the logits of byte t.
//!
//! A step runs a stack on one row per sequence. By default ([`DecodeKernel::Auto`]) a step of
//! each stack is one fused launch (`megabyte_ops::decode`): the local step builds its input
//! row, runs every local block and ends with the logits; the global step embeds the patch,
//! runs every global block and ends with the final LayerNorm. The fused kernel reads a packed
//! copy of each stack's parameters, made when the decoder is created. Stacks too wide for it
//! run as the forward's unfused blocks (nine launches each).

use cubecl::prelude::*;
use megabyte_ops::FloatElement;
use megabyte_reference::generate::argmax;
use megabyte_reference::{Config, Error as InputError, Sampler, Sampling};

use crate::error::Error;
use crate::model::Model;

mod decoder;
mod reference;

pub use decoder::{DecodeKernel, Decoder};
pub use reference::{ReferenceDecoder, ReferenceModel};

/// Decoding a batch of equally long byte sequences one position at a time: what the
/// generators drive. [`Decoder`] runs the steps on a device with KV caches,
/// [`ReferenceDecoder`] on the CPU by re-running the reference forward.
pub trait StepDecoder {
    /// Restarts from `prompts` (one per batch row, all of the same length n) and returns the
    /// logits (B, V) of byte n.
    fn start(&mut self, prompts: &[&[u8]]) -> Result<Vec<f32>, Error>;

    /// Appends one byte per batch row and returns the logits (B, V) of the next position.
    fn push(&mut self, bytes: &[u32]) -> Result<Vec<f32>, Error>;

    /// Whether [`StepDecoder::push_greedy`] runs on the device, with no host round trip
    /// until its last step.
    fn greedy_on_device(&self) -> bool {
        false
    }

    /// Appends `bytes` (as [`StepDecoder::push`]), then `steps` times appends the argmax of
    /// the next position's logits (the lowest id among equal maxima). Returns the `steps`
    /// bytes of each row ((B, steps), row-major); all but the last are consumed, and the next
    /// call appends the last. This default pushes and takes the argmax on the host.
    fn push_greedy(&mut self, bytes: &[u32], steps: usize) -> Result<Vec<u32>, Error> {
        let b = bytes.len();
        let mut out = vec![0; b * steps];
        let mut next = bytes.to_vec();
        for i in 0..steps {
            let logits = self.push(&next)?;
            let vocab = logits.len() / b.max(1);
            for (row, id) in next.iter_mut().enumerate() {
                *id = argmax(&logits[row * vocab..(row + 1) * vocab]);
                out[row * steps + i] = *id;
            }
        }
        Ok(out)
    }
}

/// Checks that a call gives `len` = one item per batch row.
fn one_per_row(len: usize, batch: usize) -> Result<(), Error> {
    if len != batch {
        return Err(InputError::InputLength { len, batch, seq: 1 }.into());
    }
    Ok(())
}

/// Checks the prompts of a start: one per batch row, all of one length n below the context.
/// Returns n.
fn check_start(prompts: &[&[u8]], batch: usize, context: usize) -> Result<usize, Error> {
    one_per_row(prompts.len(), batch)?;
    let n = prompts[0].len();
    if let Some(other) = prompts.iter().find(|q| q.len() != n) {
        return Err(InputError::InputLength {
            len: other.len(),
            batch: 1,
            seq: n,
        }
        .into());
    }
    if n >= context {
        return Err(InputError::PromptTooLong {
            prompt: n,
            new: 1,
            context,
        }
        .into());
    }
    Ok(n)
}

/// Checks a push at position `pos` of one id per batch row below `vocab`, followed by
/// `more - 1` further positions, all inside the context.
fn check_push(
    bytes: &[u32],
    batch: usize,
    vocab: usize,
    pos: usize,
    more: usize,
    context: usize,
) -> Result<(), Error> {
    one_per_row(bytes.len(), batch)?;
    if let Some((position, &id)) = bytes
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab)
    {
        return Err(InputError::IdOutOfRange {
            id,
            position,
            vocab,
        }
        .into());
    }
    if pos + more >= context {
        return Err(Error::ContextFull { context });
    }
    Ok(())
}

/// Greedy bytes decoded on the device per host round trip: each is one read-back of B × this
/// many ids instead of one of B × V logits per byte; a callback sees a block's bytes when the
/// block is done.
const GREEDY_BLOCK: usize = 32;

/// What to generate and when to stop.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most new bytes per prompt; prompt + max_new must fit in the context.
    pub max_new: usize,
    pub sampling: Sampling,
    /// A row stops after emitting any of these byte sequences (which are kept in its output).
    pub stop: Vec<Vec<u8>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new: 256,
            sampling: Sampling::greedy(),
            stop: Vec::new(),
        }
    }
}

/// A model that [`Generator`] can decode with: it makes a [`StepDecoder`] for a batch.
/// Implemented by the device [`Model`] (KV caches, the kernels' steps) and by
/// [`ReferenceModel`] (the CPU reference, re-running its forward).
pub trait DecodeModel {
    type Decoder<'a>: StepDecoder
    where
        Self: 'a;

    fn config(&self) -> &Config;

    /// A decoder for `batch` sequences; `kernel` chooses the device's block kernel (the
    /// reference has one).
    fn decoder(&self, batch: usize, kernel: DecodeKernel) -> Result<Self::Decoder<'_>, Error>;
}

impl<R: Runtime, E: FloatElement> DecodeModel for Model<R, E> {
    type Decoder<'a> = Decoder<'a, R, E>;

    fn config(&self) -> &Config {
        Model::config(self)
    }

    fn decoder(&self, batch: usize, kernel: DecodeKernel) -> Result<Decoder<'_, R, E>, Error> {
        Decoder::with_kernel(self, batch, kernel)
    }
}

/// Samples continuations of a batch of prompts, on a device with the model's KV caches or on
/// the CPU with the reference model.
///
/// Prompts of equal length decode together as one batch; prompts of different lengths decode
/// as separate batches (their patch boundaries fall at different steps). Prompt i samples
/// with seed `sampling.seed + i`, as the reference generator does, so greedy decoding gives
/// the reference's bytes and sampling is reproducible.
pub struct Generator<'m, M: DecodeModel> {
    model: &'m M,
    options: GenerateOptions,
    kernel: DecodeKernel,
}

impl<'m, M: DecodeModel> Generator<'m, M> {
    pub fn new(model: &'m M, options: GenerateOptions) -> Result<Self, Error> {
        options.sampling.validate()?;
        Ok(Generator {
            model,
            options,
            kernel: DecodeKernel::Auto,
        })
    }

    /// The block kernel of the decoding steps ([`DecodeKernel::Auto`] unless set).
    pub fn decode_kernel(mut self, kernel: DecodeKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The new bytes of each prompt. `on_byte(prompt_index, byte)` sees every byte as soon as
    /// it is sampled (for streaming). A row ends after `max_new` bytes, at the end id (256)
    /// when the vocabulary has one (not emitted), or after a stop sequence (emitted).
    pub fn generate(
        &self,
        prompts: &[&[u8]],
        mut on_byte: impl FnMut(usize, u8),
    ) -> Result<Vec<Vec<u8>>, Error> {
        let (context, vocab) = (self.model.config().context, self.model.config().vocab);
        let options = &self.options;
        for q in prompts {
            if q.len().saturating_add(options.max_new) > context {
                return Err(InputError::PromptTooLong {
                    prompt: q.len(),
                    new: options.max_new,
                    context,
                }
                .into());
            }
        }
        let mut outputs = vec![Vec::new(); prompts.len()];
        if options.max_new == 0 {
            return Ok(outputs);
        }
        // Group prompts by length, keeping first-appearance order.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, q) in prompts.iter().enumerate() {
            match groups.iter_mut().find(|(n, _)| *n == q.len()) {
                Some((_, rows)) => rows.push(i),
                None => groups.push((q.len(), vec![i])),
            }
        }
        for (_, rows) in groups {
            let mut decoder = self.model.decoder(rows.len(), self.kernel)?;
            let group = Group {
                vocab,
                options,
                prompts,
                rows: &rows,
            };
            group.decode(&mut decoder, &mut outputs, &mut on_byte)?;
        }
        Ok(outputs)
    }
}

/// Prompts of one length, decoded as one batch: `rows` are their indices in `prompts`.
struct Group<'a> {
    vocab: usize,
    options: &'a GenerateOptions,
    prompts: &'a [&'a [u8]],
    rows: &'a [usize],
}

impl Group<'_> {
    fn decode(
        &self,
        decoder: &mut impl StepDecoder,
        outputs: &mut [Vec<u8>],
        on_byte: &mut impl FnMut(usize, u8),
    ) -> Result<(), Error> {
        let (vocab, opts, rows) = (self.vocab, self.options, self.rows);
        let group: Vec<&[u8]> = rows.iter().map(|&i| self.prompts[i]).collect();
        let mut samplers = rows
            .iter()
            .map(|&i| {
                Sampler::new(Sampling {
                    seed: opts.sampling.seed.wrapping_add(i as u64),
                    ..opts.sampling.clone()
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut active = vec![true; rows.len()];
        // Row j's next id: emitted unless it ends the row; stop sequences end it after.
        let mut emit = |j: usize, id: u32, active: &mut [bool]| {
            let i = rows[j];
            if !active[j] {
                return;
            }
            if id >= 256 {
                active[j] = false;
                return;
            }
            outputs[i].push(id as u8);
            on_byte(i, id as u8);
            if opts
                .stop
                .iter()
                .any(|s| !s.is_empty() && outputs[i].ends_with(s))
            {
                active[j] = false;
            }
        };
        let logits = decoder.start(&group)?;
        let mut next: Vec<u32> = (0..rows.len())
            .map(|j| samplers[j].sample(&logits[j * vocab..(j + 1) * vocab]))
            .collect();
        for (j, &id) in next.iter().enumerate() {
            emit(j, id, &mut active);
        }
        let mut produced = 1;
        if opts.sampling.temperature == 0.0 && decoder.greedy_on_device() {
            // Greedy: the argmax runs in the step on the device; bytes come back in blocks.
            while produced < opts.max_new && active.contains(&true) {
                let steps = (opts.max_new - produced).min(GREEDY_BLOCK);
                // Rows that have ended keep decoding; their bytes are discarded.
                let block = decoder.push_greedy(&next, steps)?;
                for t in 0..steps {
                    for j in 0..rows.len() {
                        emit(j, block[j * steps + t], &mut active);
                    }
                }
                next = (0..rows.len())
                    .map(|j| block[j * steps + steps - 1])
                    .collect();
                produced += steps;
            }
            return Ok(());
        }
        while produced < opts.max_new && active.contains(&true) {
            let feed: Vec<u32> = (0..rows.len())
                .map(|j| if active[j] { next[j] } else { 0 })
                .collect();
            let logits = decoder.push(&feed)?;
            for (j, id) in next.iter_mut().enumerate() {
                *id = samplers[j].sample(&logits[j * vocab..(j + 1) * vocab]);
                emit(j, *id, &mut active);
            }
            produced += 1;
        }
        Ok(())
    }
}

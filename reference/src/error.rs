//! Errors for bad input to the reference model.

use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("input holds {len} ids but batch {batch} × sequence {seq} needs {}", batch * seq)]
    InputLength {
        len: usize,
        batch: usize,
        seq: usize,
    },
    #[error("batch must be at least 1, got {batch}")]
    EmptyBatch { batch: usize },
    #[error("sequence length must be at least 1 patch, got {seq}")]
    EmptySequence { seq: usize },
    #[error("sequence length {seq} is not a multiple of the patch size {patch}")]
    SequenceNotPatchMultiple { seq: usize, patch: usize },
    #[error("sequence length {seq} exceeds the context of {context} bytes")]
    SequenceTooLong { seq: usize, context: usize },
    #[error("id {id} at position {position} is outside the vocabulary of {vocab}")]
    IdOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },
    #[error(
        "prompt of {prompt} byte{} plus {new} new byte{} exceeds the context of {context} bytes",
        if *.prompt == 1 { "" } else { "s" },
        if *.new == 1 { "" } else { "s" }
    )]
    PromptTooLong {
        prompt: usize,
        new: usize,
        context: usize,
    },
    #[error("sampling parameter `{name}` = {value}: {reason}")]
    Sampling {
        name: &'static str,
        value: f64,
        reason: &'static str,
    },
}

//! The error every fallible call of the model, the generator and the checkpoint code returns.

use megabyte_ops::OpError;
use megabyte_reference::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad input caught before any device work: shapes, lengths, ids, sampling parameters.
    #[error(transparent)]
    Input(#[from] megabyte_reference::Error),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A numeric setting outside its range (NaN and infinities included), named as the
    /// setting's field is (`lr`, `min_lr`, ...; the program's options spell `_` as `-`).
    #[error("{name} = {value} is out of range: {reason}")]
    Argument {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A NaN or infinity where a checkpoint is written: nothing is written.
    #[error("{what} holds {value} at index {index}: refusing to write a checkpoint that cannot be loaded")]
    NonFinite {
        what: String,
        value: f32,
        index: usize,
    },
    /// The loss or the gradient norm of a training step is NaN or infinite (the step's update
    /// is not applied: the weights stay those of the step before), or the validation loss is
    /// (the weights are not saved). Either way the last checkpoint written is kept.
    #[error("training diverged at step {step}: {what}; the last checkpoint saved is kept (try a lower --lr, or --clip)")]
    Diverged { step: u64, what: String },
    /// A device runtime reported a failure on its own thread (a panic it caught and logged);
    /// what it computed since cannot be trusted, so nothing more is reported.
    #[error("the device failed: {0}; no results from this run are reported")]
    DeviceFailed(String),
    /// Input data (training text, a file to evaluate) that cannot be used: empty, too short.
    #[error("{path}: {reason}")]
    Data { path: String, reason: String },
    /// Arguments that do not make a run together: a missing model, nothing to do, a device
    /// that cannot do what was asked.
    #[error("{0}")]
    Usage(String),
    /// An output path that would destroy a file the run did not make (`--force` overrides).
    #[error("--out {path}: {reason}")]
    Output { path: String, reason: String },
    #[error("the prompt is empty: give it as an argument or on stdin")]
    EmptyPrompt,
    #[error("the context of {context} bytes is full: no position is left to predict")]
    ContextFull { context: usize },
    #[error("the evaluation stride {stride} must be between 1 and the window length {context}")]
    EvalStride { stride: usize, context: usize },
    #[error("the evaluation window {window} must be a multiple of the patch size {patch} between {patch} and the context length {context}")]
    EvalWindow {
        window: usize,
        patch: usize,
        context: usize,
    },
    #[error("weights do not match the config: tensor `{name}` has {got} elements, the config needs {expected}")]
    WeightsMismatch {
        name: String,
        got: usize,
        expected: usize,
    },
}

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

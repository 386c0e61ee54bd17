//! The error every launcher returns instead of panicking on bad input.

/// Why an op refused to run. Messages name the offending values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{op}: `{tensor}` has shape {got:?}, expected {expected:?}")]
    Shape {
        op: &'static str,
        tensor: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor of shape {shape:?} needs {expected} elements, got {got}")]
    DataLength {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("{op}: `{tensor}` is empty (shape {shape:?})")]
    Empty {
        op: &'static str,
        tensor: &'static str,
        shape: Vec<usize>,
    },
    #[error("{op}: element type {dtype} is not supported by this device ({device})")]
    UnsupportedDtype {
        op: &'static str,
        dtype: &'static str,
        device: String,
    },
    #[error("{op}: {what} = {value} is not supported: {reason}")]
    Unsupported {
        op: &'static str,
        what: &'static str,
        value: usize,
        reason: String,
    },
    #[error("view at offset {offset} with shape {shape:?} and strides {strides:?} reaches past the {len} elements of its buffer")]
    ViewOutOfBounds {
        offset: usize,
        shape: Vec<usize>,
        strides: Vec<usize>,
        len: usize,
    },
    #[error("no compute device for runtime {runtime}: {reason}")]
    NoDevice {
        runtime: &'static str,
        reason: String,
    },
    /// A buffer larger than the device's largest allocation (`bytes` is `None` when the size
    /// overflows). `hint` says what to change; empty for a buffer the caller did not name.
    #[error("{buffer} of shape {shape:?} needs {} but the device's largest buffer is {} bytes{}{hint}", .bytes.map_or("more than 2^64 bytes".to_string(), |b| format!("{b} bytes")), .limit, if .hint.is_empty() { "" } else { ": " })]
    BufferTooLarge {
        buffer: &'static str,
        shape: Vec<usize>,
        bytes: Option<usize>,
        limit: usize,
        hint: String,
    },
    #[error("device error: {0}")]
    Device(String),
}

impl OpError {
    /// `op` does not take `what = value`, for `reason`.
    pub fn unsupported(
        op: &'static str,
        what: &'static str,
        value: usize,
        reason: impl Into<String>,
    ) -> Self {
        OpError::Unsupported {
            op,
            what,
            value,
            reason: reason.into(),
        }
    }

    /// `tensor` of `op` has no elements.
    pub fn empty(op: &'static str, tensor: &'static str, shape: Vec<usize>) -> Self {
        OpError::Empty { op, tensor, shape }
    }

    /// `tensor` of `op` has shape `got` where `expected` was wanted.
    pub fn shape(
        op: &'static str,
        tensor: &'static str,
        got: &[usize],
        expected: Vec<usize>,
    ) -> Self {
        OpError::Shape {
            op,
            tensor,
            got: got.to_vec(),
            expected,
        }
    }
}

//! Element types the launchers accept.

use cubecl::prelude::{CubeElement, Float};

use crate::profile::Dtype;

/// A floating-point element that kernels compute with and the host can convert.
pub trait FloatElement:
    Float + CubeElement + Copy + std::fmt::Debug + Send + Sync + 'static
{
    /// Short dtype name for messages and bench ids: "f32", "f16", "bf16".
    const NAME: &'static str;
    /// The same type as the planners name it.
    const DTYPE: Dtype;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl FloatElement for f32 {
    const NAME: &'static str = "f32";
    const DTYPE: Dtype = Dtype::F32;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl FloatElement for half::f16 {
    const NAME: &'static str = "f16";
    const DTYPE: Dtype = Dtype::F16;
    fn from_f64(v: f64) -> Self {
        half::f16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
}

impl FloatElement for half::bf16 {
    const NAME: &'static str = "bf16";
    const DTYPE: Dtype = Dtype::Bf16;
    fn from_f64(v: f64) -> Self {
        half::bf16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
}

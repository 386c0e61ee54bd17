//! Element types the launchers accept.

use cubecl::prelude::{CubeElement, Float};

use crate::profile::Dtype;

/// A floating-point element that kernels compute with and the host can convert.
pub trait FloatElement:
    Float + CubeElement + Copy + std::fmt::Debug + Send + Sync + 'static
{
    /// The same type as the planners name it.
    const DTYPE: Dtype;
    /// Short dtype name for messages and bench ids: "f32", "f16", "bf16".
    const NAME: &'static str = Self::DTYPE.name();
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl FloatElement for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

/// The two 2-byte floats, through `half`'s own conversions.
macro_rules! half_element {
    ($($t:ty => $dtype:expr),+) => {
        $(
            impl FloatElement for $t {
                const DTYPE: Dtype = $dtype;
                fn from_f64(v: f64) -> Self {
                    <$t>::from_f64(v)
                }
                fn to_f64(self) -> f64 {
                    <$t>::to_f64(self)
                }
            }
        )+
    };
}

half_element!(half::f16 => Dtype::F16, half::bf16 => Dtype::Bf16);

//! Elementwise nonlinearities of the FFN.

use crate::config::Activation;

/// Exact GELU: `x · Φ(x) = x/2 · (1 + erf(x/√2))`, evaluated in f64.
pub fn gelu_scalar(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

pub fn relu_scalar(x: f64) -> f64 {
    x.max(0.0)
}

pub fn activation_scalar(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Gelu => gelu_scalar(x),
        Activation::Relu => relu_scalar(x),
    }
}

/// `out[i] = gelu(inp[i])`
pub fn gelu(out: &mut [f32] /* (N) */, inp: &[f32] /* (N) */) {
    assert_eq!(out.len(), inp.len());
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = gelu_scalar(x as f64) as f32;
    }
}

/// `out[i] = max(inp[i], 0)`
pub fn relu(out: &mut [f32] /* (N) */, inp: &[f32] /* (N) */) {
    assert_eq!(out.len(), inp.len());
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = relu_scalar(x as f64) as f32;
    }
}

/// In place, the activation the config names.
pub fn activation_inplace(act: Activation, x: &mut [f32] /* (N) */) {
    for v in x.iter_mut() {
        *v = activation_scalar(act, *v as f64) as f32;
    }
}

/// d act(x) / dx: GELU' = Φ(x) + x·φ(x); ReLU' = 1 for x > 0, else 0.
pub fn activation_grad_scalar(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// `d_inp[i] = d_out[i] · act'(inp[i])`.
pub fn activation_backward(
    act: Activation,
    d_inp: &mut [f32], // (N)
    inp: &[f32],       // (N) the pre-activation
    d_out: &[f32],     // (N)
) {
    assert_eq!((d_inp.len(), d_out.len()), (inp.len(), inp.len()));
    for ((d, &x), &g) in d_inp.iter_mut().zip(inp).zip(d_out) {
        *d = (g as f64 * activation_grad_scalar(act, x as f64)) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_known_values() {
        // Φ(1) = 0.8413447460685429, Φ(-1) = 0.15865525393145707 (tables of the normal CDF).
        assert!((gelu_scalar(1.0) - 0.8413447460685429).abs() < 1e-15);
        assert!((gelu_scalar(-1.0) + 0.15865525393145707).abs() < 1e-15);
        assert_eq!(gelu_scalar(0.0), 0.0);
        assert_eq!(relu_scalar(-2.5), 0.0);
        assert_eq!(relu_scalar(2.5), 2.5);
    }
}

//! Elementwise FFN nonlinearities: exact GELU and ReLU.
//!
//! The activation is a comptime choice, so each variant compiles to straight-line code. Loads
//! and stores are vectorised (`Vector<F, N>`, N chosen by the launcher from the device and the
//! length); each unit handles one vector.

use cubecl::prelude::*;

/// Comptime tag for [`activation()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivationKind {
    Gelu,
    Relu,
}

impl ActivationKind {
    pub fn id(self) -> u32 {
        match self {
            ActivationKind::Gelu => 0,
            ActivationKind::Relu => 1,
        }
    }
}

/// erf(z) by its Taylor series, 2/√π · Σ (-1)^n z^(2n+1) / (n! (2n+1)); 11 terms reach 1e-9
/// at |z| = 1. Used for -1/2 < z < 1 (see [`gelu()`]).
#[cube]
fn erf_series<F: Float, N: Size>(z: Vector<F, N>) -> Vector<F, N> {
    let u = z * z;
    let mut series = Vector::new(F::new(comptime!(1.0 / 76_204_800.0)));
    series = series * u + Vector::new(F::new(comptime!(-1.0 / 6_894_720.0)));
    series = series * u + Vector::new(F::new(comptime!(1.0 / 685_440.0)));
    series = series * u + Vector::new(F::new(comptime!(-1.0 / 75_600.0)));
    series = series * u + Vector::new(F::new(comptime!(1.0 / 9_360.0)));
    series = series * u + Vector::new(F::new(comptime!(-1.0 / 1_320.0)));
    series = series * u + Vector::new(F::new(comptime!(1.0 / 216.0)));
    series = series * u + Vector::new(F::new(comptime!(-1.0 / 42.0)));
    series = series * u + Vector::new(F::new(comptime!(1.0 / 10.0)));
    series = series * u + Vector::new(F::new(comptime!(-1.0 / 3.0)));
    series = series * u + Vector::new(F::new(1.0));
    z * series * Vector::new(F::new(comptime!(core::f32::consts::FRAC_2_SQRT_PI)))
}

/// Φ(√2·z) from the Chebyshev fit of erfc (Numerical Recipes §6.2, `erfcc`, fractional error
/// < 1.2e-7): erfc(|z|) = t · exp(-z² + P(t)), t = 1 / (1 + |z|/2); Φ = erfc/2 below 0, which
/// keeps the negative tail accurate relative to its own size.
// The erfc coefficients are kept with the digits they were published with.
#[allow(clippy::excessive_precision)]
#[cube]
fn normal_cdf_tail<F: Float, N: Size>(z: Vector<F, N>) -> Vector<F, N> {
    let half = Vector::new(F::new(0.5));
    let one = Vector::new(F::new(1.0));
    let az = Vector::abs(z);
    let t = one / (one + half * az);
    let mut p = Vector::new(F::new(0.17087277));
    p = p * t + Vector::new(F::new(-0.82215223));
    p = p * t + Vector::new(F::new(1.48851587));
    p = p * t + Vector::new(F::new(-1.13520398));
    p = p * t + Vector::new(F::new(0.27886807));
    p = p * t + Vector::new(F::new(-0.18628806));
    p = p * t + Vector::new(F::new(0.09678418));
    p = p * t + Vector::new(F::new(0.37409196));
    p = p * t + Vector::new(F::new(1.00002368));
    p = p * t + Vector::new(F::new(-1.26551223));
    let erfc = t * Vector::exp(p - z * z);
    select_many(
        z.less_than(Vector::new(F::new(0.0))),
        half * erfc,
        one - half * erfc,
    )
}

/// Where the series serves: -1/2 < z < 1 (z = x/√2).
#[cube]
fn in_series_range<F: Float, N: Size>(z: Vector<F, N>) -> Vector<bool, N> {
    Vector::abs(z).less_than(Vector::new(F::new(1.0))) & z.greater_than(Vector::new(F::new(-0.5)))
}

/// Exact GELU, `x · Φ(x)` with Φ the standard normal CDF.
///
/// CubeCL's `erf` polyfill (absolute error 1.5e-7) is 10× less accurate than f32 allows near 0,
/// and `1 + erf(z)` cancels for negative x. So Φ is built from two pieces that are each accurate
/// relative to their own size: a Taylor series of erf for |z| < 1, and for |z| >= 1 the
/// Chebyshev fit of erfc, used directly in the negative tail where Φ = erfc(|z|)/2 is small.
/// The series serves -1/2 < z < 1, the erfc fit the rest.
#[cube]
pub fn gelu<F: Float, N: Size>(x: Vector<F, N>) -> Vector<F, N> {
    let z = x * Vector::new(F::new(comptime!(core::f32::consts::FRAC_1_SQRT_2)));
    // x/2 + x/2 · erf(z) rounds once at the end instead of once on Φ and again on x · Φ.
    let hx = Vector::new(F::new(0.5)) * x;
    let gelu_small = hx + hx * erf_series::<F, N>(z);
    // Below z = -1/2 the sum x/2 + x/2·erf cancels; there the tail form is the accurate one.
    select_many(
        in_series_range::<F, N>(z),
        gelu_small,
        x * normal_cdf_tail::<F, N>(z),
    )
}

/// GELU'(x) = Φ(x) + x·φ(x), with Φ from the same two pieces as [`gelu()`].
#[cube]
pub fn gelu_grad<F: Float, N: Size>(x: Vector<F, N>) -> Vector<F, N> {
    let z = x * Vector::new(F::new(comptime!(core::f32::consts::FRAC_1_SQRT_2)));
    let half = Vector::new(F::new(0.5));
    let cdf = select_many(
        in_series_range::<F, N>(z),
        half + half * erf_series::<F, N>(z),
        normal_cdf_tail::<F, N>(z),
    );
    let pdf = Vector::exp(Vector::new(F::new(0.0)) - z * z)
        * Vector::new(F::new(comptime!(0.398_942_3_f32)));
    cdf + x * pdf
}

#[cube]
pub fn relu<F: Float, N: Size>(x: Vector<F, N>) -> Vector<F, N> {
    let zero = Vector::new(F::new(0.0));
    select_many(x.less_than(zero), zero, x)
}

/// `act` selected at compile time: 0 = GELU, 1 = ReLU (see [`ActivationKind::id`]).
#[cube]
pub fn apply_activation<F: Float, N: Size>(x: Vector<F, N>, #[comptime] act: u32) -> Vector<F, N> {
    if comptime!(act == 0) {
        gelu::<F, N>(x)
    } else {
        relu::<F, N>(x)
    }
}

/// `output[i] = act(input[i])` for every vector `i < input.len()`. Half-precision inputs are
/// computed in f32 and rounded once on the store: the polynomial erf loses several ulps when
/// every step rounds to f16.
#[cube(launch_unchecked)]
pub fn activation<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    #[comptime] act: u32,
) {
    // The grid may overshoot the length by up to one cube.
    if ABSOLUTE_POS < input.len() {
        let x = Vector::<f32, N>::cast_from(input[ABSOLUTE_POS]);
        output[ABSOLUTE_POS] = Vector::cast_from(apply_activation::<f32, N>(x, act));
    }
}

/// The straightforward GELU, `x/2 · (1 + erf(x/√2))` with the backend's `erf` in the element
/// type: the same-precision naive implementation that tests and benches measure
/// [`activation()`] against.
#[cube(launch_unchecked)]
pub fn gelu_naive<F: Float>(input: &Array<F>, output: &mut Array<F>) {
    if ABSOLUTE_POS < input.len() {
        let x = input[ABSOLUTE_POS];
        output[ABSOLUTE_POS] = x
            * F::new(0.5)
            * (F::new(1.0) + F::erf(x * F::new(comptime!(core::f32::consts::FRAC_1_SQRT_2))));
    }
}

/// `d_input[i] = d_output[i] · act'(pre[i])` for every vector i, act selected as in
/// [`apply_activation()`] (ReLU'(0) = 0). Computed in f32, rounded once on the store.
#[cube(launch_unchecked)]
pub fn activation_backward<F: Float, N: Size>(
    pre: &Array<Vector<F, N>>,
    d_output: &Array<Vector<F, N>>,
    d_input: &mut Array<Vector<F, N>>,
    #[comptime] act: u32,
) {
    if ABSOLUTE_POS < pre.len() {
        let x = Vector::<f32, N>::cast_from(pre[ABSOLUTE_POS]);
        let g = Vector::<f32, N>::cast_from(d_output[ABSOLUTE_POS]);
        let slope = if comptime!(act == 0) {
            gelu_grad::<f32, N>(x)
        } else {
            select_many(
                x.greater_than(Vector::new(0.0)),
                Vector::new(1.0),
                Vector::new(0.0),
            )
        };
        d_input[ABSOLUTE_POS] = Vector::cast_from(g * slope);
    }
}

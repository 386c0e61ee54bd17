//! Model parameters in host memory, their names (the checkpoint layout), and seeded initialisation.
//!
//! Every linear weight is stored `[in, out]` row-major, so a layer computes `x · W + b`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::Config;

/// A linear layer `y = x · W + b`. `T` is what holds a tensor: host `Vec<f32>` here, a device
/// tensor in the model crate; every parameter structure below is generic the same way, so the
/// host and the device share one layout, built by one walk ([`Params::build`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Linear<T = Vec<f32>> {
    /// (C_in, C_out)
    pub weight: T,
    /// (C_out)
    pub bias: T,
}

/// LayerNorm scale (`weight`, the gain) and shift.
#[derive(Clone, Debug, PartialEq)]
pub struct Norm<T = Vec<f32>> {
    /// (C)
    pub weight: T,
    /// (C)
    pub bias: T,
}

/// One pre-LN decoder block of width C with FFN hidden width H.
#[derive(Clone, Debug, PartialEq)]
pub struct Block<T = Vec<f32>> {
    pub ln1: Norm<T>,
    /// (C, 3C): columns are [q | k | v], each split into heads of width C / NH.
    pub qkv: Linear<T>,
    /// (C, C)
    pub proj: Linear<T>,
    pub ln2: Norm<T>,
    /// (C, H)
    pub fc1: Linear<T>,
    /// (H, C)
    pub fc2: Linear<T>,
}

/// All parameters of a MEGABYTE model, each held as a `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T> {
    /// E_G: (V, D_G)
    pub global_embed: T,
    /// E_pos: (T, D_G)
    pub global_pos: T,
    /// E_gpad: (P·D_G)
    pub global_pad: T,
    pub global_blocks: Vec<Block<T>>,
    pub global_ln_f: Norm<T>,
    /// W_GL: (D_G, D_L)
    pub global_to_local: T,
    /// E_L: (V, D_L)
    pub local_embed: T,
    /// E_lpad: (D_L)
    pub local_pad: T,
    /// E_lpos: (P, D_L), present when `config.local_positions`.
    pub local_pos: Option<T>,
    pub local_blocks: Vec<Block<T>>,
    pub local_ln_f: Norm<T>,
    /// Untied head (D_L, V), present when `!config.tied_head`.
    pub head: Option<T>,
}

/// All parameters of a MEGABYTE model in host memory.
pub type Weights = Params<Vec<f32>>;

/// Walks a block's tensors in the order of `Config::tensor_specs`, borrowing with `$r`.
macro_rules! block_fields {
    ($b:expr, $($r:tt)*) => {
        [
            $($r)* $b.ln1.weight,
            $($r)* $b.ln1.bias,
            $($r)* $b.qkv.weight,
            $($r)* $b.qkv.bias,
            $($r)* $b.proj.weight,
            $($r)* $b.proj.bias,
            $($r)* $b.ln2.weight,
            $($r)* $b.ln2.bias,
            $($r)* $b.fc1.weight,
            $($r)* $b.fc1.bias,
            $($r)* $b.fc2.weight,
            $($r)* $b.fc2.bias,
        ]
    };
}

/// Walks the tensors of `Params` in the order of `Config::tensor_specs`, borrowing each field
/// with `$r` (`&` or `&mut`). One walk serves both the shared and the exclusive accessor.
macro_rules! walk_tensors {
    ($w:expr, $($r:tt)*) => {{
        let w = $w;
        let mut out = Vec::new();
        out.push($($r)* w.global_embed);
        out.push($($r)* w.global_pos);
        out.push($($r)* w.global_pad);
        for b in $($r)* w.global_blocks {
            out.extend(block_fields!(b, $($r)*));
        }
        out.push($($r)* w.global_ln_f.weight);
        out.push($($r)* w.global_ln_f.bias);
        out.push($($r)* w.global_to_local);
        out.push($($r)* w.local_embed);
        out.push($($r)* w.local_pad);
        if let Some(pos) = $($r)* w.local_pos {
            out.push(pos);
        }
        for b in $($r)* w.local_blocks {
            out.extend(block_fields!(b, $($r)*));
        }
        out.push($($r)* w.local_ln_f.weight);
        out.push($($r)* w.local_ln_f.bias);
        if let Some(head) = $($r)* w.head {
            out.push(head);
        }
        out
    }};
}

impl<T> Block<T> {
    /// The block's tensors in the order of [`Config::tensor_specs`].
    pub fn tensors(&self) -> [&T; 12] {
        block_fields!(self, &)
    }
}

/// `layers` blocks of width `c` named `{stack}.blocks.{l}.*`, built by `make` in walk order.
fn build_stack<T, E>(
    make: &mut impl FnMut(&str, &[usize]) -> Result<T, E>,
    stack: &str,
    layers: usize,
    c: usize,
    h: usize,
) -> Result<Vec<Block<T>>, E> {
    let mut blocks = Vec::with_capacity(layers);
    for l in 0..layers {
        let mut t =
            |part: &str, shape: &[usize]| make(&format!("{stack}.blocks.{l}.{part}"), shape);
        // Struct fields are evaluated in the order written: the walk's order.
        blocks.push(Block {
            ln1: Norm {
                weight: t("ln1.weight", &[c])?,
                bias: t("ln1.bias", &[c])?,
            },
            qkv: Linear {
                weight: t("attn.qkv.weight", &[c, 3 * c])?,
                bias: t("attn.qkv.bias", &[3 * c])?,
            },
            proj: Linear {
                weight: t("attn.proj.weight", &[c, c])?,
                bias: t("attn.proj.bias", &[c])?,
            },
            ln2: Norm {
                weight: t("ln2.weight", &[c])?,
                bias: t("ln2.bias", &[c])?,
            },
            fc1: Linear {
                weight: t("ffn.fc1.weight", &[c, h])?,
                bias: t("ffn.fc1.bias", &[h])?,
            },
            fc2: Linear {
                weight: t("ffn.fc2.weight", &[h, c])?,
                bias: t("ffn.fc2.bias", &[c])?,
            },
        });
    }
    Ok(blocks)
}

impl<T> Params<T> {
    /// Every parameter of `cfg`, built by name: `make(name, shape)` gives the tensor of each
    /// entry of the checkpoint layout, called in the order [`Params::tensors`] walks (this walk
    /// is what [`Config::tensor_specs`] lists).
    pub fn build<E>(
        cfg: &Config,
        mut make: impl FnMut(&str, &[usize]) -> Result<T, E>,
    ) -> Result<Self, E> {
        let (v, p, t) = (cfg.vocab, cfg.patch, cfg.context);
        let (dg, dl, wg) = (cfg.d_global, cfg.d_local, cfg.global_width());
        let (lg, ll, mult) = (cfg.layers_global, cfg.layers_local, cfg.ffn_mult);
        let m = &mut make;
        // Struct fields are evaluated in the order written: the walk's order.
        Ok(Params {
            global_embed: m("global.embed", &[v, dg])?,
            global_pos: m("global.pos", &[t, dg])?,
            global_pad: m("global.pad", &[wg])?,
            global_blocks: build_stack(m, "global", lg, wg, mult * wg)?,
            global_ln_f: Norm {
                weight: m("global.ln_f.weight", &[wg])?,
                bias: m("global.ln_f.bias", &[wg])?,
            },
            global_to_local: m("global_to_local.weight", &[dg, dl])?,
            local_embed: m("local.embed", &[v, dl])?,
            local_pad: m("local.pad", &[dl])?,
            local_pos: match cfg.local_positions {
                true => Some(m("local.pos", &[p, dl])?),
                false => None,
            },
            local_blocks: build_stack(m, "local", ll, dl, mult * dl)?,
            local_ln_f: Norm {
                weight: m("local.ln_f.weight", &[dl])?,
                bias: m("local.ln_f.bias", &[dl])?,
            },
            head: match cfg.tied_head {
                false => Some(m("head.weight", &[dl, v])?),
                true => None,
            },
        })
    }

    /// Every tensor, in the order of [`Config::tensor_specs`].
    pub fn tensors(&self) -> Vec<&T> {
        walk_tensors!(self, &)
    }

    /// Every tensor, mutably, in the order of [`Config::tensor_specs`].
    pub fn tensors_mut(&mut self) -> Vec<&mut T> {
        walk_tensors!(self, &mut)
    }
}

impl Weights {
    /// Weights with every tensor allocated to its shape and zero-filled (to be overwritten).
    pub fn zeros(cfg: &Config) -> Self {
        let zeros = |_: &str, shape: &[usize]| {
            Ok::<_, std::convert::Infallible>(vec![0.0; shape.iter().product()])
        };
        match Params::build(cfg, zeros) {
            Ok(w) => w,
            Err(never) => match never {},
        }
    }

    /// Standard initialisation for training: N(0, 0.02) for matrices and embeddings, zero
    /// biases and pads, unit LayerNorm scales; output projections scaled by 1/sqrt(2·layers).
    pub fn init(cfg: &Config, seed: u64) -> Self {
        let mut w = Weights::zeros(cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let specs = cfg.tensor_specs();
        for ((name, _), t) in specs.iter().zip(w.tensors_mut()) {
            let layers = if name.starts_with("global") {
                cfg.layers_global
            } else {
                cfg.layers_local
            };
            let std = if name.ends_with("proj.weight") || name.ends_with("fc2.weight") {
                0.02 / ((2 * layers.max(1)) as f64).sqrt()
            } else {
                0.02
            };
            if name.ends_with(".bias") || name.ends_with(".pad") {
                t.fill(0.0);
            } else if name.contains(".ln") {
                t.fill(1.0);
            } else {
                for x in t.iter_mut() {
                    *x = (normal(&mut rng) * std) as f32;
                }
            }
        }
        w
    }

    /// Every tensor random, biases and norms included, at a scale where activations stay O(1):
    /// the weights tests use, so that no term of the forward pass is zero or one by accident.
    pub fn random(cfg: &Config, seed: u64) -> Self {
        let mut w = Weights::zeros(cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let specs = cfg.tensor_specs();
        for ((name, shape), t) in specs.iter().zip(w.tensors_mut()) {
            let fan_in = if shape.len() == 2 && !name.contains("embed") && !name.contains("pos") {
                shape[0]
            } else {
                1
            };
            let is_norm_scale = name.contains(".ln") && name.ends_with(".weight");
            for x in t.iter_mut() {
                let r: f64 = rng.gen_range(-1.0..1.0);
                *x = if is_norm_scale {
                    (1.0 + 0.5 * r) as f32
                } else if name.ends_with(".bias") || name.ends_with(".pad") {
                    (0.2 * r) as f32
                } else {
                    // Uniform(-a, a) with variance 1/fan_in.
                    (r * (3.0 / fan_in as f64).sqrt()) as f32
                };
            }
        }
        w
    }
}

/// A standard normal draw (Box–Muller), so initialisation depends on nothing but the seed.
pub fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_follow_the_specs_for_every_head_and_position_option() {
        for (tied, pos) in [(true, true), (false, false), (true, false), (false, true)] {
            let cfg = Config {
                tied_head: tied,
                local_positions: pos,
                ..Config::tiny()
            };
            let mut w = Weights::init(&cfg, 1);
            let specs = cfg.tensor_specs();
            let lens: Vec<usize> = w.tensors_mut().iter().map(|t| t.len()).collect();
            let ro: Vec<usize> = w.tensors().iter().map(|t| t.len()).collect();
            let expected: Vec<usize> = specs.iter().map(|(_, s)| s.iter().product()).collect();
            assert_eq!(lens, expected);
            assert_eq!(ro, expected);
        }
    }

    #[test]
    fn the_walk_visits_tensors_in_the_order_the_build_makes_them() {
        // Same-length tensors (a norm's weight and bias) swapped in one of the two would pass a
        // length check; numbering each tensor as it is built catches it.
        for (tied, pos) in [(true, true), (false, false), (true, false), (false, true)] {
            let cfg = Config {
                tied_head: tied,
                local_positions: pos,
                ..Config::tiny()
            };
            let mut made = 0usize;
            let numbered: Params<usize> = Params::build(&cfg, |_, _| {
                made += 1;
                Ok::<_, std::convert::Infallible>(made - 1)
            })
            .unwrap();
            let walked: Vec<usize> = numbered.tensors().into_iter().copied().collect();
            assert_eq!(walked, (0..cfg.tensor_specs().len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn init_is_seeded() {
        let cfg = Config::tiny();
        assert_eq!(Weights::init(&cfg, 7), Weights::init(&cfg, 7));
        assert_ne!(Weights::init(&cfg, 7), Weights::init(&cfg, 8));
        assert_eq!(Weights::random(&cfg, 7), Weights::random(&cfg, 7));
    }
}

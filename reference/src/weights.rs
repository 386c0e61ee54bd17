//! Model parameters in host memory, their names (the checkpoint layout), and seeded initialisation.
//!
//! Every linear weight is stored `[in, out]` row-major, so a layer computes `x · W + b`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::Config;

/// A linear layer `y = x · W + b`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// (C_in, C_out)
    pub weight: Vec<f32>,
    /// (C_out)
    pub bias: Vec<f32>,
}

/// LayerNorm scale and shift.
#[derive(Clone, Debug, PartialEq)]
pub struct Norm {
    /// (C)
    pub weight: Vec<f32>,
    /// (C)
    pub bias: Vec<f32>,
}

/// One pre-LN decoder block of width C with FFN hidden width H.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub ln1: Norm,
    /// (C, 3C): columns are [q | k | v], each split into heads of width C / NH.
    pub qkv: Linear,
    /// (C, C)
    pub proj: Linear,
    pub ln2: Norm,
    /// (C, H)
    pub fc1: Linear,
    /// (H, C)
    pub fc2: Linear,
}

/// All parameters of a MEGABYTE model.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// E_G: (V, D_G)
    pub global_embed: Vec<f32>,
    /// E_pos: (T, D_G)
    pub global_pos: Vec<f32>,
    /// E_gpad: (P·D_G)
    pub global_pad: Vec<f32>,
    pub global_blocks: Vec<Block>,
    pub global_ln_f: Norm,
    /// W_GL: (D_G, D_L)
    pub global_to_local: Vec<f32>,
    /// E_L: (V, D_L)
    pub local_embed: Vec<f32>,
    /// E_lpad: (D_L)
    pub local_pad: Vec<f32>,
    /// E_lpos: (P, D_L), present when `config.local_positions`.
    pub local_pos: Option<Vec<f32>>,
    pub local_blocks: Vec<Block>,
    pub local_ln_f: Norm,
    /// Untied head (D_L, V), present when `!config.tied_head`.
    pub head: Option<Vec<f32>>,
}

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

/// Walks the tensors of `Weights` in the order of `Config::tensor_specs`, borrowing each field
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

impl Weights {
    /// Weights with every tensor allocated to its shape and zero-filled (to be overwritten).
    pub fn zeros(cfg: &Config) -> Self {
        let block = |c: usize, h: usize| Block {
            ln1: Norm {
                weight: vec![0.0; c],
                bias: vec![0.0; c],
            },
            qkv: Linear {
                weight: vec![0.0; c * 3 * c],
                bias: vec![0.0; 3 * c],
            },
            proj: Linear {
                weight: vec![0.0; c * c],
                bias: vec![0.0; c],
            },
            ln2: Norm {
                weight: vec![0.0; c],
                bias: vec![0.0; c],
            },
            fc1: Linear {
                weight: vec![0.0; c * h],
                bias: vec![0.0; h],
            },
            fc2: Linear {
                weight: vec![0.0; h * c],
                bias: vec![0.0; c],
            },
        };
        let (v, p, t, dg, dl, wg) = (
            cfg.vocab,
            cfg.patch,
            cfg.context,
            cfg.d_global,
            cfg.d_local,
            cfg.global_width(),
        );
        Weights {
            global_embed: vec![0.0; v * dg],
            global_pos: vec![0.0; t * dg],
            global_pad: vec![0.0; wg],
            global_blocks: (0..cfg.layers_global)
                .map(|_| block(wg, cfg.ffn_mult * wg))
                .collect(),
            global_ln_f: Norm {
                weight: vec![0.0; wg],
                bias: vec![0.0; wg],
            },
            global_to_local: vec![0.0; dg * dl],
            local_embed: vec![0.0; v * dl],
            local_pad: vec![0.0; dl],
            local_pos: cfg.local_positions.then(|| vec![0.0; p * dl]),
            local_blocks: (0..cfg.layers_local)
                .map(|_| block(dl, cfg.ffn_mult * dl))
                .collect(),
            local_ln_f: Norm {
                weight: vec![0.0; dl],
                bias: vec![0.0; dl],
            },
            head: (!cfg.tied_head).then(|| vec![0.0; dl * v]),
        }
    }

    /// Every tensor, mutably, in the order of [`Config::tensor_specs`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        walk_tensors!(self, &mut)
    }

    /// Every tensor, in the order of [`Config::tensor_specs`].
    pub fn tensors(&self) -> Vec<&[f32]> {
        let all: Vec<&Vec<f32>> = walk_tensors!(self, &);
        all.into_iter().map(|t| t.as_slice()).collect()
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
    fn init_is_seeded() {
        let cfg = Config::tiny();
        assert_eq!(Weights::init(&cfg, 7), Weights::init(&cfg, 7));
        assert_ne!(Weights::init(&cfg, 7), Weights::init(&cfg, 8));
        assert_eq!(Weights::random(&cfg, 7), Weights::random(&cfg, 7));
    }
}

//! Model configuration, presets, and validation.
//!
//! Shape letters follow `docs/DESIGN.md`: V vocabulary, P patch, T context, K = T / P patches,
//! D_G global width per byte (the global model is P·D_G wide), D_L local width.

use std::fmt;

/// Epsilon of every LayerNorm in the model.
pub const LN_EPS: f64 = 1e-5;

/// The feed-forward nonlinearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// Exact GELU, `x · Φ(x)` with the Gaussian CDF (not the tanh approximation).
    Gelu,
    /// `max(x, 0)`, as in the paper.
    Relu,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A MEGABYTE architecture. Build one from a preset or by hand, then call [`Config::validate`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// V: 256 byte values, or 257 with an extra pad/end-of-sequence id (256).
    pub vocab: usize,
    /// P: bytes per patch.
    pub patch: usize,
    /// T: context length in bytes; a multiple of `patch`.
    pub context: usize,
    /// D_G: global embedding width per byte. The global transformer is `patch · d_global` wide.
    pub d_global: usize,
    /// D_L: local transformer width.
    pub d_local: usize,
    /// L_G: global transformer blocks.
    pub layers_global: usize,
    /// L_L: local transformer blocks.
    pub layers_local: usize,
    /// Attention heads of the global transformer; must divide `patch · d_global`.
    pub heads_global: usize,
    /// Attention heads of the local transformer; must divide `d_local`.
    pub heads_local: usize,
    /// FFN hidden width as a multiple of the block width (4 in the paper).
    pub ffn_mult: usize,
    /// FFN nonlinearity.
    pub activation: Activation,
    /// Logits through the transposed local byte embedding (true) or a separate `D_L × V` head.
    pub tied_head: bool,
    /// Learned local position embeddings `E_lpos: P × D_L` added to the local input.
    pub local_positions: bool,
}

/// A configuration field with a value that cannot work, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}` = {value}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: usize,
    pub reason: String,
}

fn bad(field: &'static str, value: usize, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        value,
        reason: reason.into(),
    }
}

/// Names of the built-in presets, in the order `Config::preset` knows them.
pub const PRESET_NAMES: &[&str] = &[
    "tiny",
    "small",
    "paper-text",
    "paper-pg19",
    "paper-imagenet64",
    "paper-image256",
    "paper-image640",
    "paper-audio",
];

impl Config {
    /// This config with the switches tests vary set from the bits of `variant`: ReLU instead
    /// of GELU (bit 0), a separate head instead of the tied one (bit 1), and V = 257 without
    /// local position embeddings instead of V = 256 with them (bit 2).
    pub fn with_variant(self, variant: u8) -> Self {
        Config {
            vocab: if variant & 4 == 0 { 256 } else { 257 },
            activation: [Activation::Gelu, Activation::Relu][(variant & 1) as usize],
            tied_head: variant & 2 == 0,
            local_positions: variant & 4 == 0,
            ..self
        }
    }

    /// A model small enough for exhaustive tests: 64-byte context, patches of 4.
    pub fn tiny() -> Self {
        Config {
            vocab: 256,
            patch: 4,
            context: 64,
            d_global: 16,
            d_local: 32,
            layers_global: 2,
            layers_local: 2,
            heads_global: 2,
            heads_local: 2,
            ffn_mult: 4,
            activation: Activation::Gelu,
            tied_head: true,
            local_positions: true,
        }
    }

    /// A model that trains and samples at interactive speed on a CPU: 2 KiB context, P = 8.
    pub fn small() -> Self {
        Config {
            vocab: 256,
            patch: 8,
            context: 2048,
            d_global: 32,
            d_local: 128,
            layers_global: 4,
            layers_local: 2,
            heads_global: 4,
            heads_local: 2,
            ffn_mult: 4,
            activation: Activation::Gelu,
            tied_head: true,
            local_positions: true,
        }
    }

    /// One of the paper's configurations (Table 15), heads of width 64. `global_width` is the
    /// global transformer's width P·D_G.
    fn paper(
        global_width: usize,
        layers_global: usize,
        d_local: usize,
        layers_local: usize,
        patch: usize,
        context: usize,
    ) -> Self {
        Config {
            vocab: 256,
            patch,
            context,
            d_global: global_width / patch,
            d_local,
            layers_global,
            layers_local,
            heads_global: global_width / 64,
            heads_local: d_local / 64,
            ffn_mult: 4,
            activation: Activation::Gelu,
            tied_head: true,
            local_positions: true,
        }
    }

    /// Looks a preset up by name (see [`PRESET_NAMES`]).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "tiny" => Self::tiny(),
            "small" => Self::small(),
            // Text, compute-controlled (the 758M global / 262M local model).
            "paper-text" => Self::paper(2048, 14, 1024, 18, 8, 8192),
            "paper-pg19" => Self::paper(2048, 24, 1024, 24, 8, 8192),
            // The paper lists a global width of 2560 with P = 12, which 12 does not divide; we use
            // 2496 = 12·208 = 39·64, the nearest width that both P and the head width divide.
            "paper-imagenet64" => Self::paper(2496, 32, 1024, 24, 12, 12_288),
            "paper-image256" => Self::paper(768, 12, 768, 12, 192, 196_608),
            "paper-image640" => Self::paper(768, 12, 768, 8, 192, 1_228_800),
            "paper-audio" => Self::paper(1024, 24, 768, 12, 32, 524_288),
            _ => return None,
        })
    }

    /// K = T / P.
    pub fn patches(&self) -> usize {
        self.context / self.patch
    }

    /// Width of the global transformer, P·D_G.
    pub fn global_width(&self) -> usize {
        self.patch * self.d_global
    }

    pub fn head_dim_global(&self) -> usize {
        self.global_width() / self.heads_global
    }

    pub fn head_dim_local(&self) -> usize {
        self.d_local / self.heads_local
    }

    /// Checks every field and every relation between fields; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("vocab", self.vocab),
            ("patch", self.patch),
            ("context", self.context),
            ("d_global", self.d_global),
            ("d_local", self.d_local),
            ("heads_global", self.heads_global),
            ("heads_local", self.heads_local),
            ("ffn_mult", self.ffn_mult),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(bad(field, value, "must be at least 1"));
            }
        }
        if self.patch.checked_mul(self.d_global).is_none() {
            return Err(bad(
                "d_global",
                self.d_global,
                format!("patch·d_global overflows with `patch` = {}", self.patch),
            ));
        }
        if self.vocab != 256 && self.vocab != 257 {
            return Err(bad(
                "vocab",
                self.vocab,
                "must be 256 (bytes) or 257 (bytes and a pad/end id)",
            ));
        }
        if !self.context.is_multiple_of(self.patch) {
            return Err(bad(
                "context",
                self.context,
                format!("must be a multiple of `patch` = {}", self.patch),
            ));
        }
        if !self.global_width().is_multiple_of(self.heads_global) {
            return Err(bad(
                "heads_global",
                self.heads_global,
                format!(
                    "must divide the global width patch·d_global = {}",
                    self.global_width()
                ),
            ));
        }
        if !self.d_local.is_multiple_of(self.heads_local) {
            return Err(bad(
                "heads_local",
                self.heads_local,
                format!("must divide `d_local` = {}", self.d_local),
            ));
        }
        // Byte and position ids travel as u32 on the device.
        if self.context > u32::MAX as usize / 2 {
            return Err(bad("context", self.context, "must be below 2^31"));
        }
        // Every size is computed from these fields: refuse a config whose parameter count
        // overflows rather than let a product wrap later.
        let global = self
            .patch
            .checked_mul(self.d_global)
            .and_then(|wg| stack_parameters(self.layers_global, wg, self.ffn_mult));
        if global.is_none() {
            return Err(bad(
                "layers_global",
                self.layers_global,
                format!(
                    "with a global width of {} x {} the parameter count overflows",
                    self.patch, self.d_global
                ),
            ));
        }
        if stack_parameters(self.layers_local, self.d_local, self.ffn_mult).is_none()
            || self.checked_parameters().is_none()
        {
            return Err(bad(
                "layers_local",
                self.layers_local,
                format!(
                    "with `d_local` = {} the parameter count overflows",
                    self.d_local
                ),
            ));
        }
        Ok(())
    }

    /// [`Config::num_parameters`] computed from the fields alone, without listing the tensors,
    /// or `None` when the count overflows `usize`; cheap for any config, however large.
    pub fn checked_parameters(&self) -> Option<usize> {
        let (v, p, t) = (self.vocab, self.patch, self.context);
        let (dg, dl) = (self.d_global, self.d_local);
        let wg = p.checked_mul(dg)?;
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let terms = [
            mul(v, dg)?,
            mul(t, dg)?,
            mul(wg, 3)?,
            stack_parameters(self.layers_global, wg, self.ffn_mult)?,
            mul(dg, dl)?,
            mul(v, dl)?,
            mul(dl, 3)?,
            if self.local_positions { mul(p, dl)? } else { 0 },
            stack_parameters(self.layers_local, dl, self.ffn_mult)?,
            if self.tied_head { 0 } else { mul(dl, v)? },
        ];
        terms.iter().try_fold(0usize, |a, &b| a.checked_add(b))
    }

    /// Every parameter tensor of the model, in a fixed order, with its name and shape.
    /// This is the checkpoint layout; [`crate::Weights`] stores tensors in this order.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut specs = Vec::new();
        let walk = crate::weights::Params::build(self, |name, shape| {
            specs.push((name.to_string(), shape.to_vec()));
            Ok::<(), std::convert::Infallible>(())
        });
        match walk {
            Ok(_) => specs,
            Err(never) => match never {},
        }
    }

    /// Total parameter count.
    pub fn num_parameters(&self) -> usize {
        self.tensor_specs()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Parameters of `layers` blocks of width `c` with an FFN of `ffn_mult`·c (the tensors of
/// a block of [`crate::weights::Params::build`]: two LayerNorms, qkv and output projections, two FFN layers, with biases),
/// or `None` on overflow.
fn stack_parameters(layers: usize, c: usize, ffn_mult: usize) -> Option<usize> {
    let h = ffn_mult.checked_mul(c)?;
    let c2 = c.checked_mul(c)?;
    let per_block = [
        c.checked_mul(4)?,  // ln1, ln2: gain and bias
        c2.checked_mul(3)?, // qkv weight
        c.checked_mul(3)?,  // qkv bias
        c2,                 // proj weight
        c,                  // proj bias
        c.checked_mul(h)?,  // fc1 weight
        h,                  // fc1 bias
        h.checked_mul(c)?,  // fc2 weight
        c,                  // fc2 bias
    ]
    .iter()
    .try_fold(0usize, |a, &b| a.checked_add(b))?;
    layers.checked_mul(per_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counted_parameters_are_those_of_the_tensor_list() {
        for name in PRESET_NAMES {
            let base = Config::preset(name).unwrap();
            for (tied_head, local_positions) in [(true, true), (false, false), (false, true)] {
                let cfg = Config {
                    tied_head,
                    local_positions,
                    ..base.clone()
                };
                assert_eq!(
                    cfg.checked_parameters(),
                    Some(cfg.num_parameters()),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn sizes_that_overflow_are_refused_by_name() {
        let huge = Config {
            d_local: 1 << 31,
            heads_local: 1,
            layers_local: 1 << 20,
            ..Config::tiny()
        };
        assert_eq!(huge.validate().unwrap_err().field, "layers_local");
        let wide = Config {
            d_global: 1 << 40,
            heads_global: 1,
            ..Config::tiny()
        };
        assert_eq!(wide.validate().unwrap_err().field, "layers_global");
        let wider = Config {
            d_global: usize::MAX / 2,
            heads_global: 1,
            ..Config::tiny()
        };
        assert_eq!(wider.validate().unwrap_err().field, "d_global");
        // Large but representable: valid (whether it fits a device is not the config's concern).
        let deep = Config {
            layers_global: 1_000_000_000,
            ..Config::tiny()
        };
        assert!(deep.validate().is_ok());
    }

    #[test]
    fn every_preset_validates() {
        for name in PRESET_NAMES {
            let cfg = Config::preset(name).unwrap();
            cfg.validate()
                .unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
    }

    #[test]
    fn paper_text_model_has_the_papers_sizes() {
        let cfg = Config::preset("paper-text").unwrap();
        assert_eq!(
            (cfg.global_width(), cfg.d_local, cfg.patches()),
            (2048, 1024, 1024)
        );
        assert_eq!((cfg.head_dim_global(), cfg.head_dim_local()), (64, 64));
    }

    #[test]
    fn context_not_multiple_of_patch_names_the_field() {
        let cfg = Config {
            context: 66,
            ..Config::tiny()
        };
        let err = cfg.validate().unwrap_err();
        assert_eq!((err.field, err.value), ("context", 66));
        assert!(err.to_string().contains("multiple of `patch` = 4"), "{err}");
    }

    #[test]
    fn head_count_must_divide_width() {
        let err = Config {
            heads_global: 3,
            ..Config::tiny()
        }
        .validate()
        .unwrap_err();
        assert_eq!((err.field, err.value), ("heads_global", 3));
        let err = Config {
            heads_local: 5,
            ..Config::tiny()
        }
        .validate()
        .unwrap_err();
        assert_eq!((err.field, err.value), ("heads_local", 5));
    }

    #[test]
    fn zero_sizes_are_rejected() {
        for (field, cfg) in [
            (
                "patch",
                Config {
                    patch: 0,
                    ..Config::tiny()
                },
            ),
            (
                "d_local",
                Config {
                    d_local: 0,
                    ..Config::tiny()
                },
            ),
            (
                "ffn_mult",
                Config {
                    ffn_mult: 0,
                    ..Config::tiny()
                },
            ),
        ] {
            assert_eq!(cfg.validate().unwrap_err().field, field);
        }
        let err = Config {
            vocab: 300,
            ..Config::tiny()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "vocab");
    }

    #[test]
    fn parameter_count_matches_hand_count_for_tiny() {
        let c = Config::tiny();
        let (v, p, t, dg, dl, wg) = (256, 4, 64, 16, 32, 64);
        let block = |c: usize| {
            2 * c + c * 3 * c + 3 * c + c * c + c + 2 * c + c * 4 * c + 4 * c + 4 * c * c + c
        };
        let expected = v * dg
            + t * dg
            + wg
            + 2 * block(wg)
            + 2 * wg
            + dg * dl
            + v * dl
            + dl
            + p * dl
            + 2 * block(dl)
            + 2 * dl;
        assert_eq!(c.num_parameters(), expected);
    }
}

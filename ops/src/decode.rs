//! Launcher for the fused decoding step of a stack of pre-LN blocks
//! (`megabyte_kernels::decode`): one launch per stack per decoded position (a few for a deep or
//! long stack, under [`LOOP_TRIPS_PER_LAUNCH`]) instead of nine per block, with the row's input
//! built in front (the local model's input, or the global model's
//! patch embedding) and the final LayerNorm (and the logits) behind.
//!
//! The kernel reads a stack's parameters from one packed buffer ([`PackedStack`]), so a
//! launch binds 15 buffers whatever the depth: on CPU drivers each binding adds to the launch
//! cost, and a launch costs more than a step's arithmetic.

use cubecl::prelude::*;
use megabyte_kernels::activation::ActivationKind;
use megabyte_kernels::decode::{
    decode_stack as decode_stack_kernel, input, output, DecodeConfig, LayerOffsets, PARTS,
};

use crate::copy::copy;
use crate::device::ensure_dtype;
use crate::element::FloatElement;
use crate::error::OpError;
use crate::layer_norm::EPS;
use crate::profile::{DeviceProfile, Dtype};
use crate::tensor::Tensor;

const OP: &str = "decode_stack";

/// Widest stack the fused step takes. One cube computes a whole row, so its cost grows as
/// C·(4C + 2H) per layer on one compute unit while the unfused GEMMs spread over the device;
/// past this width the unfused blocks are the better choice on a GPU.
pub const MAX_FUSED_WIDTH: usize = 512;

/// Buffers the kernel binds (the runtime adds its metadata buffer).
const BINDINGS: u32 = 15;

/// Most loop iterations one unit may run in one launch of the kernel, as [`loop_trips`]
/// counts them. Mesa's CPU Vulkan driver (lavapipe, llvmpipe's compiler) ends every loop of an
/// invocation once its loops have run 65,535 iterations in total, without an error: a launch
/// past that computes part of the stack and leaves the rest of its outputs as they were. A
/// stack whose step would loop more runs as several launches over ranges of its layers; this
/// bound is half the driver's, so the count need not be exact. It applies on every device
/// (a launch of this much serial work per unit is one a GPU would rather split too).
pub const LOOP_TRIPS_PER_LAUNCH: usize = 32_768;

/// One pre-LN block's parameters: LayerNorms (C), qkv (C, 3C), proj (C, C), fc1 (C, H),
/// fc2 (H, C), each with its bias; linear weights (in, out).
pub struct BlockWeights<'a, R: Runtime, E> {
    pub ln1: (&'a Tensor<R, E>, &'a Tensor<R, E>),
    pub qkv: (&'a Tensor<R, E>, &'a Tensor<R, E>),
    pub proj: (&'a Tensor<R, E>, &'a Tensor<R, E>),
    pub ln2: (&'a Tensor<R, E>, &'a Tensor<R, E>),
    pub fc1: (&'a Tensor<R, E>, &'a Tensor<R, E>),
    pub fc2: (&'a Tensor<R, E>, &'a Tensor<R, E>),
}

impl<'a, R: Runtime, E> BlockWeights<'a, R, E> {
    /// From the twelve tensors in checkpoint order: ln1 weight and bias, qkv, proj, ln2, fc1,
    /// fc2 (each weight then bias).
    pub fn from_tensors(t: [&'a Tensor<R, E>; 12]) -> Self {
        BlockWeights {
            ln1: (t[0], t[1]),
            qkv: (t[2], t[3]),
            proj: (t[4], t[5]),
            ln2: (t[6], t[7]),
            fc1: (t[8], t[9]),
            fc2: (t[10], t[11]),
        }
    }
}

/// A stack's blocks (and its final LayerNorm) copied into one buffer in the kernel's layout
/// (`LayerOffsets`): a second copy of the stack's parameters, made once per decoder.
pub struct PackedStack<R: Runtime, E> {
    weights: Tensor<R, E>,
    /// Final LayerNorm weight then bias (2C); placeholder without one.
    ln_f: Tensor<R, E>,
    has_ln_f: bool,
    width: usize,
    hidden: usize,
    heads: usize,
    layers: usize,
}

impl<R: Runtime, E: FloatElement> PackedStack<R, E> {
    /// Packs `blocks` (at least one, all of one shape) with `heads` attention heads and the
    /// stack's final LayerNorm (C each), if it has one.
    pub fn pack(
        blocks: &[BlockWeights<R, E>],
        heads: usize,
        final_norm: Option<(&Tensor<R, E>, &Tensor<R, E>)>,
    ) -> Result<Self, OpError> {
        let first = blocks
            .first()
            .ok_or(OpError::empty(OP, "blocks", vec![0]))?;
        let client = first.ln1.0.client();
        let c = first.ln1.0.shape().first().copied().unwrap_or(0);
        let hidden = first.fc1.1.shape().first().copied().unwrap_or(0);
        if c == 0 || hidden == 0 {
            return Err(OpError::empty(OP, "blocks", vec![c, hidden]));
        }
        let off = LayerOffsets::new(c, hidden);
        let weights = Tensor::<R, E>::empty(client, &[blocks.len() * off.len])?;
        for (l, w) in blocks.iter().enumerate() {
            let base = l * off.len;
            for (name, t, at, shape) in [
                ("ln1.weight", w.ln1.0, off.ln1_w, vec![c]),
                ("ln1.bias", w.ln1.1, off.ln1_b, vec![c]),
                ("qkv.weight", w.qkv.0, off.qkv_w, vec![c, 3 * c]),
                ("qkv.bias", w.qkv.1, off.qkv_b, vec![3 * c]),
                ("proj.weight", w.proj.0, off.proj_w, vec![c, c]),
                ("proj.bias", w.proj.1, off.proj_b, vec![c]),
                ("ln2.weight", w.ln2.0, off.ln2_w, vec![c]),
                ("ln2.bias", w.ln2.1, off.ln2_b, vec![c]),
                ("fc1.weight", w.fc1.0, off.fc1_w, vec![c, hidden]),
                ("fc1.bias", w.fc1.1, off.fc1_b, vec![hidden]),
                ("fc2.weight", w.fc2.0, off.fc2_w, vec![hidden, c]),
                ("fc2.bias", w.fc2.1, off.fc2_b, vec![c]),
            ] {
                t.expect_shape(OP, name, &shape)?;
                let n = t.len();
                copy(
                    &t.strided(0, &[n], &[1])?,
                    &weights.strided(base + at, &[n], &[1])?,
                )?;
            }
        }
        let ln_f = Tensor::<R, E>::empty(client, &[2 * c])?;
        if let Some((w, b)) = final_norm {
            w.expect_shape(OP, "ln_f.weight", &[c])?;
            b.expect_shape(OP, "ln_f.bias", &[c])?;
            copy(&w.strided(0, &[c], &[1])?, &ln_f.strided(0, &[c], &[1])?)?;
            copy(&b.strided(0, &[c], &[1])?, &ln_f.strided(c, &[c], &[1])?)?;
        }
        Ok(PackedStack {
            weights,
            ln_f,
            has_ln_f: final_norm.is_some(),
            width: c,
            hidden,
            heads,
            layers: blocks.len(),
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn layers(&self) -> usize {
        self.layers
    }
}

/// The local model's input row at patch position `slot` = p:
/// `x = g[b, p·D_G ..][.. D_G] · W_GL + (p = 0 ? pad : embed[ids[b, p - 1]]) + positions[p]`.
pub struct LocalInputStep<'a, R: Runtime, E> {
    /// The global model's output for the current patch, (B, P·D_G).
    pub g: &'a Tensor<R, E>,
    /// W_GL (D_G, C).
    pub global_to_local: &'a Tensor<R, E>,
    /// E_L (V, C), the local pad (C), E_lpos (P, C).
    pub embed: &'a Tensor<R, E>,
    pub pad: &'a Tensor<R, E>,
    pub positions: Option<&'a Tensor<R, E>>,
    /// The bytes of each row's current patch so far (B, P): the step reads byte p - 1 (none at
    /// p = 0); [`StepOutput::Argmax`] writes byte p.
    pub ids: &'a Tensor<R, u32>,
    pub slot: usize,
}

/// The global model's input for the patch of bytes t0 .. t0 + P, C = P·D:
/// x[p·D .. (p + 1)·D] = embed[ids[b, p]] + positions[t0 + p].
pub struct PatchInputStep<'a, R: Runtime, E> {
    /// E_G (V, D), E_pos (T, D).
    pub embed: &'a Tensor<R, E>,
    pub positions: &'a Tensor<R, E>,
    /// The patch's bytes (B, P).
    pub ids: &'a Tensor<R, u32>,
    /// t0: the position of the patch's first byte.
    pub first_byte: usize,
}

/// Where a step's row comes from.
pub enum StepInput<'a, R: Runtime, E> {
    /// `h` as it is.
    Row,
    Local(LocalInputStep<'a, R, E>),
    Patch(PatchInputStep<'a, R, E>),
}

/// What a step writes besides the residual stream `h`.
pub enum StepOutput<'a, R: Runtime, E> {
    Row,
    /// The final LayerNorm of the row, (B, C).
    Norm(&'a Tensor<R, E>),
    /// The final LayerNorm's output times `table`ᵀ (V, C): logits (B, V).
    Logits {
        table: &'a Tensor<R, E>,
        logits: &'a Tensor<R, E>,
    },
    /// The logits, and greedy decoding's next byte: their argmax (the lowest id among equal
    /// maxima) is written to the local input's `ids[b, p]` and to `generated[b, at]` (B, G).
    /// Needs [`StepInput::Local`].
    Argmax {
        table: &'a Tensor<R, E>,
        logits: &'a Tensor<R, E>,
        generated: &'a Tensor<R, u32>,
        at: usize,
    },
}

/// Units per cube and keys per softmax chunk. On a device with plane (warp) operations, enough
/// units to cover the row (32 to 256) and one key per unit per chunk. Without them (CPU
/// drivers such as lavapipe, where cubecl-wgpu hides plane ops), one plane's worth of units:
/// a CPU driver runs a cube's units as SIMD lanes of one thread and pays for every barrier
/// per lane group, so one group that loops over the row is the fastest shape there, as long
/// as the loop bound allows it (`config_for` doubles the units for wide stacks).
fn units_for(profile: &DeviceProfile, width: usize) -> (usize, usize) {
    let max_units = profile.hardware.max_units_per_cube.max(1) as usize;
    if profile.plane_ops {
        let units = width.next_power_of_two().clamp(32, 256).min(max_units);
        (units, units)
    } else {
        let units = (profile.hardware.plane_size_max.max(1) as usize).min(max_units);
        (units, 64)
    }
}

/// The stack a fused decoding step runs: its width C, FFN hidden width H, heads, depth and
/// element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeProblem {
    pub width: usize,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub dtype: Dtype,
}

/// The planner of the fused decoding step: the kernel's comptime shape (units, keys per chunk,
/// vector width) for a stack on a device, or why it can't be fused. Pure: what it reads of the
/// device is the profile. The per-call fields (input and output stage, positions, activation,
/// `d_in`) are the launcher's, left at their row defaults here.
pub fn plan(problem: &DecodeProblem, profile: &DeviceProfile) -> Result<DecodeConfig, OpError> {
    let DecodeProblem {
        width,
        hidden,
        heads,
        layers,
        dtype,
    } = *problem;
    let unsupported = |what, value, reason: String| OpError::Unsupported {
        op: OP,
        what,
        value,
        reason,
    };
    if width == 0 || hidden == 0 || layers == 0 {
        return Err(OpError::empty(OP, "stack", vec![layers, width, hidden]));
    }
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(unsupported(
            "heads",
            heads,
            format!("must divide the width {width}"),
        ));
    }
    if width > MAX_FUSED_WIDTH {
        return Err(unsupported(
            "width",
            width,
            format!("the fused step takes widths up to {MAX_FUSED_WIDTH}; use the unfused blocks"),
        ));
    }
    let hw = &profile.hardware;
    if hw.max_bindings < BINDINGS {
        return Err(unsupported(
            "bindings",
            BINDINGS as usize,
            format!(
                "the device binds at most {} buffers per kernel",
                hw.max_bindings
            ),
        ));
    }
    let (units, chunk) = units_for(profile, width);
    let cfg = DecodeConfig {
        width,
        hidden,
        heads,
        units,
        chunk,
        vector: 1,
        activation: 0,
        input: input::ROW,
        positions: false,
        d_in: 1,
        output: output::ROW,
    };
    // Weights, the head table and the caches are read in vectors along C, 3C, H and the head
    // width.
    let vector = profile.vector_for(dtype, &[width, hidden, width / heads]);
    let mut cfg = DecodeConfig { vector, ..cfg };
    // A wide stack on few units would not fit one layer per launch under the loop bound:
    // double the units until a layer at one chunk of keys fits. (More units than needed cost
    // more on CPU drivers, whose barriers switch between lane groups, than more launches.)
    let max_units = (hw.max_units_per_cube as usize).min(256);
    while loop_trips(&cfg, cfg.chunk, 1, 0, false, false) > LOOP_TRIPS_PER_LAUNCH
        && cfg.units * 2 <= max_units
    {
        cfg.units *= 2;
    }
    let bytes = cfg.shared_words() * 4;
    if bytes > hw.max_shared_memory_size {
        return Err(unsupported(
            "shared memory bytes",
            bytes,
            format!(
                "width {width} and hidden width {hidden} need more than the device's {} bytes per cube",
                hw.max_shared_memory_size
            ),
        ));
    }
    Ok(cfg)
}

/// The decode problem of a stack for element type `E`, planned for `client`'s device.
fn config_for<R: Runtime, E: FloatElement>(
    client: &ComputeClient<R>,
    width: usize,
    hidden: usize,
    heads: usize,
    layers: usize,
) -> Result<DecodeConfig, OpError> {
    plan(
        &DecodeProblem {
            width,
            hidden,
            heads,
            layers,
            dtype: E::DTYPE,
        },
        &DeviceProfile::of(client),
    )
}

/// Loop iterations one unit runs, at most, in one launch of the kernel with this `cfg`: the
/// input stage if `first`, `layers` layers against `keys` keys, and the output stage (with
/// `vocab` logits) if `last`. Mirrors the kernel's loops (`megabyte_kernels::decode`): each
/// loop counts its trips for the unit with the most, plus one.
pub fn loop_trips(
    cfg: &DecodeConfig,
    keys: usize,
    layers: usize,
    vocab: usize,
    first: bool,
    last: bool,
) -> usize {
    let (c, h, u, n, k) = (cfg.width, cfg.hidden, cfg.units, cfg.vector, cfg.chunk);
    let hs = c / cfg.heads;
    let parts = PARTS.min(u);
    let per = |len: usize, step: usize| len.div_ceil(step) + 1;
    // dot_columns over n_in inputs for each of this unit's vectors of n_out columns.
    let gemv = |n_in: usize, n_out: usize| per(n_out, u * n) * (n_in + 1);
    // Every unit sums the whole row twice, then writes its columns.
    let norm = 2 * (c + 1) + per(c, u);
    let chunk =
        per(k, u) + per(k, parts) + per(k, u) + per(k, parts) + per(hs, u * n) * (k + 1) + 1;
    let head = 2 * per(hs, u * n) + keys.div_ceil(k) * chunk + 1;
    let layer = 2 * norm
        + gemv(c, 3 * c)
        + per(c, u * n)
        + cfg.heads * head
        + 1
        + gemv(c, c)
        + gemv(c, h)
        + gemv(h, c)
        + 1;
    let input = match cfg.input {
        input::LOCAL => per(c, u) * (cfg.d_in + 1),
        _ => per(c, u),
    };
    let output = per(c, u)
        + match cfg.output {
            output::ROW => 0,
            output::NORM => norm + per(c, u),
            _ => norm + per(vocab, u) * (c / n + 1) + u,
        };
    usize::from(first) * input + layers * layer + usize::from(last) * output
}

/// The launches of one step: consecutive layer ranges covering `0 .. layers`, each under
/// [`LOOP_TRIPS_PER_LAUNCH`] with the first carrying the input stage and the last the output
/// stage; or why one layer alone does not fit (too many keys for one launch).
pub fn plan_launches(
    cfg: &DecodeConfig,
    keys: usize,
    layers: usize,
    vocab: usize,
) -> Result<Vec<std::ops::Range<usize>>, OpError> {
    let mut launches = Vec::new();
    let mut begin = 0;
    while begin < layers {
        let fits = |end: usize| {
            loop_trips(cfg, keys, end - begin, vocab, begin == 0, end == layers)
                <= LOOP_TRIPS_PER_LAUNCH
        };
        // The most layers from `begin` that fit; at least one must.
        let mut end = begin;
        while end < layers && fits(end + 1) {
            end += 1;
        }
        if end == begin {
            let need = loop_trips(cfg, keys, 1, vocab, begin == 0, begin + 1 == layers);
            return Err(OpError::unsupported(OP, "keys", keys, format!(
                    "one layer of width {} at this many keys runs {need} loop iterations per unit, over the {LOOP_TRIPS_PER_LAUNCH} one launch may run; use the unfused blocks",
                    cfg.width
                )));
        }
        launches.push(begin..end);
        begin = end;
    }
    Ok(launches)
}

/// The most keys (`pos + 1`) at which [`decode_stack`] runs a stack of this shape on this
/// device, whatever its output, with a local input of `d_in` values per position (0 for a
/// stack fed its row or a patch embedding) and `vocab` logits; 0 if one layer does not fit a
/// launch even at one key, and an error naming the offending value if the kernel does not take
/// the shape (no layers, heads not dividing the width, wider than [`MAX_FUSED_WIDTH`], too
/// little shared memory or too few buffer bindings). Past this the step returns an error and
/// the unfused blocks are the way to decode.
pub fn decode_stack_max_keys<R: Runtime, E: FloatElement>(
    client: &ComputeClient<R>,
    width: usize,
    hidden: usize,
    heads: usize,
    layers: usize,
    d_in: usize,
    vocab: usize,
) -> Result<usize, OpError> {
    let cfg = config_for::<R, E>(client, width, hidden, heads, layers)?;
    // The costliest stages: the local input in front, the logits and argmax behind.
    let cfg = DecodeConfig {
        input: input::LOCAL,
        d_in,
        output: output::ARGMAX,
        ..cfg
    };
    let fits = |keys: usize| plan_launches(&cfg, keys, layers, vocab).is_ok();
    if !fits(1) {
        return Ok(0);
    }
    // Trips grow with the keys: double, then bisect.
    let (mut lo, mut hi) = (1usize, 2usize);
    while fits(hi) {
        lo = hi;
        hi = match hi.checked_mul(2) {
            Some(next) if next <= 1 << 40 => next,
            _ => return Ok(lo),
        };
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// One decoding step of a packed stack for B sequences, one new position each, in one launch
/// or, where [`plan_launches`] splits the layers, a few. The row comes from `input`; every layer l then does h += proj(attn(LN1(h))),
/// h += fc2(act(fc1(LN2(h)))), writing its key and value to slot `pos` of `k_cache`/`v_cache`
/// (L, B, cap, C) and attending to slots `0 ..= pos`; `h` (B, C) receives the result and
/// `output` says what follows. Past the keys one layer can take in a launch, an
/// [`OpError::Unsupported`] naming `keys` ([`decode_stack_max_keys`]).
#[allow(clippy::too_many_arguments)]
pub fn decode_stack<R: Runtime, E: FloatElement>(
    h: &Tensor<R, E>,
    stack: &PackedStack<R, E>,
    k_cache: &Tensor<R, E>,
    v_cache: &Tensor<R, E>,
    pos: usize,
    act: ActivationKind,
    input: &StepInput<R, E>,
    output: &StepOutput<R, E>,
) -> Result<(), OpError> {
    let client = h.client();
    ensure_dtype::<R, E>(client, OP)?;
    let (c, layers) = (stack.width, stack.layers);
    if h.shape().len() != 2 || h.shape()[1] != c || h.shape()[0] == 0 {
        return Err(OpError::shape(OP, "h", h.shape(), vec![1, c]));
    }
    let b = h.shape()[0];
    let mut cfg = config_for::<R, E>(client, c, stack.hidden, stack.heads, layers)?;
    let vector = cfg.vector;
    let cap = k_cache.shape().get(2).copied().unwrap_or(0);
    k_cache.expect_shape(OP, "k_cache", &[layers, b, cap, c])?;
    v_cache.expect_shape(OP, "v_cache", &[layers, b, cap, c])?;
    if pos >= cap {
        return Err(OpError::unsupported(
            OP,
            "pos",
            pos,
            format!("the cache holds {cap} positions"),
        ));
    }
    // Placeholders for the tensors a disabled stage would read: any tensor of E (u32 for ids).
    let ph = &stack.ln_f;
    let ids_ph;
    let (g, w_gl, embed, pad, positions, ids, slot) = match input {
        StepInput::Row => {
            ids_ph = Tensor::<R, u32>::empty(client, &[1])?;
            (ph, ph, ph, ph, ph, &ids_ph, 0)
        }
        StepInput::Local(x) => {
            let gw = x.g.shape().get(1).copied().unwrap_or(0);
            let dg = x.global_to_local.shape().first().copied().unwrap_or(0);
            x.global_to_local
                .expect_shape(OP, "global_to_local", &[dg, c])?;
            if dg == 0 || gw % dg != 0 || x.slot >= gw / dg {
                return Err(OpError::shape(
                    OP,
                    "g",
                    x.g.shape(),
                    vec![b, (x.slot + 1) * dg],
                ));
            }
            x.g.expect_shape(OP, "g", &[b, gw])?;
            let v = x.embed.shape().first().copied().unwrap_or(0);
            x.embed.expect_shape(OP, "embed", &[v, c])?;
            x.pad.expect_shape(OP, "pad", &[c])?;
            if let Some(p) = x.positions {
                p.expect_shape(OP, "positions", &[gw / dg, c])?;
            }
            x.ids.expect_shape(OP, "ids", &[b, gw / dg])?;
            cfg.input = input::LOCAL;
            cfg.positions = x.positions.is_some();
            cfg.d_in = dg;
            let positions = x.positions.unwrap_or(ph);
            (
                x.g,
                x.global_to_local,
                x.embed,
                x.pad,
                positions,
                x.ids,
                x.slot,
            )
        }
        StepInput::Patch(x) => {
            let d = x.embed.shape().get(1).copied().unwrap_or(0);
            if d == 0 || c % d != 0 {
                return Err(OpError::shape(OP, "embed", x.embed.shape(), vec![256, c]));
            }
            let patch = c / d;
            let v = x.embed.shape()[0];
            x.embed.expect_shape(OP, "embed", &[v, d])?;
            let t = x.positions.shape().first().copied().unwrap_or(0);
            x.positions.expect_shape(OP, "positions", &[t, d])?;
            if x.first_byte + patch > t {
                return Err(OpError::unsupported(
                    OP,
                    "first_byte",
                    x.first_byte,
                    format!("the patch of {patch} bytes needs positions past the {t} given"),
                ));
            }
            x.ids.expect_shape(OP, "ids", &[b, patch])?;
            cfg.input = input::PATCH;
            cfg.positions = true;
            cfg.d_in = d;
            (ph, ph, x.embed, ph, x.positions, x.ids, x.first_byte)
        }
    };
    let check_head = |table: &Tensor<R, E>, logits: &Tensor<R, E>| -> Result<(), OpError> {
        let v = table.shape().first().copied().unwrap_or(0);
        table.expect_shape(OP, "table", &[v, c])?;
        logits.expect_shape(OP, "logits", &[b, v])
    };
    let (table, out, generated, at) = match output {
        StepOutput::Row => (ph, h, ids, 0),
        StepOutput::Norm(out) => {
            out.expect_shape(OP, "out", &[b, c])?;
            cfg.output = output::NORM;
            (ph, *out, ids, 0)
        }
        StepOutput::Logits { table, logits } => {
            check_head(table, logits)?;
            cfg.output = output::LOGITS;
            (*table, *logits, ids, 0)
        }
        StepOutput::Argmax {
            table,
            logits,
            generated,
            at,
        } => {
            check_head(table, logits)?;
            if cfg.input != input::LOCAL {
                return Err(OpError::unsupported(
                    OP,
                    "argmax output without a local input",
                    0,
                    "the argmax is written into the local input's patch bytes",
                ));
            }
            let g = generated.shape().get(1).copied().unwrap_or(0);
            generated.expect_shape(OP, "generated", &[b, g])?;
            if *at >= g {
                return Err(OpError::unsupported(
                    OP,
                    "at",
                    *at,
                    format!("`generated` holds {g} bytes per row"),
                ));
            }
            cfg.output = output::ARGMAX;
            (*table, *logits, *generated, *at)
        }
    };
    if cfg.output != output::ROW && !stack.has_ln_f {
        return Err(OpError::unsupported(
            OP,
            "final LayerNorm",
            0,
            "the stack was packed without one; the output needs it",
        ));
    }
    cfg.activation = act.id();
    let scale = 1.0 / ((c / stack.heads) as f32).sqrt();
    let cubes = u32::try_from(b)
        .map_err(|_| OpError::unsupported(OP, "batch", b, "more rows than a launch has cubes"))?;
    let vocab = table.shape().first().copied().unwrap_or(0);
    crate::record::note(|| {
        let problem = DecodeProblem {
            width: c,
            hidden: stack.hidden,
            heads: stack.heads,
            layers,
            dtype: E::DTYPE,
        };
        crate::record::Planned::Decode {
            problem,
            step: cfg,
            keys: pos + 1,
            vocab,
        }
    });
    let launches = plan_launches(&cfg, pos + 1, layers, vocab)?;
    let last = launches.len() - 1;
    for (i, range) in launches.into_iter().enumerate() {
        // Only the first launch builds the row and only the last writes the output; the
        // others pass the residual stream through `h`.
        let cfg = DecodeConfig {
            input: if i == 0 { cfg.input } else { input::ROW },
            positions: cfg.positions && i == 0,
            output: if i == last { cfg.output } else { output::ROW },
            ..cfg
        };
        // SAFETY: every shape was validated above; the kernel indexes rows b < B (one cube
        // each), layers in `range` (below L), cache slots 0 ..= pos < cap and columns below C,
        // H and V; `vector` divides C, H and the head width; every unit reaches every barrier
        // (loop bounds depend only on comptime sizes, `pos` and the range).
        unsafe {
            decode_stack_kernel::launch_unchecked::<E, R>(
                client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(cfg.units as u32),
                vector,
                h.arg(),
                stack.weights.arg(),
                stack.weights.arg(),
                k_cache.arg(),
                v_cache.arg(),
                g.arg(),
                w_gl.arg(),
                embed.arg(),
                pad.arg(),
                positions.arg(),
                ids.arg(),
                stack.ln_f.arg(),
                table.arg(),
                out.arg(),
                generated.arg(),
                pos as u32,
                slot as u32,
                at as u32,
                range.start as u32,
                range.end as u32,
                scale,
                EPS,
                cfg,
            );
        }
    }
    Ok(())
}

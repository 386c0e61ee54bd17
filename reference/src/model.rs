//! The whole MEGABYTE forward pass, step for step as `MEGABYTE.md` states it.
//!
//! Position t = k·P + p is predicted from patches < k (the global model sees them because its
//! input is shifted by one patch) and bytes < p of its own patch (the local input is offset by
//! one byte). `logits[b, t]` is therefore the distribution of byte `x[b, t]` given `x[b, ..t]`.

use crate::config::Config;
use crate::cross_entropy::{bits_per_byte, cross_entropy, logits_tied, logits_untied};
use crate::error::Error;
use crate::ffn::block_forward;
use crate::layer_norm::layer_norm_forward;
use crate::local_input::local_input;
use crate::patch_embed::global_input;
use crate::weights::Weights;

/// Checks a (B, T) id tensor against the config: T a positive multiple of P, at most the
/// context, every id inside the vocabulary.
pub fn check_input(cfg: &Config, x: &[u32], b: usize, t: usize) -> Result<(), Error> {
    cfg.validate()?;
    if b == 0 {
        return Err(Error::EmptyBatch { batch: b });
    }
    if t == 0 {
        return Err(Error::EmptySequence { seq: t });
    }
    if x.len() != b * t {
        return Err(Error::InputLength {
            len: x.len(),
            batch: b,
            seq: t,
        });
    }
    if !t.is_multiple_of(cfg.patch) {
        return Err(Error::SequenceNotPatchMultiple {
            seq: t,
            patch: cfg.patch,
        });
    }
    if t > cfg.context {
        return Err(Error::SequenceTooLong {
            seq: t,
            context: cfg.context,
        });
    }
    if let Some((position, &id)) = x
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= cfg.vocab)
    {
        return Err(Error::IdOutOfRange {
            id,
            position,
            vocab: cfg.vocab,
        });
    }
    Ok(())
}

/// Steps 1–3: global output g, (B, K, P·D_G), after the final LayerNorm.
pub fn global_forward(cfg: &Config, w: &Weights, x: &[u32], b: usize, t: usize) -> Vec<f32> {
    let (p, dg) = (cfg.patch, cfg.d_global);
    let (k, c) = (t / p, cfg.global_width());
    // 1–2. Byte embedding + positions, patchify, shift right by one patch.
    let mut h = vec![0f32; b * k * c]; // (B, K, P·D_G)
    global_input(
        &mut h,
        x,
        &w.global_embed,
        &w.global_pos,
        &w.global_pad,
        b,
        t,
        p,
        dg,
    );
    // 3. Global transformer over K patches, then the final LayerNorm.
    for blk in &w.global_blocks {
        block_forward(&mut h, blk, cfg.activation, b, k, c, cfg.heads_global);
    }
    let mut g = vec![0f32; b * k * c];
    layer_norm_forward(
        &mut g,
        &h,
        &w.global_ln_f.weight,
        &w.global_ln_f.bias,
        b * k,
        c,
    );
    g
}

/// Steps 4–6: local output, (B, K, P, D_L), after the final LayerNorm.
pub fn local_forward(
    cfg: &Config,
    w: &Weights,
    g: &[f32],
    x: &[u32],
    b: usize,
    t: usize,
) -> Vec<f32> {
    let (p, dg, dl) = (cfg.patch, cfg.d_global, cfg.d_local);
    let k = t / p;
    // 4–5. Project each byte slice of g to D_L and add the previous byte's local embedding.
    let mut l = vec![0f32; b * t * dl]; // (B·K sequences, P, D_L)
    let lpos = w.local_pos.as_deref();
    local_input(
        &mut l,
        g,
        x,
        &w.global_to_local,
        &w.local_embed,
        &w.local_pad,
        lpos,
        b,
        k,
        p,
        dg,
        dl,
    );
    // 6. Local transformer: B·K independent causal sequences of length P.
    for blk in &w.local_blocks {
        block_forward(&mut l, blk, cfg.activation, b * k, p, dl, cfg.heads_local);
    }
    let mut out = vec![0f32; b * t * dl];
    layer_norm_forward(
        &mut out,
        &l,
        &w.local_ln_f.weight,
        &w.local_ln_f.bias,
        b * t,
        dl,
    );
    out
}

/// Step 7: logits, (B, T, V), through the tied embedding or the untied head.
pub fn head(cfg: &Config, w: &Weights, l_out: &[f32], n: usize) -> Vec<f32> {
    let (dl, v) = (cfg.d_local, cfg.vocab);
    let mut logits = vec![0f32; n * v];
    match &w.head {
        Some(head) => logits_untied(&mut logits, l_out, head, n, dl, v),
        None => logits_tied(&mut logits, l_out, &w.local_embed, n, dl, v),
    }
    logits
}

/// The full forward pass: ids (B, T) -> logits (B, T, V).
pub fn forward(
    cfg: &Config,
    w: &Weights,
    x: &[u32],
    b: usize,
    t: usize,
) -> Result<Vec<f32>, Error> {
    check_input(cfg, x, b, t)?;
    let g = global_forward(cfg, w, x, b, t);
    let l_out = local_forward(cfg, w, &g, x, b, t);
    Ok(head(cfg, w, &l_out, b * t))
}

/// Mean cross-entropy over all B·T positions in bits per byte; position t's target is x[t].
pub fn loss_bits_per_byte(
    cfg: &Config,
    w: &Weights,
    x: &[u32],
    b: usize,
    t: usize,
) -> Result<f64, Error> {
    let logits = forward(cfg, w, x, b, t)?;
    let n = b * t;
    let (mut losses, mut lse) = (vec![0f64; n], vec![0f64; n]);
    cross_entropy(&mut losses, &mut lse, &logits, x, n, cfg.vocab);
    Ok(bits_per_byte(&losses))
}

//! The whole MEGABYTE forward pass, step for step as `docs/DESIGN.md` states it.
//!
//! Position t = k·P + p is predicted from patches < k (the global model sees them because its
//! input is shifted by one patch) and bytes < p of its own patch (the local input is offset by
//! one byte). `logits[b, t]` is therefore the distribution of byte `x[b, t]` given `x[b, ..t]`.

use crate::config::Config;
use crate::cross_entropy::{
    bits_per_byte, cross_entropy, cross_entropy_backward, logits_tied, logits_untied,
};
use crate::error::Error;
use crate::ffn::{block_backward, block_forward};
use crate::gemm::{linear_backward, transpose};
use crate::layer_norm::{layer_norm, layer_norm_backward, layer_norm_forward};
use crate::local_input::{local_input, local_input_backward};
use crate::patch_embed::{global_input, global_input_backward};
use crate::weights::Weights;

/// Checks a (B, T) input shape against the config: B >= 1, T a positive multiple of P, at most
/// the context (for ids that are already on a device, or not yet drawn).
pub fn check_shape(cfg: &Config, b: usize, t: usize) -> Result<(), Error> {
    check_dims(cfg, b, t, None)
}

/// Checks a (B, T) id tensor against the config: its shape as in [`check_shape`], its length,
/// and every id inside the vocabulary.
pub fn check_input(cfg: &Config, x: &[u32], b: usize, t: usize) -> Result<(), Error> {
    check_dims(cfg, b, t, Some(x.len()))?;
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

/// The shape checks, and the length of the ids when given, in the order their errors win.
fn check_dims(cfg: &Config, b: usize, t: usize, len: Option<usize>) -> Result<(), Error> {
    cfg.validate()?;
    if b == 0 {
        return Err(Error::EmptyBatch { batch: b });
    }
    if t == 0 {
        return Err(Error::EmptySequence { seq: t });
    }
    if let Some(len) = len.filter(|&len| b.checked_mul(t) != Some(len)) {
        return Err(Error::InputLength {
            len,
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
    Ok(())
}

/// Steps 1–2: the global model's input, (B, K, P·D_G): byte embeddings plus positions,
/// patchified and shifted right by one patch (the learned pad first).
pub fn embed_global(cfg: &Config, w: &Weights, x: &[u32], b: usize, t: usize) -> Vec<f32> {
    let (p, dg) = (cfg.patch, cfg.d_global);
    let mut h = vec![0f32; b * (t / p) * cfg.global_width()];
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
    h
}

/// Steps 1–3: global output g, (B, K, P·D_G), after the final LayerNorm.
pub fn global_forward(cfg: &Config, w: &Weights, x: &[u32], b: usize, t: usize) -> Vec<f32> {
    let (k, c) = (t / cfg.patch, cfg.global_width());
    // 1–2. Byte embedding + positions, patchify, shift right by one patch: (B, K, P·D_G).
    let mut h = embed_global(cfg, w, x, b, t);
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

/// Steps 4–5: the local model's input, (B, T, D_L): each byte's slice of the global output
/// g projected to D_L, plus the previous byte's local embedding (the learned pad first in
/// each patch) and, where the model has them, local positions.
fn embed_local(cfg: &Config, w: &Weights, g: &[f32], x: &[u32], b: usize, t: usize) -> Vec<f32> {
    let (p, dg, dl) = (cfg.patch, cfg.d_global, cfg.d_local);
    let mut l = vec![0f32; b * t * dl];
    local_input(
        &mut l,
        g,
        x,
        &w.global_to_local,
        &w.local_embed,
        &w.local_pad,
        w.local_pos.as_deref(),
        b,
        t / p,
        p,
        dg,
        dl,
    );
    l
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
    let (p, dl) = (cfg.patch, cfg.d_local);
    let k = t / p;
    // 4–5. Project each byte slice of g to D_L and add the previous byte's local embedding:
    // B·K sequences of P rows of D_L.
    let mut l = embed_local(cfg, w, g, x, b, t);
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

/// Mean cross-entropy over all B·T positions in bits per byte; position t's target is `x[t]`.
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

/// The training loss, mean cross-entropy over all B·T positions in nats, and its gradient with
/// respect to every parameter (a `Weights` of gradients, same shapes). Recomputes each
/// block's internals from its saved input.
pub fn loss_and_grads(
    cfg: &Config,
    w: &Weights,
    x: &[u32],
    b: usize,
    t: usize,
) -> Result<(f64, Weights), Error> {
    check_input(cfg, x, b, t)?;
    let (p, dg, dl, v) = (cfg.patch, cfg.d_global, cfg.d_local, cfg.vocab);
    let (k, c) = (t / p, cfg.global_width());
    let n = b * t;
    let act = cfg.activation;
    let mut grads = Weights::zeros(cfg);

    // Forward, saving each block's input.
    let mut h = embed_global(cfg, w, x, b, t);
    let mut global_inputs = Vec::new();
    for blk in &w.global_blocks {
        global_inputs.push(h.clone());
        block_forward(&mut h, blk, act, b, k, c, cfg.heads_global);
    }
    let (mut g, mut gm, mut gr) = (vec![0f32; b * k * c], vec![0f32; b * k], vec![0f32; b * k]);
    layer_norm(
        &mut g,
        &mut gm,
        &mut gr,
        &h,
        &w.global_ln_f.weight,
        &w.global_ln_f.bias,
        b * k,
        c,
    );
    let mut l = embed_local(cfg, w, &g, x, b, t);
    let mut local_inputs = Vec::new();
    for blk in &w.local_blocks {
        local_inputs.push(l.clone());
        block_forward(&mut l, blk, act, b * k, p, dl, cfg.heads_local);
    }
    let (mut out, mut om, mut or) = (vec![0f32; n * dl], vec![0f32; n], vec![0f32; n]);
    layer_norm(
        &mut out,
        &mut om,
        &mut or,
        &l,
        &w.local_ln_f.weight,
        &w.local_ln_f.bias,
        n,
        dl,
    );
    let logits = head(cfg, w, &out, n);
    let (mut losses, mut lse) = (vec![0f64; n], vec![0f64; n]);
    cross_entropy(&mut losses, &mut lse, &logits, x, n, v);
    let loss = losses.iter().sum::<f64>() / n as f64;

    // Backward.
    let mut d_logits = vec![0f32; n * v];
    cross_entropy_backward(&mut d_logits, &logits, x, n, v);
    let mut d_out = vec![0f32; n * dl];
    match &w.head {
        Some(hw) => {
            let dh = grads.head.as_mut().expect("untied head has a gradient");
            linear_backward(&mut d_out, dh, None, &d_logits, &out, hw, n, dl, v);
        }
        None => {
            // logits = out · E_Lᵀ: the linear layer's weight is E_Lᵀ (D_L, V).
            let et = transpose(&w.local_embed, v, dl);
            let mut d_et = vec![0f32; dl * v];
            linear_backward(&mut d_out, &mut d_et, None, &d_logits, &out, &et, n, dl, v);
            let d_e = transpose(&d_et, dl, v);
            grads
                .local_embed
                .iter_mut()
                .zip(d_e)
                .for_each(|(g, d)| *g += d);
        }
    }
    let mut d_l = vec![0f32; n * dl];
    let ln = &mut grads.local_ln_f;
    layer_norm_backward(
        &mut d_l,
        &mut ln.weight,
        &mut ln.bias,
        &d_out,
        &l,
        &w.local_ln_f.weight,
        &om,
        &or,
        n,
        dl,
    );
    let local = w.local_blocks.iter().zip(&mut grads.local_blocks);
    for ((blk, gblk), input) in local.zip(&local_inputs).rev() {
        block_backward(
            &mut d_l,
            gblk,
            input,
            blk,
            act,
            b * k,
            p,
            dl,
            cfg.heads_local,
        );
    }
    let mut d_g = vec![0f32; b * k * c];
    local_input_backward(
        &mut d_g,
        &mut grads.global_to_local,
        &mut grads.local_embed,
        &mut grads.local_pad,
        grads.local_pos.as_deref_mut(),
        &d_l,
        &g,
        x,
        &w.global_to_local,
        b,
        k,
        p,
        dg,
        dl,
    );
    let mut d_h = vec![0f32; b * k * c];
    let ln = &mut grads.global_ln_f;
    layer_norm_backward(
        &mut d_h,
        &mut ln.weight,
        &mut ln.bias,
        &d_g,
        &h,
        &w.global_ln_f.weight,
        &gm,
        &gr,
        b * k,
        c,
    );
    let global = w.global_blocks.iter().zip(&mut grads.global_blocks);
    for ((blk, gblk), input) in global.zip(&global_inputs).rev() {
        block_backward(&mut d_h, gblk, input, blk, act, b, k, c, cfg.heads_global);
    }
    global_input_backward(
        &mut grads.global_embed,
        &mut grads.global_pos,
        &mut grads.global_pad,
        &d_h,
        x,
        b,
        t,
        p,
        dg,
    );
    Ok((loss, grads))
}

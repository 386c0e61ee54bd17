//! `megabyte info`: parameters, FLOPs per byte and memory of a configuration.

use std::path::PathBuf;

use megabyte::checkpoint;
use megabyte::info::{flops_per_byte, memory, parameters};
use megabyte::{Config, Error};

use crate::args::DeviceArg;

pub(crate) fn info(
    checkpoint: Option<PathBuf>,
    preset: Option<String>,
    context: Option<usize>,
    device: Option<DeviceArg>,
) -> Result<(), Error> {
    match device {
        None => {}
        #[cfg(feature = "cuda")]
        Some(DeviceArg::Cuda) => {
            for d in crate::device::cuda_devices()? {
                println!("device: {d}");
            }
        }
        // The device line goes to stderr, as on every command that runs on a device.
        Some(arg) => drop(crate::device::backend(arg)?),
    }
    let cfg = match (&checkpoint, preset.as_deref()) {
        (Some(path), _) => checkpoint::load(path)?.config,
        (None, Some(name)) => Config::preset(name).expect("clap checked the preset name"),
        (None, None) => Config::tiny(),
    };
    let t = context.unwrap_or(cfg.context);
    if t == 0 || !t.is_multiple_of(cfg.patch) {
        return Err(megabyte::reference::Error::SequenceNotPatchMultiple {
            seq: t,
            patch: cfg.patch,
        }
        .into());
    }
    let c = Config {
        context: t,
        ..cfg.clone()
    };
    // Sizes (context below 2^31, no overflowing product) before any figure is computed.
    c.validate()?;
    let p = parameters(&c);
    let f = flops_per_byte(&c, t);
    let m32 = memory(&c, t, 4);
    let m16 = memory(&c, t, 2);
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    println!(
        "config: V={} P={} T={} D_G={} (global width {}) D_L={} L_G={} L_L={} heads {}/{} ffn x{} {} {} head{}",
        c.vocab,
        c.patch,
        c.context,
        c.d_global,
        c.global_width(),
        c.d_local,
        c.layers_global,
        c.layers_local,
        c.heads_global,
        c.heads_local,
        c.ffn_mult,
        c.activation,
        if c.tied_head { "tied" } else { "untied" },
        if c.local_positions { ", local positions" } else { "" },
    );
    println!(
        "parameters: {} total = {} global blocks + {} local blocks + {} embeddings/pads/head",
        p.total, p.global_blocks, p.local_blocks, p.embeddings
    );
    println!(
        "forward FLOPs per byte at T={t}: global {:.3e} + local {:.3e} = {:.3e}",
        f.global,
        f.local,
        f.total()
    );
    println!(
        "memory at T={t}, batch 1 (f32 / f16): weights {:.1} / {:.1} MiB, forward activations {:.1} / {:.1} MiB, generation KV caches {:.1} / {:.1} MiB",
        mib(m32.weights),
        mib(m16.weights),
        mib(m32.forward),
        mib(m16.forward),
        mib(m32.kv_cache),
        mib(m16.kv_cache)
    );
    Ok(())
}

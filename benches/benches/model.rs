//! End-to-end measurements of the model: forward and training throughput, generation with and
//! without the KV caches, MEGABYTE against a plain byte-level transformer with the same
//! parameter count built from the same kernels, and forward time and device memory against the
//! context length (1 KiB to 1 MiB), written as a table and as `docs/scaling.svg`.
//!
//! Each figure is one timed run after a warm-up run (these take seconds each, too long for
//! criterion's sampling), with a device sync before the clock stops. Prints markdown tables.
//!
//! `cargo bench -p megabyte-benches --bench model` (about 10 minutes on two CPU cores through
//! lavapipe); `-- --quick` runs one small case of each section (the CI smoke run).
//!
//! The plain transformer is MEGABYTE with P = 1 and no local layers: a decoder over bytes of
//! width D_G with learned positions, whose output passes one D_G × D_L projection and a
//! LayerNorm into the tied byte embedding. Its cached generation steps the "global" model (the
//! transformer) once per byte.

use std::time::Instant;

use cubecl::prelude::*;
use megabyte::info::{flops_per_byte, parameters};
use megabyte::plot;
use megabyte::train::{TrainConfig, Trainer};
use megabyte::{Config, DecodeKernel, GenerateOptions, Generator, Model, Weights};

type Rt = megabyte_benches::BenchRuntime;

fn sync(client: &ComputeClient<Rt>) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// Seconds of one run of `f` after one warm-up run (JIT compilation, pool growth).
fn time(client: &ComputeClient<Rt>, mut f: impl FnMut()) -> f64 {
    f();
    sync(client);
    let start = Instant::now();
    f();
    sync(client);
    start.elapsed().as_secs_f64()
}

/// Seconds of one run of `f`, no warm-up (for runs too long to repeat).
fn time_once(client: &ComputeClient<Rt>, f: impl FnOnce()) -> f64 {
    sync(client);
    let start = Instant::now();
    f();
    sync(client);
    start.elapsed().as_secs_f64()
}

fn megabyte_cfg(
    width: usize,
    patch: usize,
    layers: (usize, usize),
    d_local: usize,
    context: usize,
) -> Config {
    Config {
        vocab: 256,
        patch,
        context,
        d_global: width / patch,
        d_local,
        layers_global: layers.0,
        layers_local: layers.1,
        heads_global: width / 64,
        heads_local: (d_local / 64).max(1),
        ffn_mult: 4,
        activation: megabyte::Activation::Gelu,
        tied_head: true,
        local_positions: true,
    }
}

/// The plain byte transformer: P = 1, no local layers, D_L = D_G.
fn transformer_cfg(width: usize, layers: usize, context: usize) -> Config {
    Config {
        layers_local: 0,
        ..megabyte_cfg(width, 1, (layers, 0), width, context)
    }
}

fn ids(n: usize) -> Vec<u32> {
    // Text-like bytes: a fixed walk over printable ASCII.
    (0..n)
        .map(|i| 32 + ((i * 7919 + i / 13) % 95) as u32)
        .collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn forward_rate(client: &ComputeClient<Rt>, cfg: &Config, batch: usize, t: usize) -> (f64, f64) {
    let model = Model::<Rt, f32>::new(client, cfg, &Weights::init(cfg, 1)).unwrap();
    let x = ids(batch * t);
    let secs = time(client, || {
        model.losses(&x, batch).unwrap();
    });
    ((batch * t) as f64 / secs, secs)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `-- --only=SECTION` runs one of: throughput, generation, comparison, scaling.
    let only = std::env::args().find_map(|a| a.strip_prefix("--only=").map(str::to_string));
    let run = |section: &str| only.as_deref().is_none_or(|o| o == section);
    let Some(client) = megabyte_benches::client_or_skip("model") else {
        return;
    };
    let rt = megabyte_benches::RUNTIME;

    // ---- Forward and training throughput ----
    if run("throughput") {
        println!("\n### Forward and training-step throughput ({rt}, f32)\n");
        println!("| model | params | batch × bytes | forward bytes/s | training-step bytes/s |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        let throughput: Vec<(&str, Config, usize, usize)> = if quick {
            vec![("tiny", Config::tiny(), 2, 64)]
        } else {
            vec![
                (
                    "tiny (T = 2048)",
                    Config {
                        context: 2048,
                        ..Config::tiny()
                    },
                    4,
                    2048,
                ),
                ("small", Config::small(), 2, 2048),
            ]
        };
        for (name, cfg, b, t) in &throughput {
            let (fwd, _) = forward_rate(&client, cfg, *b, *t);
            let mut tc = TrainConfig::new(cfg, 100);
            tc.batch = *b;
            tc.seq = *t;
            let mut trainer = Trainer::new(&client, cfg, &Weights::init(cfg, 1), tc).unwrap();
            let x = ids(b * t);
            let secs = time(&client, || {
                trainer.step(&x).unwrap();
            });
            println!(
                "| {name} | {} | {b} × {t} | {fwd:.0} | {:.0} |",
                cfg.num_parameters(),
                (b * t) as f64 / secs
            );
        }
    }

    // ---- Generation with and without the caches ----
    if run("generation") {
        let t = if quick { 64 } else { 2048 };
        let new = if quick { 8 } else { 256 };
        let cfg = Config {
            context: t,
            ..Config::tiny()
        };
        let w = Weights::init(&cfg, 2);
        let model = Model::<Rt, f32>::new(&client, &cfg, &w).unwrap();
        let prompt: Vec<u8> = ids(t - new).iter().map(|&x| x as u8).collect();
        // Without caches: one full forward over the whole prefix per new byte, as the naive
        // generator (and megabyte-pytorch) does.
        let uncached = time(&client, || {
            let mut seq: Vec<u32> = prompt.iter().map(|&x| x as u32).collect();
            for _ in 0..new {
                let n = seq.len();
                let len = (n + 1).div_ceil(cfg.patch) * cfg.patch;
                let mut x = seq.clone();
                x.resize(len, 0);
                let logits = model.forward(&x, 1).unwrap();
                let row = &logits[n * cfg.vocab..(n + 1) * cfg.vocab];
                seq.push(megabyte::reference::generate::argmax(row));
            }
        });
        println!("\n### Generation at context {t}, tiny ({rt}, f32, batch 1, the last {new} bytes of the context, prompt included)\n");
        println!("| generator | bytes/s | speed-up |");
        println!("| --- | ---: | ---: |");
        println!(
            "| full forward per byte (no cache), greedy | {:.1} | 1 |",
            new as f64 / uncached
        );
        // top-k 1 samples the argmax through the host sampler: the logits come back each byte.
        let host_argmax = megabyte::Sampling {
            top_k: 1,
            temperature: 1.0,
            ..megabyte::Sampling::greedy()
        };
        let cached: [(&str, DecodeKernel, megabyte::Sampling); 3] = [
            (
                "KV caches, unfused blocks (9 launches per block), logits read back per byte",
                DecodeKernel::Unfused,
                host_argmax.clone(),
            ),
            (
                "KV caches, fused steps (1 launch per stack), logits read back per byte",
                DecodeKernel::Fused,
                host_argmax,
            ),
            (
                "KV caches, fused steps, greedy on the device (bytes read back every 32)",
                DecodeKernel::Fused,
                megabyte::Sampling::greedy(),
            ),
        ];
        for (name, kernel, sampling) in cached {
            let gen = Generator::new(
                &model,
                GenerateOptions {
                    max_new: new,
                    sampling,
                    ..Default::default()
                },
            )
            .unwrap()
            .decode_kernel(kernel);
            let secs = time(&client, || {
                gen.generate(&[&prompt], |_, _| {}).unwrap();
            });
            println!(
                "| {name} | {:.1} | {:.1}× |",
                new as f64 / secs,
                uncached / secs
            );
        }
    }

    // ---- MEGABYTE against a plain transformer of the same size ----
    if run("comparison") {
        println!("\n### MEGABYTE vs a byte-level transformer with the same parameter count ({rt}, f32, batch 1)\n");
        println!("| model | params | context | training FLOPs/byte | forward s | forward bytes/s | generation bytes/s, fused steps | generation bytes/s, unfused steps |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        let contexts: &[usize] = if quick { &[256] } else { &[2048, 8192] };
        for &ctx in contexts {
            let (mb, tr) = if quick {
                (
                    megabyte_cfg(64, 8, (1, 1), 64, ctx),
                    transformer_cfg(64, 1, ctx),
                )
            } else {
                (
                    megabyte_cfg(256, 8, (4, 4), 128, ctx),
                    transformer_cfg(256, 5, ctx),
                )
            };
            for (name, cfg) in [("MEGABYTE P=8", &mb), ("transformer", &tr)] {
                let (rate, secs) = forward_rate(&client, cfg, 1, ctx);
                let model = Model::<Rt, f32>::new(&client, cfg, &Weights::init(cfg, 3)).unwrap();
                let gen_new = if quick { 8 } else { 256 };
                let prompt: Vec<u8> = ids(ctx - gen_new).iter().map(|&x| x as u8).collect();
                // Greedy. Fused: each stack's step in one launch (the transformer, having no
                // local stack, reads its logits back every byte; MEGABYTE keeps greedy bytes on
                // the device); unfused: nine launches per block and logits read back per byte.
                let rates = [DecodeKernel::Auto, DecodeKernel::Unfused].map(|kernel| {
                    let g = Generator::new(
                        &model,
                        GenerateOptions {
                            max_new: gen_new,
                            ..Default::default()
                        },
                    )
                    .unwrap()
                    .decode_kernel(kernel);
                    let gsecs = time(&client, || {
                        g.generate(&[&prompt], |_, _| {}).unwrap();
                    });
                    gen_new as f64 / gsecs
                });
                // Training ≈ 3 × forward (backward twice the forward's matmuls).
                let f = flops_per_byte(cfg, ctx).total() * 3.0;
                println!(
                    "| {name} | {} | {ctx} | {:.2e} | {secs:.2} | {rate:.0} | {:.1} | {:.1} |",
                    parameters(cfg).total,
                    f,
                    rates[0],
                    rates[1]
                );
            }
        }
    }

    // ---- Scaling with the context ----
    if !run("scaling") {
        return;
    }
    println!("\n### Forward time and device memory against context length ({rt}, f32, batch 1)\n");
    println!("| model | context | forward s | reserved device memory MiB |");
    println!("| --- | ---: | ---: | ---: |");
    let (mb_ctx, tr_ctx): (Vec<usize>, Vec<usize>) = if quick {
        (vec![1024], vec![1024])
    } else {
        (
            vec![1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20],
            vec![1 << 10, 1 << 12, 1 << 14],
        )
    };
    let mut points: Vec<(&str, Vec<(usize, f64)>)> = Vec::new();
    for (name, contexts, make) in [
        (
            "MEGABYTE P=64",
            &mb_ctx,
            (|c| megabyte_cfg(512, 64, (2, 2), 64, c)) as fn(usize) -> Config,
        ),
        (
            "transformer",
            &tr_ctx,
            (|c| transformer_cfg(512, 2, c)) as fn(usize) -> Config,
        ),
    ] {
        let mut curve = Vec::new();
        for &ctx in contexts.iter() {
            let cfg = make(ctx);
            let model = Model::<Rt, f32>::new(&client, &cfg, &Weights::init(&cfg, 4)).unwrap();
            let x = ids(ctx);
            client.memory_cleanup();
            // Warm up (JIT) where a second run is affordable; the largest contexts run once.
            let run = || {
                model.losses(&x, 1).unwrap();
            };
            let secs = if ctx <= 1 << 16 {
                time(&client, run)
            } else {
                time_once(&client, run)
            };
            let mem = client.memory_usage().map(|m| m.bytes_reserved).unwrap_or(0);
            println!(
                "| {name} ({} params) | {ctx} | {secs:.2} | {:.1} |",
                cfg.num_parameters(),
                mib(mem)
            );
            curve.push((ctx, secs));
            drop(model);
        }
        points.push((name, curve));
    }
    if !quick {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/scaling.svg");
        std::fs::write(&path, scaling_svg(&points)).expect("write docs/scaling.svg");
        println!("\nwrote {}", path.display());
    }
}

/// Log-log plot of forward seconds against context bytes, one line per model.
fn scaling_svg(curves: &[(&str, Vec<(usize, f64)>)]) -> String {
    let points: Vec<Vec<(f64, f64)>> = (curves.iter())
        .map(|(_, c)| {
            c.iter()
                .map(|&(bytes, secs)| (bytes as f64, secs))
                .collect()
        })
        .collect();
    let series: Vec<plot::Series> = (curves.iter().zip(&points))
        .map(|((name, _), points)| plot::Series {
            name,
            points,
            dots: true,
        })
        .collect();
    let chart = plot::Chart {
        title: "forward seconds against context bytes",
        x_label: "context (bytes)",
        y_label: "seconds",
        log_x: true,
        log_y: true,
    };
    plot::line_chart_svg(&chart, &series).expect("draw the scaling plot")
}

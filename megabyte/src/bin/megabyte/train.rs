//! `megabyte train`: train a model on a file or a folder, with checkpoints and a loss curve.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use megabyte::eval::evaluate;
use megabyte::ops::cubecl::prelude::*;
use megabyte::{checkpoint, plot};
use megabyte::{Config, Error, Weights};

use crate::{args::*, device::*, device_ok, files::*};

pub(crate) fn train(args: &TrainArgs) -> Result<(), Error> {
    if args.eval_every == 0 {
        return Err(Error::Argument {
            name: "eval_every",
            value: "0".into(),
            reason: "validate every 1 or more steps",
        });
    }
    if !(args.val_fraction.is_finite() && args.val_fraction > 0.0 && args.val_fraction < 1.0) {
        return Err(Error::Argument {
            name: "val_fraction",
            value: format!("{}", args.val_fraction),
            reason: "must be between 0 and 1",
        });
    }
    check_out(&args.out, Some(&args.data), args.force)?;
    let data = megabyte::corpus::read_corpus(&args.data)?;
    if data.is_empty() {
        return Err(Error::Data {
            path: args.data.display().to_string(),
            reason: "no bytes to train on (an empty file, or a folder without files)".into(),
        });
    }
    let resumed = match &args.resume {
        Some(p) => Some(checkpoint::load(p)?),
        None => None,
    };
    let cfg = match &resumed {
        Some(c) => c.config.clone(),
        None => Config::preset(&args.preset).expect("clap checked the preset name"),
    };
    let seq = args.seq.unwrap_or(cfg.context);
    // Before any arithmetic on them: a sequence of whole patches within the context.
    megabyte::reference::model::check_shape(&cfg, args.batch, seq)?;
    if args.val_bytes == 0 {
        return Err(Error::Argument {
            name: "val_bytes",
            value: "0".into(),
            reason: "validate on at least one byte",
        });
    }
    let val_len = ((data.len() as f64 * args.val_fraction) as usize).max(seq);
    if data.len() < val_len + seq {
        return Err(Error::Data {
            path: args.data.display().to_string(),
            reason: format!(
                "{} bytes is too little: need one sequence of {seq} bytes to train on and {val_len} held out",
                data.len()
            ),
        });
    }
    let (train_data, val_data) = data.split_at(data.len() - val_len);
    let val_data = &val_data[..val_data.len().min(args.val_bytes)];
    let mut tc = megabyte::train::TrainConfig::new(&cfg, args.steps);
    tc.lr = args.lr;
    tc.min_lr = args.min_lr;
    tc.warmup = args.warmup.unwrap_or((args.steps / 20).max(1));
    tc.weight_decay = args.weight_decay;
    tc.clip = args.clip;
    tc.batch = args.batch;
    tc.seq = seq;
    tc.seed = args.seed;
    tc.validate()?;
    let save_dtype = args.save_dtype.into();
    eprintln!(
        "data: {} bytes ({} train, {} validation); {} parameters; {} steps of {} x {} bytes",
        data.len(),
        train_data.len(),
        val_data.len(),
        cfg.num_parameters(),
        args.steps,
        args.batch,
        seq
    );
    match backend(args.device)? {
        Backend::Cpu => Err(Error::Usage(
            "training runs on the kernels, not the cpu reference: use --device wgpu (any Vulkan driver, lavapipe included) or cuda".into(),
        )),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(c) => train_on(&c, args, &cfg, resumed, tc, train_data, val_data, save_dtype),
        #[cfg(feature = "cuda")]
        Backend::Cuda(c, _) => train_on(&c, args, &cfg, resumed, tc, train_data, val_data, save_dtype),
        #[cfg(feature = "hip")]
        Backend::Hip(c) => train_on(&c, args, &cfg, resumed, tc, train_data, val_data, save_dtype),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn train_on<R: Runtime>(
    client: &ComputeClient<R>,
    args: &TrainArgs,
    cfg: &Config,
    resumed: Option<checkpoint::Checkpoint>,
    tc: megabyte::train::TrainConfig,
    train_data: &[u8],
    val_data: &[u8],
    save_dtype: checkpoint::StorageDtype,
) -> Result<(), Error> {
    use megabyte::train::Trainer;
    let mut trainer = match &resumed {
        Some(ckpt) => Trainer::resume(client, ckpt, tc)?,
        None => {
            note_size(cfg);
            Trainer::new(client, cfg, &Weights::init(cfg, args.seed), tc)?
        }
    };
    let validate = |t: &Trainer<R>| -> Result<f64, Error> {
        let model = t.model();
        let e = evaluate(
            val_data,
            cfg.context,
            cfg.patch,
            4,
            |ids, b, _| model.losses(ids, b),
            |_| {},
        )?;
        Ok(e.bits_per_byte())
    };
    let start_step = trainer.steps_done();
    let bar = ProgressBar::new(args.steps);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .expect("valid template"),
    );
    bar.set_position(start_step);
    let mut curve: Vec<(u64, f64)> = Vec::new();
    let mut val_curve: Vec<(u64, f64)> = Vec::new();
    let bytes_per_step = (trainer.train.batch * trainer.train.seq) as f64;
    let started = Instant::now();
    let mut last_val = f64::NAN;
    let last = args.stop_after.map_or(args.steps, |s| s.min(args.steps));
    if last <= start_step {
        return Err(Error::Usage(format!(
            "nothing to do: the run is at step {start_step} and would stop at step {last} (raise --steps or --stop-after)"
        )));
    }
    for step in start_step + 1..=last {
        let ids = trainer.batch_for(train_data, step)?;
        let stats = trainer.step(&ids)?;
        curve.push((step, stats.bits_per_byte()));
        let rate = (step - start_step) as f64 * bytes_per_step / started.elapsed().as_secs_f64();
        if step % args.eval_every == 0 || step == last {
            last_val = validate(&trainer)?;
            if !last_val.is_finite() {
                return Err(Error::Diverged {
                    step,
                    what: format!(
                        "validation loss {last_val} bits per byte: these weights were not saved"
                    ),
                });
            }
            val_curve.push((step, last_val));
            // Never replace a good checkpoint with weights computed after a device failure.
            device_ok()?;
            trainer.save(&args.out, save_dtype)?;
            let line = format!(
                "step {step}: train {:.3} bits/byte, validation {last_val:.3} bits/byte, saved {}",
                stats.bits_per_byte(),
                args.out.display()
            );
            // A hidden bar (stderr not a terminal) drops its printlns.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
        bar.set_position(step);
        bar.set_message(format!(
            "loss {:.3} nats ({:.3} bits/byte) lr {:.2e} {:.0} bytes/s val {last_val:.3}",
            stats.loss,
            stats.bits_per_byte(),
            stats.lr,
            rate
        ));
    }
    bar.finish();
    let svg_path = args.out.with_extension("loss.svg");
    let svg = loss_curve_svg(&curve, &val_curve).map_err(|reason| Error::Output {
        path: svg_path.display().to_string(),
        reason: format!("drawing the loss curve: {reason}"),
    })?;
    checkpoint::write_atomic(&svg_path, svg.as_bytes())?;
    eprintln!(
        "wrote {} and {} ({} steps in {:.0} s)",
        args.out.display(),
        svg_path.display(),
        last - start_step,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Training and validation bits per byte against the step, as SVG.
pub(crate) fn loss_curve_svg(train: &[(u64, f64)], val: &[(u64, f64)]) -> Result<String, String> {
    let points = |c: &[(u64, f64)]| c.iter().map(|&(s, v)| (s as f64, v)).collect::<Vec<_>>();
    let (train, val) = (points(train), points(val));
    let chart = plot::Chart {
        title: "bits per byte",
        x_label: "step",
        y_label: "bits per byte",
        log_x: false,
        log_y: false,
    };
    let series = [
        plot::Series {
            name: "training",
            points: &train,
            dots: false,
        },
        plot::Series {
            name: "validation",
            points: &val,
            dots: true,
        },
    ];
    plot::line_chart_svg(&chart, &series)
}

//! `megabyte eval`: bits per byte of a file.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use megabyte::eval::{check_window, evaluate_strided, Evaluation};
use megabyte::ops::cubecl::prelude::*;
use megabyte::ops::FloatElement;
use megabyte::reference::cross_entropy::cross_entropy;
use megabyte::{Error, Model};

use crate::{args::*, device::*, device_ok, files::*};

pub(crate) fn eval(
    args: &ModelArgs,
    file: &PathBuf,
    batch: usize,
    limit: Option<usize>,
    window: Option<usize>,
    stride: Option<usize>,
) -> Result<(), Error> {
    let (cfg, w) = load(
        args.checkpoint.as_ref(),
        args.preset.as_deref(),
        args.init_seed,
    )?;
    let window = window.unwrap_or(cfg.context);
    let stride = stride.unwrap_or(window);
    // Before any device work; `evaluate_strided` checks the same again.
    check_window(window, stride, cfg.patch, cfg.context)?;
    let mut data = if file.as_os_str() == "-" {
        read_prompt(None)?
    } else {
        std::fs::read(file).map_err(|source| Error::Io {
            path: file.display().to_string(),
            source,
        })?
    };
    if let Some(n) = limit {
        data.truncate(n);
    }
    if data.is_empty() {
        return Err(Error::Data {
            path: file.display().to_string(),
            reason: "the file is empty: no byte to evaluate".into(),
        });
    }
    let bar = ProgressBar::new(data.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let progress = |done: usize| bar.set_position(done as u64);
    let backend = backend(args.device)?;
    check_dtype(&backend, args.dtype)?;
    let result = match backend {
        Backend::Cpu => evaluate_strided(
            &data,
            window,
            stride,
            cfg.patch,
            batch,
            |ids, b, t| {
                let logits = megabyte::reference::forward(&cfg, &w, ids, b, t)?;
                let n = b * t;
                let (mut losses, mut lse) = (vec![0f64; n], vec![0f64; n]);
                cross_entropy(&mut losses, &mut lse, &logits, ids, n, cfg.vocab);
                Ok(losses.into_iter().map(|l| l as f32).collect())
            },
            progress,
        )?,
        _ => {
            let job = Eval {
                data: &data,
                window,
                stride,
                batch,
                progress,
            };
            with_model(&backend, args.dtype, &cfg, &w, job)?
        }
    };
    bar.finish_and_clear();
    device_ok()?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.4} bits per byte over {} bytes ({:.0} bytes/s)",
        result.bits_per_byte(),
        result.bytes,
        result.bytes as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Bits per byte on a kernel device.
struct Eval<'a, F> {
    data: &'a [u8],
    window: usize,
    stride: usize,
    batch: usize,
    progress: F,
}

impl<F: FnMut(usize)> WithModel for Eval<'_, F> {
    type Output = Evaluation;

    fn run<R: Runtime, E: FloatElement>(self, model: &Model<R, E>) -> Result<Evaluation, Error> {
        let Eval {
            data,
            window,
            stride,
            batch,
            progress,
        } = self;
        let losses = |ids: &[u32], b: usize, _: usize| model.losses(ids, b);
        evaluate_strided(
            data,
            window,
            stride,
            model.config().patch,
            batch,
            losses,
            progress,
        )
    }
}

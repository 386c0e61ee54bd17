//! `megabyte generate`: continue a prompt, streamed to stdout.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use megabyte::ops::cubecl::prelude::*;
use megabyte::ops::FloatElement;
use megabyte::{Error, GenerateOptions, Generator, Model, ReferenceModel};

use crate::{args::*, device::*, device_ok, PANIC};

/// Most `--samples` of one run: their prompts are copied per sample before the device says
/// how many it can hold.
pub(crate) const MAX_SAMPLES: usize = 65_536;

pub(crate) fn generate(
    args: &ModelArgs,
    prompt: &[u8],
    mut opts: GenerateOptions,
    default_length: bool,
    samples: usize,
) -> Result<(), Error> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if !(1..=MAX_SAMPLES).contains(&samples) {
        return Err(Error::Argument {
            name: "samples",
            value: samples.to_string(),
            reason: "decode between 1 and 65536 samples at once",
        });
    }
    let (cfg, w) = load(
        args.checkpoint.as_ref(),
        args.preset.as_deref(),
        args.init_seed,
    )?;
    if prompt.len() >= cfg.context {
        return Err(megabyte::reference::Error::PromptTooLong {
            prompt: prompt.len(),
            new: if default_length {
                1
            } else {
                opts.max_new.max(1)
            },
            context: cfg.context,
        }
        .into());
    }
    if default_length {
        opts.max_new = 256.min(cfg.context - prompt.len());
    }
    let prompts: Vec<&[u8]> = vec![prompt; samples];
    let start = Instant::now();
    let stdout = std::io::stdout();
    let stream = samples == 1;
    let mut emit = |_: usize, byte: u8| {
        // Nothing more reaches stdout once a device thread failed.
        if stream && PANIC.get().is_none() {
            let mut out = stdout.lock();
            // A closed pipe (`| head`) ends the output; generation itself is not an error.
            let _ = out.write_all(&[byte]).and_then(|_| out.flush());
        }
    };
    let backend = backend(args.device)?;
    check_dtype(&backend, args.dtype)?;
    let outputs = match backend {
        Backend::Cpu => {
            let model = ReferenceModel::new(&cfg, &w)?;
            Generator::new(&model, opts)?.generate(&prompts, &mut emit)?
        }
        _ => {
            let job = Generate {
                prompts: &prompts,
                opts,
                emit: &mut emit,
            };
            with_model(&backend, args.dtype, &cfg, &w, job)?
        }
    };
    device_ok()?;
    let elapsed = start.elapsed().as_secs_f64();
    let n: usize = outputs.iter().map(Vec::len).sum();
    if !stream {
        let mut out = stdout.lock();
        for (i, o) in outputs.iter().enumerate() {
            let _ = writeln!(out, "--- sample {i} ---");
            let _ = out.write_all(o);
            let _ = writeln!(out);
        }
    } else if std::io::stdout().is_terminal() {
        println!();
    }
    eprintln!(
        "{n} bytes in {elapsed:.2} s ({:.1} bytes/s)",
        n as f64 / elapsed.max(1e-9)
    );
    Ok(())
}

/// Cached generation on a kernel device.
struct Generate<'a, F> {
    prompts: &'a [&'a [u8]],
    opts: GenerateOptions,
    emit: &'a mut F,
}

impl<F: FnMut(usize, u8)> WithModel for Generate<'_, F> {
    type Output = Vec<Vec<u8>>;

    fn run<R: Runtime, E: FloatElement>(self, model: &Model<R, E>) -> Result<Self::Output, Error> {
        Generator::new(model, self.opts)?.generate(self.prompts, self.emit)
    }
}

//! `megabyte`: train, generate with, evaluate, export and describe MEGABYTE byte-level models.
//!
//! ```text
//! megabyte train --data src/ --preset small --steps 1000 --out model.safetensors
//! megabyte export --checkpoint model.safetensors --out weights.safetensors
//! megabyte generate --checkpoint model.safetensors "fn main() {"
//! echo "prompt" | megabyte generate --checkpoint model.safetensors --max-new 200
//! megabyte eval --checkpoint model.safetensors some_file.txt
//! megabyte info --preset paper-text --context 8192
//! ```

mod args;
mod device;
mod eval;
mod export;
mod files;
mod generate;
mod info;
mod train;

use std::path::Path;
use std::sync::OnceLock;

use clap::Parser;
use megabyte::{Error, GenerateOptions, Sampling};

use crate::{args::*, eval::*, export::*, files::*, generate::*, info::*, train::*};

/// The first panic of any thread. The device runtimes run work on threads of their own and
/// only log a task that panics there (an allocation the device refused, say); what they compute
/// after it cannot be trusted, so the program reports no result once one happened.
static PANIC: OnceLock<String> = OnceLock::new();

/// An error once any thread has panicked (see [`PANIC`]).
fn device_ok() -> Result<(), Error> {
    match PANIC.get() {
        Some(msg) => Err(Error::DeviceFailed(msg.clone())),
        None => Ok(()),
    }
}

/// The Vulkan loader prints "error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment." twice at every start where that variable does not name a directory, which
/// reads as a failure. Before any device is touched (and before any thread exists), point it at
/// a private directory of this user's when it is unset or invalid.
fn ensure_runtime_dir() {
    let valid = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir());
    if valid {
        return;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let dir = std::env::temp_dir().join(format!("megabyte-runtime-{user}"));
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    let dir = match builder.create(&dir) {
        Ok(()) => dir,
        Err(_) if dir.is_dir() => dir,
        Err(_) => std::env::temp_dir(),
    };
    std::env::set_var("XDG_RUNTIME_DIR", dir);
}

fn main() {
    ensure_runtime_dir();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        let _ = PANIC.set(format!(
            "thread `{thread}` panicked: {}",
            msg.lines().next().unwrap_or("")
        ));
        default_hook(info);
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate {
            prompt,
            model,
            max_new,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            samples,
        } => {
            let sampling = Sampling {
                temperature,
                top_k,
                top_p,
                seed,
            };
            let stop = stop
                .iter()
                .map(|s| s.replace("\\n", "\n").into_bytes())
                .collect();
            let opts = GenerateOptions {
                max_new: max_new.unwrap_or(0),
                sampling,
                stop,
            };
            read_prompt(prompt).and_then(|p| generate(&model, &p, opts, max_new.is_none(), samples))
        }
        Command::Eval {
            file,
            model,
            batch,
            limit,
            window,
            stride,
        } => eval(&model, &file, batch, limit, window, stride),
        Command::Train(args) => train(&args),
        Command::Export {
            checkpoint,
            out,
            save_dtype,
            force,
        } => export(&checkpoint, &out, save_dtype, force),
        Command::Info {
            checkpoint,
            preset,
            context,
            device,
        } => info(checkpoint, preset, context, device),
    };
    if let Err(e) = result.and_then(|()| device_ok()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

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

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use megabyte::eval::{check_window, evaluate, evaluate_strided, Evaluation};
use megabyte::info::{flops_per_byte, memory, parameters};
use megabyte::ops::cubecl::prelude::*;
use megabyte::ops::{try_client, FloatElement};
use megabyte::reference::cross_entropy::cross_entropy;
use megabyte::{checkpoint, plot};
use megabyte::{Config, Error, GenerateOptions, Generator, Model, Sampling, Weights, PRESET_NAMES};

#[derive(Parser)]
#[command(
    name = "megabyte",
    version,
    about = "MEGABYTE byte-level language models: train, generate, evaluate, export, inspect"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// CUDA if built in and a GPU answers, else wgpu if a Vulkan/Metal/DX12 adapter answers, else cpu.
    Auto,
    Wgpu,
    Cuda,
    /// The pure-Rust reference implementation: no GPU or driver needed (no KV cache; slow).
    Cpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
}

impl From<DtypeArg> for checkpoint::StorageDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => checkpoint::StorageDtype::F32,
            DtypeArg::F16 => checkpoint::StorageDtype::F16,
        }
    }
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A checkpoint written by `megabyte train` or `megabyte::checkpoint::save`.
    #[arg(long, conflicts_with = "preset")]
    checkpoint: Option<PathBuf>,
    /// Untrained weights for a built-in configuration (for speed and plumbing checks).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESET_NAMES))]
    preset: Option<String>,
    /// Seed of the untrained weights of `--preset`.
    #[arg(long, default_value_t = 0)]
    init_seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Element type of the weights and activations on the device (f32 accumulation either way).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt (from the argument, or stdin when absent or `-`), streamed to stdout.
    Generate {
        prompt: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        /// Most new bytes (default: up to 256, as many as the context leaves after the prompt).
        #[arg(long)]
        max_new: Option<usize>,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Keep only the k most likely bytes (0: off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling: the smallest set of bytes reaching this probability (1: off).
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop after this text appears (repeatable; `\n` is a newline).
        #[arg(long)]
        stop: Vec<String>,
        /// Independent samples of the prompt, decoded as one batch (seeds seed, seed + 1, ...).
        #[arg(long, default_value_t = 1)]
        samples: usize,
    },
    /// Bits per byte of a file (or stdin with `-`).
    Eval {
        file: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// Context windows per forward pass.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Evaluate at most this many bytes of the file.
        #[arg(long)]
        limit: Option<usize>,
        /// Window length in bytes, a multiple of the patch size up to the context length
        /// (default: the context length). A model trained on shorter sequences than its context
        /// has never seen the positions past them.
        #[arg(long)]
        window: Option<usize>,
        /// Start a window every this many bytes, scoring only the bytes past the previous
        /// window, so each byte after the first window has at least window - stride bytes
        /// before it. Default: the window length (consecutive windows).
        #[arg(long)]
        stride: Option<usize>,
    },
    /// Train a model on a file or a directory of files (read recursively, in path order).
    Train(TrainArgs),
    /// Writes a checkpoint's weights alone (no optimiser state), e.g. to ship a trained model.
    Export {
        /// A checkpoint written by `megabyte train`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The weights-only file to write.
        #[arg(long)]
        out: PathBuf,
        /// Storage type of the written weights.
        #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
        save_dtype: DtypeArg,
        /// Write over an existing file at --out that is not a checkpoint.
        #[arg(long)]
        force: bool,
    },
    /// Parameters, FLOPs per byte and a memory estimate of a configuration.
    Info {
        #[arg(long, conflicts_with = "preset")]
        checkpoint: Option<PathBuf>,
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESET_NAMES))]
        preset: Option<String>,
        /// Context length for the FLOP and memory figures (default: the config's).
        #[arg(long)]
        context: Option<usize>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Training text: a file, or a directory whose files are concatenated in path order.
    #[arg(long)]
    data: PathBuf,
    /// Configuration of a new model (ignored with --resume).
    #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(PRESET_NAMES))]
    preset: String,
    /// Continue from a checkpoint written by `train` (weights and optimiser state).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Total optimisation steps (a resumed run continues up to this count).
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Stop after this step, with a checkpoint, keeping the schedule of `--steps`; continue later
    /// with `--resume`.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Bytes per sequence (default: the context; a multiple of the patch size).
    #[arg(long)]
    seq: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Final learning rate of the cosine decay.
    #[arg(long, default_value_t = 3e-4)]
    min_lr: f32,
    /// Warmup steps (default: 5% of the steps).
    #[arg(long)]
    warmup: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Seed of the initial weights and of the batch sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of the data (its end) held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Validate (and save) every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Validation bytes per evaluation (from the start of the held-out part).
    #[arg(long, default_value_t = 65_536)]
    val_bytes: usize,
    /// Where to write the checkpoint; the loss curve goes next to it as `<out>.loss.svg`.
    #[arg(long)]
    out: PathBuf,
    /// Write --out even where it would replace a file that is not a checkpoint, the training
    /// data itself, or a file inside the --data folder.
    #[arg(long)]
    force: bool,
    /// Storage type of the saved weights (optimiser state is always f32).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    save_dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// The first panic of any thread. The device runtimes run work on threads of their own and
/// only log a task that panics there (an allocation the device refused, say); what they compute
/// after it cannot be trusted, so the program reports no result once one happened.
static PANIC: OnceLock<String> = OnceLock::new();

/// Most `--samples` of one run: their prompts are copied per sample before the device says
/// how many it can hold.
const MAX_SAMPLES: usize = 65_536;

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
        } => info(checkpoint, preset, context),
    };
    if let Err(e) = result.and_then(|()| device_ok()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// `path` made absolute with every link resolved; a path that does not exist yet resolves its
/// folder (which must exist) and keeps its file name.
fn resolved(path: &Path, what: &str) -> Result<PathBuf, Error> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Ok(p);
    }
    let name = path.file_name().ok_or_else(|| Error::Output {
        path: path.display().to_string(),
        reason: format!("{what} names a folder, not a file"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::Output {
        path: path.display().to_string(),
        reason: format!("its folder {} cannot be used: {e}", dir.display()),
    })?;
    Ok(dir.join(name))
}

/// Refuses an output path that would destroy what the run did not make, unless `force`: the
/// training data itself, any file inside the data folder (the next run would train on its own
/// checkpoint), an existing file that is not a checkpoint. Then proves the folder writable
/// (a file is created there and removed), so a run does not train for hours only to fail at
/// its first save. Paths are compared resolved, so `./a`, `a` and links to it are one file.
fn check_out(out: &Path, data: Option<&Path>, force: bool) -> Result<PathBuf, Error> {
    let refuse = |reason: String| {
        Err(Error::Output {
            path: out.display().to_string(),
            reason: format!("{reason}; give --force to write it anyway"),
        })
    };
    let target = resolved(out, "--out")?;
    if target.is_dir() {
        return Err(Error::Output {
            path: out.display().to_string(),
            reason: "is a folder; name the checkpoint file to write".into(),
        });
    }
    if let Some(data) = data {
        let data = std::fs::canonicalize(data).map_err(|source| Error::Io {
            path: data.display().to_string(),
            source,
        })?;
        if !force && target == data {
            return refuse("is the training data".into());
        }
        if !force && data.is_dir() && target.starts_with(&data) {
            return refuse(format!(
                "is inside the --data folder {}, so a later run would train on it",
                data.display()
            ));
        }
    }
    if !force && target.is_file() && !checkpoint::is_checkpoint(&target)? {
        return refuse("exists and is not a megabyte checkpoint".into());
    }
    let dir = target.parent().unwrap_or(Path::new("/"));
    let probe = dir.join(format!(".megabyte-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| Error::Output {
            path: out.display().to_string(),
            reason: format!("its folder {} is not writable: {e}", dir.display()),
        })?;
    Ok(target)
}

fn export(from: &Path, out: &Path, dtype: DtypeArg, force: bool) -> Result<(), Error> {
    let source = std::fs::canonicalize(from).map_err(|source| Error::Io {
        path: from.display().to_string(),
        source,
    })?;
    if resolved(out, "--out")? == source {
        return Err(Error::Output {
            path: out.display().to_string(),
            reason: "is the input checkpoint; write the weights to another file".into(),
        });
    }
    check_out(out, None, force)?;
    let ckpt = checkpoint::load(from)?;
    checkpoint::save(out, &ckpt.config, &ckpt.weights, dtype.into())?;
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({} parameters, {size} bytes; dropped {} optimiser tensors)",
        out.display(),
        ckpt.config.num_parameters(),
        ckpt.optimizer.len()
    );
    Ok(())
}

fn read_prompt(arg: Option<String>) -> Result<Vec<u8>, Error> {
    match arg.as_deref() {
        Some("-") | None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|source| Error::Io {
                    path: "stdin".into(),
                    source,
                })?;
            Ok(buf)
        }
        Some(p) => Ok(p.as_bytes().to_vec()),
    }
}

/// The config and weights named by the arguments.
fn load(
    checkpoint: Option<&PathBuf>,
    preset: Option<&str>,
    seed: u64,
) -> Result<(Config, Weights), Error> {
    match (checkpoint, preset) {
        (Some(path), _) => {
            let ckpt = checkpoint::load(path)?;
            Ok((ckpt.config, ckpt.weights))
        }
        (None, Some(name)) => {
            let cfg = Config::preset(name).expect("clap checked the preset name");
            eprintln!("note: preset `{name}` with untrained weights (seed {seed})");
            note_size(&cfg);
            let w = Weights::init(&cfg, seed);
            Ok((cfg, w))
        }
        (None, None) => Err(Error::Usage(
            "no model: give --checkpoint FILE or --preset NAME".into(),
        )),
    }
}

/// Says how much memory a model's weights take before they are made, when that is a lot (the
/// paper presets' run to gigabytes).
fn note_size(cfg: &Config) {
    let params = cfg.num_parameters();
    let gib = (params * 4) as f64 / (1u64 << 30) as f64;
    if gib >= 0.5 {
        eprintln!(
            "note: {params} parameters: {gib:.1} GiB of f32 weights in host memory, and as much again on the device (half in f16)"
        );
    }
}

/// Refuses `--dtype f16` where it cannot apply: the cpu reference computes in f32 only.
fn check_dtype(backend: &Backend, dtype: DtypeArg) -> Result<(), Error> {
    if matches!(backend, Backend::Cpu) && dtype != DtypeArg::F32 {
        return Err(Error::Usage(
            "--dtype f16 needs a kernel device (--device wgpu or cuda): the cpu reference computes in f32 only".into(),
        ));
    }
    Ok(())
}

/// The backend a command runs on, resolved from `--device`.
enum Backend {
    Cpu,
    #[cfg(feature = "wgpu")]
    Wgpu(ComputeClient<megabyte::ops::cubecl::wgpu::WgpuRuntime>),
    #[cfg(feature = "cuda")]
    Cuda(ComputeClient<megabyte::ops::cubecl::cuda::CudaRuntime>),
}

#[cfg(not(all(feature = "cuda", feature = "wgpu")))]
fn not_built(name: &str) -> Error {
    Error::Usage(format!(
        "--device {name}: this build of megabyte has no `{name}` backend; rebuild with `--features {name}`"
    ))
}

fn backend(arg: DeviceArg) -> Result<Backend, Error> {
    let chosen = match arg {
        DeviceArg::Cpu => Backend::Cpu,
        DeviceArg::Cuda => {
            #[cfg(feature = "cuda")]
            {
                Backend::Cuda(try_client(&Default::default())?)
            }
            #[cfg(not(feature = "cuda"))]
            return Err(not_built("cuda"));
        }
        DeviceArg::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                Backend::Wgpu(try_client(&Default::default())?)
            }
            #[cfg(not(feature = "wgpu"))]
            return Err(not_built("wgpu"));
        }
        DeviceArg::Auto => auto_backend(),
    };
    let name = match &chosen {
        Backend::Cpu => "cpu (pure-Rust reference)".to_string(),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(c) => format!("wgpu ({})", adapter_name(c)),
        #[cfg(feature = "cuda")]
        Backend::Cuda(_) => "cuda".to_string(),
    };
    eprintln!("device: {name}");
    Ok(chosen)
}

#[cfg(feature = "wgpu")]
fn adapter_name<R: Runtime>(client: &ComputeClient<R>) -> String {
    let hw = &client.properties().hardware;
    format!(
        "{} units per cube, {} KiB shared memory",
        hw.max_units_per_cube,
        hw.max_shared_memory_size / 1024
    )
}

/// Quietly tries the runtimes from fastest to slowest; the runtimes print their own panic
/// message when no adapter answers, which the hook silences here.
fn auto_backend() -> Backend {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut found = None;
    #[cfg(feature = "cuda")]
    if found.is_none() {
        found = try_client(&Default::default()).ok().map(Backend::Cuda);
    }
    #[cfg(feature = "wgpu")]
    if found.is_none() {
        found = try_client(&Default::default()).ok().map(Backend::Wgpu);
    }
    std::panic::set_hook(hook);
    found.unwrap_or(Backend::Cpu)
}

fn generate(
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
            opts.sampling.validate()?;
            let mut outs = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let s = Sampling {
                    seed: opts.sampling.seed.wrapping_add(i as u64),
                    ..opts.sampling.clone()
                };
                let out = megabyte::reference::generate(&cfg, &w, p, opts.max_new, &s)?;
                // The reference generator has no stop sequences; cut at the first one here.
                let cut = first_stop(&out, &opts.stop);
                out[..cut].iter().for_each(|&b| emit(i, b));
                outs.push(out[..cut].to_vec());
            }
            outs
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(c) => device_generate(&c, args.dtype, &cfg, &w, &prompts, opts, &mut emit)?,
        #[cfg(feature = "cuda")]
        Backend::Cuda(c) => device_generate(&c, args.dtype, &cfg, &w, &prompts, opts, &mut emit)?,
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

/// Length of `out` up to and including the first stop sequence.
fn first_stop(out: &[u8], stop: &[Vec<u8>]) -> usize {
    (1..=out.len())
        .find(|&n| stop.iter().any(|s| !s.is_empty() && out[..n].ends_with(s)))
        .unwrap_or(out.len())
}

fn device_generate<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: DtypeArg,
    cfg: &Config,
    w: &Weights,
    prompts: &[&[u8]],
    opts: GenerateOptions,
    emit: &mut impl FnMut(usize, u8),
) -> Result<Vec<Vec<u8>>, Error> {
    fn run<R: Runtime, E: FloatElement>(
        client: &ComputeClient<R>,
        cfg: &Config,
        w: &Weights,
        prompts: &[&[u8]],
        opts: GenerateOptions,
        emit: &mut impl FnMut(usize, u8),
    ) -> Result<Vec<Vec<u8>>, Error> {
        let model = Model::<R, E>::new(client, cfg, w)?;
        Generator::new(&model, opts)?.generate(prompts, emit)
    }
    match dtype {
        DtypeArg::F32 => run::<R, f32>(client, cfg, w, prompts, opts, emit),
        DtypeArg::F16 => run::<R, half::f16>(client, cfg, w, prompts, opts, emit),
    }
}

fn eval(
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
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(c) => device_eval(
            &c, args.dtype, &cfg, &w, &data, window, stride, batch, progress,
        )?,
        #[cfg(feature = "cuda")]
        Backend::Cuda(c) => device_eval(
            &c, args.dtype, &cfg, &w, &data, window, stride, batch, progress,
        )?,
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

#[allow(clippy::too_many_arguments)]
fn device_eval<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: DtypeArg,
    cfg: &Config,
    w: &Weights,
    data: &[u8],
    window: usize,
    stride: usize,
    batch: usize,
    progress: impl FnMut(usize),
) -> Result<Evaluation, Error> {
    #[allow(clippy::too_many_arguments)]
    fn run<R: Runtime, E: FloatElement>(
        client: &ComputeClient<R>,
        cfg: &Config,
        w: &Weights,
        data: &[u8],
        window: usize,
        stride: usize,
        batch: usize,
        progress: impl FnMut(usize),
    ) -> Result<Evaluation, Error> {
        let model = Model::<R, E>::new(client, cfg, w)?;
        evaluate_strided(
            data,
            window,
            stride,
            cfg.patch,
            batch,
            |ids, b, _| model.losses(ids, b),
            progress,
        )
    }
    match dtype {
        DtypeArg::F32 => run::<R, f32>(client, cfg, w, data, window, stride, batch, progress),
        DtypeArg::F16 => run::<R, half::f16>(client, cfg, w, data, window, stride, batch, progress),
    }
}

fn info(
    checkpoint: Option<PathBuf>,
    preset: Option<String>,
    context: Option<usize>,
) -> Result<(), Error> {
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

/// Every regular file under `path` (or `path` itself), concatenated in path order.
fn read_corpus(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    let io = |source, p: &std::path::Path| Error::Io {
        path: p.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| io(e, path))?;
    if meta.is_file() {
        return std::fs::read(path).map_err(|e| io(e, path));
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(e, &dir))? {
            let p = entry.map_err(|e| io(e, &dir))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut data = Vec::new();
    for f in files {
        data.extend(std::fs::read(&f).map_err(|e| io(e, &f))?);
    }
    Ok(data)
}

fn train(args: &TrainArgs) -> Result<(), Error> {
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
    let data = read_corpus(&args.data)?;
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
        Backend::Cuda(c) => train_on(&c, args, &cfg, resumed, tc, train_data, val_data, save_dtype),
    }
}

#[allow(clippy::too_many_arguments)]
fn train_on<R: Runtime>(
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
fn loss_curve_svg(train: &[(u64, f64)], val: &[(u64, f64)]) -> Result<String, String> {
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

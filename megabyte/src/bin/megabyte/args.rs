//! The command line: subcommands and their options.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use megabyte::checkpoint;
use megabyte::PRESET_NAMES;

#[derive(Parser)]
#[command(
    name = "megabyte",
    version,
    about = "MEGABYTE byte-level language models: train, generate, evaluate, export, inspect"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeviceArg {
    /// CUDA if built in and a GPU answers, else HIP (ROCm) likewise, else wgpu if a
    /// Vulkan/Metal/DX12 adapter answers, else cpu.
    Auto,
    Wgpu,
    Cuda,
    /// ROCm through HIP (builds with `--features hip`).
    Hip,
    /// The pure-Rust reference implementation: no GPU or driver needed (no KV cache; slow).
    Cpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DtypeArg {
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
pub(crate) struct ModelArgs {
    /// A checkpoint written by `megabyte train` or `megabyte::checkpoint::save`.
    #[arg(long, conflicts_with = "preset")]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Untrained weights for a built-in configuration (for speed and plumbing checks).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESET_NAMES))]
    pub(crate) preset: Option<String>,
    /// Seed of the untrained weights of `--preset`.
    #[arg(long, default_value_t = 0)]
    pub(crate) init_seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub(crate) device: DeviceArg,
    /// Element type of the weights and activations on the device (f32 accumulation either way).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub(crate) dtype: DtypeArg,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Also say what this device is (for cuda, every device the driver reports: name,
        /// compute capability, memory), or in one line why it cannot be used (exit 1).
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
    },
}

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Training text: a file, or a directory whose files are concatenated in path order.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Configuration of a new model (ignored with --resume).
    #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(PRESET_NAMES))]
    pub(crate) preset: String,
    /// Continue from a checkpoint written by `train` (weights and optimiser state).
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    /// Total optimisation steps (a resumed run continues up to this count).
    #[arg(long, default_value_t = 300)]
    pub(crate) steps: u64,
    /// Stop after this step, with a checkpoint, keeping the schedule of `--steps`; continue later
    /// with `--resume`.
    #[arg(long)]
    pub(crate) stop_after: Option<u64>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub(crate) batch: usize,
    /// Bytes per sequence (default: the context; a multiple of the patch size).
    #[arg(long)]
    pub(crate) seq: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub(crate) lr: f32,
    /// Final learning rate of the cosine decay.
    #[arg(long, default_value_t = 3e-4)]
    pub(crate) min_lr: f32,
    /// Warmup steps (default: 5% of the steps).
    #[arg(long)]
    pub(crate) warmup: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    pub(crate) weight_decay: f32,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) clip: f32,
    /// Seed of the initial weights and of the batch sampler.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Fraction of the data (its end) held out for validation.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) val_fraction: f64,
    /// Validate (and save) every this many steps.
    #[arg(long, default_value_t = 100)]
    pub(crate) eval_every: u64,
    /// Validation bytes per evaluation (from the start of the held-out part).
    #[arg(long, default_value_t = 65_536)]
    pub(crate) val_bytes: usize,
    /// Where to write the checkpoint; the loss curve goes next to it as `<out>.loss.svg`.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Write --out even where it would replace a file that is not a checkpoint, the training
    /// data itself, or a file inside the --data folder.
    #[arg(long)]
    pub(crate) force: bool,
    /// Storage type of the saved weights (optimiser state is always f32).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub(crate) save_dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub(crate) device: DeviceArg,
}

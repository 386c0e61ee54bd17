//! Running the program and reading what it printed; the checkpoints and corpora the tests feed
//! it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use megabyte::checkpoint::{self, StorageDtype};
use megabyte::{Config, Weights};

/// Runs `megabyte args…` to completion.
pub fn megabyte(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run the megabyte binary")
}

/// Runs `megabyte <command> --checkpoint <checkpoint> --device <device> <rest…>`: a command on
/// a saved model, its own flags and operands in `rest`.
pub fn on_checkpoint(
    command: &str,
    checkpoint: impl AsRef<Path>,
    device: &str,
    rest: &[&str],
) -> Output {
    let mut args = vec![
        command,
        "--checkpoint",
        arg(&checkpoint),
        "--device",
        device,
    ];
    args.extend(rest);
    megabyte(&args)
}

/// `megabyte generate --checkpoint <checkpoint> --device cpu <rest…>`.
pub fn generate_cpu(checkpoint: impl AsRef<Path>, rest: &[&str]) -> Output {
    on_checkpoint("generate", checkpoint, "cpu", rest)
}

/// `megabyte eval --checkpoint <checkpoint> --device cpu <rest…>`.
pub fn eval_cpu(checkpoint: impl AsRef<Path>, rest: &[&str]) -> Output {
    on_checkpoint("eval", checkpoint, "cpu", rest)
}

/// Runs `megabyte train --data <data> --out <out> <flags…>`.
pub fn train(data: impl AsRef<Path>, out: impl AsRef<Path>, flags: &[&str]) -> Output {
    let mut args = vec!["train", "--data", arg(&data), "--out", arg(&out)];
    args.extend(flags);
    megabyte(&args)
}

/// The words of `line`, split at white space: a run of flags written as on a command line.
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// `path` as a command-line argument.
pub fn arg<P: AsRef<Path> + ?Sized>(path: &P) -> &str {
    path.as_ref().to_str().unwrap()
}

/// Fails unless the program's output `bytes` contain `want`, printing them.
pub fn assert_has(bytes: &[u8], want: &str) {
    let t = text(bytes);
    assert!(t.contains(want), "expected {want:?} in:\n{t}");
}

/// A training corpus of `lines` lines of Rust, written to a temporary file.
pub fn code_corpus(name: &str, lines: usize) -> PathBuf {
    let path = temp(name);
    std::fs::write(
        &path,
        "fn add(a: u32, b: u32) -> u32 { a + b }\n".repeat(lines),
    )
    .unwrap();
    path
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A file in the target dir's temporary area, unique per test.
pub fn temp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(name)
}

/// The model the repository ships, `models/small-pydoc.safetensors`.
pub fn shipped_model() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("models/small-pydoc.safetensors")
}

/// The bits per byte `eval` printed first on stdout.
pub fn bits_per_byte(out: &Output) -> f64 {
    let stdout = text(&out.stdout);
    stdout
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no bits per byte in: {stdout}"))
}

/// The order-0 entropy of `bytes` in bits per byte: what a model that knows only how often
/// each byte value occurs needs.
pub fn order0_entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0usize; 256];
    bytes.iter().for_each(|&b| counts[b as usize] += 1);
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| -(c as f64 / n) * (c as f64 / n).log2())
        .sum()
}

/// A tiny checkpoint with seeded random weights.
pub fn tiny_checkpoint(name: &str) -> (PathBuf, Config, Weights) {
    let cfg = Config::tiny();
    let w = Weights::random(&cfg, 77);
    let path = temp(name);
    checkpoint::save(&path, &cfg, &w, StorageDtype::F32).unwrap();
    (path, cfg, w)
}

/// Checkpoint bytes written straight through safetensors, without `checkpoint::to_bytes`'s
/// refusal of non-finite values: how a corrupt or foreign file looks.
pub fn unchecked_checkpoint(
    cfg: &Config,
    w: &Weights,
    extra: &[(String, Vec<usize>, Vec<f32>)],
) -> Vec<u8> {
    unchecked_checkpoint_with(cfg, w, extra, checkpoint::config_metadata(cfg))
}

/// [`unchecked_checkpoint`] with `meta` as the file's metadata (a config that may not match
/// the tensors, or values that are not a config at all).
pub fn unchecked_checkpoint_with(
    cfg: &Config,
    w: &Weights,
    extra: &[(String, Vec<usize>, Vec<f32>)],
    meta: HashMap<String, String>,
) -> Vec<u8> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = cfg
        .tensor_specs()
        .into_iter()
        .zip(w.tensors())
        .map(|((name, shape), data)| (name, shape, checkpoint::encode(data, StorageDtype::F32)))
        .collect();
    for (name, shape, data) in extra {
        tensors.push((
            name.clone(),
            shape.clone(),
            checkpoint::encode(data, StorageDtype::F32),
        ));
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, &Some(meta)).unwrap()
}

/// Asserts a failed run: exit code 1 and exactly one line on stderr starting with `error:`
/// and containing `what`, no panic.
pub fn assert_one_line_error(out: &Output, what: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "stderr: {err}");
    assert!(lines[0].contains(what), "expected `{what}` in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Skips a wgpu test on a machine without a Vulkan adapter (never in CI, which installs one).
pub fn no_adapter(out: &Output) -> bool {
    let skip = !out.status.success() && !in_ci() && text(&out.stderr).contains("no compute device");
    if skip {
        eprintln!("SKIPPED: no wgpu adapter; install mesa-vulkan-drivers");
    }
    skip
}

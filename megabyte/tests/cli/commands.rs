//! What `info`, `generate` and `eval` print, and the `cpu` and `wgpu` devices agreeing.

use std::process::Command;

use megabyte::{Config, Sampling};

use crate::common::*;

#[test]
fn info_reports_the_parameter_count() {
    let out = megabyte(&["info", "--preset", "small"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let n = Config::small().num_parameters();
    assert_has(&out.stdout, &format!("parameters: {n} total"));
}

/// `info --device cuda` lists the CUDA devices where there are some; elsewhere (no driver, no
/// device, or a build without `cuda`) it says why in one line and exits 1.
#[test]
fn info_names_the_cuda_devices_or_says_why_not_in_one_line() {
    let out = megabyte(&["info", "--device", "cuda"]);
    if out.status.success() {
        assert_has(&out.stdout, "device: cuda:0 ");
    } else {
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains("cuda"), "{err}");
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    }
}

#[test]
fn cpu_generation_is_the_reference_generator() {
    let (path, cfg, w) = tiny_checkpoint("cli_gen.safetensors");
    let want = megabyte::reference::generate(&cfg, &w, b"Hello", 20, &Sampling::greedy()).unwrap();
    let out = generate_cpu(&path, &["--temperature", "0", "--max-new", "20", "Hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, want);
    assert_has(&out.stderr, "device: cpu");
}

/// Started without `XDG_RUNTIME_DIR` (a fresh Debian login), generation prints nothing on
/// stderr but the device line and the closing rate: the Vulkan loader's complaint about the
/// variable, twice per start, read as a failure.
#[test]
fn generation_starts_quietly_without_a_runtime_dir() {
    let (path, _, _) = tiny_checkpoint("cli_quiet.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args(["generate", "--checkpoint", arg(&path), "--device", "wgpu"])
        .args(["--temperature", "0", "--max-new", "4", "hi"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run the megabyte binary");
    if no_adapter(&out) {
        return;
    }
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "stderr: {stderr}");
    assert!(lines[0].starts_with("device: wgpu"), "stderr: {stderr}");
    assert!(lines[1].starts_with("4 bytes in "), "stderr: {stderr}");
}

#[test]
fn wgpu_and_cpu_agree() {
    let (path, _, _) = tiny_checkpoint("cli_agree.safetensors");
    let data = temp("cli_agree.txt");
    std::fs::write(
        &data,
        "The quick brown fox jumps over the lazy dog. ".repeat(5),
    )
    .unwrap();
    let d = arg(&data);
    let gen = ["--temperature", "0", "--max-new", "30", "MEGABYTE"];
    let cpu = on_checkpoint("generate", &path, "cpu", &gen);
    let gpu = on_checkpoint("generate", &path, "wgpu", &gen);
    if no_adapter(&gpu) {
        return;
    }
    assert!(gpu.status.success(), "{}", text(&gpu.stderr));
    assert_eq!(
        gpu.stdout, cpu.stdout,
        "greedy bytes differ between wgpu and cpu"
    );
    // Whole windows, then overlapping ones: every byte still scored once, the same on both
    // devices.
    for eval in [&[d][..], &["--window", "32", "--stride", "12", d]] {
        let cpu = on_checkpoint("eval", &path, "cpu", eval);
        let gpu = on_checkpoint("eval", &path, "wgpu", eval);
        assert!(
            cpu.status.success() && gpu.status.success(),
            "{eval:?}: {}{}",
            text(&cpu.stderr),
            text(&gpu.stderr)
        );
        let (a, b) = (bits_per_byte(&cpu), bits_per_byte(&gpu));
        assert!(
            (a - b).abs() < 1e-3,
            "{eval:?}: bits per byte: cpu {a}, wgpu {b}"
        );
        assert_has(&gpu.stdout, "over 225 bytes");
    }
}

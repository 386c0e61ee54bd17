//! Fault injection: a training run killed (SIGKILL, no chance to clean up) while it saves its
//! checkpoint, again and again at random moments, never leaves a checkpoint that does not load.
//! Each round resumes from the checkpoint the last one left, saves after every step, and is
//! killed when its temporary file appears (the save is under way) plus a random delay of up to
//! a few milliseconds, or at a random moment. After every kill the checkpoint must load whole,
//! with a step count that never goes back; at the end a run resumes from it and finishes.
//!
//! Seeded (printed; `MEGABYTE_FAULT_SEED` sets it). Needs a wgpu adapter (lavapipe in CI).

mod common;
use common::env_or;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use megabyte::checkpoint;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn train(data: &Path, out: &Path, steps: u64) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_megabyte"));
    cmd.args(["train", "--data"])
        .arg(data)
        .args(["--preset", "tiny", "--batch", "1", "--seq", "32"])
        .args(["--val-bytes", "64", "--eval-every", "1", "--device", "wgpu"])
        .args(["--steps", &steps.to_string(), "--out"])
        .arg(out)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if out.exists() {
        cmd.arg("--resume").arg(out);
    }
    cmd
}

/// The temporary file of a save in progress beside `out` (`write_atomic` names it
/// `.<name>.tmp-<pid>`).
fn temporary(dir: &Path, name: &str, pid: u32) -> bool {
    dir.join(format!(".{name}.tmp-{pid}")).exists()
}

/// The length and modification time of `path`, if it exists.
fn state(path: &Path) -> Option<(u64, Option<std::time::SystemTime>)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

fn step_of(ckpt: &checkpoint::Checkpoint) -> f32 {
    ckpt.optimizer
        .iter()
        .find(|(n, _, _)| n == "optimizer.step")
        .map(|(_, _, v)| v[0])
        .expect("a training checkpoint has optimizer.step")
}

#[test]
// A child that exits by itself was reaped by `try_wait` before the early return.
#[allow(clippy::zombie_processes)]
fn killing_training_while_it_saves_never_loses_the_checkpoint() {
    let seed: u64 = env_or("MEGABYTE_FAULT_SEED", 0x6b69_6c6c);
    eprintln!("fault seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault_injection");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.txt");
    std::fs::write(
        &data,
        "fn add(a: u32, b: u32) -> u32 { a + b }\n".repeat(50),
    )
    .unwrap();
    let name = "model.safetensors";
    let out = dir.join(name);

    let (rounds, mut mid_save, mut last_step) = (8, 0, 0.0f32);
    // The length of a whole checkpoint (the same at every step), once one has loaded.
    let mut whole: Option<u64> = None;
    for round in 0..rounds {
        let before = state(&out);
        let mut child = train(&data, &out, 1_000_000).spawn().unwrap();
        let pid = child.id();
        // A save is under way while its temporary file exists; a save that wrote `out` in
        // place would show as `out` changing, and as a length short of a whole checkpoint.
        let saving = || temporary(&dir, name, pid) || state(&out) != before;
        let partial = || {
            temporary(&dir, name, pid)
                || matches!((state(&out), whole), (Some((len, _)), Some(w)) if len != w)
        };
        let started = Instant::now();
        // Even rounds wait for a save to begin; odd rounds kill at a random moment.
        let deadline = Duration::from_millis(if round % 2 == 0 {
            60_000
        } else {
            rng.gen_range(2_000..6_000)
        });
        let delay = Duration::from_micros(rng.gen_range(0..1_000));
        let mut exited = None;
        while started.elapsed() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            if round % 2 == 0 && saving() {
                std::thread::sleep(delay);
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        if let Some(status) = exited {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            if !in_ci() && err.contains("no compute device") {
                eprintln!("SKIPPED: no wgpu adapter; install mesa-vulkan-drivers");
                return;
            }
            panic!("round {round}: training exited by itself ({status}): {err}");
        }
        let during = partial();
        child.kill().unwrap();
        child.wait().unwrap();
        mid_save += during as usize;
        eprintln!(
            "round {round}: killed after {:.2} s{}",
            started.elapsed().as_secs_f64(),
            if during { ", during a save" } else { "" }
        );
        if !out.exists() {
            assert_eq!(last_step, 0.0, "round {round}: the checkpoint disappeared");
            continue;
        }
        let ckpt = checkpoint::load(&out)
            .unwrap_or_else(|e| panic!("round {round}: the checkpoint does not load: {e}"));
        whole = whole.or(state(&out).map(|(len, _)| len));
        let step = step_of(&ckpt);
        assert!(
            step >= last_step,
            "round {round}: step went back from {last_step} to {step}"
        );
        last_step = step;
    }
    assert!(
        mid_save > 0,
        "no kill landed during a save: the test injected no fault"
    );
    assert!(last_step > 0.0, "no round got as far as a first save");
    // The survivor is a training checkpoint a run resumes from.
    let steps = last_step as u64 + 1;
    let run = train(&data, &out, steps).output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(step_of(&checkpoint::load(&out).unwrap()), steps as f32);
    eprintln!("{rounds} kills, {mid_save} during a save; resumed from step {last_step}");
}

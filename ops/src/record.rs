//! Recording what the launchers plan, for the test that holds every launched plan to the set
//! the CUDA check compiles (`tests/tests/plans.rs`).
//!
//! Off by default: a launcher pays one relaxed atomic load. [`recording`] turns it on for the
//! whole process while its closure runs, so a test that records should be alone in its test
//! binary (or hold a lock shared with the others).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;

use megabyte_kernels::decode::DecodeConfig;

use crate::attention::{AttentionCall, BackwardProblem};
use crate::cross_entropy::CrossEntropyProblem;
use crate::decode::DecodeProblem;
use crate::gemm::GemmCall;
use crate::layer_norm::LayerNormProblem;

/// One planned launch, as the launcher handed it to its planner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Planned {
    Gemm(GemmCall),
    /// The gathering global-to-local GEMM (`local_input`), planned without a CMMA form.
    LocalInput(GemmCall),
    Attention(AttentionCall),
    AttentionBackward(BackwardProblem),
    LayerNorm(LayerNormProblem),
    CrossEntropy(CrossEntropyProblem),
    /// The fused decoding step: its stack, its configuration with the step's input and
    /// output stages (before it is split over launches, which depends on the device's plan),
    /// the keys it attends to and the vocabulary of its logits.
    Decode {
        problem: DecodeProblem,
        step: DecodeConfig,
        keys: usize,
        vocab: usize,
    },
}

static ON: AtomicBool = AtomicBool::new(false);
static LOG: Mutex<Vec<(ThreadId, Planned)>> = Mutex::new(Vec::new());
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `f` and returns its result with every call planned while it ran (by any thread).
pub fn recording<T>(f: impl FnOnce() -> T) -> (T, Vec<Planned>) {
    let (out, log) = record(f);
    (out, log.into_iter().map(|(_, p)| p).collect())
}

/// [`recording`], keeping only the calls planned on the calling thread: what `f` itself
/// launched, not what tests running beside it in other threads did meanwhile.
pub fn recording_this_thread<T>(f: impl FnOnce() -> T) -> (T, Vec<Planned>) {
    let (out, log) = record(f);
    let me = std::thread::current().id();
    (
        out,
        log.into_iter()
            .filter(|(t, _)| *t == me)
            .map(|(_, p)| p)
            .collect(),
    )
}

fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<(ThreadId, Planned)>) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    LOG.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::SeqCst);
    let out = f();
    ON.store(false, Ordering::SeqCst);
    let log = std::mem::take(&mut *LOG.lock().unwrap_or_else(|e| e.into_inner()));
    (out, log)
}

/// Notes a planned launch when recording is on.
pub(crate) fn note(planned: impl FnOnce() -> Planned) {
    if ON.load(Ordering::Relaxed) {
        let p = (std::thread::current().id(), planned());
        LOG.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }
}

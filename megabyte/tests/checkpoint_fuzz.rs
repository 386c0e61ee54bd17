//! Checkpoint loading under hostile bytes: random files, truncation at every section boundary,
//! random byte flips in the header, random edits of the header's JSON (shapes, dtypes, offsets,
//! metadata), and absurd sizes in the stored config. Every case must end in an `Err` (or, for an
//! edit that leaves the file valid, a checkpoint consistent with its config), never a panic, and
//! the loader's peak memory must stay within a small multiple of the file's size whatever the
//! header claims. A counting allocator measures the peak; this file holds one test so that no
//! other test allocates beside it.
//!
//! Seeded: the base seed is printed and can be set with `MEGABYTE_FUZZ_SEED`; a failure names
//! the case. `MEGABYTE_FUZZ_CASES` raises the number of random cases per kind.

mod common;
use common::env_or;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use megabyte::checkpoint::{self, StorageDtype};
use megabyte::{Config, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What a case may end in.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// The bytes cannot be a valid checkpoint: loading must fail.
    Err,
    /// The edit may have left a valid file: an `Ok` must be consistent with its config.
    ErrOrConsistent,
}

struct Stats {
    cases: usize,
    errors: usize,
    /// The largest peak of one load, in bytes, and the size of that file.
    worst_peak: (usize, usize),
}

/// Loads `bytes`, checking the outcome against `expect` and the peak memory of the call
/// against 4× the file plus 1 MiB (the weights as f32 take at most twice an f16 file).
fn check(stats: &mut Stats, case: &str, bytes: &[u8], expect: Expect) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = std::panic::catch_unwind(|| checkpoint::from_bytes("fuzz", bytes));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let bound = 4 * bytes.len() + (1 << 20);
    assert!(
        peak <= bound,
        "{case}: loading {} bytes peaked at {peak} bytes (bound {bound})",
        bytes.len()
    );
    stats.cases += 1;
    stats.worst_peak = stats.worst_peak.max((peak, bytes.len()));
    match result {
        Err(_) => panic!("{case}: loading panicked"),
        Ok(Err(e)) => {
            stats.errors += 1;
            let msg = e.to_string();
            assert!(
                msg.starts_with("checkpoint fuzz: ") && !msg.contains('\n'),
                "{case}: error `{msg}`"
            );
        }
        Ok(Ok(ckpt)) => {
            assert_eq!(expect, Expect::ErrOrConsistent, "{case}: loaded");
            ckpt.config.validate().unwrap();
            for ((name, shape), t) in ckpt
                .config
                .tensor_specs()
                .iter()
                .zip(ckpt.weights.tensors())
            {
                assert_eq!(t.len(), shape.iter().product::<usize>(), "{case}: {name}");
                assert!(t.iter().all(|v| v.is_finite()), "{case}: {name} not finite");
            }
        }
    }
}

/// A small training checkpoint (f16 weights, f32 optimiser tensors) and its header.
fn base() -> (Config, Vec<u8>) {
    let cfg = Config {
        d_global: 8,
        d_local: 16,
        heads_global: 2,
        heads_local: 2,
        context: 32,
        ..Config::tiny()
    };
    let w = Weights::random(&cfg, 11);
    let extra = vec![
        ("optimizer.step".to_string(), vec![1], vec![3.0]),
        ("optimizer.m.local.pad".to_string(), vec![16], vec![0.5; 16]),
    ];
    let bytes = checkpoint::to_bytes(&cfg, &w, StorageDtype::F16, &extra).unwrap();
    (cfg, bytes)
}

/// The header's JSON and the data after it.
fn split(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, &bytes[8 + n..])
}

fn join(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// A number a hostile header might hold.
fn wild(rng: &mut ChaCha8Rng) -> u64 {
    match rng.gen_range(0..6) {
        0 => 0,
        1 => rng.gen_range(1..64),
        2 => 1_000_000_000,
        3 => u64::MAX - rng.gen_range(0..8),
        4 => 1u64 << rng.gen_range(20..63),
        _ => rng.gen(),
    }
}

#[test]
fn checkpoint_loading_survives_hostile_bytes() {
    let seed: u64 = env_or("MEGABYTE_FUZZ_SEED", 0x6d65_6761);
    let per_kind: usize = env_or("MEGABYTE_FUZZ_CASES", 300);
    eprintln!("fuzz seed {seed} ({per_kind} random cases per kind)");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (cfg, good) = base();
    let mut stats = Stats {
        cases: 0,
        errors: 0,
        worst_peak: (0, 0),
    };
    let loaded = checkpoint::from_bytes("fuzz", &good).unwrap();
    assert_eq!(loaded.config, cfg);

    // Truncation at every section boundary (the length prefix, the header, each tensor's
    // first and last byte) and one byte either side, then at random points.
    let (header, data) = split(&good);
    let data_start = good.len() - data.len();
    let mut cuts: Vec<usize> = (0..=9).collect();
    cuts.extend([data_start - 1, data_start, data_start + 1]);
    for info in header.values() {
        if let Some(offsets) = info.get("data_offsets").and_then(|o| o.as_array()) {
            for o in offsets {
                let at = data_start + o.as_u64().unwrap() as usize;
                cuts.extend([at.saturating_sub(1), at, at + 1]);
            }
        }
    }
    for _ in 0..per_kind {
        cuts.push(rng.gen_range(0..good.len()));
    }
    cuts.retain(|&c| c < good.len());
    cuts.sort();
    cuts.dedup();
    for &cut in &cuts {
        check(
            &mut stats,
            &format!("truncated at {cut}"),
            &good[..cut],
            Expect::Err,
        );
    }

    // Random files, with and without a plausible header length in front.
    for i in 0..per_kind {
        let len = rng.gen_range(0..4096);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if i % 2 == 1 && len >= 8 {
            let n = rng.gen_range(0..len as u64);
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        check(
            &mut stats,
            &format!("random file {i} ({len} bytes)"),
            &bytes,
            Expect::Err,
        );
    }

    // Byte flips inside the length prefix and the header.
    for i in 0..per_kind {
        let mut bytes = good.clone();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..data_start);
            bytes[at] ^= 1 << rng.gen_range(0..8);
        }
        check(
            &mut stats,
            &format!("header flip {i}"),
            &bytes,
            Expect::ErrOrConsistent,
        );
    }

    // Edits of the header's JSON: a tensor's shape, dtype or offsets, or a metadata value.
    let names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let meta_keys: Vec<String> = header["__metadata__"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for i in 0..per_kind {
        let mut h = header.clone();
        let what;
        match rng.gen_range(0..4) {
            0 => {
                let name = &names[rng.gen_range(0..names.len())];
                let dims: Vec<serde_json::Value> = (0..rng.gen_range(0..4))
                    .map(|_| wild(&mut rng).into())
                    .collect();
                what = format!("shape of {name} = {dims:?}");
                h.get_mut(name).unwrap()["shape"] = dims.into();
            }
            1 => {
                let name = &names[rng.gen_range(0..names.len())];
                let dtype =
                    ["F64", "I8", "BF16", "U8", "F16", "F32", "BOOL", "X"][rng.gen_range(0..8)];
                what = format!("dtype of {name} = {dtype}");
                h.get_mut(name).unwrap()["dtype"] = dtype.into();
            }
            2 => {
                let name = &names[rng.gen_range(0..names.len())];
                let (a, b) = (wild(&mut rng), wild(&mut rng));
                what = format!("offsets of {name} = [{a}, {b}]");
                h.get_mut(name).unwrap()["data_offsets"] = vec![a, b].into();
            }
            _ => {
                let key = &meta_keys[rng.gen_range(0..meta_keys.len())];
                let value = match rng.gen_range(0..4) {
                    0 => wild(&mut rng).to_string(),
                    1 => "-1".to_string(),
                    2 => "1e9".to_string(),
                    _ => String::new(),
                };
                what = format!("metadata {key} = `{value}`");
                h.get_mut("__metadata__").unwrap()[key.as_str()] = value.into();
            }
        }
        check(
            &mut stats,
            &format!("header edit {i}: {what}"),
            &join(&h, data),
            Expect::ErrOrConsistent,
        );
    }

    // Absurd sizes in the stored config, each alone: a load must refuse them before it
    // allocates anything of their size.
    for (key, value) in [
        ("d_local", "1000000000"),
        ("d_global", "1000000000"),
        ("layers_global", "1000000000"),
        ("layers_local", "18446744073709551615"),
        ("context", "4294967296"),
        ("patch", "1000000000"),
        ("ffn_mult", "1000000000000"),
        ("heads_global", "0"),
        ("vocab", "65536"),
    ] {
        let mut h = header.clone();
        h.get_mut("__metadata__").unwrap()[key] = value.into();
        check(
            &mut stats,
            &format!("absurd {key} = {value}"),
            &join(&h, data),
            Expect::Err,
        );
    }
    eprintln!(
        "{} cases, {} refused; largest peak {} bytes, loading a file of {} bytes",
        stats.cases, stats.errors, stats.worst_peak.0, stats.worst_peak.1
    );
}

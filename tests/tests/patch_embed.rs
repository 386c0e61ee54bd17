//! The fused global input (bytes → (B, K, P·D_G)) against the reference `global_input`,
//! per dtype a sweep of awkward sizes, every preset's P and D_G, and proptest; a window of
//! patches against the whole sequence; a bad id must show up as NaN, never as a number.

use cubecl::prelude::ComputeClient;
use megabyte_ops::patch_embed::{patch_embed, patch_embed_window};
use megabyte_ops::{FloatElement, Tensor};
use megabyte_reference::patch_embed::global_input;
use megabyte_tests::{
    check, kernel_tests, no_plan, preset_configs, read_f64, round, round_all, uniform, uniform_ids,
    with_client, DeviceProfile, Dtype, KernelCase, TestRuntime,
};
use proptest::prelude::*;

const VOCAB: usize = 257;

kernel_tests!(Case, [f32, f16], [sweep, presets], random(6, any_case()));

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    k: usize,
    p: usize,
    d: usize,
    seed: u64,
}

impl KernelCase for Case {
    no_plan!();

    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        let (b, k, p, d, seed) = (self.b, self.k, self.p, self.d, self.seed);
        let t = k * p;
        let r = round_all::<E>;
        let x = uniform_ids(seed, b * t, VOCAB);
        let wte = r(uniform(seed ^ 1, VOCAB * d, -1.0, 1.0));
        let wpe = r(uniform(seed ^ 2, (t + 3) * d, -1.0, 1.0));
        let pad = r(uniform(seed ^ 3, p * d, -1.0, 1.0));
        let out = Tensor::<TestRuntime, E>::full(client, &[b, k, p * d], f64::NAN).unwrap();
        patch_embed(
            &Tensor::from_ids(client, &x, &[b, t]).unwrap(),
            &Tensor::<TestRuntime, E>::from_f32(client, &wte, &[VOCAB, d]).unwrap(),
            &Tensor::<TestRuntime, E>::from_f32(client, &wpe, &[t + 3, d]).unwrap(),
            &Tensor::<TestRuntime, E>::from_f32(client, &pad, &[p * d]).unwrap(),
            &out,
            p,
        )
        .unwrap();
        let mut expected = vec![0f32; b * t * d];
        global_input(&mut expected, &x, &wte, &wpe, &pad, b, t, p, d);
        // The reference adds in f64 and rounds to f32 (exact to half an f32 ulp); the naive
        // implementation's one f32 add, rounded to E, is that value rounded to E.
        let reference: Vec<f64> = expected.iter().map(|&v| v as f64).collect();
        let naive: Vec<f64> = expected.iter().map(|&v| round::<E>(v as f64)).collect();
        check::<E>(case, "out", &read_f64(&out), &naive, &reference)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A window of patches `first .. first + count` from the ids of the bytes they embed only
/// (a decoding step) must equal those rows of the whole-sequence reference.
#[allow(clippy::too_many_arguments)]
fn run_window_case(
    client: &ComputeClient<TestRuntime>,
    b: usize,
    k: usize,
    p: usize,
    d: usize,
    first: usize,
    count: usize,
    seed: u64,
) {
    let case = format!(
        "patch_embed_window(B={b}, K={k}, P={p}, D={d}, first={first}, count={count}, seed={seed})"
    );
    let t = k * p;
    let x = uniform_ids(seed, b * t, 256);
    let wte = uniform(seed ^ 1, VOCAB * d, -1.0, 1.0);
    let wpe = uniform(seed ^ 2, t * d, -1.0, 1.0);
    let pad = uniform(seed ^ 3, p * d, -1.0, 1.0);
    let mut expected = vec![0f32; b * t * d];
    global_input(&mut expected, &x, &wte, &wpe, &pad, b, t, p, d);
    // Only the bytes the window embeds: (first - 1)·P .. (first + count - 1)·P, at least one.
    let lo = first.saturating_sub(1) * p;
    let hi = ((first + count - 1) * p).max(lo + 1).min(t);
    let window: Vec<u32> = (0..b)
        .flat_map(|bi| x[bi * t + lo..bi * t + hi].to_vec())
        .collect();
    let out = Tensor::<TestRuntime, f32>::full(client, &[b, count, p * d], f64::NAN).unwrap();
    patch_embed_window(
        &Tensor::from_ids(client, &window, &[b, hi - lo]).unwrap(),
        lo,
        &Tensor::<TestRuntime, f32>::from_f32(client, &wte, &[VOCAB, d]).unwrap(),
        &Tensor::<TestRuntime, f32>::from_f32(client, &wpe, &[t, d]).unwrap(),
        &Tensor::<TestRuntime, f32>::from_f32(client, &pad, &[p * d]).unwrap(),
        &out,
        p,
        first,
    )
    .unwrap();
    let rows: Vec<f64> = (0..b)
        .flat_map(|bi| expected[(bi * k + first) * p * d..][..count * p * d].to_vec())
        .map(|v| v as f64)
        .collect();
    check::<f32>(&case, "out", &read_f64(&out), &rows, &rows).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn window_matches_the_whole_sequence() {
    with_client!(TestRuntime, |client| {
        for (i, &(b, k, p, d, first, count)) in [
            (1, 1, 4, 3, 0, 1),
            (2, 5, 3, 7, 0, 1),
            (2, 5, 3, 7, 1, 1),
            (3, 6, 4, 5, 4, 2),
            (1, 9, 8, 16, 8, 1),
        ]
        .iter()
        .enumerate()
        {
            run_window_case(&client, b, k, p, d, first, count, 1300 + i as u64);
        }
        // Ids that stop short of the window's bytes are an error naming the ranges.
        let f = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.0).unwrap();
        let ids = Tensor::from_ids(&client, &[1, 2, 3], &[1, 3]).unwrap();
        let err = patch_embed_window(
            &ids,
            2,
            &f(&[VOCAB, 2]),
            &f(&[12, 2]),
            &f(&[6]),
            &f(&[1, 1, 6]),
            3,
            2,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("ids cover bytes 2..5, patches 2..3 need 3..6"),
            "{err}"
        );
    });
}

/// Length-1 sequences, one patch, odd widths, P not a power of two.
#[rustfmt::skip]
const SWEEP: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 1), (1, 1, 4, 3), (3, 5, 3, 7), (2, 16, 8, 32), (1, 7, 12, 33),
    (4, 3, 1, 64),
];

fn sweep(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
    (SWEEP.iter().enumerate())
        .map(|(i, &(b, k, p, d))| Case {
            b,
            k,
            p,
            d,
            seed: 900 + i as u64,
        })
        .collect()
}

/// Every preset's P and D_G, over two sequences of three patches.
fn presets(_: Dtype, _: &DeviceProfile) -> Vec<Case> {
    (preset_configs().enumerate())
        .map(|(i, (_, cfg))| Case {
            b: 2,
            k: 3,
            p: cfg.patch,
            d: cfg.d_global,
            seed: 1900 + i as u64,
        })
        .collect()
}

fn any_case() -> impl Strategy<Value = Case> {
    (1usize..4, 1usize..12, 1usize..10, 1usize..40, any::<u64>())
        .prop_map(|(b, k, p, d, seed)| Case { b, k, p, d, seed })
}

#[test]
fn out_of_vocabulary_id_is_nan_not_a_number() {
    with_client!(TestRuntime, |client| {
        let (p, d) = (2, 4);
        let x = [1u32, 2, 300, 4, 5, 6];
        let out = Tensor::<TestRuntime, f32>::full(&client, &[1, 3, p * d], 0.0).unwrap();
        patch_embed(
            &Tensor::from_ids(&client, &x, &[1, 6]).unwrap(),
            &Tensor::<TestRuntime, f32>::full(&client, &[VOCAB, d], 0.5).unwrap(),
            &Tensor::<TestRuntime, f32>::full(&client, &[6, d], 0.25).unwrap(),
            &Tensor::<TestRuntime, f32>::full(&client, &[p * d], -1.0).unwrap(),
            &out,
            p,
        )
        .unwrap();
        let got = out.to_vec().unwrap();
        // Byte 2 (id 300) lands in patch 2, slot 0.
        assert!(got[2 * p * d..][..d].iter().all(|v| v.is_nan()), "{got:?}");
        assert!(got[..p * d].iter().all(|&v| v == -1.0), "{got:?}");
        assert!(got[p * d..2 * p * d].iter().all(|&v| v == 0.75), "{got:?}");
    });
}

#[test]
fn bad_shapes_are_errors() {
    with_client!(TestRuntime, |client| {
        let f = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.0).unwrap();
        let x = Tensor::from_ids(&client, &[1, 2, 3, 4, 5, 6], &[1, 6]).unwrap();
        // (ids, wpe shape, out shape, P), with wte (V, 4) and a pad of P·4.
        let run = |x: &Tensor<TestRuntime, u32>, wpe: &[usize], out: &[usize], p: usize| {
            let (wte, pad) = (f(&[VOCAB, 4]), f(&[4 * p]));
            patch_embed(x, &wte, &f(wpe), &pad, &f(out), p)
                .unwrap_err()
                .to_string()
        };
        for (wpe, out, p, want) in [
            (
                &[6, 4][..],
                &[1, 1, 16][..],
                4,
                "sequence length = 6 is not supported: must be a multiple of the patch size 4",
            ),
            (
                &[5, 4],
                &[1, 2, 12],
                3,
                "`wpe` has shape [5, 4], expected [6, 4]",
            ),
            (
                &[6, 4],
                &[1, 3, 12],
                3,
                "`out` has shape [1, 3, 12], expected [1, 2, 12]",
            ),
        ] {
            assert_eq!(run(&x, wpe, out, p), format!("patch_embed: {want}"));
        }
        let empty = Tensor::from_ids(&client, &[], &[1, 0]).unwrap();
        assert_eq!(
            run(&empty, &[6, 4], &[1, 0, 12], 3),
            "patch_embed: `ids` is empty (shape [1, 0])"
        );
    });
}

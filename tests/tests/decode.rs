//! The fused decoding step of a stack of blocks (`megabyte_ops::decode::decode_stack`) against
//! the reference blocks over the whole sequence: the step's output row is the reference's last
//! row, and the keys and values it appends are each layer's projections at that position. The
//! cache holds the reference's keys and values before the step and NaN after it, so a read
//! past `pos` fails. Per dtype: a sweep of awkward sizes (one key, key counts around the
//! softmax chunk, odd head widths, 3 heads), every built-in preset's own stacks, proptest over
//! shapes and depths (narrow stacks, and in `wide::` stacks 192 to 512 wide with 4 to 8
//! layers); errors. The inputs (local input, patch embedding) and outputs (final LayerNorm, logits) are covered by
//! the model's cached-decoding tests, which run the fused and the unfused steps.
//!
//! Tolerance baseline: the model tests' naive block (`megabyte_tests::naive_model::block`: f32
//! sums in index order, a materialised softmax) with every stored intermediate rounded to E.

use cubecl::prelude::ComputeClient;
use megabyte_ops::decode::{
    decode_stack, decode_stack_max_keys, BlockWeights, PackedStack, StepInput, StepOutput,
};
use megabyte_ops::{ActivationKind, FloatElement, OpError, Tensor};
use megabyte_reference::config::Activation;
use megabyte_reference::ffn::{block_forward, split_qkv};
use megabyte_reference::gemm::linear;
use megabyte_reference::layer_norm::layer_norm_forward;
use megabyte_reference::weights::{Block, Linear, Norm};
use megabyte_tests::plans::stacks;
use megabyte_tests::{
    assert_unsupported, check, kernel_tests, naive_model, no_plan, preset_configs, read_f64, round,
    round_all, uniform, with_client, DeviceProfile, Dtype, KernelCase, TestRuntime,
};
use proptest::prelude::*;

fn random_block<E: FloatElement>(c: usize, hidden: usize, seed: u64) -> Block {
    let lin = |i: usize, o: usize, s: u64| {
        let bound = 1.0 / (i as f32).sqrt();
        Linear {
            weight: round_all::<E>(uniform(s, i * o, -bound, bound)),
            bias: round_all::<E>(uniform(s ^ 0xb1, o, -0.2, 0.2)),
        }
    };
    let norm = |s: u64| Norm {
        weight: round_all::<E>(uniform(s, c, 0.5, 1.5)),
        bias: round_all::<E>(uniform(s ^ 0xb2, c, -0.3, 0.3)),
    };
    Block {
        ln1: norm(seed ^ 1),
        qkv: lin(c, 3 * c, seed ^ 2),
        proj: lin(c, c, seed ^ 3),
        ln2: norm(seed ^ 4),
        fc1: lin(c, hidden, seed ^ 5),
        fc2: lin(hidden, c, seed ^ 6),
    }
}

fn kind(act: Activation) -> ActivationKind {
    match act {
        Activation::Gelu => ActivationKind::Gelu,
        Activation::Relu => ActivationKind::Relu,
    }
}

/// A block's parameters uploaded, in the order `BlockWeights` borrows them.
fn upload<E: FloatElement>(
    client: &ComputeClient<TestRuntime>,
    w: &Block,
    c: usize,
    hidden: usize,
) -> Vec<Tensor<TestRuntime, E>> {
    let up =
        |v: &[f32], shape: &[usize]| Tensor::<TestRuntime, E>::from_f32(client, v, shape).unwrap();
    vec![
        up(&w.ln1.weight, &[c]),
        up(&w.ln1.bias, &[c]),
        up(&w.qkv.weight, &[c, 3 * c]),
        up(&w.qkv.bias, &[3 * c]),
        up(&w.proj.weight, &[c, c]),
        up(&w.proj.bias, &[c]),
        up(&w.ln2.weight, &[c]),
        up(&w.ln2.bias, &[c]),
        up(&w.fc1.weight, &[c, hidden]),
        up(&w.fc1.bias, &[hidden]),
        up(&w.fc2.weight, &[hidden, c]),
        up(&w.fc2.bias, &[c]),
    ]
}

fn borrow<E>(t: &[Tensor<TestRuntime, E>]) -> BlockWeights<'_, TestRuntime, E> {
    BlockWeights::from_tensors(std::array::from_fn(|i| &t[i]))
}

kernel_tests!(Case, [f32, f16], [sweep, presets], random(6, any_case()));

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    keys: usize,
    heads: usize,
    /// Head width.
    hs: usize,
    /// The FFN's hidden width over the stack's.
    mult: usize,
    layers: usize,
    act: Activation,
    seed: u64,
}

impl KernelCase for Case {
    no_plan!();

    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        let (b, keys, heads, hs) = (self.b, self.keys, self.heads, self.hs);
        let (mult, layers, act, seed) = (self.mult, self.layers, self.act, self.seed);
        let c = heads * hs;
        let hidden = mult * c;
        let t = keys;
        let pos = t - 1;
        let case = format!("{case} (H = {hidden})");
        let blocks: Vec<Block> = (0..layers)
            .map(|l| random_block::<E>(c, hidden, seed ^ (l as u64 + 1) << 20))
            .collect();
        let x = round_all::<E>(uniform(seed ^ 0x5eed, b * t * c, -2.0, 2.0));
        // Reference and naive: the whole sequence through the layers, with each layer's keys and
        // values; the naive stack rounds its residual stream to E between layers.
        let mut reference = x.clone();
        let mut naive = x.clone();
        let (mut ref_kv, mut naive_kv) = (Vec::new(), Vec::new());
        for w in &blocks {
            let mut xn = vec![0f32; b * t * c];
            layer_norm_forward(&mut xn, &reference, &w.ln1.weight, &w.ln1.bias, b * t, c);
            let mut qkv = vec![0f32; b * t * 3 * c];
            linear(
                &mut qkv,
                &xn,
                &w.qkv.weight,
                Some(&w.qkv.bias),
                b * t,
                c,
                3 * c,
            );
            let [_, k, v] = split_qkv(&qkv, b * t, c);
            ref_kv.push((k, v));
            block_forward(&mut reference, w, act, b, t, c, heads);
            let round = |v: f32| round::<E>(v as f64) as f32;
            let (k, v) = naive_model::block(
                &mut naive,
                w,
                act,
                b,
                t,
                c,
                heads,
                naive_model::Order::Forward,
                round,
            );
            naive_kv.push((k, v));
        }

        // The device: the caches hold the reference's (rounded) keys and values before `pos`,
        // NaN from `pos` on, two slots past the sequence.
        let cap = t + 2;
        let cache = |which: usize| {
            let mut buf = vec![f32::NAN; layers * b * cap * c];
            for (l, kv) in ref_kv.iter().enumerate() {
                let src = if which == 0 { &kv.0 } else { &kv.1 };
                for bi in 0..b {
                    for j in 0..pos {
                        for i in 0..c {
                            buf[((l * b + bi) * cap + j) * c + i] =
                                round::<E>(src[(bi * t + j) * c + i] as f64) as f32;
                        }
                    }
                }
            }
            Tensor::<TestRuntime, E>::from_f32(client, &buf, &[layers, b, cap, c]).unwrap()
        };
        let (kc, vc) = (cache(0), cache(1));
        let last = |m: &[f32]| -> Vec<f32> {
            (0..b)
                .flat_map(|bi| m[(bi * t + pos) * c..][..c].to_vec())
                .collect()
        };
        let h = Tensor::<TestRuntime, E>::from_f32(client, &last(&x), &[b, c]).unwrap();
        let uploaded: Vec<_> = blocks
            .iter()
            .map(|w| upload::<E>(client, w, c, hidden))
            .collect();
        let steps: Vec<_> = uploaded.iter().map(|t| borrow(t)).collect();
        let stack = PackedStack::pack(&steps, heads, None).unwrap();
        decode_stack(
            &h,
            &stack,
            &kc,
            &vc,
            pos,
            kind(act),
            &StepInput::Row,
            &StepOutput::Row,
        )
        .unwrap();

        // Kernel rows first, then every row of the sequence for the naive error.
        let with_all = |rows: Vec<f32>, all: &[f32]| -> Vec<f64> {
            rows.iter().chain(all).map(|&v| v as f64).collect()
        };
        check::<E>(
            &case,
            "output row",
            &read_f64(&h),
            &with_all(last(&naive), &naive),
            &with_all(last(&reference), &reference),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (kd, vd) = (read_f64(&kc), read_f64(&vc));
        for l in 0..layers {
            for (name, dev, naive_all, ref_all) in [
                ("key", &kd, &naive_kv[l].0, &ref_kv[l].0),
                ("value", &vd, &naive_kv[l].1, &ref_kv[l].1),
            ] {
                let at = |bi: usize, j: usize| ((l * b + bi) * cap + j) * c;
                let slot: Vec<f64> = (0..b)
                    .flat_map(|bi| dev[at(bi, pos)..][..c].to_vec())
                    .collect();
                check::<E>(
                    &case,
                    &format!("layer {l} {name} appended at slot {pos}"),
                    &slot,
                    &with_all(last(naive_all), naive_all),
                    &with_all(last(ref_all), ref_all),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                // Slots past the step are untouched.
                for bi in 0..b {
                    for j in pos + 1..cap {
                        assert!(
                            dev[at(bi, j)..][..c].iter().all(|v| v.is_nan()),
                            "{case}: layer {l} {name} slot {j} of row {bi} was written"
                        );
                    }
                }
            }
        }
    }
}

/// One key (the step's own), key counts around the 32-, 64- and 128-key softmax chunks,
/// head widths 1 to 80, three heads, batch 1 to 5; in f16 a few of the same kind.
fn sweep(dtype: Dtype, _: &DeviceProfile) -> Vec<Case> {
    // (B, keys, heads, head width, FFN multiple)
    #[rustfmt::skip]
    let f32_shapes: &[(usize, usize, usize, usize, usize)] = &[
        (1, 1, 1, 8, 4), (2, 2, 2, 16, 4), (3, 7, 3, 8, 2), (1, 33, 2, 16, 4), (2, 65, 1, 64, 4),
        (1, 129, 4, 32, 4), (5, 40, 2, 40, 1), (1, 17, 1, 80, 2), (2, 9, 1, 1, 3),
    ];
    let f16_shapes: &[(usize, usize, usize, usize, usize)] =
        &[(1, 1, 1, 16, 4), (3, 35, 2, 16, 4), (2, 70, 3, 8, 4)];
    let f16 = dtype != Dtype::F32;
    let shapes = if f16 { f16_shapes } else { f32_shapes };
    (shapes.iter().enumerate())
        .map(|(i, &(b, keys, heads, hs, mult))| Case {
            b,
            keys,
            heads,
            hs,
            mult,
            layers: if f16 { 2 } else { 1 + i % 2 },
            act: if i % 3 == 2 && !f16 {
                Activation::Relu
            } else {
                Activation::Gelu
            },
            seed: 900 + 50 * f16 as u64 + i as u64,
        })
        .collect()
}

/// Every built-in preset's global and local stacks at their own width, heads, hidden width,
/// depth and activation, batch cut to 2: each stack the fused step takes runs at its full
/// cache (K patches for the global stack, P bytes for the local one), and in f32 also at one
/// key and at 70 (past a 64-key chunk); each it refuses is refused for its width.
fn presets(dtype: Dtype, profile: &DeviceProfile) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, (name, cfg)) in preset_configs().enumerate() {
        for (j, stack) in stacks(&cfg).into_iter().enumerate() {
            let (width, heads, layers, cap) = (stack.width, stack.heads, stack.layers, stack.seq);
            if let Err(err) = megabyte_ops::decode::plan(&stack.decode_problem(dtype), profile) {
                assert!(
                    width > megabyte_ops::decode::MAX_FUSED_WIDTH
                        && err.to_string().contains(&format!("width = {width}")),
                    "{name} {} stack (width {width}, {heads} heads, {layers} layers) refused: {err}",
                    stack.name
                );
                continue;
            }
            let mut keys = if dtype == Dtype::F32 {
                vec![1, 70.min(cap), cap]
            } else {
                vec![cap]
            };
            keys.dedup();
            for keys in keys {
                cases.push(Case {
                    b: 2,
                    keys,
                    heads,
                    hs: width / heads,
                    mult: cfg.ffn_mult,
                    layers,
                    act: cfg.activation,
                    seed: 1000 + 10 * i as u64 + j as u64 + keys as u64,
                });
            }
        }
    }
    // tiny and small: both stacks each.
    assert!(cases.len() >= 4, "only {} preset stacks", cases.len());
    cases
}

/// A drawn case: (B, keys, heads, head width, FFN multiple, layers), ReLU or GELU, seed.
type Draw = ((usize, usize, usize, usize, usize, usize), bool, u64);

fn drawn(((b, keys, heads, hs, mult, layers), relu, seed): Draw) -> Case {
    let act = if relu {
        Activation::Relu
    } else {
        Activation::Gelu
    };
    Case {
        b,
        keys,
        heads,
        hs,
        mult,
        layers,
        act,
        seed,
    }
}

fn any_case() -> impl Strategy<Value = Case> {
    let dims = (
        1usize..4,
        1usize..80,
        1usize..4,
        1usize..20,
        1usize..5,
        1usize..4,
    );
    (dims, any::<bool>(), any::<u64>()).prop_map(drawn)
}

/// Stacks as wide as the presets' and wider, up to the widest the fused step takes, 4 to 8
/// layers deep: on CPU drivers these run as several launches per step.
fn wide_stack() -> impl Strategy<Value = Case> {
    let width = prop::sample::select(vec![192usize, 256, 384, 512]);
    let dims = (
        width,
        0usize..4,
        1usize..5,
        4usize..9,
        1usize..3,
        1usize..16,
    );
    (dims, any::<bool>(), any::<u64>()).prop_map(
        |((width, heads_pick, mult, layers, b, keys), relu, seed)| {
            // 3 to 8 heads, of those that divide the width.
            let heads: Vec<usize> = [3usize, 4, 6, 8]
                .into_iter()
                .filter(|h| width % h == 0)
                .collect();
            let heads = heads[heads_pick % heads.len()];
            drawn(((b, keys, heads, width / heads, mult, layers), relu, seed))
        },
    )
}

mod wide {
    use super::*;

    kernel_tests!(Case, [f32, f16], [], random(3, wide_stack()));
}

#[test]
fn errors_name_the_bad_value() {
    with_client!(TestRuntime, |client| {
        let (b, c, hidden, heads) = (2, 16, 32, 2);
        let block = random_block::<f32>(c, hidden, 7);
        let uploaded = upload::<f32>(&client, &block, c, hidden);
        let stack = PackedStack::pack(&[borrow(&uploaded)], heads, None).unwrap();
        let t = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 0.5).unwrap();
        let (h, kc, vc) = (t(&[b, c]), t(&[1, b, 4, c]), t(&[1, b, 4, c]));
        let gelu = ActivationKind::Gelu;
        let (row, out) = (StepInput::Row, StepOutput::Row);
        // The step past the cache.
        let err = decode_stack(&h, &stack, &kc, &vc, 4, gelu, &row, &out).unwrap_err();
        assert_unsupported(&err, "pos", 4);
        // A cache of another batch or depth.
        for shape in [[1, b + 1, 4, c], [2, b, 4, c]] {
            let wrong = t(&shape);
            let err = decode_stack(&h, &stack, &wrong, &vc, 0, gelu, &row, &out).unwrap_err();
            assert!(err.to_string().contains("k_cache"), "{err}");
        }
        // A row of another width.
        let err = decode_stack(&t(&[b, c + 1]), &stack, &kc, &vc, 0, gelu, &row, &out).unwrap_err();
        assert!(err.to_string().contains("`h`"), "{err}");
        // The final LayerNorm asked of a stack packed without one.
        let g = t(&[b, c]);
        let err =
            decode_stack(&h, &stack, &kc, &vc, 0, gelu, &row, &StepOutput::Norm(&g)).unwrap_err();
        assert!(err.to_string().contains("final LayerNorm"), "{err}");
        // A weight of the wrong shape, at packing.
        let mut bad = upload::<f32>(&client, &block, c, hidden);
        bad[2] = t(&[c, 2 * c]);
        let err = PackedStack::pack(&[borrow(&bad)], heads, None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("qkv.weight"), "{err}");
        // No layers; heads that don't divide the width; wider than the fused kernel takes.
        let supported = |width, hidden, heads, layers| {
            decode_stack_max_keys::<TestRuntime, f32>(&client, width, hidden, heads, layers, 0, 256)
        };
        let err = supported(c, hidden, 2, 0).unwrap_err();
        assert!(matches!(err, OpError::Empty { .. }), "{err}");
        let err = supported(c, hidden, 3, 1).unwrap_err();
        assert!(err.to_string().contains("heads = 3"), "{err}");
        let wide = megabyte_ops::decode::MAX_FUSED_WIDTH + 64;
        let err = supported(wide, 4 * wide, 8, 1).unwrap_err();
        assert!(
            err.to_string().contains(&format!("width = {wide}")),
            "{err}"
        );
    });
}

//! The fused decoding step (`decode_stack`): one new position of one sequence through a whole
//! stack (its comparison with the unfused blocks it replaces is `--bench model`'s generation
//! table). FLOPs per
//! step: per layer 2·(4C² + 2CH) for the projections and the FFN plus 4·(pos + 1)·C for the
//! attention scores and the weighted sum; 2·V·C more for the logits when the step ends with
//! them. At these sizes a step is dominated by its launch, so the figure to read is the time.
//!
//! `cargo bench -p megabyte-benches --bench decode`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use megabyte_ops::decode::{decode_stack, BlockWeights, PackedStack, StepInput, StepOutput};
use megabyte_ops::{ActivationKind, Tensor};

type Rt = megabyte_benches::BenchRuntime;

/// (name, C, H, heads, layers, cache slots, pos, logits): the local and global stacks of `tiny`
/// at context 2048 and of `small`, each at its last position.
const SHAPES: &[(&str, usize, usize, usize, usize, usize, usize, bool)] = &[
    ("tiny_local_p4", 32, 128, 2, 2, 4, 3, true),
    ("tiny_global_k512", 64, 256, 2, 2, 512, 511, false),
    ("small_local_p8", 128, 512, 2, 2, 8, 7, true),
    ("small_global_k256", 256, 1024, 4, 4, 256, 255, false),
];

fn bench(c: &mut Criterion) {
    let Some((client, mut group)) = megabyte_benches::group(c, "decode", 3) else {
        return;
    };
    for &(name, width, hidden, heads, layers, cap, pos, logits) in SHAPES {
        let t = |shape: &[usize], salt: usize| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = megabyte_benches::data(n, salt, -0.1, 0.1);
            Tensor::<Rt, f32>::from_f32(&client, &data, shape).unwrap()
        };
        let params: Vec<Vec<Tensor<Rt, f32>>> = (0..layers)
            .map(|l| {
                [
                    vec![width],
                    vec![width],
                    vec![width, 3 * width],
                    vec![3 * width],
                    vec![width, width],
                    vec![width],
                    vec![width],
                    vec![width],
                    vec![width, hidden],
                    vec![hidden],
                    vec![hidden, width],
                    vec![width],
                ]
                .iter()
                .enumerate()
                .map(|(i, shape)| t(shape, 13 * l + i))
                .collect()
            })
            .collect();
        let blocks: Vec<BlockWeights<Rt, f32>> = params
            .iter()
            .map(|p| BlockWeights::from_tensors(std::array::from_fn(|i| &p[i])))
            .collect();
        let (ln_w, ln_b) = (t(&[width], 1), t(&[width], 2));
        let stack = PackedStack::pack(&blocks, heads, Some((&ln_w, &ln_b))).unwrap();
        let h = t(&[1, width], 3);
        let (kc, vc) = (
            t(&[layers, 1, cap, width], 4),
            t(&[layers, 1, cap, width], 5),
        );
        let (table, out) = (t(&[256, width], 6), t(&[1, 256], 7));
        let output = if logits {
            StepOutput::Logits {
                table: &table,
                logits: &out,
            }
        } else {
            StepOutput::Row
        };
        let per_layer = 2 * (4 * width * width + 2 * width * hidden) + 4 * (pos + 1) * width;
        let flops = layers * per_layer + if logits { 2 * 256 * width } else { 0 };
        group.throughput(Throughput::Elements(flops as u64));
        megabyte_benches::timed(&mut group, &client, "wgpu_decode_stack_f32", name, || {
            decode_stack(
                &h,
                &stack,
                &kc,
                &vc,
                pos,
                ActivationKind::Gelu,
                &StepInput::Row,
                &output,
            )
            .unwrap()
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The model the repository ships (`models/small-pydoc.safetensors`): it loads, predicts text
//! of its domain, generates the same bytes on both devices, and asking it for more than the
//! device holds is a one-line error.

use megabyte::checkpoint;
use megabyte::Config;

use crate::common::*;

/// The README's first command, greedy: the shipped model (the `small` preset, whose global
/// stack is 256 wide and 4 deep) gives the same bytes on wgpu as on cpu (the reference
/// generator), from a prompt that ends inside its third patch.
#[test]
fn the_shipped_model_generates_the_same_bytes_on_wgpu_and_cpu() {
    let model = shipped_model();
    let run = |device: &str| {
        let rest = [
            "--temperature",
            "0",
            "--max-new",
            "48",
            "The function returns",
        ];
        on_checkpoint("generate", &model, device, &rest)
    };
    let gpu = run("wgpu");
    if no_adapter(&gpu) {
        return;
    }
    let cpu = run("cpu");
    assert!(cpu.status.success(), "{}", text(&cpu.stderr));
    assert!(gpu.status.success(), "{}", text(&gpu.stderr));
    assert_eq!(
        text(&gpu.stdout),
        text(&cpu.stdout),
        "greedy bytes of the shipped model differ between wgpu and cpu"
    );
    assert!(gpu.stdout.len() >= 48, "{}", text(&gpu.stdout));
}

/// The shipped model loads from a fresh checkout as the `small` preset, and scores a passage in
/// its training domain (reStructuredText prose, written for this test) well below the passage's
/// order-0 entropy.
#[test]
fn the_shipped_model_loads_and_predicts_documentation_text() {
    let model = shipped_model();
    let ckpt = checkpoint::load(&model).unwrap();
    assert_eq!(ckpt.config, Config::small());
    assert!(ckpt.optimizer.is_empty());
    let passage = "The :func:`sorted` function returns a new sorted list from the items in \
        *iterable*.  It has two optional arguments which must be specified as keyword \
        arguments.  *key* specifies a function of one argument that is used to extract a \
        comparison key from each element in the list.  The default value is ``None`` \
        (compare the elements directly).\n\n*reverse* is a boolean value.  If set to \
        ``True``, then the list elements are sorted as if each comparison were reversed.\n"
        .repeat(2);
    let file = temp("cli_shipped_passage.txt");
    std::fs::write(&file, &passage).unwrap();
    let out = on_checkpoint("eval", &model, "wgpu", &[arg(&file)]);
    if no_adapter(&out) {
        return;
    }
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bpb = bits_per_byte(&out);
    let order0 = order0_entropy(passage.as_bytes());
    assert!(
        bpb < order0 - 1.0,
        "shipped model {bpb} bits/byte vs order-0 {order0}"
    );
}

/// Buffers past the device's largest allocation are refused before they are made, naming the
/// buffer, its size, the limit and what fits: 200 samples of the shipped model need a 200 MiB
/// global KV cache, and `paper-image640`'s cache for one sequence is 225 MiB, past lavapipe's
/// 128 MiB. Before, the device thread panicked, every sample came out the same wrong bytes
/// and the program exited 0.
#[test]
fn buffers_past_the_device_limit_are_one_line_errors() {
    let model = shipped_model();
    let greedy = |extra: &[&str]| {
        let mut rest = vec!["--temperature", "0", "--max-new", "12"];
        rest.extend(extra);
        rest.push("def main():  return x");
        on_checkpoint("generate", &model, "wgpu", &rest)
    };
    let out = greedy(&["--samples", "200"]);
    if no_adapter(&out) {
        return;
    }
    let client =
        megabyte::ops::try_client::<megabyte::ops::cubecl::wgpu::WgpuRuntime>(&Default::default())
            .unwrap();
    if megabyte::ops::max_buffer_bytes(&client) >= 209_715_200 {
        // A device whose largest buffer holds the cache: every greedy sample is then the same
        // bytes as one sample alone.
        assert!(out.status.success(), "{}", text(&out.stderr));
        let one = greedy(&[]);
        let sample = format!("--- sample 199 ---\n{}\n", text(&one.stdout));
        assert!(
            text(&out.stdout).ends_with(&sample),
            "{}",
            text(&out.stdout)
        );
        return;
    }
    assert_one_line_error(
        &out,
        "KV cache of the global stack of shape [4, 200, 256, 256] needs 209715200 bytes",
    );
    let limit = text(&out.stderr);
    assert!(limit.contains("sequences fit in one batch"), "{limit}");
    assert!(
        out.stdout.is_empty(),
        "printed results: {}",
        text(&out.stdout)
    );
    let prompt = "x".repeat(380);
    let preset = ["generate", "--preset", "paper-image640", "--device", "wgpu"];
    let out = megabyte(&[&preset[..], &["--max-new", "4", &prompt]].concat());
    assert_one_line_error(
        &out,
        "KV cache of the global stack of shape [12, 1, 6400, 768]",
    );
    assert_has(&out.stderr, "GiB of f32 weights");
    assert!(
        out.stdout.is_empty(),
        "printed results: {}",
        text(&out.stdout)
    );
}

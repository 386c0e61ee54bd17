//! Bad input — damaged or foreign checkpoints, prompts and windows that do not fit, counts out
//! of range — ends in one line on stderr naming what is wrong, and exit code 1.

use megabyte::checkpoint;
use megabyte::{Config, Weights};

use crate::common::*;

#[test]
fn bad_input_gets_a_one_line_error() {
    let (path, cfg, w) = tiny_checkpoint("cli_errors.safetensors");
    let p = arg(&path);
    // A truncated checkpoint.
    let bytes = std::fs::read(&path).unwrap();
    let cut = temp("cli_truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = generate_cpu(&cut, &["x"]);
    assert_one_line_error(&out, "cli_truncated.safetensors");
    // A checkpoint whose stored config does not match its tensors.
    let wrong = Config {
        d_local: 64,
        heads_local: 1,
        ..cfg.clone()
    };
    let meta = checkpoint::config_metadata(&wrong);
    let mismatched = temp("cli_mismatched.safetensors");
    std::fs::write(&mismatched, unchecked_checkpoint_with(&cfg, &w, &[], meta)).unwrap();
    let out = generate_cpu(&mismatched, &["x"]);
    assert_one_line_error(
        &out,
        "tensor `global_to_local.weight` has shape [16, 32], the config needs [16, 64]",
    );
    // An empty prompt, an over-long prompt, too many new bytes.
    let out = generate_cpu(p, &[""]);
    assert_one_line_error(&out, "the prompt is empty");
    let long = "x".repeat(64);
    let out = generate_cpu(p, &[&long]);
    assert_one_line_error(
        &out,
        "prompt of 64 bytes plus 1 new byte exceeds the context of 64 bytes",
    );
    let out = generate_cpu(p, &["--max-new", "100", "abc"]);
    assert_one_line_error(
        &out,
        "prompt of 3 bytes plus 100 new bytes exceeds the context of 64 bytes",
    );
    // An evaluation stride longer than the context.
    let out = eval_cpu(p, &["--stride", "65", "/nonexistent/file"]);
    assert_one_line_error(
        &out,
        "the evaluation stride 65 must be between 1 and the window length 64",
    );
    // A window that is not a whole number of patches, and a stride past a shorter window.
    assert_one_line_error(
        &eval_cpu(p, &["--window", "30", "/nonexistent/file"]),
        "the evaluation window 30 must be a multiple of the patch size 4 between 4 and the context length 64",
    );
    assert_one_line_error(
        &eval_cpu(
            p,
            &["--window", "32", "--stride", "48", "/nonexistent/file"],
        ),
        "the evaluation stride 48 must be between 1 and the window length 32",
    );
    // A missing file to evaluate, and no model at all.
    let out = eval_cpu(p, &["/nonexistent/file"]);
    assert_one_line_error(&out, "/nonexistent/file");
    let out = megabyte(&["generate", "abc"]);
    assert_one_line_error(&out, "give --checkpoint FILE or --preset NAME");
}

/// A checkpoint is refused, naming the tensor, when a weight is NaN or infinite (it generated
/// 0xFF bytes), and metadata claiming sizes the file cannot hold is refused before anything is
/// allocated (`d_local = 1000000000` aborted `info` on a 100+ GB allocation).
#[test]
fn corrupt_checkpoints_are_refused_naming_the_fault() {
    let cfg = Config::tiny();
    let mut w = Weights::random(&cfg, 8);
    w.local_embed[17] = f32::NAN;
    let nan = temp("cli_nan.safetensors");
    std::fs::write(&nan, unchecked_checkpoint(&cfg, &w, &[])).unwrap();
    let out = generate_cpu(&nan, &["x"]);
    assert_one_line_error(&out, "tensor `local.embed` holds NaN at index 17");
    w.local_embed[17] = f32::INFINITY;
    std::fs::write(&nan, unchecked_checkpoint(&cfg, &w, &[])).unwrap();
    let out = megabyte(&["info", "--checkpoint", arg(&nan)]);
    assert_one_line_error(&out, "tensor `local.embed` holds inf at index 17");
    let w = Weights::random(&cfg, 8);
    for (key, value, what) in [
        ("d_local", "1000000000", "the parameter count overflows"),
        ("layers_global", "1000000000", "more than the"),
        ("context", "18446744073709551612", "must be below 2^31"),
        ("heads_local", "-1", "is not a non-negative integer"),
    ] {
        let mut meta = checkpoint::config_metadata(&cfg);
        meta.insert(key.into(), value.into());
        let path = temp(&format!("cli_absurd_{key}.safetensors"));
        std::fs::write(&path, unchecked_checkpoint_with(&cfg, &w, &[], meta)).unwrap();
        let out = megabyte(&["info", "--checkpoint", arg(&path)]);
        assert_one_line_error(&out, what);
    }
}

/// Words of errors that were unclear: the eval file that is empty, `--dtype f16` on the cpu
/// reference (ignored before), the new-byte count that was asked for, an overflowing
/// `info --context`, a truncated file described rather than named by safetensors' variant.
#[test]
fn errors_say_what_is_wrong() {
    let (path, _, _) = tiny_checkpoint("cli_words.safetensors");
    let p = arg(&path);
    let empty = temp("cli_words_empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = eval_cpu(p, &[arg(&empty)]);
    assert_one_line_error(&out, "cli_words_empty.txt: the file is empty");
    let out = generate_cpu(p, &["--dtype", "f16", "x"]);
    assert_one_line_error(&out, "--dtype f16 needs a kernel device");
    let long = "x".repeat(64);
    let out = generate_cpu(p, &["--max-new", "16", &long]);
    assert_one_line_error(
        &out,
        "prompt of 64 bytes plus 16 new bytes exceeds the context of 64 bytes",
    );
    // Counts that would overflow or allocate without bound.
    let max = "18446744073709551615";
    for (args, what) in [
        (
            vec!["generate", "--samples", "0", "x"],
            "samples = 0 is out of range",
        ),
        (
            vec!["generate", "--samples", "100000000000", "x"],
            "samples = 100000000000",
        ),
        (
            vec!["generate", "--max-new", max, "x"],
            "prompt of 1 byte plus 18446744073709551615 new bytes",
        ),
        (vec!["eval", "--batch", "0", p], "batch = 0 is out of range"),
    ] {
        let mut all = args.clone();
        all.extend(["--checkpoint", p, "--device", "cpu"]);
        assert_one_line_error(&megabyte(&all), what);
    }
    let data = code_corpus("cli_words_data.txt", 50);
    let never = temp("cli_words_never.safetensors");
    let out = train(
        &data,
        &never,
        &["--batch", "1000000000000", "--device", "wgpu"],
    );
    if !no_adapter(&out) {
        assert_one_line_error(&out, "training logits of shape [64000000000000, 256]");
    }
    let context = "18446744073709551608";
    let out = megabyte(&["info", "--preset", "tiny", "--context", context]);
    assert_one_line_error(&out, "`context` = 18446744073709551608: must be below 2^31");
    let bytes = std::fs::read(&path).unwrap();
    let cut = temp("cli_words_cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let out = megabyte(&["info", "--checkpoint", arg(&cut)]);
    assert_one_line_error(&out, "do not cover the data exactly (truncated or padded)");
    assert!(!text(&out.stderr).contains("MetadataIncompleteBuffer"));
}

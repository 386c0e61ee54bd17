//! The ROCm path proven without a GPU, as `cuda_codegen` proves the CUDA one: every kernel
//! variant the planners give the built-in presets on a gfx90a (`DeviceProfile::hip_gfx90a`) is
//! defined through the wgpu client, compiled to HIP C++ by cubecl-cpp's HIP dialect (the
//! compiler `cubecl-hip` uses at run time) and to a gfx90a code object by Debian's ROCm 5.2
//! (`hipcc --genco`, unbundled with `clang-offload-bundler-15`). Registers (VGPR, AGPR, SGPR),
//! LDS, scratch and spill counts come from the code object's metadata (`llvm-readelf-15
//! --notes`), and scratch instructions inside loops from its disassembly (`llvm-objdump-15 -d`:
//! a loop runs from a backward branch's target to the branch). All of it goes to
//! `target/rocm-resources.md`. The test fails on a variant that does not compile and on a main
//! (attention or GEMM) variant with scratch inside a loop.
//!
//! What this ROCm cannot compile is listed in the table with the compiler's own reason, not
//! skipped: bf16 (the HIP dialect includes `hip/hip_bf16.h`; ROCm 5.2 has only
//! `hip/hip_bfloat16.h`), and gfx1100 and gfx942 (one variant is tried for each: Debian's
//! ROCm has no gfx1100 device libraries, clang-15 does not know gfx942). The gfx90a profile
//! plans no CMMA variant: the dialect's tensor-core path needs rocWMMA, which Debian does not
//! package. The GELU variants hit two bugs of cubecl-cpp 0.10's HIP dialect (see
//! [`HIP_DIALECT_BUGS`]); they are listed with the compiler's message, and any other failure
//! fails the test.
//!
//! Needs `hipcc` (`scripts/install-rocm-tools.sh`: `apt-get install hipcc libamdhip64-dev`);
//! without it the test skips, except under `CI=true`, where it fails. Run:
//! `cargo test -p megabyte-tests --features rocm --test rocm_codegen` (`MEGABYTE_CODEGEN_ONLY=text`
//! keeps only the variants whose name contains `text`, as in the CUDA check).
#![cfg(feature = "rocm")]

use std::path::{Path, PathBuf};
use std::process::Command;

use cubecl::prelude::*;
use cubecl_cpp::hip::mma::WmmaIntrinsicCompiler;
use cubecl_cpp::hip::HipDialect;
use cubecl_cpp::shared::CppCompiler;
use megabyte_tests::in_ci;
use megabyte_tests::plans::rocm_profiles;

#[path = "codegen/variants.rs"]
mod variants;
use variants::{
    assert_main_variants_clean, cpp_source, enumerate, once, par_map, plan_sections, run_tool,
    Source, Variant, W,
};

type HipCompiler = CppCompiler<HipDialect<WmmaIntrinsicCompiler>>;

const ARCH: &str = "gfx90a";
/// Vector registers per lane of a gfx90a SIMD (architectural and accumulation registers share
/// them), allocated in granules of 8; at most 8 waves per SIMD.
const VGPRS_PER_SIMD: usize = 512;
const MAX_WAVES: usize = 8;

/// HIP C++ for a kernel definition, as `cubecl-hip` generates it at run time, and the kernel's
/// dynamic shared memory (LDS) in bytes, which the code object's metadata does not count.
fn hip_source(def: KernelDefinition) -> Result<(String, usize), String> {
    cpp_source(HipCompiler::default(), 64, def)
}

/// One kernel's resources on gfx90a.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Resources {
    vgpr: usize,
    agpr: usize,
    sgpr: usize,
    /// Static LDS from the metadata plus the dynamic LDS the launch asks for.
    lds: usize,
    /// Private (scratch) bytes per work item.
    scratch: usize,
    vgpr_spills: usize,
    sgpr_spills: usize,
    scratch_in_loops: usize,
}

impl Resources {
    /// Waves per SIMD the vector registers allow.
    fn waves(&self) -> usize {
        let used = (self.vgpr + self.agpr).max(1).next_multiple_of(8);
        (VGPRS_PER_SIMD / used).min(MAX_WAVES)
    }
}

/// Reads the first kernel's entries of `llvm-readelf --notes` (AMDGPU metadata, YAML).
fn parse_notes(notes: &str) -> Resources {
    let field = |key: &str| {
        notes
            .lines()
            .find_map(|l| l.trim().trim_start_matches("- ").strip_prefix(key))
            .and_then(|v| v.trim_start_matches(':').trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    Resources {
        vgpr: field(".vgpr_count"),
        agpr: field(".agpr_count"),
        sgpr: field(".sgpr_count"),
        lds: field(".group_segment_fixed_size"),
        scratch: field(".private_segment_fixed_size"),
        vgpr_spills: field(".vgpr_spill_count"),
        sgpr_spills: field(".sgpr_spill_count"),
        scratch_in_loops: 0,
    }
}

/// Scratch instructions inside loops in `llvm-objdump -d` output. An instruction line ends in
/// `// <address>: <encoding>` and a branch's in ` <kernel+0xOFF>` (its target); a branch whose
/// target lies at or before it closes a loop over the addresses between. Scratch is reached
/// through `scratch_*` or `buffer_*` instructions: the kernels reach global memory through
/// pointers (`global_*`), so a buffer resource is only ever the private segment's.
fn scratch_in_loops(disassembly: &str) -> usize {
    let mut base = None;
    let mut ins: Vec<(u64, bool)> = Vec::new();
    let mut loops: Vec<(u64, u64)> = Vec::new();
    for line in disassembly.lines() {
        // `0000000000001600 <k>:` opens the kernel.
        if let Some(head) = line.strip_suffix(">:") {
            if let Some((addr, _)) = head.split_once(" <") {
                base = u64::from_str_radix(addr.trim(), 16).ok();
            }
            continue;
        }
        let Some((op, comment)) = line.split_once("//") else {
            continue;
        };
        let Some(addr) = comment
            .trim()
            .split(':')
            .next()
            .and_then(|a| u64::from_str_radix(a.trim(), 16).ok())
        else {
            continue;
        };
        let op = op.trim();
        let scratch = op.starts_with("scratch_") || op.starts_with("buffer_");
        ins.push((addr, scratch));
        if op.starts_with("s_branch") || op.starts_with("s_cbranch") {
            let target = comment
                .rsplit_once("+0x")
                .and_then(|(_, off)| u64::from_str_radix(off.trim_end_matches('>'), 16).ok());
            if let (Some(base), Some(off)) = (base, target) {
                if base + off <= addr {
                    loops.push((base + off, addr));
                }
            }
        }
    }
    ins.iter()
        .filter(|(addr, scratch)| *scratch && loops.iter().any(|(s, e)| s <= addr && addr <= e))
        .count()
}

/// Compiles `source` for `arch` to a code object and reads its resources.
fn compile(dir: &Path, name: &str, source: &str, arch: &str) -> Result<Resources, String> {
    let hip = dir.join(format!("{name}.hip"));
    let bundle = dir.join(format!("{name}.{arch}.co"));
    let elf = dir.join(format!("{name}.{arch}.elf"));
    std::fs::write(&hip, source).map_err(|e| e.to_string())?;
    let offload = format!("--offload-arch={arch}");
    run_tool(
        "hipcc",
        &[
            "--genco".as_ref(),
            offload.as_ref(),
            "-O3".as_ref(),
            hip.as_os_str(),
            "-o".as_ref(),
            bundle.as_os_str(),
        ],
    )?;
    let input = format!("--input={}", bundle.display());
    let output = format!("--output={}", elf.display());
    let targets = format!("--targets=hipv4-amdgcn-amd-amdhsa--{arch}");
    run_tool(
        "clang-offload-bundler-15",
        &[
            "--unbundle".as_ref(),
            "--type=o".as_ref(),
            input.as_ref(),
            targets.as_ref(),
            output.as_ref(),
        ],
    )?;
    let notes = run_tool("llvm-readelf-15", &["--notes".as_ref(), elf.as_os_str()])?;
    let mcpu = format!("--mcpu={arch}");
    let disassembly = run_tool(
        "llvm-objdump-15",
        &["-d".as_ref(), mcpu.as_ref(), elf.as_os_str()],
    )?;
    std::fs::write(dir.join(format!("{name}.{arch}.s")), &disassembly)
        .map_err(|e| e.to_string())?;
    Ok(Resources {
        scratch_in_loops: scratch_in_loops(&disassembly),
        ..parse_notes(&notes)
    })
}

/// Whether Debian's ROCm tools are on the path.
fn tools() -> bool {
    let have = [
        "hipcc",
        "clang-offload-bundler-15",
        "llvm-readelf-15",
        "llvm-objdump-15",
    ]
    .iter()
    .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !have && in_ci() {
        panic!("CI=true: hipcc or the LLVM 15 tools are missing (scripts/install-rocm-tools.sh)");
    }
    if !have {
        eprintln!("SKIPPED: no hipcc (scripts/install-rocm-tools.sh installs Debian's ROCm 5.2)");
    }
    have
}

/// Every variant's name, whether it is main, and its gfx90a resources; compiled once per
/// test process.
type Compiled = Vec<(String, bool, Resources)>;

fn compiled() -> Option<&'static Compiled> {
    static COMPILED: std::sync::OnceLock<Result<Option<Compiled>, String>> =
        std::sync::OnceLock::new();
    once(&COMPILED, compile_all)
}

/// The outcome of one variant: resources, a reason it cannot compile on this ROCm, or a
/// failure.
enum Outcome {
    Compiled(Resources),
    Unsupported(String),
    Failed(String),
}

fn source(v: Variant) -> Source {
    (v.name, v.main, hip_source(v.def))
}

fn compile_variant(dir: &Path, (name, _, source): &Source) -> Outcome {
    match source {
        Err(e) => Outcome::Failed(format!("HIP codegen failed: {e}")),
        Ok((source, dynamic_lds)) => match compile(dir, name, source, ARCH) {
            Ok(r) => Outcome::Compiled(Resources {
                lds: r.lds + dynamic_lds,
                ..r
            }),
            Err(log) if name.ends_with("_bf16") && log.contains("hip/hip_bf16.h") => {
                Outcome::Unsupported(first_error(&log))
            }
            Err(log)
                if name.contains("gelu") && HIP_DIALECT_BUGS.iter().any(|b| log.contains(b)) =>
            {
                Outcome::Unsupported(format!(
                    "cubecl-cpp 0.10's HIP dialect emits invalid C++ for the GELU polynomial: {}",
                    first_error(&log)
                ))
            }
            Err(log) => Outcome::Failed(format!("hipcc rejected it:\n{log}")),
        },
    }
}

/// What cubecl-cpp 0.10's HIP dialect gets wrong in the GELU kernels (the activation, its
/// backward and the GEMM's GELU epilogue), which its CUDA dialect gets right: the mutable
/// locals of the polynomial are used but never declared, and bool vectors are built from int
/// expressions in braces (a narrowing clang rejects). A GELU variant failing with one of these
/// is listed, not failed; any other failure fails the test.
const HIP_DIALECT_BUGS: [&str; 2] = [
    "use of undeclared identifier 'l_mut_",
    "cannot be narrowed from type 'int' to 'bool'",
];

/// The first line of a compiler log that says `error`, or its first line.
fn first_error(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains("error"))
        .or_else(|| log.lines().next())
        .unwrap_or("");
    line.rsplit_once("error: ")
        .map_or(line, |(_, e)| e)
        .trim()
        .to_string()
}

fn compile_all() -> Option<Compiled> {
    let c = megabyte_tests::client::<W>().filter(|_| tools())?;
    let mut sink = enumerate(c, rocm_profiles());
    let mut sources: Vec<Source> = std::mem::take(&mut sink.variants)
        .into_iter()
        .map(source)
        .collect();
    sources.sort_by(|a, b| a.0.cmp(&b.0));
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let dir = target.join("rocm-codegen");
    std::fs::create_dir_all(&dir).unwrap();

    let done = par_map(&sources, |v| compile_variant(&dir, v));

    // The other architectures, tried once on the source of the first variant gfx90a compiled.
    let mut other_archs = Vec::new();
    let first = sources
        .iter()
        .zip(&done)
        .find(|(_, o)| matches!(o, Outcome::Compiled(_)));
    if let Some(((name, _, Ok((source, _))), _)) = first {
        for arch in ["gfx1100", "gfx942"] {
            let reason = match compile(&dir, name, source, arch) {
                Ok(_) => "compiles (add it to the check)".to_string(),
                Err(log) => first_error(&log),
            };
            other_archs.push(format!("- {arch} ({name}): {reason}"));
        }
    }
    let outcomes = sources
        .iter()
        .zip(done)
        .map(|((name, main, _), outcome)| (name.clone(), *main, outcome));

    let mut table = String::from(
        "# ROCm resources per kernel variant (gfx90a, Debian's ROCm 5.2)\n\n\
         Generated by `cargo test -p megabyte-tests --features rocm --test rocm_codegen`. \
         Waves: per SIMD, as the vector registers allow (512 per lane, at most 8).\n\n\
         | variant | VGPR | AGPR | SGPR | LDS bytes (static + dynamic) | scratch bytes | VGPR spills | SGPR spills | waves | scratch instructions in loops |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let (mut results, mut unsupported, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for (name, main, outcome) in outcomes {
        match outcome {
            Outcome::Compiled(r) => {
                table += &format!(
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    r.vgpr,
                    r.agpr,
                    r.sgpr,
                    r.lds,
                    r.scratch,
                    r.vgpr_spills,
                    r.sgpr_spills,
                    r.waves(),
                    r.scratch_in_loops
                );
                results.push((name, main, r));
            }
            Outcome::Unsupported(reason) => unsupported.push(format!("- {name}: {reason}")),
            Outcome::Failed(log) => failures.push(format!("{name}: {log}")),
        }
    }
    table += "\n## Not compiled by this ROCm, with the compiler's reason\n\n";
    table += "- CMMA variants (`flash_attention_cmma`, `gemm_cmma`): not planned for gfx90a; the HIP dialect's tensor-core path includes rocWMMA, which Debian does not package.\n";
    for line in other_archs.iter().chain(&unsupported) {
        table += line;
        table += "\n";
    }
    table += &plan_sections(&sink.planned, &sink.refused);
    std::fs::write(target.join("rocm-resources.md"), &table).unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Some(results)
}

/// Every variant compiles (or is listed with its reason), and, as on CUDA, no main attention or
/// GEMM variant touches scratch inside a loop; scratch elsewhere is printed.
#[test]
fn every_kernel_variant_compiles_for_gfx90a_and_main_ones_keep_scratch_out_of_loops() {
    let Some(all) = compiled() else {
        return;
    };
    assert!(!all.is_empty());
    for (name, main, r) in all {
        if r.scratch > 0 || r.vgpr_spills > 0 || r.sgpr_spills > 0 {
            let kind = if *main { "main" } else { "other" };
            eprintln!("scratch ({kind}): {name}: {r:?}");
        }
    }
    assert_main_variants_clean(all, |r| r.scratch_in_loops, "scratch");
}

/// The checker itself: a kernel with a run-time-indexed register array inside a loop keeps it
/// in scratch and is caught there, a plain kernel is not, a broken one is an error, and the
/// metadata parser reads what it is given.
#[test]
fn the_checker_catches_scratch_in_a_loop_and_a_broken_kernel() {
    let notes = "  - .agpr_count:     2\n    .group_segment_fixed_size: 256\n    \
                 .private_segment_fixed_size: 272\n    .sgpr_count:     18\n    \
                 .sgpr_spill_count: 1\n    .vgpr_count:     10\n    .vgpr_spill_count: 3\n";
    let r = parse_notes(notes);
    assert_eq!(
        r,
        Resources {
            vgpr: 10,
            agpr: 2,
            sgpr: 18,
            lds: 256,
            scratch: 272,
            vgpr_spills: 3,
            sgpr_spills: 1,
            scratch_in_loops: 0,
        }
    );
    assert_eq!(r.waves(), 8);
    assert_eq!(
        Resources {
            vgpr: 130,
            ..r.clone()
        }
        .waves(),
        3
    );
    let disassembly = "0000000000001600 <k>:\n\
        \tbuffer_store_dword v7, off, s[0:3], 0 offset:16 // 000000001680: E0700010 80000700\n\
        \tglobal_load_dword v1, v[2:3], off // 000000001690: DC508000 017F0002\n\
        \tbuffer_load_dword v5, v4, s[0:3], 0 offen // 0000000020C8: E0501000 80000504\n\
        \ts_cbranch_scc0 65511 // 00000000210C: BF84FFE7 <k+0xac0>\n\
        \tbuffer_load_dword v4, v6, s[0:3], 0 offen // 000000002110: E0501000 80000406\n";
    assert_eq!(scratch_in_loops(disassembly), 1);
    if !tools() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("megabyte-rocm-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header = "#include <hip/hip_runtime.h>\n";
    let local = format!(
        "{header}extern \"C\" __global__ void k(float* x, const int* idx, int n) {{\n\
         float a[64];\n\
         for (int i = 0; i < 64; i++) a[i] = x[i * blockDim.x + threadIdx.x];\n\
         float s = 0.0f;\n\
         for (int i = 0; i < n; i++) {{ a[idx[i] & 63] += s; s += a[(idx[i] + 7) & 63]; }}\n\
         x[threadIdx.x] = s; }}"
    );
    let r = compile(&dir, "local_array_in_loop", &local, ARCH).unwrap();
    assert!(r.scratch > 0 && r.scratch_in_loops > 0, "{r:?}");
    let good =
        format!("{header}extern \"C\" __global__ void k(float* x) {{ x[threadIdx.x] *= 2.0f; }}");
    let r = compile(&dir, "good", &good, ARCH).unwrap();
    assert_eq!((r.scratch, r.scratch_in_loops), (0, 0), "{r:?}");
    let broken = format!(
        "{header}extern \"C\" __global__ void k(float* x) {{ x[threadIdx.x] = __no_such_intrinsic(x[0]); }}"
    );
    let err = compile(&dir, "broken", &broken, ARCH).unwrap_err();
    assert!(err.contains("__no_such_intrinsic"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

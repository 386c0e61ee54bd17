//! The CUDA path proven without a GPU: every kernel variant the model launches on CUDA is
//! defined (through the wgpu client, which only supplies the builder's device properties),
//! compiled to CUDA C++ by cubecl-cpp's CUDA dialect (the compiler `cubecl-cuda` uses at run
//! time), compiled by NVRTC to PTX for sm_80 and sm_90, and assembled by `ptxas -v` for sm_90,
//! whose register, shared-memory and spill counts go to `target/cuda-resources.md`, with the
//! local-memory instructions `nvdisasm` finds inside loops. A main attention or GEMM variant
//! that touches local memory inside a loop fails `main_variants_keep_local_memory_out_of_loops`
//! (see there for the few bytes ptxas may spill outside loops). A tensor-core (CMMA) variant
//! whose PTX has no `wmma`/`mma` instruction fails the test.
//!
//! NVRTC, ptxas and nvdisasm come from NVIDIA's PyPI wheels, unpacked by
//! `scripts/install-cuda-tools.sh` into the folder named by `MEGABYTE_CUDA_TOOLS`. Without it
//! the test skips, except under `CI=true`, where it fails. NVRTC is called through
//! `cudarc::nvrtc`, which loads the wheel's library by name from `LD_LIBRARY_PATH`. Run:
//! `MEGABYTE_CUDA_TOOLS=DIR LD_LIBRARY_PATH=DIR/nvidia/cuda_nvrtc/lib cargo test -p megabyte-tests --features cuda-codegen --test cuda_codegen`.
//! `MEGABYTE_CODEGEN_ONLY=text` keeps only the variants whose name contains `text` (for
//! iterating on one kernel; refused under `CI=true`, where every variant must be checked).
#![cfg(feature = "cuda-codegen")]

use std::path::{Path, PathBuf};

use cubecl::cuda::CudaCompiler;
use cubecl::prelude::*;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use megabyte_tests::in_ci;
use megabyte_tests::plans::cuda_profiles;

#[path = "codegen/variants.rs"]
mod variants;
use variants::{
    assert_main_variants_clean, cpp_source, enumerate, once, par_map, plan_sections, run_tool,
    Sink, Source, W,
};

/// CUDA C++ for a kernel definition, as `cubecl-cuda` generates it at run time, and the
/// kernel's dynamic shared memory in bytes (which `ptxas -v` does not see).
fn cuda_source(def: KernelDefinition) -> Result<(String, usize), String> {
    cpp_source(CudaCompiler::default(), 32, def)
}

// ---- NVRTC through cudarc, loaded from the wheel ----

/// Checks that cudarc finds NVRTC: the wheel's `libnvrtc.so.12`, which the loader finds through
/// `LD_LIBRARY_PATH` (`.ci/run` sets it; a library loaded by name cannot be pointed at a folder
/// after the process has started). A clear message instead of cudarc's panic.
fn nvrtc_loads(tools: &Path) {
    // SAFETY: only probes whether the library loads; nothing is called through it.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        panic!(
            "NVRTC does not load: run with LD_LIBRARY_PATH={} (scripts/install-cuda-tools.sh put it there)",
            tools.join("nvidia/cuda_nvrtc/lib").display()
        );
    }
}

/// PTX for `source` on `arch` (e.g. "sm_90"), or NVRTC's log.
fn nvrtc(tools: &Path, source: &str, arch: &'static str) -> Result<String, String> {
    let include = |p: &str| tools.join(p).display().to_string();
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![
            include("nvidia/cuda_runtime/include"),
            include("nvidia/cuda_nvcc/include"),
            include("nvidia/cuda_cccl/include"),
        ],
        options: vec!["-lineinfo".into()],
        name: Some("kernel.cu".into()),
        ..Default::default()
    };
    match compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => Err(log.to_string_lossy().into_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// Registers, shared memory and spill bytes from `ptxas -v`, and the local-memory
/// instructions inside loops from the disassembly.
#[derive(Debug, Default, PartialEq)]
struct Resources {
    registers: u32,
    shared: u32,
    spill_stores: u32,
    spill_loads: u32,
    local_in_loops: usize,
}

fn parse_ptxas(log: &str) -> Resources {
    let mut r = Resources::default();
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(v) = num_before(line, "registers") {
            r.registers = r.registers.max(v);
        }
        if let Some(v) = num_before(line, "bytes smem") {
            r.shared = r.shared.max(v);
        }
        if let Some(v) = num_before(line, "bytes spill stores") {
            r.spill_stores = r.spill_stores.max(v);
        }
        if let Some(v) = num_before(line, "bytes spill loads") {
            r.spill_loads = r.spill_loads.max(v);
        }
    }
    r
}

/// Local-memory instructions (`LDL`/`STL`: spills and refills, or a register array indexed at
/// run time) inside loops of `nvdisasm -c` output. Outside loops such an instruction runs once
/// per unit; inside, once per iteration. Loops are the natural loops of the control-flow graph
/// (basic blocks split at labels and after branches and exits; a back edge is a branch to a
/// block that dominates it), so code between a loop and a cold block that branches back into
/// it is not counted, while the cold block is. Subroutines reached by `CALL` (ptxas's
/// out-of-line math slow paths) are not followed.
fn local_memory_in_loops(sass: &str) -> usize {
    let mut labels = std::collections::HashMap::new();
    let mut pending = Vec::new();
    let mut code: Vec<String> = Vec::new();
    for line in sass.lines() {
        let line = line.trim();
        if let Some(label) = line.strip_suffix(':').filter(|l| !l.starts_with("/*")) {
            pending.push(label.to_string());
            continue;
        }
        // `/*0a40*/   @P0 BRA `(.L_x_3) ;`
        let Some((_, text)) = line.strip_prefix("/*").and_then(|r| r.split_once("*/")) else {
            continue;
        };
        for label in pending.drain(..) {
            labels.insert(label, code.len());
        }
        code.push(text.trim().to_string());
    }
    let n = code.len();
    // (opcode, predicated, branch target)
    let ins: Vec<(String, bool, Option<usize>)> = code
        .iter()
        .map(|text| {
            let (predicated, body) = match text.strip_prefix('@') {
                Some(rest) => (
                    !rest.starts_with("PT "),
                    rest.split_once(char::is_whitespace).map_or("", |(_, t)| t),
                ),
                None => (false, text.as_str()),
            };
            let op = body.split_whitespace().next().unwrap_or("");
            let op = op.split('.').next().unwrap_or("").to_string();
            let target = (op == "BRA")
                .then(|| body.split("`(").nth(1)?.split(')').next())
                .flatten()
                .and_then(|l| labels.get(l).copied());
            (op, predicated, target)
        })
        .collect();
    let ends_block = |op: &str| matches!(op, "BRA" | "BRX" | "JMP" | "JMX" | "EXIT" | "RET");
    let mut leader = vec![false; n];
    if n > 0 {
        leader[0] = true;
    }
    for (i, (op, _, target)) in ins.iter().enumerate() {
        if let Some(t) = target {
            leader[*t] = true;
        }
        if ends_block(op) && i + 1 < n {
            leader[i + 1] = true;
        }
    }
    let starts: Vec<usize> = (0..n).filter(|&i| leader[i]).collect();
    let block_of = {
        let mut b = vec![0usize; n];
        for (k, &s) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(n);
            b[s..end].fill(k);
        }
        b
    };
    let nb = starts.len();
    let succ: Vec<Vec<usize>> = (0..nb)
        .map(|k| {
            let last = starts.get(k + 1).copied().unwrap_or(n) - 1;
            let (op, predicated, target) = &ins[last];
            let falls_through = !ends_block(op) || *predicated;
            let mut next: Vec<usize> = target.iter().map(|&t| block_of[t]).collect();
            if falls_through && last + 1 < n {
                next.push(block_of[last + 1]);
            }
            next
        })
        .collect();
    // Reverse postorder from the entry, then immediate dominators (Cooper, Harvey, Kennedy).
    let mut order = Vec::new();
    let mut seen = vec![false; nb];
    let mut stack = vec![(0usize, 0usize)];
    if nb > 0 {
        seen[0] = true;
    }
    while let Some((b, i)) = stack.pop() {
        if let Some(&next) = succ[b].get(i) {
            stack.push((b, i + 1));
            if !seen[next] {
                seen[next] = true;
                stack.push((next, 0));
            }
        } else {
            order.push(b);
        }
    }
    order.reverse();
    let mut rank = vec![usize::MAX; nb];
    for (r, &b) in order.iter().enumerate() {
        rank[b] = r;
    }
    let mut pred = vec![Vec::new(); nb];
    for (b, next) in succ.iter().enumerate() {
        for &s in next {
            pred[s].push(b);
        }
    }
    let mut idom = vec![usize::MAX; nb];
    if nb > 0 {
        idom[0] = 0;
    }
    let mut changed = true;
    while changed {
        changed = false;
        for &b in order.iter().skip(1) {
            let mut new = usize::MAX;
            for &p in &pred[b] {
                if idom[p] == usize::MAX {
                    continue;
                }
                new = if new == usize::MAX {
                    p
                } else {
                    let (mut x, mut y) = (p, new);
                    while x != y {
                        while rank[x] > rank[y] {
                            x = idom[x];
                        }
                        while rank[y] > rank[x] {
                            y = idom[y];
                        }
                    }
                    x
                };
            }
            if new != idom[b] {
                idom[b] = new;
                changed = true;
            }
        }
    }
    let dominates = |v: usize, mut u: usize| loop {
        if u == v {
            return true;
        }
        if u == 0 || idom[u] == usize::MAX {
            return false;
        }
        u = idom[u];
    };
    // Natural loops: for each back edge u → v, v and every block that reaches u without v.
    let mut in_loop = vec![false; nb];
    for u in 0..nb {
        if rank[u] == usize::MAX {
            continue;
        }
        for &v in &succ[u] {
            if !dominates(v, u) {
                continue;
            }
            in_loop[v] = true;
            let mut body = vec![false; nb];
            body[v] = true;
            let mut work = vec![u];
            while let Some(x) = work.pop() {
                if !body[x] {
                    body[x] = true;
                    in_loop[x] = true;
                    work.extend(pred[x].iter().copied().filter(|&p| rank[p] != usize::MAX));
                }
            }
        }
    }
    ins.iter()
        .enumerate()
        .filter(|(i, (op, _, _))| matches!(op.as_str(), "LDL" | "STL") && in_loop[block_of[*i]])
        .count()
}

/// Assembles `ptx` for sm_90 with `ptxas -v`, then disassembles the cubin with `nvdisasm`.
fn ptxas(tools: &Path, ptx: &str, dir: &Path, name: &str) -> Result<Resources, String> {
    let ptx_path = dir.join(format!("{name}.ptx"));
    let cubin = dir.join(format!("{name}.cubin"));
    std::fs::write(&ptx_path, ptx).map_err(|e| e.to_string())?;
    let log = run_tool(
        tools.join("nvidia/cuda_nvcc/bin/ptxas"),
        &[
            "-arch=sm_90".as_ref(),
            "-v".as_ref(),
            "-o".as_ref(),
            cubin.as_os_str(),
            ptx_path.as_os_str(),
        ],
    )?;
    let sass = run_tool(
        tools.join("nvidia/cu13/bin/nvdisasm"),
        &["-c".as_ref(), cubin.as_os_str()],
    )?;
    std::fs::write(dir.join(format!("{name}.sass")), &sass).map_err(|e| e.to_string())?;
    Ok(Resources {
        local_in_loops: local_memory_in_loops(&sass),
        ..parse_ptxas(&log)
    })
}

fn tools() -> Option<PathBuf> {
    match std::env::var_os("MEGABYTE_CUDA_TOOLS") {
        Some(p) => {
            let p = PathBuf::from(p);
            for tool in ["nvidia/cuda_nvcc/bin/ptxas", "nvidia/cu13/bin/nvdisasm"] {
                assert!(
                    p.join(tool).exists(),
                    "{} has no {tool}: rerun scripts/install-cuda-tools.sh on it",
                    p.display()
                );
            }
            Some(p)
        }
        None if in_ci() => panic!("CI=true: MEGABYTE_CUDA_TOOLS is not set (scripts/install-cuda-tools.sh installs NVRTC, ptxas and nvdisasm)"),
        None => {
            eprintln!("SKIPPED: set MEGABYTE_CUDA_TOOLS to a folder made by scripts/install-cuda-tools.sh");
            None
        }
    }
}

fn client() -> Option<ComputeClient<W>> {
    megabyte_tests::client::<W>()
}

/// Every variant's name, whether it is main, and its sm_90 resources; compiled once per test
/// process (both tests read it).
type Compiled = Vec<(String, bool, Resources)>;

fn compiled() -> Option<&'static Compiled> {
    static COMPILED: std::sync::OnceLock<Result<Option<Compiled>, String>> =
        std::sync::OnceLock::new();
    once(&COMPILED, compile_all)
}

/// Compiles every variant (CUDA C++ → NVRTC sm_80 and sm_90 → ptxas sm_90 → nvdisasm), writes
/// the resource table, and returns every variant's resources.
fn compile_all() -> Option<Compiled> {
    let (Some(tools), Some(c)) = (tools(), client()) else {
        return None;
    };
    nvrtc_loads(&tools);
    let Sink {
        variants,
        planned,
        refused,
        ..
    } = enumerate(c, cuda_profiles());

    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let dir = target.join("cuda-codegen");
    std::fs::create_dir_all(&dir).unwrap();
    let mut table = String::from(
        "# CUDA resources per kernel variant (ptxas -v, sm_90)\n\n\
         Generated by `cargo test -p megabyte-tests --features cuda-codegen --test cuda_codegen`.\n\n\
         | variant | registers | shared bytes (static + dynamic) | spill stores | spill loads | local-memory instructions in loops |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    // CUDA C++ here, one variant after another; NVRTC, ptxas and nvdisasm on every core.
    let sources: Vec<Source> = variants
        .into_iter()
        .map(|v| (v.name, v.main, cuda_source(v.def)))
        .collect();
    let compiled = par_map(&sources, |v| compile_variant(&tools, &dir, v));
    let mut failures = Vec::new();
    let mut results = Vec::new();
    for ((name, main, _), (errors, resources)) in sources.into_iter().zip(compiled) {
        failures.extend(errors);
        let Some(r) = resources else { continue };
        table += &format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            r.registers, r.shared, r.spill_stores, r.spill_loads, r.local_in_loops
        );
        results.push((name, main, r));
    }
    table += &plan_sections(&planned, &refused);
    std::fs::write(target.join("cuda-resources.md"), &table).unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Some(results)
}

/// One variant through NVRTC (sm_80, sm_90), ptxas and nvdisasm (sm_90): the failures, in the
/// order the steps ran, and the sm_90 resources (shared memory with the dynamic part added)
/// when ptxas assembled it.
fn compile_variant(
    tools: &Path,
    dir: &Path,
    (name, _, source): &Source,
) -> (Vec<String>, Option<Resources>) {
    let (source, dynamic_shared) = match source {
        Ok(s) => s,
        Err(e) => return (vec![format!("{name}: CUDA codegen failed: {e}")], None),
    };
    std::fs::write(dir.join(format!("{name}.cu")), source).unwrap();
    let mut failures = Vec::new();
    let mut sm90 = None;
    for arch in ["sm_80", "sm_90"] {
        match nvrtc(tools, source, arch) {
            Ok(ptx) if arch == "sm_90" => sm90 = Some(ptx),
            Ok(_) => {}
            Err(log) => failures.push(format!("{name} ({arch}): NVRTC rejected it:\n{log}")),
        }
    }
    let Some(ptx) = sm90 else {
        return (failures, None);
    };
    if uses_tensor_cores(name) && !has_matrix_instructions(&ptx) {
        failures.push(format!(
            "{name}: a tensor-core variant whose sm_90 PTX has no wmma/mma instruction"
        ));
    }
    match ptxas(tools, &ptx, dir, name) {
        Ok(r) => {
            let shared = r.shared + *dynamic_shared as u32;
            (failures, Some(Resources { shared, ..r }))
        }
        Err(log) => {
            failures.push(format!("{name}: ptxas failed:\n{log}"));
            (failures, None)
        }
    }
}

/// The tensor-core variants, by name.
fn uses_tensor_cores(name: &str) -> bool {
    name.contains("_cmma_")
}

/// True when PTX holds a warp-level matrix multiply (`wmma.mma.sync…` or `mma.sync…`), possibly
/// predicated.
fn has_matrix_instructions(ptx: &str) -> bool {
    ptx.lines().any(|line| {
        let op = line.trim_start();
        let op = match op.strip_prefix('@') {
            Some(rest) => rest
                .split_once(char::is_whitespace)
                .map_or("", |(_, o)| o.trim_start()),
            None => op,
        };
        op.starts_with("wmma.mma.sync") || op.starts_with("mma.sync")
    })
}

#[test]
fn every_kernel_variant_compiles_for_sm80_and_sm90() {
    if let Some(all) = compiled() {
        for (name, main, r) in all {
            if r.spill_stores > 0 || r.spill_loads > 0 || r.local_in_loops > 0 {
                eprintln!(
                    "spill ({}): {name}: {r:?}",
                    if *main { "main" } else { "other" }
                );
            }
        }
    }
}

/// The resource rule: no main attention or GEMM variant touches local memory inside a loop,
/// where a spill would cost once per iteration (per key tile, K step or key).
///
/// ptxas may still spill a few bytes outside loops. When the kernel declares its cube size
/// (`__launch_bounds__(units)`, as cubecl-cuda emits) and its register need sits a little
/// above a step in the number of cubes a multiprocessor can hold, ptxas caps the registers at
/// that step and spills values that are live across the main loop but used only before or
/// after it: one store and one load per unit, for one more resident cube (NVIDIA documents
/// this heuristic with `__launch_bounds__`). Such spills are listed in
/// `target/cuda-resources.md`. They come and go with unrelated edits (in an experiment, not
/// kept, hoisting two stride reads out of the flash kernel's key loop removed its 4-byte spill
/// at head dim 32 and brought 8-byte ones at head dim 128), and even between runs of the same
/// code: cubecl places the shared arrays at offsets that change from process to process, and
/// the flash tile at head dim 32 spills 4 bytes in some runs and none in others.
#[test]
fn main_variants_keep_local_memory_out_of_loops() {
    if let Some(all) = compiled() {
        assert_main_variants_clean(all, |r| r.local_in_loops, "local memory");
    }
}

/// The checker itself: a source NVRTC must reject (an intrinsic that does not exist) is
/// reported as a failure, and the ptxas parser reads the numbers it is given.
#[test]
fn the_checker_catches_a_broken_kernel() {
    assert_eq!(
        parse_ptxas(
            "ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem\n    \
             24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads"
        ),
        Resources {
            registers: 40,
            shared: 4096,
            spill_stores: 8,
            spill_loads: 12,
            local_in_loops: 0
        }
    );
    // The tensor-core rule reads matrix instructions, predicated or not, and nothing else.
    assert!(has_matrix_instructions(
        "\twmma.mma.sync.aligned.row.row.m16n16k16.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    ));
    assert!(has_matrix_instructions(
        "  @%p3 mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    ));
    assert!(!has_matrix_instructions(
        "\tfma.rn.f32 %f3, %f1, %f2, %f3;\n\tld.shared.v4.f32 {%f1, %f2, %f3, %f4}, [%r1];\n// wmma.mma.sync in a comment"
    ));
    assert!(uses_tensor_cores(
        "gemm_cmma_64x64x32_2x2planes_bias_gelu_f16"
    ));
    // Local memory counts inside a loop (label up to a branch back to it, predicated or not)
    // and not before or after it.
    let sass = "        /*0000*/                   STL [R1], R12 ;\n\
                .L_x_3:\n\
                        /*0010*/                   LDS R4, [R2] ;\n\
                        /*0020*/                   LDL.LU R10, [R1+0x4] ;\n\
                        /*0030*/               @P0 BRA `(.L_x_3) ;\n\
                        /*0040*/                   LDL R10, [R1] ;\n\
                .L_x_9:\n\
                        /*0050*/                   BRA `(.L_x_9);\n";
    assert_eq!(local_memory_in_loops(sass), 1);
    for branch in [
        "BRA.U `(.L_x_3)",
        "@!P0 BRA `(.L_x_3)",
        "@P1 BRA.DIV `(.L_x_3)",
    ] {
        let sass = sass.replace("@P0 BRA `(.L_x_3)", branch);
        assert_eq!(local_memory_in_loops(&sass), 1, "{branch}");
    }
    assert_eq!(
        local_memory_in_loops(&sass.replace("@P0 BRA `(.L_x_3)", "@P0 BRA `(.L_x_9)")),
        0
    );
    // A cold block after the kernel's exit that branches back into the loop is in the loop;
    // the code after the loop, between the two, is not.
    let cold = "        /*0000*/                   STL [R1], R12 ;\n\
                .L_x_3:\n\
                        /*0010*/                   LDS R4, [R2] ;\n\
                        /*0020*/               @P0 BRA `(.L_x_7) ;\n\
                .L_x_4:\n\
                        /*0030*/               @P1 BRA `(.L_x_3) ;\n\
                        /*0040*/                   LDL R10, [R1] ;\n\
                        /*0050*/                   EXIT ;\n\
                .L_x_7:\n\
                        /*0060*/                   LDL R11, [R1+0x8] ;\n\
                        /*0070*/                   BRA `(.L_x_4) ;\n";
    assert_eq!(local_memory_in_loops(cold), 1);
    let Some(tools) = tools() else {
        return;
    };
    nvrtc_loads(&tools);
    let good = "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }";
    assert!(nvrtc(&tools, good, "sm_90").is_ok());
    let broken =
        "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] = __no_such_intrinsic(x[0]); }";
    let err = nvrtc(&tools, broken, "sm_90").unwrap_err();
    assert!(err.contains("__no_such_intrinsic"), "{err}");

    // The loop rule: a register array indexed at run time inside a loop lives in local memory,
    // and its loads and stores are found inside the loop; the good kernel has none.
    let dir = std::env::temp_dir().join(format!("megabyte-codegen-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let local = "extern \"C\" __global__ void k(float* x, const int* idx, int n) {\n\
                 float a[64];\n\
                 for (int i = 0; i < 64; i++) a[i] = x[i * blockDim.x + threadIdx.x];\n\
                 float s = 0.0f;\n\
                 for (int i = 0; i < n; i++) { a[idx[i] & 63] += s; s += a[(idx[i] + 7) & 63]; }\n\
                 x[threadIdx.x] = s; }";
    let ptx = nvrtc(&tools, local, "sm_90").unwrap();
    let r = ptxas(&tools, &ptx, &dir, "local_array_in_loop").unwrap();
    assert!(r.local_in_loops > 0, "{r:?}");
    let ptx = nvrtc(&tools, good, "sm_90").unwrap();
    assert_eq!(ptxas(&tools, &ptx, &dir, "good").unwrap().local_in_loops, 0);
    std::fs::remove_dir_all(&dir).ok();
}

//! Build script: compiles `kernels/*.cu` into fatbins with nvcc, embeds them, and generates the
//! Rust mirror of the kernel parameter headers (`kernels/*.h`) with bindgen.
//!
//! Without the `cuda` feature, or without nvcc, the crate builds CPU-only (a `cargo:warning`
//! says why); `ATTNKIT_REQUIRE_NVCC=1` turns a missing nvcc into a build error.
//!
//! Environment:
//! - `NVCC`, `CUDA_HOME`, `CUDA_PATH`, `PATH`: where nvcc is looked for, in that order, then
//!   the project-local toolchain that `scripts/toolchain.sh` fills (`.toolchain/`).
//! - `ATTNKIT_CUDA_ARCHS`: SASS targets, comma separated (default `80,90a`).
//! - `ATTNKIT_CUDA_PTX`: the virtual arch embedded as PTX for newer GPUs (default `90`), or
//!   `none` for SASS only (the GPU bundle: `scripts/gpu-bundle.sh` builds sm_90a alone).
//! - `ATTNKIT_NO_NVCC=1`: behave as if nvcc were absent (to test the CPU-only build).
//! - `ATTNKIT_PTXAS_VERBOSE=1`: print ptxas' register/spill report (shown by `cargo build -vv`);
//!   with `ATTNKIT_DENY_SPILLS=1` too, a kernel that spills registers fails the build.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest PTX ISA the target driver (R580, CUDA 13.0) accepts. PTX newer than this fails
/// at module load time on the user's machine; we fail the build instead.
const MAX_PTX_ISA: (u32, u32) = (9, 0);

fn main() {
    println!("cargo::rustc-check-cfg=cfg(attnkit_cuda)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "ATTNKIT_CUDA_ARCHS",
        "ATTNKIT_CUDA_PTX",
        "ATTNKIT_NO_NVCC",
        "ATTNKIT_REQUIRE_NVCC",
        "ATTNKIT_PTXAS_VERBOSE",
        "ATTNKIT_DENY_SPILLS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = manifest.join("kernels");
    let mut sources = Vec::new();
    let mut headers = Vec::new();
    for entry in fs::read_dir(&kernels).expect("kernels/ exists").flatten() {
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "cu" | "cuh" | "h") {
            println!("cargo::rerun-if-changed={}", path.display());
        }
        match ext {
            "cu" => sources.push(path),
            "h" => headers.push(path),
            _ => {}
        }
    }
    sources.sort();
    headers.sort();

    let require = env::var("ATTNKIT_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let nvcc = match find_nvcc(&manifest) {
        Some(nvcc) => nvcc,
        None => {
            let why = "nvcc not found (looked at NVCC, CUDA_HOME/bin, CUDA_PATH/bin, PATH and \
                       .toolchain/ from scripts/toolchain.sh)";
            if require {
                panic!("ATTNKIT_REQUIRE_NVCC=1 but {why}");
            }
            println!("cargo::warning=attnkit: {why}; building CPU-only (GPU kernels compiled out)");
            return;
        }
    };

    // bindgen first: it is cheap, and without libclang there is no GPU build to make.
    if let Err(e) = generate_params(&headers, &out.join("params.rs")) {
        if require {
            panic!("ATTNKIT_REQUIRE_NVCC=1 but the parameter mirror failed: {e}");
        }
        println!("cargo::warning=attnkit: {e}; building CPU-only (GPU kernels compiled out)");
        return;
    }

    let archs = env::var("ATTNKIT_CUDA_ARCHS").unwrap_or_else(|_| "80,90a".to_string());
    let ptx_arch = env::var("ATTNKIT_CUDA_PTX").unwrap_or_else(|_| "90".to_string());
    let mut gencode = Vec::new();
    for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        check_arch(arch, "ATTNKIT_CUDA_ARCHS");
        gencode.push(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    // `none`: SASS only. nvcc still writes each SASS target's PTX under --keep, so the ISA
    // check below runs either way.
    let ptx = ptx_arch.trim() != "none";
    if ptx {
        check_arch(&ptx_arch, "ATTNKIT_CUDA_PTX");
        gencode.push(format!(
            "-gencode=arch=compute_{ptx_arch},code=compute_{ptx_arch}"
        ));
    }
    let verbose = env::var("ATTNKIT_PTXAS_VERBOSE").is_ok_and(|v| v == "1");

    // Compile the files in parallel: nvcc is single threaded per file and arch.
    let results: Vec<Result<(String, PathBuf), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(|| compile(&nvcc, src, &kernels, &out, &gencode, verbose)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("nvcc thread panicked".to_string()))
            })
            .collect()
    });
    let mut modules = Vec::new();
    for r in results {
        match r {
            Ok(m) => modules.push(m),
            Err(e) => panic!("{e}"),
        }
    }

    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| l.contains("release"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string());
    let mut rs = String::from("// Generated by build.rs: the embedded kernel fatbins.\n");
    rs += &format!("pub const NVCC_VERSION: &str = {:?};\n", version.trim());
    rs += &format!(
        "pub const ARCHS: &str = {:?};\n",
        if ptx {
            format!("sass {archs}; ptx compute_{ptx_arch}")
        } else {
            format!("sass {archs}; no ptx")
        }
    );
    rs += "pub const FATBINS: &[(&str, &[u8])] = &[\n";
    for (name, path) in &modules {
        rs += &format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        );
    }
    rs += "];\n";
    fs::write(out.join("kernels.rs"), rs).expect("write kernels.rs");
    println!("cargo::rustc-cfg=attnkit_cuda");
}

fn check_arch(arch: &str, var: &str) {
    let digits = arch.trim_end_matches(['a', 'f']);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        panic!("{var}: `{arch}` is not an architecture like 80, 86, 89, 90a or 120");
    }
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if env::var("ATTNKIT_NO_NVCC").is_ok_and(|v| v == "1") {
        return None;
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin").join("nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(manifest.join(".toolchain/cuda/nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Compiles one `.cu` into a fatbin; returns (module name, fatbin path).
fn compile(
    nvcc: &Path,
    src: &Path,
    kernels: &Path,
    out: &Path,
    gencode: &[String],
    verbose: bool,
) -> Result<(String, PathBuf), String> {
    let name = src
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("kernel")
        .to_string();
    let fatbin = out.join(format!("{name}.fatbin"));
    // One compile per content: clippy, doc, test and release builds each run this script in
    // their own OUT_DIR, and nvcc is the slow part of every one of them.
    let cached = cache_path(out, &name, nvcc, kernels, gencode, verbose);
    if let Some(c) = &cached {
        if c.is_file() && fs::copy(c, &fatbin).is_ok() {
            // Replay ptxas' report, so every build's output holds it (scripts/perf-structure.sh
            // reads it there); spills were refused when it was made, if they are refused now.
            if verbose {
                for line in fs::read_to_string(c.with_extension("ptxas.txt"))
                    .unwrap_or_default()
                    .lines()
                {
                    println!("{name}: {line}");
                }
            }
            return Ok((name, fatbin));
        }
    }
    // --keep leaves the PTX beside the fatbin so its ISA version can be checked below.
    let keep = out.join(format!("keep-{name}"));
    let _ = fs::remove_dir_all(&keep);
    fs::create_dir_all(&keep).map_err(|e| format!("create {}: {e}", keep.display()))?;
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args(["-O3", "-lineinfo", "-std=c++17", "--expt-relaxed-constexpr"])
        .arg("-I")
        .arg(kernels)
        .args(gencode)
        .arg("--keep")
        .arg("--keep-dir")
        .arg(&keep)
        .arg("-o")
        .arg(&fatbin)
        .arg(src);
    if verbose {
        cmd.args(["-Xptxas", "-v"]);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("nvcc failed on {}:\n{stderr}", src.display()));
    }
    if verbose {
        // Plain lines show in `cargo build -vv`; spills are a warning in any build, and an
        // error under ATTNKIT_DENY_SPILLS=1 (CI: no shipped configuration may spill).
        let deny = env::var("ATTNKIT_DENY_SPILLS").is_ok_and(|v| v == "1");
        let mut function = String::new();
        let mut spills = Vec::new();
        for line in stderr.lines() {
            println!("{name}: {line}");
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                function = rest.replace('\'', "");
            }
            if line.contains("spill")
                && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
            {
                let msg = format!("{function}: {}", line.trim());
                println!("cargo::warning=attnkit {msg}");
                spills.push(msg);
            }
        }
        if deny && !spills.is_empty() {
            return Err(format!(
                "register spills (ATTNKIT_DENY_SPILLS=1):\n{}",
                spills.join("\n")
            ));
        }
    }
    let mut checked = 0;
    for entry in fs::read_dir(&keep).map_err(|e| e.to_string())?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "ptx") {
            let text = fs::read_to_string(&path).map_err(|e| e.to_string())?;
            check_ptx_isa(&text, &path)?;
            checked += 1;
        }
    }
    if checked == 0 {
        return Err(format!(
            "{}: nvcc left no PTX to check the ISA version of",
            src.display()
        ));
    }
    let _ = fs::remove_dir_all(&keep);
    if let Some(c) = cached {
        // Best effort: a failed copy only costs the next build a compile.
        let _ = fs::create_dir_all(c.parent().unwrap_or(out)).and_then(|_| fs::copy(&fatbin, &c));
        if verbose {
            let _ = fs::write(c.with_extension("ptxas.txt"), stderr.as_bytes());
        }
    }
    Ok((name, fatbin))
}

/// Where a compiled fatbin is cached: `<target>/attnkit-kernels/<name>-<key>.fatbin`, the key
/// hashing every file under kernels/, nvcc's path and the flags (so a cache hit is exactly what
/// this compile would produce, spill checks included). None when the target dir is unknown.
fn cache_path(
    out: &Path,
    name: &str,
    nvcc: &Path,
    kernels: &Path,
    gencode: &[String],
    verbose: bool,
) -> Option<PathBuf> {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    let target = out.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file())?;
    let mut h = DefaultHasher::new();
    (
        name,
        nvcc,
        gencode,
        verbose,
        env::var("ATTNKIT_DENY_SPILLS").ok(),
    )
        .hash(&mut h);
    let mut files: Vec<PathBuf> = fs::read_dir(kernels)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files {
        (f.file_name(), fs::read(&f).ok()?).hash(&mut h);
    }
    Some(
        target
            .join("attnkit-kernels")
            .join(format!("{name}-{:016x}.fatbin", h.finish())),
    )
}

fn check_ptx_isa(ptx: &str, path: &Path) -> Result<(), String> {
    let Some(line) = ptx.lines().find(|l| l.trim_start().starts_with(".version")) else {
        return Err(format!(
            "{}: no .version directive in the PTX",
            path.display()
        ));
    };
    let v = line.trim_start().trim_start_matches(".version").trim();
    let mut parts = v
        .split('.')
        .map(|p| p.trim().parse::<u32>().unwrap_or(u32::MAX));
    let isa = (parts.next().unwrap_or(u32::MAX), parts.next().unwrap_or(0));
    if isa > MAX_PTX_ISA {
        return Err(format!(
            "{}: nvcc emitted PTX ISA {v}, but the target driver (R580, CUDA 13.0) loads at most \
             {}.{}; use the pinned toolchain (scripts/toolchain.sh) or a CUDA 13.0 nvcc",
            path.display(),
            MAX_PTX_ISA.0,
            MAX_PTX_ISA.1
        ));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn generate_params(headers: &[PathBuf], out: &Path) -> Result<(), String> {
    if !clang_sys::is_loaded() && clang_sys::load().is_err() {
        return Err(
            "libclang not found: bindgen needs it to mirror kernels/*.h (Debian: \
                    libclang-dev; scripts/toolchain.sh installs it)"
                .to_string(),
        );
    }
    let mut builder = bindgen::Builder::default()
        .use_core()
        .allowlist_type(".*Params")
        .allowlist_var("ATTNKIT_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .generate_comments(true);
    for h in headers {
        builder = builder.header(h.display().to_string());
    }
    let bindings = builder
        .generate()
        .map_err(|e| format!("bindgen on kernels/*.h failed: {e}"))?;
    bindings
        .write_to_file(out)
        .map_err(|e| format!("write {}: {e}", out.display()))
}

#[cfg(not(feature = "cuda"))]
fn generate_params(_: &[PathBuf], _: &Path) -> Result<(), String> {
    Ok(())
}

//! Runs the `smoke` example against this crate's libcuda.so, the way scripts/emulate.sh
//! does: the loader reads LD_LIBRARY_PATH only at start-up, so it takes a child process.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn smoke_example_passes_on_the_emulated_driver() {
    // This test runs from target/<profile>/deps/; cargo built the examples beside it before
    // running any test.
    let exe = std::env::current_exe().expect("test path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .expect("target/<profile>");
    // Cargo does not build a cdylib for integration tests: build it, with this test's profile
    // into this test's target directory (the build lock is free while tests run).
    let cargo_profile = match profile.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => panic!("no profile in {}", profile.display()),
    };
    let target_dir = profile.parent().expect("target dir");
    let built = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--lib", "-p", "attnkit-emulator-driver"])
        .args(["--profile", &cargo_profile, "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .expect("run cargo build");
    assert!(built.success(), "cargo build of the driver failed");
    // Not named libcuda.so (see Cargo.toml): only the links below make it one.
    let lib = profile.join("libattnkit_emu_cuda.so");
    let example = profile.join("examples").join("smoke");
    assert!(lib.is_file(), "{} not built", lib.display());
    assert!(example.is_file(), "{} not built", example.display());

    // libcuda.so.1 too, as scripts/emulate.sh makes it, so a client looking for either works.
    let dir = profile.join("emulator-test-lib");
    std::fs::create_dir_all(&dir).expect("lib dir");
    for name in ["libcuda.so", "libcuda.so.1"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link).expect("symlink");
    }
    let out = Command::new(&example)
        .env("LD_LIBRARY_PATH", &dir)
        .output()
        .expect("run the smoke example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("smoke: all checks passed"),
        "smoke example failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Each unsupported function is named once, however often it is called.
    assert_eq!(
        stderr.matches("cuMemAllocManaged is not supported").count(),
        1,
        "{stderr}"
    );
}

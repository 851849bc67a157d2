//! `cargo xtask fuzz`: every target in `fuzz/` (cargo-fuzz, nightly) run
//! for a bounded time. `fuzz/` is a workspace of its own, so stable builds
//! of the main one never see it.
//!
//! The targets run without a sanitizer (`-s none`): the `chaperone` crate is
//! safe Rust (`#![deny(unsafe_code)]` outside `redirect/`, which no target
//! reaches), so what fuzzing finds is panics, overflows (debug assertions
//! are on), hangs and broken invariants the targets assert, and without
//! AddressSanitizer each target executes several times more inputs in the
//! same time.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::setup;

/// Every target in `fuzz/fuzz_targets`, in the order they run.
pub const TARGETS: &[&str] = &["request", "mask_json", "websocket", "spdy", "policy_yaml"];

/// Seconds each target runs in `cargo xtask test` (five targets: 100 s).
pub const CI_SECONDS: u64 = 20;

/// Builds the targets once, then runs each for `seconds`; the first crash
/// (or hang of more than 10 s on one input) fails with what to do next.
pub fn run(root: &Path, seconds: u64, only: &[String]) -> Result<()> {
    setup::cargo_fuzz()?;
    for name in only {
        if !TARGETS.contains(&name.as_str()) {
            bail!(
                "no fuzz target `{name}`; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let targets: Vec<&str> = if only.is_empty() {
        TARGETS.to_vec()
    } else {
        only.iter().map(String::as_str).collect()
    };
    println!(
        "    fuzzing {} for {seconds} s each (fuzz/, cargo-fuzz, nightly)",
        targets.join(", ")
    );
    // One build of every target, then each binary run directly: `cargo
    // fuzz run` would rebuild the crate for each target (its build flags
    // differ from `build`'s), minutes per target on these machines.
    fuzz(root, &["build", "-s", "none"])?;
    let binaries = target_dir().join(host_triple()).join("release");
    for target in targets {
        let corpus = root.join("fuzz/corpus").join(target);
        let seeds = root.join("fuzz/seeds").join(target);
        let artifacts = root.join("fuzz/artifacts").join(target);
        for dir in [&corpus, &artifacts] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut command = Command::new(binaries.join(target));
        command.arg(&corpus);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        command
            .arg(format!("-max_total_time={seconds}"))
            .arg("-timeout=10")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .current_dir(root);
        println!("    fuzz target {target}");
        let status = command.status().with_context(|| {
            format!(
                "cannot run the fuzz target {} (built by `cargo +nightly fuzz build -s none`)",
                binaries.join(target).display()
            )
        })?;
        if !status.success() {
            bail!(
                "the fuzz target `{target}` failed ({status}): the input is in \
                 fuzz/artifacts/{target}/ (libFuzzer printed its name above). Reproduce it with \
                 `cargo +nightly fuzz run -s none {target} fuzz/artifacts/{target}/<file>`, fix \
                 the crate and add the input as a regression test beside the code it broke"
            );
        }
    }
    Ok(())
}

/// Where the fuzz builds go: a cache beside the kube binaries
/// (`/var/cache/chaperone/fuzz-target`, or `$CHAPERONE_FUZZ_TARGET`), not
/// the clone's `fuzz/target`. The fuzz workspace is built with nightly and
/// coverage instrumentation, so it shares nothing with the main build; kept
/// across clones it costs CI seconds instead of a full release build of
/// every dependency (about 10 minutes on 2 cores) each run.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CHAPERONE_FUZZ_TARGET")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/chaperone/fuzz-target"))
}

/// Variables `cargo run` sets for the binary it runs (besides
/// `CARGO_PKG_*`), which describe xtask and where this clone is.
const RUN_ENV: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// The host's target triple, which cargo-fuzz builds for explicitly.
fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn fuzz(root: &Path, args: &[&str]) -> Result<()> {
    let (subcommand, rest) = args.split_first().context("a cargo fuzz subcommand")?;
    let mut command = Command::new("cargo");
    command
        .arg("+nightly")
        .arg("fuzz")
        .arg(subcommand)
        .arg("--target-dir")
        .arg(target_dir())
        .args(rest)
        .current_dir(root)
        .env("PATH", setup::path_with_cargo_bin())
        // The toolchain is chosen by `+nightly`; a RUSTUP_TOOLCHAIN or
        // CARGO inherited from `cargo xtask` (stable) would override it.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    // What `cargo run` sets for xtask itself names this clone
    // (CARGO_MANIFEST_DIR=<clone>/xtask, ...). `ring`'s build script reads
    // those through `rerun-if-env-changed`, so inherited they made every
    // clone at another path rebuild ring and everything above it (rustls,
    // kube) in the shared cache: minutes of each CI fuzz build.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if RUN_ENV.contains(&name.as_ref()) || name.starts_with("CARGO_PKG_") {
            command.env_remove(name.as_ref());
        }
    }
    let status = command
        .status()
        .with_context(|| format!("cannot run cargo +nightly fuzz {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo +nightly fuzz {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

//! Idempotent installation of what building and testing chaperone needs.
//! Each step checks first, installs only what is missing, and says so.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The LLVM that bpf-linker links against (Debian's `llvm-22-dev`).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGE: &str = "llvm-22-dev";
/// Debian packages the tests use as real tools: `ip` (iproute2) for network
/// namespaces and veth pairs; nginx, the reverse proxy `cargo xtask bench`
/// compares chaperone with (the bench starts its own; the package's service
/// is not used); valgrind, whose callgrind counts the bench's instructions
/// per request.
const TEST_PACKAGES: &[&str] = &["iproute2", "nginx", "iptables", "valgrind"];

pub fn all() -> Result<()> {
    println!("==> setup (idempotent): eBPF toolchain and test tools");
    apt_packages(&[LLVM_PACKAGE, "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"])?;
    apt_packages(TEST_PACKAGES)?;
    nightly_rust_src()?;
    bpf_linker()?;
    manifest_validators()?;
    python_client()?;
    node_clients()?;
    cargo_fuzz()?;
    println!("==> setup done");
    Ok(())
}

pub(crate) fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!("    ok: {} (already installed)", packages.join(", "));
        return Ok(());
    }
    println!("    installing Debian packages: {}", missing.join(", "));
    if !is_root() {
        bail!(
            "Debian packages {} are missing and installing them needs root: \
             run `sudo apt-get install -y {}` and retry",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "the eBPF programs build with the nightly toolchain, which is not installed: \
             run `rustup toolchain install nightly --component rust-src`"
        );
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("    ok: rust-src for the nightly toolchain (already installed)");
        return Ok(());
    }
    println!("    installing rust-src for the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    if linker.is_file()
        && Command::new(&linker)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    {
        println!("    ok: bpf-linker ({})", linker.display());
        return Ok(());
    }
    println!("    installing bpf-linker, built against {LLVM_PREFIX} (takes a few minutes)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // bpf-linker's build script reads LLVM_PREFIX; llvm-sys reads the other.
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
}

/// The Kubernetes schema validators the deploy tests use (PyPI packages in
/// a project-local virtualenv, `target/py`); the script is idempotent.
fn manifest_validators() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace");
    println!("    checking the manifest validators (kubernetes-validate, jsonschema in target/py)");
    run(Command::new("bash")
        .arg(root.join("deploy/validate.sh"))
        .arg("setup")
        .current_dir(root))
}

/// The official Python Kubernetes client, the second real client library
/// the end-to-end tests run through chaperone (PyPI, pinned, in a
/// project-local virtualenv `target/py-client`); the script is idempotent.
fn python_client() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace");
    println!("    checking the Python kubernetes client (target/py-client)");
    run(Command::new("sh")
        .arg(root.join("tests/python/setup.sh"))
        .stdout(Stdio::null())
        .current_dir(root))
}

/// The Node.js agents of the end-to-end tests: `@kubernetes/client-node`
/// and kubernetes-mcp-server, from the npm registry into target/node-clients.
fn node_clients() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace");
    println!("    checking the Node.js clients (target/node-clients)");
    run(Command::new("sh")
        .arg(root.join("tests/node/setup.sh"))
        .stdout(Stdio::null())
        .current_dir(root))
}

/// cargo-fuzz, which builds and runs the fuzz targets in `fuzz/` with the
/// nightly toolchain (`cargo xtask fuzz`, and `cargo xtask test` after the
/// suite).
pub(crate) fn cargo_fuzz() -> Result<()> {
    let installed = Command::new(cargo_bin().join("cargo-fuzz"))
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if installed {
        println!("    ok: cargo-fuzz (already installed)");
        return Ok(());
    }
    println!("    installing cargo-fuzz from crates.io (takes a minute or two)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

/// PATH with cargo's bin directory (where bpf-linker lives) in front.
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

pub(crate) fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|o| o.trim() == "0")
        .unwrap_or(false)
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

//! Builds the eBPF programs in `interceptor-ebpf` for `bpfel-unknown-none`
//! and leaves the object in `OUT_DIR`, where `redirect` embeds it with
//! `include_bytes_aligned!`: one `cargo build` gives one binary.
//!
//! Needs the eBPF toolchain (`cargo xtask setup`): the nightly toolchain with
//! `rust-src`, and `bpf-linker` on PATH. Without the `ebpf` feature (the fuzz
//! targets' build) it builds nothing and leaves an empty object.

fn main() -> anyhow::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        // Built for the fuzz targets: an empty object, which `redirect`
        // refuses to load (and nothing here to rerun for but this file).
        println!("cargo:rerun-if-changed=build.rs");
        std::fs::write(out_dir.join("interceptor-ebpf"), [])?;
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .expect("interceptor/ lives inside the workspace")
        .join("interceptor-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("workspace path is UTF-8");
    if which("bpf-linker").is_none() {
        anyhow::bail!(
            "bpf-linker is not on PATH: the eBPF programs cannot be built. \
             Run `cargo xtask setup` once (it installs llvm-22-dev, bpf-linker and rust-src)."
        );
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "interceptor-ebpf",
            root_dir: ebpf_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::Nightly,
    )
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

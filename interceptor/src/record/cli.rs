//! `chaperone sessions`, `chaperone replay`, `chaperone verify`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Map, Value, json};

use super::chain::ChainKey;
use super::micro_time;
use super::read::{self, AgentSession, Recording, SessionSummary};

/// Where recordings live unless `--record-dir` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/chaperone/sessions";

/// How a list is printed, as kubectl's `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// A table.
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    Json,
    Yaml,
    /// `agentsession/NAME`, one a line.
    Name,
}

/// Where to find the record key and how long an agent may be idle.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// The recordings directory (the node agent's --record-dir; `--dir`
    /// is the older spelling).
    #[arg(
        long = "record-dir",
        visible_alias = "dir",
        env = "CHAPERONE_RECORD_DIR",
        default_value = DEFAULT_DIR
    )]
    pub dir: PathBuf,
    /// The node's record key, to check keyed chains (default: record.key
    /// beside --record-dir, when it exists); `none` checks chains without a key.
    #[arg(long, env = "CHAPERONE_RECORD_KEY", value_name = "FILE|none")]
    pub key: Option<String>,
    /// A pod idle for longer than this ends its agent session; its next
    /// connection starts another (`30s`, `5m`, `1h`).
    #[arg(long, default_value = "5m", value_parser = parse_gap)]
    pub gap: std::time::Duration,
}

fn parse_gap(text: &str) -> Result<std::time::Duration, crate::policy::DurationError> {
    crate::policy::parse_duration(text)
}

impl ReadArgs {
    /// The record key to verify with.
    pub fn key(&self) -> anyhow::Result<Option<ChainKey>> {
        let path = match self.key.as_deref() {
            Some("none") => return Ok(None),
            Some(path) => PathBuf::from(path),
            None => {
                let path = default_key_path(&self.dir);
                if !path.exists() {
                    return Ok(None);
                }
                path
            }
        };
        ChainKey::load(&path).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the record key {}: {e}; run as the user chaperone runs as (the key is readable by its owner only), pass --key FILE, or --key none to check the chains without it",
                path.display()
            )
        })
    }
}

/// The record key's default place: `record.key` beside the recordings
/// directory (`/var/lib/chaperone/record.key`).
pub fn default_key_path(dir: &std::path::Path) -> PathBuf {
    dir.with_file_name("record.key")
}

/// `chaperone sessions`: list agent sessions.
///
/// An agent session is one pod's activity until it was idle for longer
/// than `--gap`; each of its connections is recorded (and chained) on its
/// own. `--connections` lists the connections instead.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  chaperone sessions
  chaperone sessions --pod agents/coder-0 --gap 10m -o wide
  chaperone sessions -o json | jq '.items[].connections[].id'
  chaperone sessions --connections")]
pub struct SessionsArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// Only the sessions of this pod (`namespace/name`).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
    /// One row per connection (each one's own recording) instead of one
    /// per agent session.
    #[arg(long)]
    pub connections: bool,
}

/// `chaperone replay`: print an agent session (or one connection) as a
/// timeline.
///
/// A verb ending in `>` marks where a long-running response (watch, exec,
/// attach) started; the request appears again when it completed.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  chaperone replay coder-0-1a2b3c4d          an agent session, as `chaperone sessions` names it
  chaperone replay 20261123T111702Z-1a2b3c4d5e6f   one connection
  chaperone replay coder-0-1a2b3c4d --json")]
pub struct ReplayArgs {
    /// An agent session (from `chaperone sessions`), a connection id (from
    /// `chaperone sessions --connections`) or the path of a .jsonl file.
    pub session: String,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `chaperone verify`: check the hash chains of an agent session (every
/// connection) or of one connection, and the exec casts inside them.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  chaperone verify coder-0-1a2b3c4d
  chaperone verify coder-0-1a2b3c4d --audit-log /var/log/chaperone/audit.log --audit-log /var/log/chaperone/audit-2026-12-01.log
  chaperone verify 20261123T111702Z-1a2b3c4d5e6f --key /var/lib/chaperone/record.key")]
pub struct VerifyArgs {
    /// An agent session (from `chaperone sessions`), a connection id or the
    /// path of a .jsonl file.
    pub session: String,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Audit log files (audit.k8s.io/v1 JSON lines, as chaperone's file
    /// sink or a collector of its webhook writes them) to check the
    /// recordings against: every recorded request must be there saying the
    /// same, and (for an agent session) every request of the pod the log
    /// holds within the session must be recorded. Repeat for rotated files.
    #[arg(long = "audit-log", value_name = "FILE")]
    pub audit_logs: Vec<PathBuf>,
}

fn time_text(t: Option<time::OffsetDateTime>) -> String {
    t.map(|t| micro_time(t)[..19].replace('T', " ") + "Z")
        .unwrap_or_else(|| "-".into())
}

fn duration_text(a: Option<time::OffsetDateTime>, b: Option<time::OffsetDateTime>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format_duration((b - a).as_seconds_f64()),
        _ => "-".into(),
    }
}

fn chain_text(s: &SessionSummary) -> &'static str {
    if s.intact {
        "ok"
    } else if s.open {
        "open"
    } else {
        "BROKEN"
    }
}

fn connection_json(c: &SessionSummary, agent_session: Option<&str>) -> Value {
    json!({
        "id": c.id,
        "agentSession": agent_session,
        "path": c.path.display().to_string(),
        "pod": c.pod,
        "caller": c.caller,
        "executable": c.executable,
        "started": c.started.map(micro_time),
        "lastActivity": c.last.map(micro_time),
        "requests": c.exchanges,
        "allowed": c.allowed,
        "denied": c.denied,
        "masked": c.masked,
        "held": c.held,
        "streams": c.streams,
        "chain": chain_text(c),
    })
}

fn agent_json(a: &AgentSession) -> Value {
    let (namespace, pod) = a.pod.split_once('/').unwrap_or(("", &a.pod));
    json!({
        "apiVersion": "chaperone.dev/v1alpha1",
        "kind": "AgentSession",
        "metadata": {"name": a.name, "namespace": namespace},
        "pod": pod,
        "callers": a.callers(),
        "executables": a.executables(),
        "started": a.started().map(micro_time),
        "lastActivity": a.last().map(micro_time),
        "requests": a.total(|c| c.exchanges),
        "allowed": a.total(|c| c.allowed),
        "denied": a.total(|c| c.denied),
        "masked": a.total(|c| c.masked),
        "held": a.total(|c| c.held),
        "streams": a.total(|c| c.streams),
        "chain": a.chain(),
        "connections": a.connections.iter().map(|c| connection_json(c, None)).collect::<Vec<_>>(),
    })
}

fn write_structured(out: &mut dyn Write, output: Output, items: Vec<Value>) -> anyhow::Result<()> {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}});
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, &list)?;
            writeln!(out)?;
        }
        _ => out.write_all(serde_yaml::to_string(&list)?.as_bytes())?,
    }
    Ok(())
}

pub fn sessions(args: &SessionsArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let key = args.read.key()?;
    let list = read::list_sessions(&args.read.dir, args.pod.as_deref(), key.as_ref())?;
    let agents = read::group_sessions(list, args.read.gap);
    let structured = matches!(args.output, Output::Json | Output::Yaml);
    if agents.is_empty() && !structured {
        // kubectl says this on stderr; stdout stays empty for scripts.
        eprintln!("No sessions found under {}.", args.read.dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    if args.connections {
        let rows: Vec<(&AgentSession, &SessionSummary)> = agents
            .iter()
            .flat_map(|a| a.connections.iter().map(move |c| (a, c)))
            .collect();
        match args.output {
            Output::Json | Output::Yaml => {
                let items = rows
                    .iter()
                    .map(|(a, c)| connection_json(c, Some(&a.name)))
                    .collect();
                write_structured(out, args.output, items)?;
            }
            Output::Name => {
                for (_, c) in rows {
                    writeln!(out, "connection/{}", c.id)?;
                }
            }
            Output::Table | Output::Wide => {
                let wide = args.output == Output::Wide;
                let mut table = vec![
                    vec![
                        "CONNECTION",
                        "AGENT SESSION",
                        "POD",
                        "CALLER",
                        "START",
                        "DURATION",
                        "ALLOWED",
                        "DENIED",
                        "MASKED",
                        "HELD",
                        "CHAIN",
                    ]
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
                ];
                if wide {
                    table[0].push("EXECUTABLE".into());
                }
                for (a, c) in rows {
                    let mut row = vec![
                        c.id.clone(),
                        a.name.clone(),
                        c.pod.clone(),
                        c.caller.clone(),
                        time_text(c.started),
                        duration_text(c.started, c.last),
                        c.allowed.to_string(),
                        c.denied.to_string(),
                        c.masked.to_string(),
                        c.held.to_string(),
                        chain_text(c).to_owned(),
                    ];
                    if wide {
                        row.push(c.executable.clone().unwrap_or_else(|| "-".into()));
                    }
                    table.push(row);
                }
                write_table(out, &table)?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    match args.output {
        Output::Json | Output::Yaml => {
            write_structured(out, args.output, agents.iter().map(agent_json).collect())?;
        }
        Output::Name => {
            for a in &agents {
                writeln!(out, "agentsession/{}", a.name)?;
            }
        }
        Output::Table | Output::Wide => {
            let wide = args.output == Output::Wide;
            let mut table = vec![
                vec![
                    "NAME",
                    "POD",
                    "CALLER",
                    "START",
                    "DURATION",
                    "CONNECTIONS",
                    "REQUESTS",
                    "ALLOWED",
                    "DENIED",
                    "MASKED",
                    "HELD",
                    "CHAIN",
                ]
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            ];
            if wide {
                table[0].push("STREAMS".into());
                table[0].push("EXECUTABLES".into());
            }
            for a in &agents {
                let callers = a.callers();
                let mut row = vec![
                    a.name.clone(),
                    a.pod.clone(),
                    match callers.len() {
                        0 => "-".to_owned(),
                        1 => callers[0].clone(),
                        n => format!("{} (+{})", callers[0], n - 1),
                    },
                    time_text(a.started()),
                    duration_text(a.started(), a.last()),
                    a.connections.len().to_string(),
                    a.total(|c| c.exchanges).to_string(),
                    a.total(|c| c.allowed).to_string(),
                    a.total(|c| c.denied).to_string(),
                    a.total(|c| c.masked).to_string(),
                    a.total(|c| c.held).to_string(),
                    a.chain().to_owned(),
                ];
                if wide {
                    row.push(a.total(|c| c.streams).to_string());
                    let executables = a.executables();
                    row.push(if executables.is_empty() {
                        "-".into()
                    } else {
                        executables.join(",")
                    });
                }
                table.push(row);
            }
            write_table(out, &table)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Columns padded to their widest cell, three spaces apart, as kubectl
/// prints them.
fn write_table(out: &mut dyn Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < columns {
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 3));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn format_duration(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (secs / 3600.0) as u64,
            ((secs % 3600.0) / 60.0) as u64
        )
    }
}

/// What `replay` and `verify` were asked for: one connection's recording,
/// or an agent session's connections.
enum Target {
    Connection(Recording),
    Agent(AgentSession, Vec<Recording>),
}

fn target(spec: &str, read_args: &ReadArgs) -> anyhow::Result<Target> {
    let key = read_args.key()?;
    if read::is_connection_spec(spec) {
        let path = read::find_session(&read_args.dir, spec)?;
        return Ok(Target::Connection(read::read_session(&path, key.as_ref())?));
    }
    let agent = read::find_agent_session(&read_args.dir, spec, read_args.gap, key.as_ref())
        .map_err(|_| {
            anyhow::anyhow!(
                "no agent session {spec} under {dir} (idle gap {gap}): pass a NAME from `chaperone sessions --record-dir {dir}`, a connection id from `chaperone sessions --connections`, or the path of a .jsonl file; with another --gap the names differ",
                dir = read_args.dir.display(),
                gap = humantime_secs(read_args.gap),
            )
        })?;
    let recordings = agent
        .connections
        .iter()
        .map(|c| read::read_session(&c.path, key.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Target::Agent(agent, recordings))
}

fn humantime_secs(d: std::time::Duration) -> String {
    format_duration(d.as_secs_f64())
}

pub fn replay(args: &ReplayArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match target(&args.session, &args.read)? {
        Target::Connection(recording) => {
            if args.json {
                serde_json::to_writer_pretty(&mut *out, &replay_json(&recording))?;
                writeln!(out)?;
            } else {
                write_timeline(None, std::slice::from_ref(&recording), out)?;
            }
        }
        Target::Agent(agent, recordings) => {
            if args.json {
                let mut document = agent_json(&agent);
                document["verified"] =
                    json!(recordings.iter().all(|r| r.verification.broken.is_none()));
                document["connections"] =
                    Value::Array(recordings.iter().map(replay_json).collect());
                serde_json::to_writer_pretty(&mut *out, &document)?;
                writeln!(out)?;
            } else {
                write_timeline(Some(&agent), &recordings, out)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn strip(record: &Map<String, Value>) -> Value {
    let mut record = record.clone();
    record.remove("prev");
    record.remove("hash");
    Value::Object(record)
}

fn replay_json(recording: &Recording) -> Value {
    let dir = recording.path.parent().map(|d| d.display().to_string());
    let broken =
        recording.verification.broken.as_ref().map(
            |b| json!({"file": b.file.display().to_string(), "line": b.line, "reason": b.reason}),
        );
    json!({
        "session": strip(&recording.header),
        "dir": dir,
        "events": recording.records.iter().map(strip).collect::<Vec<_>>(),
        "verified": broken.is_none(),
        "broken": broken,
    })
}

/// `kubectl pid 42 uid 0 /usr/bin/kubectl < sh(40) < agent(12)`.
fn process_text(process: Option<&Value>) -> Option<String> {
    let p = process.filter(|p| !p.is_null())?;
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let mut text = format!(
        "{} pid {} uid {}",
        s(&p["command"]),
        p["pid"].as_u64().unwrap_or(0),
        p["uid"].as_u64().unwrap_or(0)
    );
    if let Some(exe) = p["executable"].as_str().filter(|e| !e.is_empty()) {
        text.push(' ');
        text.push_str(exe);
    }
    for parent in p["parents"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            " < {}({})",
            s(&parent["command"]),
            parent["pid"].as_u64().unwrap_or(0)
        ));
    }
    Some(text)
}

/// The timeline of one connection, or of an agent session's connections
/// merged in time order (each row tagged with its connection's number).
fn write_timeline(
    agent: Option<&AgentSession>,
    recordings: &[Recording],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("-").to_owned();
    let pod_of = |h: &Map<String, Value>| {
        h.get("pod")
            .filter(|p| !p.is_null())
            .map(|p| format!("{}/{}", s(p.get("namespace")), s(p.get("name"))))
            .unwrap_or_else(|| "-".into())
    };
    let caller_of = |h: &Map<String, Value>| {
        h.get("caller")
            .map(|c| s(c.get("username")))
            .unwrap_or("-".into())
    };
    match agent {
        None => {
            let h = &recordings[0].header;
            writeln!(
                out,
                "session {}  pod {}  caller {}  node {}  started {}",
                s(h.get("session")),
                pod_of(h),
                caller_of(h),
                s(h.get("node")),
                s(h.get("started")),
            )?;
            if let Some(process) = process_text(h.get("process")) {
                writeln!(out, "process {process}")?;
            }
        }
        Some(agent) => {
            writeln!(
                out,
                "agent session {}  pod {}  {} connection(s)  started {}",
                agent.name,
                agent.pod,
                recordings.len(),
                time_text(agent.started()),
            )?;
            for (i, recording) in recordings.iter().enumerate() {
                let h = &recording.header;
                let mut line = format!(
                    "  [{}] {}  caller {}  node {}",
                    i + 1,
                    s(h.get("session")),
                    caller_of(h),
                    s(h.get("node"))
                );
                if let Some(process) = process_text(h.get("process")) {
                    line.push_str("  process ");
                    line.push_str(&process);
                }
                writeln!(out, "{line}")?;
            }
        }
    }
    let tagged = agent.is_some();
    writeln!(
        out,
        "{}{:<16} {:<8} {:<28} {:<36} {:<20} {:>6} {:>10}",
        if tagged { "CONN " } else { "" },
        "TIME",
        "VERB",
        "RESOURCE",
        "NAMESPACE/NAME",
        "DECISION",
        "STATUS",
        "LATENCY"
    )?;
    // Every record of every connection, in time order.
    let mut rows: Vec<(usize, &Map<String, Value>)> = recordings
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.records.iter().map(move |record| (i, record)))
        .collect();
    rows.sort_by(|a, b| {
        let time = |r: &Map<String, Value>| {
            r.get("time")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        time(a.1).cmp(&time(b.1))
    });
    for (conn, r) in rows {
        let recording = &recordings[conn];
        let tag = if tagged {
            format!("{:<5}", format!("[{}]", conn + 1))
        } else {
            String::new()
        };
        let dir = recording.path.parent().unwrap_or(std::path::Path::new("."));
        let time = s(r.get("time"));
        let clock = time.get(11..26).unwrap_or(&time).to_owned();
        match r.get("type").and_then(Value::as_str) {
            Some("exchange") => {
                let mut resource = s(r.get("resource"));
                if let Some(sub) = r.get("subresource").and_then(Value::as_str) {
                    resource = format!("{resource}/{sub}");
                }
                if resource == "-" {
                    resource = s(r.get("uri"));
                }
                let target = match (
                    r.get("namespace").and_then(Value::as_str),
                    r.get("name").and_then(Value::as_str),
                ) {
                    (Some(ns), Some(name)) => format!("{ns}/{name}"),
                    (Some(ns), None) => format!("{ns}/"),
                    (None, Some(name)) => name.to_owned(),
                    (None, None) => "-".into(),
                };
                let mut decision = s(r.get("decision"));
                if let Some(approval) = r.get("approval").and_then(Value::as_str) {
                    decision = format!("{decision}({approval})");
                }
                let latency = r
                    .get("latencyMs")
                    .and_then(Value::as_f64)
                    .map(|ms| format!("{ms:.1}ms"))
                    .unwrap_or_else(|| "-".into());
                let status = r.get("status").and_then(Value::as_u64).unwrap_or(0);
                let verb = match r.get("stage").and_then(Value::as_str) {
                    Some("ResponseStarted") => format!("{}>", s(r.get("verb"))),
                    _ => s(r.get("verb")),
                };
                writeln!(
                    out,
                    "{tag}{:<16} {:<8} {:<28} {:<36} {:<20} {:>6} {:>10}",
                    clock, verb, resource, target, decision, status, latency
                )?;
                if let (Some(reason), Some(message)) = (
                    r.get("reason").and_then(Value::as_str),
                    r.get("message").and_then(Value::as_str),
                ) && !(reason.is_empty() && message.is_empty())
                {
                    writeln!(out, "{tag}{:<16} └ {reason}: {message}", "")?;
                }
                let masked = r.get("masked").and_then(Value::as_u64).unwrap_or(0);
                if masked > 0 {
                    writeln!(out, "{tag}{:<16} └ {masked} value(s) masked", "")?;
                }
            }
            Some("stream") => {
                let cast = s(r.get("cast"));
                writeln!(
                    out,
                    "{tag}{:<16} stream   {}  ({} bytes in, {} bytes out)",
                    clock,
                    s(r.get("title")),
                    r.get("bytesIn").and_then(Value::as_u64).unwrap_or(0),
                    r.get("bytesOut").and_then(Value::as_u64).unwrap_or(0),
                )?;
                writeln!(
                    out,
                    "{tag}{:<16} └ asciinema play {}",
                    "",
                    dir.join(cast).display()
                )?;
            }
            Some("gap") => writeln!(
                out,
                "{tag}{:<16} GAP: {} record(s) were dropped (recording queue full)",
                clock,
                r.get("dropped").and_then(Value::as_u64).unwrap_or(0)
            )?,
            _ => {}
        }
    }
    for broken in recordings
        .iter()
        .filter_map(|r| r.verification.broken.as_ref())
    {
        writeln!(
            out,
            "WARNING: the recording does not verify: {}:{}: {}",
            broken.file.display(),
            broken.line,
            broken.reason
        )?;
    }
    Ok(())
}

/// A connection's chain that does not hold, as `verify` reports it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}:{}: {}\n{} record(s) before it verify; last good hash {}",
    .broken.file.display(),
    .broken.line,
    .broken.reason,
    .records,
    .last_hash
)]
struct ChainBroken<'a> {
    broken: &'a read::Broken,
    records: u64,
    last_hash: &'a str,
}

/// One connection's verdict: `Ok(line)` or `Err(lines)`.
fn verdict(recording: &Recording) -> Result<String, ChainBroken<'_>> {
    let v = &recording.verification;
    let keyed = match &v.keyed {
        Some(id) => format!("chain keyed with node key {id}"),
        None => "chain NOT keyed (a session rewritten whole would pass: check it on its node or with --key)".to_owned(),
    };
    match &v.broken {
        None => Ok(format!(
            "{} records in {} file(s) verify; the session is sealed; {} exec cast(s) match; {keyed}; last hash {}",
            v.records,
            v.files.len(),
            v.casts,
            v.last_hash
        )),
        Some(broken) => Err(ChainBroken {
            broken,
            records: v.records,
            last_hash: &v.last_hash,
        }),
    }
}

/// The audit log's verdict on `recordings`; `None` without `--audit-log`.
fn witness(
    args: &VerifyArgs,
    log: Option<&read::AuditLog>,
    pod: &str,
    recordings: &[&Recording],
    out: &mut dyn Write,
) -> anyhow::Result<bool> {
    let Some(log) = log else {
        return Ok(true);
    };
    match read::cross_check(pod, recordings, log) {
        Ok(agreed) => {
            writeln!(
                out,
                "audit: {agreed} recorded request stage(s) agree with {} audit file(s)",
                args.audit_logs.len()
            )?;
            Ok(true)
        }
        Err(why) => {
            writeln!(out, "BROKEN: audit: {why}")?;
            Ok(false)
        }
    }
}

pub fn verify(args: &VerifyArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let log = if args.audit_logs.is_empty() {
        None
    } else {
        Some(read::AuditLog::read(&args.audit_logs)?)
    };
    match target(&args.session, &args.read)? {
        Target::Connection(recording) => match verdict(&recording) {
            Ok(line) => {
                writeln!(out, "ok: {line}")?;
                // One connection: only what it recorded is checked.
                if witness(args, log.as_ref(), "", &[&recording], out)? {
                    Ok(ExitCode::SUCCESS)
                } else {
                    Ok(ExitCode::FAILURE)
                }
            }
            Err(lines) => {
                writeln!(out, "BROKEN: {lines}")?;
                Ok(ExitCode::FAILURE)
            }
        },
        Target::Agent(agent, recordings) => {
            let mut broken = 0;
            for (i, recording) in recordings.iter().enumerate() {
                let id = &agent.connections[i].id;
                match verdict(recording) {
                    Ok(line) => writeln!(out, "  [{}] {id} ok: {line}", i + 1)?,
                    Err(lines) => {
                        broken += 1;
                        writeln!(out, "  [{}] {id} BROKEN: {lines}", i + 1)?;
                    }
                }
            }
            let all: Vec<&Recording> = recordings.iter().collect();
            if broken == 0 && !witness(args, log.as_ref(), &agent.pod, &all, out)? {
                writeln!(
                    out,
                    "BROKEN: agent session {}: its chains hold, but the audit log disagrees (see above)",
                    agent.name
                )?;
                Ok(ExitCode::FAILURE)
            } else if broken == 0 {
                writeln!(
                    out,
                    "ok: agent session {}: all {} connection(s) verify",
                    agent.name,
                    recordings.len()
                )?;
                Ok(ExitCode::SUCCESS)
            } else {
                writeln!(
                    out,
                    "BROKEN: agent session {}: {broken} of {} connection(s) do not verify (see above)",
                    agent.name,
                    recordings.len()
                )?;
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

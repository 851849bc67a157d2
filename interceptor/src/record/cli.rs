//! `chaperone sessions`, `chaperone replay`, `chaperone verify`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Map, Value, json};

use super::micro_time;
use super::read::{self, Recording};

/// Where recordings live unless `--record-dir` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/chaperone/sessions";

/// `chaperone sessions`: list recorded sessions.
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// The recordings directory (the node agent's --record-dir; `--dir`
    /// is the older spelling).
    #[arg(
        long = "record-dir",
        visible_alias = "dir",
        env = "CHAPERONE_RECORD_DIR",
        default_value = DEFAULT_DIR
    )]
    pub dir: PathBuf,
    /// Only the sessions of this pod (`namespace/name`).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
}

/// `chaperone replay`: print a session as a timeline.
///
/// A verb ending in `>` marks where a long-running response (watch, exec,
/// attach) started; the request appears again when it completed.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// A session id (from `chaperone sessions`) or the path of its .jsonl file.
    pub session: String,
    /// The recordings directory (the node agent's --record-dir; `--dir`
    /// is the older spelling).
    #[arg(
        long = "record-dir",
        visible_alias = "dir",
        env = "CHAPERONE_RECORD_DIR",
        default_value = DEFAULT_DIR
    )]
    pub dir: PathBuf,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `chaperone verify`: check a session's hash chain.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// A session id (from `chaperone sessions`) or the path of its .jsonl file.
    pub session: String,
    /// The recordings directory (the node agent's --record-dir; `--dir`
    /// is the older spelling).
    #[arg(
        long = "record-dir",
        visible_alias = "dir",
        env = "CHAPERONE_RECORD_DIR",
        default_value = DEFAULT_DIR
    )]
    pub dir: PathBuf,
}

pub fn sessions(args: &SessionsArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let list = read::list_sessions(&args.dir, args.pod.as_deref())?;
    if list.is_empty() {
        writeln!(out, "no sessions under {}", args.dir.display())?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<30} {:<32} {:<40} {:<20} {:>9} {:>7} {:>6} {:>6} {:>4} {:>6}",
        "SESSION",
        "POD",
        "CALLER",
        "START",
        "DURATION",
        "ALLOWED",
        "DENIED",
        "MASKED",
        "HELD",
        "CHAIN"
    )?;
    for s in list {
        let start = s
            .started
            .map(|t| micro_time(t)[..19].replace('T', " "))
            .unwrap_or_else(|| "-".into());
        let duration = match (s.started, s.last) {
            (Some(a), Some(b)) => format_duration((b - a).as_seconds_f64()),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<30} {:<32} {:<40} {:<20} {:>9} {:>7} {:>6} {:>6} {:>4} {:>6}",
            s.id,
            s.pod,
            s.caller,
            start,
            duration,
            s.allowed,
            s.denied,
            s.masked,
            s.held,
            if s.intact {
                "ok"
            } else if s.open {
                "open"
            } else {
                "BROKEN"
            }
        )?;
    }
    Ok(ExitCode::SUCCESS)
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

pub fn replay(args: &ReplayArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = read::find_session(&args.dir, &args.session)?;
    let recording = read::read_session(&path)?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &replay_json(&recording))?;
        writeln!(out)?;
    } else {
        write_timeline(&recording, out)?;
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

fn write_timeline(recording: &Recording, out: &mut dyn Write) -> std::io::Result<()> {
    let h = &recording.header;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("-").to_owned();
    let pod = h
        .get("pod")
        .filter(|p| !p.is_null())
        .map(|p| format!("{}/{}", s(p.get("namespace")), s(p.get("name"))))
        .unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "session {}  pod {}  caller {}  node {}  started {}",
        s(h.get("session")),
        pod,
        h.get("caller")
            .map(|c| s(c.get("username")))
            .unwrap_or("-".into()),
        s(h.get("node")),
        s(h.get("started")),
    )?;
    writeln!(
        out,
        "{:<16} {:<8} {:<28} {:<36} {:<20} {:>6} {:>10}",
        "TIME", "VERB", "RESOURCE", "NAMESPACE/NAME", "DECISION", "STATUS", "LATENCY"
    )?;
    let dir = recording.path.parent().unwrap_or(std::path::Path::new("."));
    for r in &recording.records {
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
                    "{:<16} {:<8} {:<28} {:<36} {:<20} {:>6} {:>10}",
                    clock, verb, resource, target, decision, status, latency
                )?;
                if let (Some(reason), Some(message)) = (
                    r.get("reason").and_then(Value::as_str),
                    r.get("message").and_then(Value::as_str),
                ) {
                    writeln!(out, "{:<16} └ {reason}: {message}", "")?;
                }
                let masked = r.get("masked").and_then(Value::as_u64).unwrap_or(0);
                if masked > 0 {
                    writeln!(out, "{:<16} └ {masked} value(s) masked", "")?;
                }
            }
            Some("stream") => {
                let cast = s(r.get("cast"));
                writeln!(
                    out,
                    "{:<16} stream   {}  ({} bytes in, {} bytes out)",
                    clock,
                    s(r.get("title")),
                    r.get("bytesIn").and_then(Value::as_u64).unwrap_or(0),
                    r.get("bytesOut").and_then(Value::as_u64).unwrap_or(0),
                )?;
                writeln!(
                    out,
                    "{:<16} └ asciinema play {}",
                    "",
                    dir.join(cast).display()
                )?;
            }
            Some("gap") => writeln!(
                out,
                "{:<16} GAP: {} record(s) were dropped (recording queue full)",
                clock,
                r.get("dropped").and_then(Value::as_u64).unwrap_or(0)
            )?,
            _ => {}
        }
    }
    if let Some(broken) = &recording.verification.broken {
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

pub fn verify(args: &VerifyArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = read::find_session(&args.dir, &args.session)?;
    let recording = read::read_session(&path)?;
    let v = &recording.verification;
    match &v.broken {
        None => {
            writeln!(
                out,
                "ok: {} records in {} file(s) verify; the session is sealed; last hash {}",
                v.records,
                v.files.len(),
                v.last_hash
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Some(broken) => {
            writeln!(
                out,
                "BROKEN: {}:{}: {}",
                broken.file.display(),
                broken.line,
                broken.reason
            )?;
            writeln!(
                out,
                "{} record(s) before it verify; last good hash {}",
                v.records, v.last_hash
            )?;
            Ok(ExitCode::FAILURE)
        }
    }
}

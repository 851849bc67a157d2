//! Reading recordings back: verifying the chain, the replay timeline, the
//! session list.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::chain::{self, GENESIS};
use super::{parse_time, writer};

/// Errors reading recordings.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "no session {spec} under {dir}: pass a session id from `chaperone sessions --dir {dir}` or the path of a .jsonl file"
    )]
    NotFound { spec: String, dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Finds the first file of a session given its id or a path to any of its
/// files.
pub fn find_session(root: &Path, spec: &str) -> Result<PathBuf, ReadError> {
    let as_path = Path::new(spec);
    if as_path.is_file() {
        let name = as_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = name.split_once('.').map(|(id, _)| id).unwrap_or(&name);
        let dir = as_path.parent().unwrap_or(Path::new("."));
        return Ok(dir.join(writer::part_name(id, 0)));
    }
    let not_found = || ReadError::NotFound {
        spec: spec.to_owned(),
        dir: root.to_owned(),
    };
    if spec.contains('/') || spec.contains('.') {
        return Err(not_found());
    }
    let file = writer::part_name(spec, 0);
    for ns in subdirs(root)? {
        for pod in subdirs(&ns)? {
            let candidate = pod.join(&file);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(not_found())
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let io = |source| ReadError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_dir() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The first record that fails verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
    pub reason: String,
    /// Only the end record is missing: the session may still be open (its
    /// connection not yet closed), or the tail was cut at a record boundary.
    pub unsealed: bool,
}

/// The result of verifying a session.
#[derive(Debug, Clone)]
pub struct Verification {
    /// Records that verified, across all parts.
    pub records: u64,
    pub files: Vec<PathBuf>,
    /// The hash of the last good record (anchor it elsewhere to make the end
    /// of the session tamper-evident too).
    pub last_hash: String,
    /// `None` when the whole chain holds and the session is sealed.
    pub broken: Option<Broken>,
}

/// A recording read leniently (for replay and listing): every record that
/// parses, in order, across all parts.
#[derive(Debug, Clone)]
pub struct Recording {
    pub path: PathBuf,
    pub header: Map<String, Value>,
    pub records: Vec<Map<String, Value>>,
    pub verification: Verification,
}

/// Verifies the hash chain of the session starting at `path` and reads its
/// records.
pub fn read_session(path: &Path) -> Result<Recording, ReadError> {
    let mut verification = Verification {
        records: 0,
        files: Vec::new(),
        last_hash: GENESIS.to_owned(),
        broken: None,
    };
    let mut header = Map::new();
    let mut records = Vec::new();
    let mut file = path.to_owned();
    let mut part = 0u64;
    let mut expected_seq = 0u64;
    'files: loop {
        let bytes = fs::read(&file).map_err(|source| ReadError::Io {
            path: file.clone(),
            source,
        })?;
        verification.files.push(file.clone());
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let mut next_file = None;
        let mut sealed = false;
        for (index, raw) in lines.iter().enumerate() {
            let line_no = index + 1;
            let fail = |reason: String| Broken {
                unsealed: false,
                file: file.clone(),
                line: line_no,
                reason,
            };
            if verification.broken.is_some() {
                lenient(raw, &mut records);
                continue;
            }
            if next_file.is_some() || sealed {
                verification.broken = Some(fail(
                    "records follow the session's last record: they were appended after it was sealed"
                        .into(),
                ));
                break 'files;
            }
            let text = match std::str::from_utf8(raw) {
                Ok(text) => text,
                Err(_) => {
                    verification.broken = Some(fail("the line is not UTF-8: it was edited".into()));
                    lenient(raw, &mut records);
                    break 'files;
                }
            };
            let record = match chain::check(text, &verification.last_hash) {
                Ok((record, hash)) => {
                    verification.last_hash = hash;
                    record
                }
                Err(error) => {
                    verification.broken = Some(fail(error.to_string()));
                    lenient(raw, &mut records);
                    continue;
                }
            };
            let seq = record.get("seq").and_then(Value::as_u64);
            if seq != Some(expected_seq) {
                verification.broken = Some(fail(format!(
                    "sequence number {seq:?}, expected {expected_seq}: records were removed or reordered"
                )));
                break 'files;
            }
            expected_seq += 1;
            let kind = record.get("type").and_then(Value::as_str).unwrap_or("");
            let first_of_file = index == 0;
            let shape_ok = match (part, first_of_file, kind) {
                (0, true, "session") => true,
                (p, true, "continue") => {
                    p > 0 && record.get("part").and_then(Value::as_u64) == Some(p)
                }
                (_, true, _) => false,
                (_, false, "session" | "continue") => false,
                _ => true,
            };
            if !shape_ok {
                verification.broken = Some(fail(format!(
                    "a {kind:?} record cannot stand here: files were swapped or spliced"
                )));
                break 'files;
            }
            verification.records += 1;
            match kind {
                "session" => header = record,
                "rotate" => {
                    let next = record.get("next").and_then(Value::as_str).unwrap_or("");
                    next_file = Some(next.to_owned());
                }
                "end" => sealed = true,
                "continue" => {}
                _ => records.push(record),
            }
        }
        if verification.broken.is_some() {
            // Keep reading what parses, for replay, but report the first break.
            break;
        }
        if sealed {
            break;
        }
        match next_file {
            Some(next) if !next.contains('/') && !next.is_empty() => {
                let dir = file.parent().unwrap_or(Path::new("."));
                file = dir.join(next);
                part += 1;
                if !file.is_file() {
                    verification.broken = Some(Broken {
                        unsealed: false,
                        file: file.clone(),
                        line: 0,
                        reason: "the next part of a rotated session is missing: it was deleted"
                            .into(),
                    });
                    break;
                }
            }
            Some(_) => {
                verification.broken = Some(Broken {
                    unsealed: false,
                    file: file.clone(),
                    line: lines.len(),
                    reason: "the rotate record names no valid next file".into(),
                });
                break;
            }
            None => {
                verification.broken = Some(Broken {
                    unsealed: true,
                    file: file.clone(),
                    line: lines.len(),
                    reason: format!(
                        "the recording ends at line {} without an end record: it was truncated, or the session is still being recorded, or chaperone stopped abruptly",
                        lines.len()
                    ),
                });
                break;
            }
        }
    }
    Ok(Recording {
        path: path.to_owned(),
        header,
        records,
        verification,
    })
}

/// Keeps a record that failed verification for replay if it still parses.
fn lenient(raw: &[u8], records: &mut Vec<Map<String, Value>>) {
    if let Ok(Value::Object(record)) = serde_json::from_slice::<Value>(raw)
        && matches!(
            record.get("type").and_then(Value::as_str),
            Some("exchange" | "stream")
        )
    {
        records.push(record);
    }
}

/// One session in `chaperone sessions`.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub id: String,
    pub path: PathBuf,
    /// `namespace/name`, or `-`.
    pub pod: String,
    pub caller: String,
    pub started: Option<OffsetDateTime>,
    /// The time of the last record.
    pub last: Option<OffsetDateTime>,
    pub exchanges: u64,
    pub allowed: u64,
    pub denied: u64,
    pub masked: u64,
    pub held: u64,
    pub streams: u64,
    /// The chain holds and the session is sealed.
    pub intact: bool,
    /// The chain holds up to its last record, and only the end record is
    /// missing (`chaperone verify` still says so).
    pub open: bool,
}

/// Every session under `root`, oldest first, optionally only those of one
/// pod (`namespace/name`).
pub fn list_sessions(root: &Path, pod: Option<&str>) -> Result<Vec<SessionSummary>, ReadError> {
    let mut out = Vec::new();
    for ns in subdirs(root)? {
        for pod_dir in subdirs(&ns)? {
            let ns_name = ns.file_name().unwrap_or_default().to_string_lossy();
            let pod_name = pod_dir.file_name().unwrap_or_default().to_string_lossy();
            let pod_key = format!("{ns_name}/{pod_name}");
            if pod.is_some_and(|p| p != pod_key) {
                continue;
            }
            let entries = fs::read_dir(&pod_dir).map_err(|source| ReadError::Io {
                path: pod_dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(".jsonl") else {
                    continue;
                };
                if id.contains('.') {
                    continue; // a later part
                }
                let recording = read_session(&entry.path())?;
                out.push(summarize(id, &pod_key, recording));
            }
        }
    }
    out.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
    Ok(out)
}

fn summarize(id: &str, pod_key: &str, recording: Recording) -> SessionSummary {
    let header = &recording.header;
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let pod = header
        .get("pod")
        .filter(|p| !p.is_null())
        .map(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_else(|| pod_key.to_owned());
    let mut summary = SessionSummary {
        id: id.to_owned(),
        path: recording.path.clone(),
        pod,
        caller: header
            .get("caller")
            .and_then(|c| text(c.get("username")))
            .unwrap_or_else(|| "-".into()),
        started: text(header.get("started")).and_then(|t| parse_time(&t)),
        last: None,
        exchanges: 0,
        allowed: 0,
        denied: 0,
        masked: 0,
        held: 0,
        streams: 0,
        intact: recording.verification.broken.is_none(),
        open: recording
            .verification
            .broken
            .as_ref()
            .is_some_and(|b| b.unsealed),
    };
    for record in &recording.records {
        for key in ["ended", "time"] {
            if let Some(t) = text(record.get(key)).and_then(|t| parse_time(&t)) {
                summary.last = Some(summary.last.map_or(t, |l| l.max(t)));
                break;
            }
        }
        match record.get("type").and_then(Value::as_str) {
            Some("exchange") => {
                summary.exchanges += 1;
                match record.get("decision").and_then(Value::as_str) {
                    Some("deny") => summary.denied += 1,
                    Some("approve") => summary.held += 1,
                    _ => summary.allowed += 1,
                }
                if record.get("masked").and_then(Value::as_u64).unwrap_or(0) > 0 {
                    summary.masked += 1;
                }
            }
            Some("stream") => summary.streams += 1,
            _ => {}
        }
    }
    summary
}

//! Reading recordings back: verifying the chain, the replay timeline, the
//! session list.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::chain::{self, ChainKey, GENESIS};
use super::{parse_time, writer};

/// Errors reading recordings.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "no session {spec} under {dir}: pass a session id from `chaperone sessions --record-dir {dir}` or the path of a .jsonl file"
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
    /// The id of the node key the chain was checked with; `None`: an
    /// unkeyed (plain SHA-256) chain, which a whole rewrite would pass.
    pub keyed: Option<String>,
    /// Exec/attach casts whose hash in the chain matched their file.
    pub casts: u64,
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

/// Verifies the hash chain of the session starting at `path` (with `key`,
/// the node's record key, when there is one) and reads its records.
pub fn read_session(path: &Path, key: Option<&ChainKey>) -> Result<Recording, ReadError> {
    let mut verification = Verification {
        records: 0,
        files: Vec::new(),
        last_hash: GENESIS.to_owned(),
        broken: None,
        keyed: None,
        casts: 0,
    };
    // `(file, line, cast, hash)` of each stream record, checked at the end.
    let mut casts: Vec<(PathBuf, usize, String, Option<String>)> = Vec::new();
    let mut chain_key: Option<&ChainKey> = None;
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
            if part == 0 && index == 0 {
                match chain_key_for(text, key) {
                    Ok(found) => {
                        chain_key = found;
                        verification.keyed = found.map(|k| k.id().to_owned());
                    }
                    Err(reason) => {
                        verification.broken = Some(fail(reason.to_string()));
                        // Unverified, but replay still names the pod.
                        header = serde_json::from_str(text).unwrap_or_default();
                        continue;
                    }
                }
            }
            let record = match chain::check(text, &verification.last_hash, chain_key) {
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
                _ => {
                    if kind == "stream" {
                        casts.push((
                            file.clone(),
                            line_no,
                            record
                                .get("cast")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            record
                                .get("castSha256")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                        ));
                    }
                    records.push(record)
                }
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
    if verification.broken.is_none() {
        let dir = path.parent().unwrap_or(Path::new("."));
        for (file, line, cast, hash) in casts {
            match check_cast(dir, &cast, hash.as_deref(), chain_key.is_some()) {
                Ok(true) => verification.casts += 1,
                Ok(false) => {}
                Err(reason) => {
                    verification.broken = Some(Broken {
                        file,
                        line,
                        reason: reason.to_string(),
                        unsealed: false,
                    });
                    break;
                }
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

/// The key to check a session with, from its header (the first line):
/// a keyed session needs the key it names; a node that keys its
/// recordings never wrote an unkeyed one.
fn chain_key_for<'k>(
    header: &str,
    key: Option<&'k ChainKey>,
) -> Result<Option<&'k ChainKey>, KeyMismatch> {
    let header: Map<String, Value> = serde_json::from_str(header).unwrap_or_default();
    let keyed = header.get("chain").and_then(Value::as_str) == Some(chain::KEYED);
    let key_id = header.get("keyId").and_then(Value::as_str).unwrap_or("?");
    match (keyed, key) {
        (true, Some(key)) if key.id() == key_id => Ok(Some(key)),
        (true, Some(key)) => Err(KeyMismatch::OtherKey {
            session: key_id.to_owned(),
            given: key.id().to_owned(),
        }),
        (true, None) => Err(KeyMismatch::NoKey {
            session: key_id.to_owned(),
        }),
        (false, Some(key)) => Err(KeyMismatch::Unkeyed {
            node: key.id().to_owned(),
        }),
        (false, None) => Ok(None),
    }
}

/// A session header that does not go with the key it is checked with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum KeyMismatch {
    #[error(
        "the session is keyed with node key {session}, not with the key given ({given}): pass --key with the record.key of the node that recorded it"
    )]
    OtherKey { session: String, given: String },
    #[error(
        "the session is keyed with node key {session} and no key was given: pass --key with that node's record key file (the node keeps it as record.key beside its recordings directory)"
    )]
    NoKey { session: String },
    #[error(
        "the session's chain is not keyed, but recordings here are keyed with node key {node}: it was rewritten by someone without the key (or recorded by a chaperone before keyed chains; check it alone with --key none)"
    )]
    Unkeyed { node: String },
}

/// An exec cast that is not what its stream record says.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum CastTampered {
    #[error("the stream record names no valid cast file ({0:?}): it was edited")]
    BadName(String),
    #[error("the stream record of {0} carries no castSha256: it was edited")]
    NoHash(String),
    #[error("the cast {} cannot be read ({reason}): it was deleted or moved", .path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "the cast {} does not match the SHA-256 its stream record holds ({recorded}, the file has {found}): it was edited, truncated or replaced",
        .path.display()
    )]
    Mismatch {
        path: PathBuf,
        recorded: String,
        found: String,
    },
}

/// Checks a cast file against the hash its stream record holds: `Ok(true)`
/// when it matches, `Ok(false)` when the record holds none (an unkeyed
/// session from before casts were chained).
fn check_cast(
    dir: &Path,
    cast: &str,
    hash: Option<&str>,
    keyed: bool,
) -> Result<bool, CastTampered> {
    use sha2::Digest as _;
    if cast.is_empty() || cast.contains('/') || cast.starts_with('.') {
        return Err(CastTampered::BadName(cast.to_owned()));
    }
    let Some(hash) = hash else {
        return if keyed {
            Err(CastTampered::NoHash(cast.to_owned()))
        } else {
            Ok(false)
        };
    };
    let path = dir.join(cast);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            return Err(CastTampered::Unreadable {
                path,
                reason: e.to_string(),
            });
        }
    };
    let found = hex::encode(sha2::Sha256::digest(&bytes));
    if found != hash {
        return Err(CastTampered::Mismatch {
            path,
            recorded: hash.to_owned(),
            found,
        });
    }
    Ok(true)
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
    /// The executable of the process behind the connection, when known.
    pub executable: Option<String>,
    /// The chain holds and the session is sealed.
    pub intact: bool,
    /// The chain holds up to its last record, and only the end record is
    /// missing (`chaperone verify` still says so).
    pub open: bool,
}

/// Every session under `root`, oldest first, optionally only those of one
/// pod (`namespace/name`).
pub fn list_sessions(
    root: &Path,
    pod: Option<&str>,
    key: Option<&ChainKey>,
) -> Result<Vec<SessionSummary>, ReadError> {
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
                let recording = read_session(&entry.path(), key)?;
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
        executable: header
            .get("process")
            .and_then(|p| text(p.get("executable")))
            .filter(|e| !e.is_empty()),
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

// === agent sessions ===

/// How long a pod may be idle before its next connection starts a new
/// agent session, unless `--gap` says otherwise.
pub const DEFAULT_GAP: std::time::Duration = std::time::Duration::from_secs(300);

/// One agent pod's activity until it was idle for longer than the gap: the
/// connections (each recorded as its own chained file) inside it.
#[derive(Debug, Clone)]
pub struct AgentSession {
    /// `<pod>-<first 8 hex of the first connection's id>`: lower case, so
    /// never mistaken for a connection id (`20261123T111702Z-…`).
    pub name: String,
    /// `namespace/name`, or `_unattested/<address>`.
    pub pod: String,
    /// Oldest first.
    pub connections: Vec<SessionSummary>,
}

impl AgentSession {
    pub fn started(&self) -> Option<OffsetDateTime> {
        self.connections.iter().filter_map(|c| c.started).min()
    }

    /// The last record of any connection.
    pub fn last(&self) -> Option<OffsetDateTime> {
        self.connections
            .iter()
            .filter_map(|c| c.last.or(c.started))
            .max()
    }

    /// Every distinct caller, in order of appearance.
    pub fn callers(&self) -> Vec<String> {
        distinct(self.connections.iter().map(|c| c.caller.clone()))
    }

    /// Every distinct executable behind its connections.
    pub fn executables(&self) -> Vec<String> {
        distinct(self.connections.iter().filter_map(|c| c.executable.clone()))
    }

    pub fn total(&self, count: impl Fn(&SessionSummary) -> u64) -> u64 {
        self.connections.iter().map(count).sum()
    }

    /// `ok` when every connection verifies and is sealed, `BROKEN` when any
    /// does not verify, else `open`.
    pub fn chain(&self) -> &'static str {
        if self.connections.iter().any(|c| !c.intact && !c.open) {
            "BROKEN"
        } else if self.connections.iter().any(|c| c.open) {
            "open"
        } else {
            "ok"
        }
    }
}

fn distinct(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if item != "-" && !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Whether `spec` names one connection (its id, or a path to its file)
/// rather than an agent session.
pub fn is_connection_spec(spec: &str) -> bool {
    let id_like = spec.len() > 17
        && spec.as_bytes().get(8) == Some(&b'T')
        && spec.as_bytes().get(15) == Some(&b'Z')
        && spec[..8].bytes().all(|b| b.is_ascii_digit());
    id_like || Path::new(spec).is_file()
}

/// Groups connections into agent sessions: per pod directory, in order of
/// start, a connection that starts more than `gap` after the last record
/// of the agent session so far starts a new one. Oldest first.
pub fn group_sessions(
    connections: Vec<SessionSummary>,
    gap: std::time::Duration,
) -> Vec<AgentSession> {
    let mut by_pod: std::collections::BTreeMap<PathBuf, Vec<SessionSummary>> = Default::default();
    for connection in connections {
        let dir = connection
            .path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        by_pod.entry(dir).or_default().push(connection);
    }
    let gap = time::Duration::try_from(gap).unwrap_or(time::Duration::MAX);
    let mut out = Vec::new();
    for (dir, mut list) in by_pod {
        list.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        let dir_name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut current: Option<AgentSession> = None;
        for connection in list {
            let starts_new = match (&current, connection.started) {
                (None, _) => true,
                (Some(session), Some(started)) => {
                    session.last().is_some_and(|last| started - last > gap)
                }
                (Some(_), None) => false,
            };
            if starts_new {
                out.extend(current.take());
                let random = connection.id.rsplit('-').next().unwrap_or("");
                current = Some(AgentSession {
                    name: format!(
                        "{}-{}",
                        dir_name.to_ascii_lowercase(),
                        &random[..random.len().min(8)]
                    ),
                    pod: connection.pod.clone(),
                    connections: Vec::new(),
                });
            }
            current
                .as_mut()
                .expect("set above")
                .connections
                .push(connection);
        }
        out.extend(current);
    }
    out.sort_by(|a, b| a.started().cmp(&b.started()).then(a.name.cmp(&b.name)));
    out
}

/// The agent session called `name` (as `chaperone sessions` lists it with
/// the same `gap`), or the one holding the connection `name`.
pub fn find_agent_session(
    root: &Path,
    name: &str,
    gap: std::time::Duration,
    key: Option<&ChainKey>,
) -> Result<AgentSession, ReadError> {
    let sessions = group_sessions(list_sessions(root, None, key)?, gap);
    sessions
        .into_iter()
        .find(|s| s.name == name || s.connections.iter().any(|c| c.id == name))
        .ok_or_else(|| ReadError::NotFound {
            spec: name.to_owned(),
            dir: root.to_owned(),
        })
}

// === the audit log as a second witness ===

/// What the audit log says about one request at one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Witness {
    verb: String,
    decision: String,
    code: u64,
    user: String,
    target: String,
}

impl std::fmt::Display for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} by {}: {} {}",
            self.verb, self.target, self.user, self.decision, self.code
        )
    }
}

/// Audit events (`audit.k8s.io/v1`, JSON lines, as the file sink writes
/// them), indexed for [`cross_check`]. The audit log usually leaves the
/// node (a webhook, a log collector), so whoever can rewrite a recording,
/// even with the node's record key, cannot make both agree.
#[derive(Debug, Default)]
pub struct AuditLog {
    by_id: std::collections::HashMap<(String, String), Witness>,
    /// `(pod, received, auditID, stage, uri)` of every event naming a pod.
    by_pod: Vec<(String, OffsetDateTime, String, String, String)>,
}

impl AuditLog {
    /// Reads every file (rotated ones too, in any order); lines that are
    /// not audit events are skipped.
    pub fn read(paths: &[PathBuf]) -> Result<Self, ReadError> {
        let mut log = AuditLog::default();
        for path in paths {
            let text = fs::read_to_string(path).map_err(|source| ReadError::Io {
                path: path.clone(),
                source,
            })?;
            for line in text.lines() {
                let Ok(event) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if event["kind"] != "Event" {
                    continue;
                }
                let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
                let id = s(&event["auditID"]);
                let stage = s(&event["stage"]);
                let notes = &event["annotations"];
                let witness = Witness {
                    verb: s(&event["verb"]),
                    decision: s(&notes["chaperone.dev/decision"]),
                    code: event["responseStatus"]["code"].as_u64().unwrap_or(0),
                    user: s(&event["user"]["username"]),
                    target: target_of(
                        event["objectRef"]["resource"].as_str(),
                        event["objectRef"]["subresource"].as_str(),
                        event["objectRef"]["namespace"].as_str(),
                        event["objectRef"]["name"].as_str(),
                        &s(&event["requestURI"]),
                    ),
                };
                if let (Some(pod), Some(received)) = (
                    notes["chaperone.dev/pod"].as_str(),
                    event["requestReceivedTimestamp"]
                        .as_str()
                        .and_then(parse_time),
                ) {
                    log.by_pod.push((
                        pod.to_owned(),
                        received,
                        id.clone(),
                        stage.clone(),
                        s(&event["requestURI"]),
                    ));
                }
                log.by_id.insert((id, stage), witness);
            }
        }
        Ok(log)
    }
}

/// `pods/exec default/worker`, or the URI of a non-resource request.
fn target_of(
    resource: Option<&str>,
    subresource: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
    uri: &str,
) -> String {
    let Some(resource) = resource.filter(|r| !r.is_empty()) else {
        return uri.split('?').next().unwrap_or(uri).to_owned();
    };
    let mut target = resource.to_owned();
    if let Some(sub) = subresource.filter(|s| !s.is_empty()) {
        target = format!("{target}/{sub}");
    }
    format!(
        "{target} {}/{}",
        namespace.unwrap_or(""),
        name.unwrap_or("")
    )
}

/// Checks the recordings of an agent session against the audit log: every
/// recorded request must be there, saying the same (verb, target, caller,
/// decision, status), and every request of the pod the log holds within
/// the session's time must be recorded (or counted in a `gap` record).
/// `Ok(n)`: `n` requests agree.
pub fn cross_check(
    pod: &str,
    recordings: &[&Recording],
    log: &AuditLog,
) -> Result<usize, AuditDisagrees> {
    let mut agreed = 0;
    let mut recorded = std::collections::HashSet::new();
    let mut dropped = 0;
    let (mut first, mut last): (Option<OffsetDateTime>, Option<OffsetDateTime>) = (None, None);
    for recording in recordings {
        for record in &recording.records {
            let s = |key: &str| {
                record
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            if s("type") == "gap" {
                dropped += record.get("dropped").and_then(Value::as_u64).unwrap_or(0);
                continue;
            }
            if s("type") != "exchange" {
                continue;
            }
            let (id, stage) = (s("auditID"), s("stage"));
            if let Some(t) = parse_time(&s("time")) {
                first = Some(first.map_or(t, |f| f.min(t)));
                last = Some(last.map_or(t, |l| l.max(t)));
            }
            let said = Witness {
                verb: s("verb"),
                decision: s("decision"),
                code: record.get("status").and_then(Value::as_u64).unwrap_or(0),
                user: s("user"),
                target: target_of(
                    record.get("resource").and_then(Value::as_str),
                    record.get("subresource").and_then(Value::as_str),
                    record.get("namespace").and_then(Value::as_str),
                    record.get("name").and_then(Value::as_str),
                    &s("uri"),
                ),
            };
            match log.by_id.get(&(id.clone(), stage.clone())) {
                None => {
                    return Err(AuditDisagrees::NotInLog {
                        recording: recording.path.clone(),
                        id,
                        stage,
                        said: said.to_string(),
                    });
                }
                Some(witness) if *witness != said => {
                    return Err(AuditDisagrees::Differs {
                        recording: recording.path.clone(),
                        id,
                        stage,
                        said: said.to_string(),
                        log: witness.to_string(),
                    });
                }
                Some(_) => agreed += 1,
            }
            recorded.insert((id, stage));
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(agreed);
    };
    let missing: Vec<&(String, OffsetDateTime, String, String, String)> = log
        .by_pod
        .iter()
        .filter(|(p, t, id, stage, _)| {
            p == pod
                && *t >= first
                && *t <= last
                // The node records each request when it completes; the
                // earlier stages are the audit log's alone.
                && stage == "ResponseComplete"
                && !recorded.contains(&(id.clone(), stage.clone()))
        })
        .collect();
    if missing.len() as u64 > dropped {
        let (_, t, id, stage, uri) = missing[0];
        return Err(AuditDisagrees::Unrecorded {
            count: missing.len(),
            pod: pod.to_owned(),
            gaps: dropped,
            first: format!("{id} ({stage}) {uri} at {}", super::micro_time(*t)),
        });
    }
    Ok(agreed)
}

/// Where the recordings of an agent session and the audit log disagree.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditDisagrees {
    #[error(
        "{}: the request {id} ({stage}, {said}) is not in the audit log: the recording was forged, or pass every (rotated) audit file",
        .recording.display()
    )]
    NotInLog {
        recording: PathBuf,
        id: String,
        stage: String,
        said: String,
    },
    #[error(
        "{}: the request {id} ({stage}) was recorded as {said}, but the audit log says {log}: the recording (or the log) was rewritten",
        .recording.display()
    )]
    Differs {
        recording: PathBuf,
        id: String,
        stage: String,
        said: String,
        log: String,
    },
    #[error(
        "the audit log holds {count} request(s) of {pod} made during this agent session that no recording of it holds ({gaps} accounted for by gap records); the first: {first}: a recording was removed or cut"
    )]
    Unrecorded {
        count: usize,
        pod: String,
        gaps: u64,
        /// `ID (STAGE) URI at TIME`.
        first: String,
    },
}

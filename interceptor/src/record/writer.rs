//! The writer thread: the only place that touches recording files.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::cast::CastWriter;
use super::chain;
use super::{Control, Data, Exchange, RecordConfig, SessionShared, StreamShared, micro_time};
use crate::metrics::Metrics;

const TICK: Duration = Duration::from_millis(100);
const BATCH: usize = 256;

/// How long the thread sleeps after a short batch before it looks again.
/// Blocked in `recv`, it is woken (another CPU's futex wake and a run) by
/// every message; asleep, the messages queue without waking anyone. At 200
/// requests/s that halves the wake-ups; the queue (8,192 messages by
/// default) holds far more than 5 ms of any stream.
const LINGER: Duration = Duration::from_millis(5);

struct OpenSession {
    shared: Arc<SessionShared>,
    dir: PathBuf,
    file: LineFile,
    part: u32,
    bytes: u64,
    seq: u64,
    prev: String,
    dirty: bool,
    /// Drops already reported in a `gap` record.
    reported_dropped: u64,
}

/// A session's file, buffered only from a batch's first record to the
/// flush that ends the batch: an idle session holds no buffer. (A
/// `BufWriter` kept 8 KiB per open session, that is per idle agent
/// connection, for the connection's life.)
struct LineFile {
    file: File,
    pending: Vec<u8>,
}

impl LineFile {
    fn new(file: File) -> Self {
        LineFile {
            file,
            pending: Vec::new(),
        }
    }

    fn get_ref(&self) -> &File {
        &self.file
    }
}

impl Write for LineFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    /// Writes what is pending and lets the buffer go; on an error what was
    /// not written stays pending, to be written by the next flush.
    fn flush(&mut self) -> std::io::Result<()> {
        let mut written = 0;
        let result = loop {
            if written == self.pending.len() {
                break Ok(());
            }
            match self.file.write(&self.pending[written..]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => break Err(error),
            }
        };
        match result {
            Ok(()) => self.pending = Vec::new(),
            Err(_) => {
                self.pending.drain(..written);
            }
        }
        result
    }
}

struct OpenStream {
    shared: Arc<StreamShared>,
    cast: CastWriter<Hashed<BufWriter<File>>>,
    name: String,
}

/// A writer that hashes what it writes: the cast's SHA-256 goes into the
/// chain when the cast ends.
pub(super) struct Hashed<W: Write> {
    inner: W,
    hasher: sha2::Sha256,
}

impl<W: Write> Hashed<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha2::Digest::new(),
        }
    }
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub(super) struct Writer {
    config: RecordConfig,
    metrics: Metrics,
    sessions: HashMap<String, OpenSession>,
    streams: HashMap<(String, u64), OpenStream>,
    last_sync: Instant,
    last_retention: Instant,
}

impl Writer {
    pub(super) fn new(config: RecordConfig, metrics: Metrics) -> Self {
        let config_retention_interval = config.retention_interval;
        Self {
            config,
            metrics,
            sessions: HashMap::new(),
            streams: HashMap::new(),
            last_sync: Instant::now(),
            // Retention runs on the first tick, then every interval.
            last_retention: Instant::now()
                .checked_sub(config_retention_interval)
                .unwrap_or_else(Instant::now),
        }
    }

    pub(super) fn run(mut self, data: Receiver<Data>, control: Receiver<Control>) {
        loop {
            let mut disconnected = false;
            let mut linger = false;
            match data.recv_timeout(TICK) {
                Ok(first) => {
                    self.handle(first);
                    let mut taken = 1;
                    for next in data.try_iter().take(BATCH) {
                        self.handle(next);
                        taken += 1;
                    }
                    if taken < BATCH {
                        linger = true;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => disconnected = true,
            }
            self.flush_buffers();
            while let Ok(message) = control.try_recv() {
                // Data sent before a close must be written before it.
                while let Ok(next) = data.try_recv() {
                    self.handle(next);
                }
                match message {
                    Control::CloseSession(session) => {
                        if self.sessions.contains_key(&session.id) {
                            let _ = self.report_gap(&session);
                        }
                        self.close_session(&session.id, "closed");
                        session.closed.store(true, Ordering::Relaxed);
                    }
                    Control::CloseStream(stream, at) => self.close_stream(&stream, at),
                    Control::Flush(done) => {
                        self.flush_buffers();
                        self.sync_all();
                        self.retention();
                        let _ = done.send(());
                    }
                    Control::Shutdown => {
                        self.shutdown();
                        return;
                    }
                }
            }
            if disconnected {
                self.shutdown();
                return;
            }
            if self.last_sync.elapsed() >= self.config.fsync_interval {
                self.sync_all();
            }
            if self.last_retention.elapsed() >= self.config.retention_interval {
                self.retention();
            }
            if linger {
                std::thread::sleep(LINGER);
            }
        }
    }

    fn shutdown(&mut self) {
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        for id in ids {
            self.close_session(&id, "shutdown");
        }
    }

    fn handle(&mut self, data: Data) {
        let session = match &data {
            Data::Exchange(session, _) => session,
            Data::Stream(stream, ..) => &stream.session,
        };
        if session.closed.load(Ordering::Relaxed) {
            // A stream outlived its connection: nothing can follow the seal.
            self.metrics.record_dropped();
            return;
        }
        let session = session.clone();
        let result = match data {
            Data::Exchange(session, exchange) => self.write_exchange(&session, &exchange),
            Data::Stream(stream, channel, bytes, at) => {
                self.write_stream(&stream, |cast| cast.data(channel, &bytes, at))
            }
        };
        if let Err(error) = result {
            // Counted where the next record that gets through reports gaps.
            session.dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.record_dropped();
            tracing::error!(%error, dir = %self.config.dir.display(), "cannot write a recording; check that the recording directory is writable and not full");
        }
    }

    fn write_exchange(
        &mut self,
        session: &Arc<SessionShared>,
        exchange: &Exchange,
    ) -> std::io::Result<()> {
        self.ensure_open(session, Some(exchange))?;
        self.report_gap(session)?;
        self.append(&session.id, exchange_record(exchange))
    }

    fn write_stream(
        &mut self,
        stream: &Arc<StreamShared>,
        write: impl FnOnce(&mut CastWriter<Hashed<BufWriter<File>>>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let key = (stream.session.id.clone(), stream.number);
        if !self.streams.contains_key(&key) {
            self.ensure_open(&stream.session, None)?;
            let dir = self.sessions[&stream.session.id].dir.clone();
            let name = super::cast_name(&stream.session.id, stream.number);
            let file = create_new(&dir.join(&name))?;
            let cast = CastWriter::new(
                Hashed::new(BufWriter::new(file)),
                &stream.info,
                stream.started,
            )?;
            self.streams.insert(
                key.clone(),
                OpenStream {
                    shared: stream.clone(),
                    cast,
                    name,
                },
            );
        }
        let open = self.streams.get_mut(&key).expect("inserted above");
        write(&mut open.cast)
    }

    fn close_stream(&mut self, stream: &Arc<StreamShared>, at: OffsetDateTime) {
        if stream.session.closed.load(Ordering::Relaxed) {
            return; // sealed with the session
        }
        // A stream that never carried a byte still gets its (empty) cast.
        if let Err(error) = self.write_stream(stream, |_| Ok(())) {
            tracing::error!(%error, "cannot write an exec/attach recording");
            return;
        }
        let key = (stream.session.id.clone(), stream.number);
        if let Some(open) = self.streams.remove(&key) {
            self.finish_stream(open, at);
        }
    }

    /// Ends a cast and writes its `stream` record, with the cast's hash,
    /// into the session.
    fn finish_stream(&mut self, open: OpenStream, at: OffsetDateTime) {
        let stream = open.shared.clone();
        let (bytes_in, bytes_out) = (open.cast.bytes_in, open.cast.bytes_out);
        let name = open.name.clone();
        let cast_sha256 = finish_cast(open, at);
        let mut record = json!({
            "type": "stream",
            "time": micro_time(stream.started),
            "ended": micro_time(at),
            "auditID": stream.audit_id.to_string(),
            "cast": name,
            "title": stream.info.title(),
            "bytesIn": bytes_in,
            "bytesOut": bytes_out,
            "dropped": stream.dropped.load(Ordering::Relaxed),
        });
        if let Some(hash) = cast_sha256 {
            record["castSha256"] = json!(hash);
        }
        if let Err(error) = self.append(&stream.session.id, as_map(record)) {
            tracing::error!(%error, "cannot write a recording");
        }
    }

    /// Creates the session file with its header on the first record.
    fn ensure_open(
        &mut self,
        session: &Arc<SessionShared>,
        first: Option<&Exchange>,
    ) -> std::io::Result<()> {
        if self.sessions.contains_key(&session.id) {
            return Ok(());
        }
        let meta = &session.meta;
        let dir = match &meta.pod {
            Some(pod) => self
                .config
                .dir
                .join(path_safe(&pod.namespace))
                .join(path_safe(&pod.name)),
            None => self
                .config
                .dir
                .join("_unattested")
                .join(path_safe(&meta.peer.ip().to_string())),
        };
        create_private_dir(&dir)?;
        let file = create_new(&dir.join(format!("{}.jsonl", session.id)))?;
        let pod = meta.pod.as_ref().map(|p| {
            json!({"namespace": p.namespace, "name": p.name, "uid": p.uid, "serviceAccount": p.service_account})
        });
        let caller = first.map(|e| {
            json!({"username": e.caller.username, "uid": e.caller.uid, "groups": e.caller.groups})
        });
        // The process behind the connection (kernel record + /proc).
        let process = first.and_then(|e| e.caller.process.as_ref().map(|p| p.to_json()));
        let mut header = json!({
            "seq": 0,
            "type": "session",
            "version": 1,
            "session": session.id,
            "node": self.config.node,
            "pod": pod,
            "peer": meta.peer.to_string(),
            "started": micro_time(meta.started),
            "caller": caller,
            "process": process,
        });
        if let Some(key) = &self.config.key {
            header["version"] = json!(2);
            header["chain"] = json!(chain::KEYED);
            header["keyId"] = json!(key.id());
        }
        let (line, hash) = chain::seal(as_map(header), chain::GENESIS, self.config.key.as_ref());
        let mut open = OpenSession {
            shared: session.clone(),
            dir,
            file: LineFile::new(file),
            part: 0,
            bytes: 0,
            seq: 1,
            prev: hash,
            dirty: true,
            reported_dropped: 0,
        };
        write_line(&mut open, &line)?;
        self.sessions.insert(session.id.clone(), open);
        self.report_gap(session)
    }

    fn report_gap(&mut self, session: &SessionShared) -> std::io::Result<()> {
        let dropped = session.dropped.load(Ordering::Relaxed);
        let open = self.sessions.get_mut(&session.id).expect("open");
        if dropped > open.reported_dropped {
            let lost = dropped - open.reported_dropped;
            open.reported_dropped = dropped;
            let record = json!({"type": "gap", "time": micro_time(OffsetDateTime::now_utc()), "dropped": lost});
            self.append_raw(&session.id, as_map(record))?;
        }
        Ok(())
    }

    fn append(&mut self, id: &str, record: Map<String, Value>) -> std::io::Result<()> {
        self.append_raw(id, record)?;
        let open = &self.sessions[id];
        if open.bytes >= self.config.max_file_bytes {
            self.rotate(id)?;
        }
        Ok(())
    }

    fn append_raw(&mut self, id: &str, mut record: Map<String, Value>) -> std::io::Result<()> {
        let open = self.sessions.get_mut(id).expect("session is open");
        let mut numbered = Map::with_capacity(record.len() + 3);
        numbered.insert("seq".into(), json!(open.seq));
        numbered.append(&mut record);
        let (line, hash) = chain::seal(numbered, &open.prev, self.config.key.as_ref());
        write_line(open, &line)?;
        open.seq += 1;
        open.prev = hash;
        Ok(())
    }

    fn rotate(&mut self, id: &str) -> std::io::Result<()> {
        let next_part = self.sessions[id].part + 1;
        let from = part_name(id, next_part - 1);
        let next = part_name(id, next_part);
        self.append_raw(id, as_map(json!({"type": "rotate", "next": next})))?;
        let open = self.sessions.get_mut(id).expect("open");
        open.file.flush()?;
        open.file.get_ref().sync_data()?;
        let file = create_new(&open.dir.join(&next))?;
        open.file = LineFile::new(file);
        open.part = next_part;
        open.bytes = 0;
        self.append_raw(
            id,
            as_map(json!({"type": "continue", "part": next_part, "from": from})),
        )
    }

    fn close_session(&mut self, id: &str, reason: &str) {
        let keys: Vec<_> = self
            .streams
            .keys()
            .filter(|(s, _)| s == id)
            .cloned()
            .collect();
        for key in keys {
            if let Some(open) = self.streams.remove(&key) {
                self.finish_stream(open, OffsetDateTime::now_utc());
            }
        }
        if !self.sessions.contains_key(id) {
            return; // nothing was ever recorded
        }
        self.sessions[id]
            .shared
            .closed
            .store(true, Ordering::Relaxed);
        let records = self.sessions[id].seq + 1;
        let end = json!({
            "type": "end",
            "time": micro_time(OffsetDateTime::now_utc()),
            "reason": reason,
            "records": records,
        });
        let result = self.append_raw(id, as_map(end));
        let Some(mut open) = self.sessions.remove(id) else {
            return;
        };
        let result = result
            .and_then(|()| open.file.flush())
            .and_then(|()| open.file.get_ref().sync_all());
        match result {
            Ok(()) => {
                tracing::info!(session = id, last_hash = %open.prev, records, "session recording sealed")
            }
            Err(error) => tracing::error!(%error, session = id, "cannot seal a session recording"),
        }
    }

    fn flush_buffers(&mut self) {
        for (id, open) in &mut self.sessions {
            if let Err(error) = open.file.flush() {
                tracing::error!(%error, session = id, "cannot write a session recording");
            }
        }
        for open in self.streams.values_mut() {
            let _ = open.cast_flush();
        }
    }

    fn sync_all(&mut self) {
        self.last_sync = Instant::now();
        for open in self.sessions.values_mut() {
            if open.dirty {
                let _ = open.file.flush();
                if open.file.get_ref().sync_data().is_ok() {
                    open.dirty = false;
                }
            }
        }
        for open in self.streams.values_mut() {
            let _ = open.cast_flush();
        }
    }

    /// Deletes whole closed sessions by age, then oldest first by size.
    fn retention(&mut self) {
        self.last_retention = Instant::now();
        if self.config.retention_bytes.is_none() && self.config.retention_age.is_none() {
            return;
        }
        let mut groups = match session_groups(&self.config.dir) {
            Ok(groups) => groups,
            Err(error) => {
                tracing::warn!(%error, "cannot scan recordings for retention");
                return;
            }
        };
        let mut total: u64 = groups.iter().map(|g| g.bytes).sum();
        groups.retain(|g| !self.sessions.contains_key(&g.id));
        groups.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.id.cmp(&b.id)));
        let now = SystemTime::now();
        for group in groups {
            let too_old = self
                .config
                .retention_age
                .is_some_and(|age| now.duration_since(group.modified).unwrap_or_default() > age);
            let too_big = self.config.retention_bytes.is_some_and(|max| total > max);
            if !too_old && !too_big {
                continue;
            }
            for file in &group.files {
                if let Err(error) = fs::remove_file(file) {
                    tracing::warn!(%error, file = %file.display(), "retention cannot delete a recording");
                }
            }
            total = total.saturating_sub(group.bytes);
            tracing::info!(session = %group.id, bytes = group.bytes, too_old, "retention deleted a session recording");
            // Remove the pod (and namespace) directory once empty.
            if let Some(pod_dir) = group.files.first().and_then(|f| f.parent())
                && fs::remove_dir(pod_dir).is_ok()
                && let Some(ns_dir) = pod_dir.parent()
            {
                let _ = fs::remove_dir(ns_dir);
            }
        }
    }
}

impl OpenStream {
    fn cast_flush(&mut self) -> std::io::Result<()> {
        self.cast_mut().flush()
    }

    fn cast_mut(&mut self) -> &mut BufWriter<File> {
        &mut self.cast.get_mut().inner
    }
}

/// Ends a cast; its SHA-256 when all of it reached the file.
fn finish_cast(open: OpenStream, at: OffsetDateTime) -> Option<String> {
    match open.cast.finish(at) {
        Ok(hashed) => {
            let _ = hashed.inner.get_ref().sync_all();
            Some(hex::encode(sha2::Digest::finalize(hashed.hasher)))
        }
        Err(error) => {
            tracing::error!(%error, cast = open.name, "cannot finish an exec recording");
            None
        }
    }
}

fn write_line(open: &mut OpenSession, line: &str) -> std::io::Result<()> {
    open.file.write_all(line.as_bytes())?;
    open.file.write_all(b"\n")?;
    open.bytes += line.len() as u64 + 1;
    open.dirty = true;
    Ok(())
}

/// Recordings hold (masked) request and response bodies: owner-only.
fn create_new(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn as_map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("records are objects"),
    }
}

/// A name that is one path component (Kubernetes names already are).
fn path_safe(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => format!("_{cleaned}"),
        _ => cleaned,
    }
}

/// `<id>.jsonl` for the first part, `<id>.pN.jsonl` after rotations.
pub(crate) fn part_name(id: &str, part: u32) -> String {
    if part == 0 {
        format!("{id}.jsonl")
    } else {
        format!("{id}.p{part}.jsonl")
    }
}

fn exchange_record(e: &Exchange) -> Map<String, Value> {
    let info = &e.request;
    let mut r = Map::new();
    r.insert("type".into(), json!("exchange"));
    r.insert("time".into(), json!(micro_time(e.received)));
    r.insert("auditID".into(), json!(e.audit_id.to_string()));
    r.insert("stage".into(), json!(e.stage.as_str()));
    r.insert("verb".into(), json!(info.verb));
    r.insert("uri".into(), json!(e.request_uri));
    for (key, value) in [
        ("apiGroup", &info.api_group),
        ("apiVersion", &info.api_version),
        ("resource", &info.resource),
        ("subresource", &info.subresource),
        ("namespace", &info.namespace),
        ("name", &info.name),
    ] {
        if !value.is_empty() {
            r.insert(key.into(), json!(value));
        }
    }
    r.insert("user".into(), json!(e.caller.username));
    if let Some(user) = &e.impersonated_user {
        r.insert("impersonatedUser".into(), json!(user.username));
    }
    r.insert("decision".into(), json!(e.decision.verdict()));
    r.insert("rule".into(), json!(&*e.decision.rule));
    r.insert("policy".into(), json!(&*e.decision.policy));
    if let Some(approval) = &e.decision.approval {
        r.insert("approval".into(), json!(&**approval));
    }
    if let Some(by) = &e.decision.approved_by {
        r.insert("approvedBy".into(), json!(&**by));
    }
    r.insert("level".into(), json!(format!("{:?}", e.decision.level)));
    r.insert("status".into(), json!(e.status.code));
    if let Some(reason) = &e.status.reason {
        r.insert("reason".into(), json!(reason));
    }
    if let Some(message) = &e.status.message {
        r.insert("message".into(), json!(message));
    }
    r.insert(
        "latencyMs".into(),
        json!((e.latency().as_secs_f64() * 1e6).round() / 1e3),
    );
    r.insert("masked".into(), json!(e.masked_fields));
    let level = e.decision.level;
    if level >= crate::policy::RecordLevel::Request
        && let Some(body) = &e.request_body
    {
        r.insert("requestObject".into(), body.clone());
    }
    if level >= crate::policy::RecordLevel::RequestResponse
        && let Some(body) = &e.response_body
    {
        r.insert("responseObject".into(), body.clone());
    }
    r
}

/// The files of one session (all parts and casts).
pub(crate) struct SessionFiles {
    pub(crate) id: String,
    pub(crate) files: Vec<PathBuf>,
    pub(crate) bytes: u64,
    pub(crate) modified: SystemTime,
}

/// Every session under `root` (`<root>/<ns>/<pod>/<id>.*`).
pub(crate) fn session_groups(root: &Path) -> std::io::Result<Vec<SessionFiles>> {
    let mut groups: HashMap<(PathBuf, String), SessionFiles> = HashMap::new();
    for ns in read_dirs(root)? {
        for pod in read_dirs(&ns)? {
            for entry in fs::read_dir(&pod)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                if !meta.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((id, _)) = name.split_once('.') else {
                    continue;
                };
                let group = groups
                    .entry((pod.clone(), id.to_owned()))
                    .or_insert_with(|| SessionFiles {
                        id: id.to_owned(),
                        files: Vec::new(),
                        bytes: 0,
                        modified: SystemTime::UNIX_EPOCH,
                    });
                group.files.push(entry.path());
                group.bytes += meta.len();
                group.modified = group.modified.max(meta.modified()?);
            }
        }
    }
    Ok(groups.into_values().collect())
}

fn read_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod line_file_tests {
    use super::*;

    #[test]
    fn a_flushed_session_file_holds_no_buffer_and_a_failed_flush_keeps_the_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.jsonl");
        let mut file = LineFile::new(create_new(&path).unwrap());
        file.write_all(b"{\"seq\":0}\n{\"seq\":1}\n").unwrap();
        assert!(file.pending.capacity() > 0);
        file.flush().unwrap();
        assert_eq!(
            file.pending.capacity(),
            0,
            "an idle session keeps no buffer"
        );
        assert_eq!(fs::read(&path).unwrap(), b"{\"seq\":0}\n{\"seq\":1}\n");

        // A file that refuses writes (opened read-only): the line stays
        // pending for the next flush, nothing is dropped.
        let mut refusing = LineFile::new(File::open(&path).unwrap());
        refusing.write_all(b"{\"seq\":2}\n").unwrap();
        assert!(refusing.flush().is_err());
        assert_eq!(refusing.pending, b"{\"seq\":2}\n");
    }
}

//! Session recording and replay (issue 7).
//!
//! A *session* is one agent pod's connection to the proxy. Its requests are
//! written as append-only, hash-chained JSON lines (see [`chain`]), exec and
//! attach streams as asciicast v2 files (see [`cast`]):
//!
//! ```text
//! <dir>/<namespace>/<pod>/<session>.jsonl        header, exchanges, streams, end
//! <dir>/<namespace>/<pod>/<session>.p1.jsonl     continuation after rotation
//! <dir>/<namespace>/<pod>/<session>.s1.cast      first exec/attach stream
//! ```
//!
//! Connections that did not come through the redirect (no attested pod) are
//! grouped under `_unattested/<client ip>/`.
//!
//! # Wiring it into the proxy
//!
//! ```text
//! // startup
//! let metrics = admin::Metrics::new();
//! let recorder = Recorder::start(RecordConfig::new("/var/lib/chaperone/sessions", node), metrics.clone())?;
//! // per accepted connection
//! let session = recorder.session(SessionMeta { pod, peer, started: OffsetDateTime::now_utc() });
//! // per request, when the response completed (and at 101 for exec/attach)
//! let exchange = Arc::new(exchange);              // bodies masked, cut to the level
//! session.exchange(exchange.clone());             // try_send, never blocks
//! // exec/attach, per decoded frame (after masking)
//! let cast = session.stream(exchange.audit_id, StreamInfo { .. }, now);
//! cast.data(Channel::Stdout, bytes, now);
//! drop(cast);                                     // ends the cast
//! drop(session);                                  // seals the session
//! // shutdown
//! recorder.shutdown();                            // seals what is still open
//! ```
//!
//! Submit the exec request's `ResponseStarted` exchange before its frames,
//! so the session header names the caller even when exec is the first
//! request of a connection.
//!
//! # Runtime
//!
//! [`Recorder::start`] spawns one writer thread. The data path only does
//! `try_send` on a bounded channel ([`RecordConfig::queue`] messages): it never
//! waits for the disk. When the channel is full the message is dropped, the
//! `chaperone_record_dropped_total` counter goes up, and the next record that
//! gets through in that session is preceded by a `gap` record saying how many
//! were lost, so a recording never silently omits anything. Closing a session
//! or stream travels on a separate unbounded channel and is never dropped.
//! Stream frames dropped this way are counted in the stream's record
//! (`dropped`); frames that arrive after their session was sealed are counted
//! in `chaperone_record_dropped_total` and not written.
//!
//! # Durability (fsync policy)
//!
//! Every record is handed to the kernel (`write`) as soon as the writer
//! thread takes it (it takes what is queued in batches, at most 5 ms apart
//! while messages flow), so a crash of chaperone loses nothing that was
//! written. Files are `fsync`ed when a session or stream ends, when a file is
//! rotated, and at least every [`RecordConfig::fsync_interval`] while they
//! have unsynced writes: a crash of the machine loses at most that interval.
//!
//! # Evidence
//!
//! The chain is keyed with the node's record key (see [`chain`]), so a
//! session rewritten whole does not verify without that key. Each exec or
//! attach cast is inside the chain: its `stream` record carries the
//! SHA-256 of the finished cast file (`castSha256`), so an edited,
//! truncated or swapped cast fails `chaperone verify` too. The session
//! header keeps the process behind the connection (`process`: pid, uid,
//! command, executable, parent chain).
//!
//! # Rotation and retention
//!
//! A session file that grows past [`RecordConfig::max_file_bytes`] ends with a
//! `rotate` record naming the next part, which starts with a `continue`
//! record chained to it: the chain runs through all parts. Retention
//! ([`RecordConfig::retention_bytes`], [`RecordConfig::retention_age`]) runs on
//! the writer thread every [`RecordConfig::retention_interval`]: whole closed
//! sessions are deleted, least recently written first, until the total fits;
//! open sessions are never deleted.

pub mod capture;
pub mod cast;
pub mod chain;
pub mod cli;
pub mod read;
mod writer;

use crate::redirect::AgentAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use time::OffsetDateTime;

pub use crate::exchange::{
    DecisionRecord, Exchange, ResponseStatus, Stage, UserInfo, micro_time, parse_time,
};
pub use cast::{Channel, StreamInfo};

#[cfg(test)]
pub(crate) use crate::exchange::testing;

use crate::identity::PodRef;
use crate::metrics::Metrics;

/// Where and how sessions are recorded.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    /// Root directory of the recordings.
    pub dir: PathBuf,
    /// The node name written in each session header.
    pub node: String,
    /// Messages the data path may queue ahead of the writer thread.
    pub queue: usize,
    /// A session file is rotated when it grows past this many bytes.
    pub max_file_bytes: u64,
    /// Delete the oldest closed sessions while all recordings together
    /// exceed this many bytes.
    pub retention_bytes: Option<u64>,
    /// Delete closed sessions last written longer ago than this.
    pub retention_age: Option<Duration>,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// Longest time a written record may stay unsynced.
    pub fsync_interval: Duration,
    /// Keys the hash chain of every session (see [`chain`]); the node
    /// agent always sets it (`--record-key`), unkeyed chains are for tests
    /// and for reading old recordings.
    pub key: Option<chain::ChainKey>,
}

impl RecordConfig {
    pub fn new(dir: impl Into<PathBuf>, node: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            node: node.into(),
            queue: 8192,
            max_file_bytes: 64 << 20,
            retention_bytes: Some(10 << 30),
            retention_age: Some(Duration::from_secs(30 * 24 * 3600)),
            retention_interval: Duration::from_secs(60),
            fsync_interval: Duration::from_secs(1),
            key: None,
        }
    }
}

/// Errors starting the recorder.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "cannot use recording directory {dir}: {source}; create it or point --record-dir at a writable directory"
    )]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the recording thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the proxy knows about a connection when it accepts it.
#[derive(Clone, Debug)]
pub struct SessionMeta {
    /// The kernel-attested pod, when the connection came through the redirect.
    pub pod: Option<PodRef>,
    /// The agent's address.
    pub peer: AgentAddr,
    /// When the connection was accepted.
    pub started: OffsetDateTime,
}

pub(crate) enum Data {
    Exchange(Arc<SessionShared>, Arc<Exchange>),
    Stream(Arc<StreamShared>, Channel, bytes::Bytes, OffsetDateTime),
}

pub(crate) enum Control {
    CloseSession(Arc<SessionShared>),
    CloseStream(Arc<StreamShared>, OffsetDateTime),
    Flush(mpsc::Sender<()>),
    Shutdown,
}

pub(crate) struct SessionShared {
    pub(crate) id: String,
    pub(crate) meta: SessionMeta,
    pub(crate) dropped: AtomicU64,
    pub(crate) streams: AtomicU64,
    /// Set by the writer when the session is sealed.
    pub(crate) closed: std::sync::atomic::AtomicBool,
}

pub(crate) struct StreamShared {
    pub(crate) session: Arc<SessionShared>,
    /// 1-based number within the session.
    pub(crate) number: u64,
    pub(crate) audit_id: uuid::Uuid,
    pub(crate) info: StreamInfo,
    pub(crate) started: OffsetDateTime,
    pub(crate) dropped: AtomicU64,
}

#[derive(Clone)]
struct Queues {
    data: mpsc::SyncSender<Data>,
    control: mpsc::Sender<Control>,
    metrics: Metrics,
}

impl Queues {
    /// Never blocks: a full queue drops the message and counts it.
    fn offer(&self, data: Data, dropped: &AtomicU64) {
        match self.data.try_send(data) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                self.metrics.record_dropped();
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                self.metrics.record_dropped();
            }
        }
    }
}

/// The recorder: cheap to clone, one per proxy.
#[derive(Clone)]
pub struct Recorder {
    queues: Queues,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Recorder {
    /// Creates the directory and starts the writer thread.
    pub fn start(config: RecordConfig, metrics: Metrics) -> Result<Self, RecordError> {
        writer::create_private_dir(&config.dir).map_err(|source| RecordError::Dir {
            dir: config.dir.clone(),
            source,
        })?;
        let (data_tx, data_rx) = mpsc::sync_channel(config.queue.max(1));
        let (control_tx, control_rx) = mpsc::channel();
        let writer = writer::Writer::new(config, metrics.clone());
        let thread = std::thread::Builder::new()
            .name("chaperone-record".into())
            .spawn(move || writer.run(data_rx, control_rx))
            .map_err(RecordError::Thread)?;
        Ok(Self {
            queues: Queues {
                data: data_tx,
                control: control_tx,
                metrics,
            },
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// A new session for an accepted connection. No I/O: the files appear
    /// with the first record. Dropping the [`Session`] ends it.
    pub fn session(&self, meta: SessionMeta) -> Session {
        let id = session_id(meta.started);
        Session {
            shared: Arc::new(SessionShared {
                id,
                meta,
                dropped: AtomicU64::new(0),
                streams: AtomicU64::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
            }),
            queues: self.queues.clone(),
        }
    }

    /// Waits until everything queued so far is written and synced, and
    /// retention has run. For shutdown and tests; never call it on the data
    /// path.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.queues.control.send(Control::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Seals every open session and stops the writer thread. Sessions still
    /// held elsewhere are sealed with reason `shutdown`.
    pub fn shutdown(self) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        let _ = self.queues.control.send(Control::Shutdown);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// One recorded connection. Cheap to clone the [`Arc`] around it if several
/// tasks serve the connection (HTTP/2 streams).
pub struct Session {
    shared: Arc<SessionShared>,
    queues: Queues,
}

impl Session {
    /// The session id (also the file name).
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Records one exchange at its decision's record level (`None`: not
    /// recorded). Never blocks.
    pub fn exchange(&self, exchange: Arc<Exchange>) {
        if exchange.decision.level == crate::policy::RecordLevel::None {
            return;
        }
        self.queues.offer(
            Data::Exchange(self.shared.clone(), exchange),
            &self.shared.dropped,
        );
    }

    /// Starts recording an exec/attach stream of the request `audit_id`.
    /// Dropping the [`StreamRecorder`] ends the cast.
    pub fn stream(
        &self,
        audit_id: uuid::Uuid,
        info: StreamInfo,
        started: OffsetDateTime,
    ) -> StreamRecorder {
        let number = self.shared.streams.fetch_add(1, Ordering::Relaxed) + 1;
        StreamRecorder {
            shared: Arc::new(StreamShared {
                session: self.shared.clone(),
                number,
                audit_id,
                info,
                started,
                dropped: AtomicU64::new(0),
            }),
            queues: self.queues.clone(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self
            .queues
            .control
            .send(Control::CloseSession(self.shared.clone()));
    }
}

/// The recording of one exec/attach stream.
pub struct StreamRecorder {
    shared: Arc<StreamShared>,
    queues: Queues,
}

impl StreamRecorder {
    /// The bytes of one decoded frame (already masked). Never blocks.
    pub fn data(&self, channel: Channel, bytes: bytes::Bytes, at: OffsetDateTime) {
        self.queues.offer(
            Data::Stream(self.shared.clone(), channel, bytes, at),
            &self.shared.dropped,
        );
    }

    /// The cast file's name (beside the session file).
    pub fn cast_name(&self) -> String {
        cast_name(&self.shared.session.id, self.shared.number)
    }
}

impl Drop for StreamRecorder {
    fn drop(&mut self) {
        let _ = self.queues.control.send(Control::CloseStream(
            self.shared.clone(),
            OffsetDateTime::now_utc(),
        ));
    }
}

pub(crate) fn cast_name(session: &str, number: u64) -> String {
    format!("{session}.s{number}.cast")
}

/// `20261123T111702Z-1a2b3c4d5e6f`: sortable by start, unique by the random
/// part, and free of dots (file names split on the first dot).
fn session_id(started: OffsetDateTime) -> String {
    let t = started.to_offset(time::UtcOffset::UTC);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        &random[..12]
    )
}

#[cfg(test)]
mod tests;

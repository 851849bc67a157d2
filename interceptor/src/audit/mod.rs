//! `audit.k8s.io/v1` export (issue 7).
//!
//! Every request the proxy handles becomes an audit [`Event`] in the API
//! server's own format (see [`event`]), delivered to the sinks the cluster
//! already uses: a rotating file, stdout, or a webhook (see [`sink`]).
//!
//! # The path of an event
//!
//! ```text
//! proxy ──admit()──► Admission ──submit(Exchange)──► in-memory queue
//!     (data path: atomics and a channel send, never I/O)     │
//!                                   audit thread (own runtime)│
//!          ingest: build Event, append + fdatasync to each sink's spool
//!                                                            │
//!          per sink: read batch from spool ─► deliver ─► ack (cursor moves,
//!                    consumed segments deleted); failure ─► backoff, retry
//!                    at start and every 30 s: adopt orphaned spools
//! ```
//!
//! The proxy calls [`AuditGate::admit`] before forwarding a request and
//! [`Admission::submit`] when the response starts (long-running requests) and
//! completes. The data path never waits for a disk or a sink.
//!
//! ```text
//! // startup
//! let auditor = Auditor::start(AuditConfig::new("/var/lib/chaperone/audit-spool", sinks), metrics.clone())?;
//! let gate = auditor.gate();                      // clone into every connection task
//! // per request, before forwarding it
//! let admission = match gate.admit() {
//!     Ok(admission) => admission,
//!     Err(full) => return respond(full.status()), // 503 Status, fail closed
//! };
//! // watch/exec/attach: when the response headers are sent
//! admission.submit(Arc::new(exchange_with_stage_response_started));
//! // when the response completed
//! admission.submit(Arc::new(exchange));           // never blocks
//! drop(admission);
//! // shutdown
//! auditor.shutdown();                             // what is not delivered stays spooled
//! ```
//!
//! # Durability: how long an event waits in memory
//!
//! [`Durability::Batched`] (the default): the audit thread gathers events
//! for up to 50 ms ([`INGEST_LINGER`]) and spools them with one write and
//! one `fdatasync`. A crash of chaperone or of the node loses the events of
//! those last 50 ms (a clean shutdown spools them).
//!
//! [`Durability::Spooled`] (`--audit-durability spooled`): write-ahead. The
//! proxy calls [`AuditGate::write_ahead`] with a `RequestReceived` event
//! before it forwards a request and forwards it only once that event is
//! synced to every sink's spool (group commit: one `fdatasync` for every
//! event that arrived meanwhile; no gathering). A request that took effect
//! is therefore always in the spool; a crash can lose only the
//! `ResponseComplete` events of the last sync, never the fact that a
//! request was forwarded. A request whose event cannot be spooled is
//! refused with 503.
//!
//! # Nothing is lost; when the spool is full
//!
//! A slow or dead sink only makes its spool grow ([`SinkSpec::spool_max_bytes`],
//! on disk, surviving restarts). When a spool (or the in-memory queue) is
//! full, [`FullMode`] decides:
//! - [`FullMode::Block`]: [`AuditGate::admit`] fails with [`AuditFull`]; the
//!   proxy must fail closed and answer with [`AuditFull::status`] (503
//!   `Status`). Admitted requests are always written, so the spool limit is
//!   soft by at most the in-flight admissions.
//! - [`FullMode::Drop`]: admission always succeeds; events that do not fit are
//!   dropped, counted in `chaperone_audit_dropped_total{sink}` and logged
//!   (at most one warning per sink every 10 s, with the count).
//!
//! # Delivery guarantee
//!
//! At-least-once. An event is removed from a sink's spool only after the sink
//! acknowledged it (the file is written and synced; the webhook answered 2xx).
//! A crash or a lost answer can deliver a batch again. Every event keeps its
//! `auditID` (the proxy's, also sent upstream as `Audit-ID`) and `stage`, so
//! consumers deduplicate on `(auditID, stage)`. Webhook failures are retried
//! forever with exponential backoff (the spool holds the events meanwhile).
//!
//! # Two agents on one spool directory
//!
//! A rolling update of the node DaemonSet (`maxSurge: 1`) runs the new agent
//! beside the old one on the same `/var/lib/chaperone`. Each sink's spool
//! directory `<spool_dir>/<sink>/` belongs to the process holding the
//! `flock` on its `lock` file; a process that finds it held spools in a
//! `surge-<n>/` slot inside it instead, so both audit at once, each with
//! its own segments and cursor (see [`spool`]). Each sink's delivery loop
//! adopts orphans (spools whose process exited, found by their free lock) at
//! start and every [`AuditConfig::adopt_every`]: their undelivered events
//! are moved into its own spool (synced before they leave the orphan, so a
//! crash can only deliver them twice) and drained slots are removed. A
//! spool directory from a version without the lock is resumed as before;
//! the lock only protects against agents that take it, so the one rollout
//! from such a version to this one still runs two agents on one directory.

pub mod event;
pub mod sink;
pub mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot, watch};

pub use event::Event;
pub use sink::{DeliveryError, Endpoint, FileSinkConfig, SinkConfig, WebhookConfig};

use crate::exchange::Exchange;
use crate::kstatus::Status;
use crate::metrics::Metrics;
use spool::Spool;

/// What to do when a spool or the queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FullMode {
    /// Fail closed: refuse new requests with 503 until there is room.
    #[default]
    Block,
    /// Drop events that do not fit, with a counter and a log line.
    Drop,
}

/// How long an event may wait in memory before it is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Events gather for up to 50 ms and are spooled in one write and
    /// `fdatasync`: cheap, but a crash of chaperone or of the node loses the
    /// events of the last 50 ms.
    #[default]
    Batched,
    /// Write-ahead: a request is forwarded only once a `RequestReceived`
    /// event for it is synced to every sink's spool, so no request takes
    /// effect unaudited. Events are spooled as soon as the audit thread
    /// takes them (group commit: whatever arrives during one sync goes in
    /// the next), without the 50 ms gathering.
    Spooled,
}

/// One sink and its spool.
#[derive(Clone, Debug)]
pub struct SinkSpec {
    /// Names the spool directory and the metrics label: `[a-z0-9-]`.
    pub name: String,
    pub config: SinkConfig,
    /// The spool counts as full at this many unacknowledged bytes.
    pub spool_max_bytes: u64,
}

/// The audit pipeline's configuration.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Spools live in `<spool_dir>/<sink name>/`.
    pub spool_dir: PathBuf,
    /// In-memory capacity: live admissions (requests between `admit()` and
    /// their end; a long-running watch or exec only until its start event,
    /// see [`Admission::release_slot`]) plus events submitted but not yet
    /// spooled. In mode `block`, `admit()` fails
    /// at this count; in mode `drop`, events beyond it are dropped.
    pub queue: usize,
    pub full: FullMode,
    pub durability: Durability,
    /// Size of one spool segment file.
    pub segment_bytes: u64,
    /// How often each sink looks for orphaned spools to adopt (besides at
    /// start); see [`spool`].
    pub adopt_every: Duration,
    pub sinks: Vec<SinkSpec>,
}

impl AuditConfig {
    pub fn new(spool_dir: impl Into<PathBuf>, sinks: Vec<SinkSpec>) -> Self {
        Self {
            spool_dir: spool_dir.into(),
            queue: 10_000,
            full: FullMode::Block,
            durability: Durability::Batched,
            segment_bytes: 8 << 20,
            adopt_every: Duration::from_secs(30),
            sinks,
        }
    }
}

/// Errors setting up the audit pipeline.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit configuration: {0}")]
    Config(String),
    #[error(
        "cannot open the audit spool {dir}: {source}; check that the directory is writable (--audit-spool-dir)"
    )]
    Spool {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the audit thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The audit pipeline cannot take another event (mode `block`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuditFull(String);

impl AuditFull {
    /// The 503 `Status` the proxy answers with.
    pub fn status(&self) -> Status {
        Status::service_unavailable(format!(
            "chaperone cannot audit this request, so it refuses it: {}. Retry later; an operator should check the audit sink",
            self.0
        ))
    }
}

struct SinkState {
    name: String,
    spool: Arc<Spool>,
    notify: Notify,
    dropped_since_log: AtomicU64,
    last_drop_log: std::sync::Mutex<Option<Instant>>,
}

/// An event waiting for the audit thread; `done` hears when it is spooled
/// (write-ahead), with the reason when it could not be.
struct Queued {
    exchange: Arc<Exchange>,
    done: Option<oneshot::Sender<Result<(), SpoolFailure>>>,
}

/// A sink's spool refused a write: the events of that batch are lost for
/// the sink, and a write-ahead request is refused.
#[derive(Clone, Debug, thiserror::Error)]
#[error("the audit spool of sink {sink} cannot be written ({error})")]
struct SpoolFailure {
    sink: String,
    error: Arc<std::io::Error>,
}

struct Shared {
    tx: mpsc::UnboundedSender<Queued>,
    durability: Durability,
    /// Live admissions plus queued events.
    inflight: AtomicUsize,
    queued: AtomicUsize,
    capacity: usize,
    mode: FullMode,
    sinks: Vec<Arc<SinkState>>,
    metrics: Metrics,
    adopt_every: Duration,
}

impl Shared {
    fn drop_event(&self, sink: &SinkState, why: &str) {
        self.metrics.audit_dropped(&sink.name);
        let dropped = sink.dropped_since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = sink
            .last_drop_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            sink.dropped_since_log.store(0, Ordering::Relaxed);
            tracing::warn!(
                sink = %sink.name,
                dropped,
                "audit events dropped: {why} (mode drop); check the sink, or raise its spool size"
            );
        }
    }
}

/// The proxy's handle: cheap to clone.
#[derive(Clone)]
pub struct AuditGate {
    shared: Arc<Shared>,
}

impl AuditGate {
    /// Call before forwarding a request. In mode `block`, fails when the
    /// queue or a spool is full: answer with [`AuditFull::status`].
    pub fn admit(&self) -> Result<Admission, AuditFull> {
        let shared = &self.shared;
        if shared.mode == FullMode::Block {
            if shared.inflight.load(Ordering::Relaxed) >= shared.capacity {
                shared.metrics.audit_refused();
                return Err(AuditFull(format!(
                    "the audit queue is full ({} events in flight)",
                    shared.capacity
                )));
            }
            if let Some(sink) = shared.sinks.iter().find(|s| s.spool.is_full()) {
                shared.metrics.audit_refused();
                return Err(AuditFull(format!(
                    "the audit spool of sink {} is full ({} bytes not yet delivered)",
                    sink.name,
                    sink.spool.bytes()
                )));
            }
        }
        shared.inflight.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            shared: shared.clone(),
            holds_slot: true,
        })
    }

    /// Events admitted but not yet spooled.
    pub fn queue_depth(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

/// One admitted request. Submit its exchange(s), then drop it.
pub struct Admission {
    shared: Arc<Shared>,
    /// Counted among the in-flight admissions the gate bounds.
    holds_slot: bool,
}

impl Admission {
    /// Queues the audit event(s) of `exchange` (one per call: call it with
    /// stage `ResponseStarted` and again with `ResponseComplete` for
    /// long-running requests). Never blocks.
    pub fn submit(&self, exchange: Arc<Exchange>) {
        self.gate().submit(exchange);
    }

    /// The gate this admission came from, to submit from elsewhere (a
    /// deferred hand-off) after the admission itself is gone.
    pub fn gate(&self) -> AuditGate {
        AuditGate {
            shared: self.shared.clone(),
        }
    }
}

impl AuditGate {
    /// Queues the audit event of `exchange` (see [`Admission::submit`]).
    pub fn submit(&self, exchange: Arc<Exchange>) {
        let shared = &self.shared;
        if shared.mode == FullMode::Drop && shared.queued.load(Ordering::Relaxed) >= shared.capacity
        {
            for sink in &shared.sinks {
                shared.drop_event(sink, "the in-memory audit queue is full");
            }
            return;
        }
        shared.inflight.fetch_add(1, Ordering::Relaxed);
        let queued = shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
        shared.metrics.audit_queue_depth(queued as i64);
        if shared
            .tx
            .send(Queued {
                exchange,
                done: None,
            })
            .is_err()
        {
            shared.inflight.fetch_sub(1, Ordering::Relaxed);
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            for sink in &shared.sinks {
                shared.drop_event(sink, "the audit pipeline has shut down");
            }
        }
    }
}

impl AuditGate {
    /// The durability mode: with [`Durability::Spooled`] the proxy calls
    /// [`AuditGate::write_ahead`] before it forwards a request.
    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Spools the event of `exchange` (stage `RequestReceived`) and waits
    /// until it is synced to every sink's spool. Fails when it could not be
    /// spooled: answer with [`AuditFull::status`], the request must not be
    /// forwarded. The wait is one `fdatasync` of the spool, shared with
    /// every event that arrived meanwhile.
    pub async fn write_ahead(&self, exchange: Arc<Exchange>) -> Result<(), AuditFull> {
        let shared = &self.shared;
        let (done, spooled) = oneshot::channel();
        shared.inflight.fetch_add(1, Ordering::Relaxed);
        let queued = shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
        shared.metrics.audit_queue_depth(queued as i64);
        if shared
            .tx
            .send(Queued {
                exchange,
                done: Some(done),
            })
            .is_err()
        {
            shared.inflight.fetch_sub(1, Ordering::Relaxed);
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(AuditFull("the audit pipeline has shut down".into()));
        }
        match spooled.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(AuditFull(why.to_string())),
            Err(_) => Err(AuditFull(
                "the audit pipeline stopped before the event was spooled".into(),
            )),
        }
    }
}

impl Admission {
    /// A long-running request (watch, exec, port-forward) whose start event
    /// is queued gives its slot back: the gate bounds requests waiting to be
    /// audited, not open streams, so 10,000 idle watches on a node do not
    /// refuse its next request. Its end event is still accepted.
    pub fn release_slot(&mut self) {
        if std::mem::take(&mut self.holds_slot) {
            self.shared.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release_slot();
    }
}

/// The running audit pipeline.
pub struct Auditor {
    gate: AuditGate,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Auditor {
    /// Opens the spools (resuming what a previous run left) and starts the
    /// audit thread with its own runtime.
    pub fn start(config: AuditConfig, metrics: Metrics) -> Result<Self, AuditError> {
        if config.sinks.is_empty() {
            return Err(AuditError::Config(
                "no audit sink configured: add a file, stdout or webhook sink".into(),
            ));
        }
        let mut sinks = Vec::new();
        let mut deliverers = Vec::new();
        for spec in &config.sinks {
            if spec.name.is_empty()
                || !spec
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(AuditError::Config(format!(
                    "audit sink name {:?} must be lowercase letters, digits and '-'",
                    spec.name
                )));
            }
            let dir = config.spool_dir.join(&spec.name);
            let spool = Spool::open(&dir, spec.spool_max_bytes, config.segment_bytes)
                .map_err(|source| AuditError::Spool { dir, source })?;
            metrics.audit_spool(&spec.name, spool.events() as i64, spool.bytes() as i64);
            let state = Arc::new(SinkState {
                name: spec.name.clone(),
                spool: Arc::new(spool),
                notify: Notify::new(),
                dropped_since_log: AtomicU64::new(0),
                last_drop_log: std::sync::Mutex::new(None),
            });
            let deliverer = match &spec.config {
                SinkConfig::File(file) => Deliverer::File(sink::FileSink::new(file.clone())),
                SinkConfig::Stdout => Deliverer::Stdout,
                SinkConfig::Webhook(webhook) => {
                    Deliverer::Webhook(Box::new(sink::WebhookSink::new(webhook.clone())?))
                }
            };
            sinks.push(state.clone());
            deliverers.push((state, deliverer));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            tx,
            inflight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            capacity: config.queue.max(1),
            mode: config.full,
            durability: config.durability,
            sinks,
            metrics: metrics.clone(),
            adopt_every: config.adopt_every,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AuditError::Thread)?;
        // The audit thread logs where the starting thread logs.
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let ingest_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("chaperone-audit".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    runtime.block_on(run(ingest_shared, rx, deliverers, shutdown_rx));
                });
            })
            .map_err(AuditError::Thread)?;
        Ok(Self {
            gate: AuditGate { shared },
            shutdown,
            thread: Some(thread),
        })
    }

    /// The handle the proxy uses.
    pub fn gate(&self) -> AuditGate {
        self.gate.clone()
    }

    /// Spools everything queued so far, stops delivery (what is not
    /// delivered stays in the spool for the next start) and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Auditor {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Deliverer {
    File(sink::FileSink),
    Stdout,
    Webhook(Box<sink::WebhookSink>),
}

/// Most events spooled in one write.
const INGEST_BATCH: usize = 1024;

/// How long the first event of a batch waits for others. A batch costs two
/// `fdatasync`s, a spool read and a cursor rename (about 0.5 ms of this
/// thread and eight context switches here) whatever its size: at 1,400
/// events/s 10 ms cut the audit thread's CPU from as much as the proxy's
/// own to a fraction, and at 200 requests/s 50 ms cut its context switches
/// a further fivefold. Events wait in memory that long at most before they
/// are spooled (the API server's own batching audit backend waits up to
/// 30 s); a shutdown spools them at once.
const INGEST_LINGER: Duration = Duration::from_millis(50);

async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    deliverers: Vec<(Arc<SinkState>, Deliverer)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for (state, deliverer) in deliverers {
        tasks.spawn(deliver(
            state,
            deliverer,
            shared.metrics.clone(),
            shared.adopt_every,
            shared.durability,
            shutdown.clone(),
        ));
    }
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            received = rx.recv_many(&mut batch, INGEST_BATCH) => {
                if received == 0 {
                    break;
                }
                // Let the rest of a burst arrive: one spool write and sync
                // (and one delivery) for all of it instead of one per event.
                // The linger does not watch the queue: a submit while it
                // runs wakes nobody, so the proxy's threads do not pay a
                // cross-CPU wake-up (and this thread a run) per request.
                let mut stopping = false;
                if received < INGEST_BATCH && shared.durability == Durability::Batched {
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => stopping = true,
                        () = tokio::time::sleep(INGEST_LINGER) => {}
                    }
                    while batch.len() < INGEST_BATCH {
                        match rx.try_recv() {
                            Ok(queued) => batch.push(queued),
                            Err(_) => break,
                        }
                    }
                }
                if shared.durability == Durability::Spooled {
                    // Off this thread, so that a file sink's own write and
                    // sync (on this thread) never hold up a write-ahead.
                    let ingesting = shared.clone();
                    let mut taken = std::mem::take(&mut batch);
                    batch = tokio::task::spawn_blocking(move || {
                        ingest(&ingesting, &mut taken);
                        taken
                    })
                    .await
                    .unwrap_or_default();
                } else {
                    ingest(&shared, &mut batch);
                }
                if stopping {
                    spool_the_rest(&shared, &mut rx, &mut batch);
                    break;
                }
            }
            _ = shutdown.changed() => {
                spool_the_rest(&shared, &mut rx, &mut batch);
                break;
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    // Nothing writes the spools any more: the next start may take them,
    // even while the proxy still holds a gate.
    for sink in &shared.sinks {
        sink.spool.close();
    }
}

/// Spools what was submitted before the shutdown.
fn spool_the_rest(
    shared: &Shared,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    batch: &mut Vec<Queued>,
) {
    while let Ok(queued) = rx.try_recv() {
        batch.push(queued);
    }
    ingest(shared, batch);
}

/// Builds the events of a batch of exchanges and appends them to every
/// sink's spool.
fn ingest(shared: &Shared, batch: &mut Vec<Queued>) {
    let count = batch.len();
    if count == 0 {
        return;
    }
    let mut waiting = Vec::new();
    let lines: Vec<Vec<u8>> = batch
        .drain(..)
        .filter_map(|queued| {
            waiting.extend(queued.done);
            Event::from_exchange(&queued.exchange)
        })
        .map(|e| e.to_line())
        .collect();
    let mut failure: Option<SpoolFailure> = None;
    for sink in &shared.sinks {
        let take = if shared.mode == FullMode::Drop && sink.spool.is_full() {
            for _ in &lines {
                shared.drop_event(sink, "the spool is full");
            }
            0
        } else {
            lines.len()
        };
        let refs: Vec<&[u8]> = lines[..take].iter().map(Vec::as_slice).collect();
        if let Err(error) = sink.spool.append(&refs) {
            let error = Arc::new(error);
            failure = Some(SpoolFailure {
                sink: sink.name.clone(),
                error: error.clone(),
            });
            // The disk refused: the events cannot be kept for this sink.
            for _ in &refs {
                shared.drop_event(sink, "the spool cannot be written");
            }
            tracing::error!(%error, sink = %sink.name, "cannot write the audit spool; check the disk");
        }
        shared.metrics.audit_spool(
            &sink.name,
            sink.spool.events() as i64,
            sink.spool.bytes() as i64,
        );
        sink.notify.notify_one();
    }
    shared.inflight.fetch_sub(count, Ordering::Relaxed);
    let queued = shared.queued.fetch_sub(count, Ordering::Relaxed) - count;
    shared.metrics.audit_queue_depth(queued as i64);
    for done in waiting {
        let _ = done.send(failure.clone().map_or(Ok(()), Err));
    }
}

/// Moves what exited processes left in orphaned spools of this sink into
/// its spool, off the audit thread (it syncs every batch it moves). `true`
/// when an orphan still holds events because the spool is full: try again
/// soon.
async fn adopt_orphans(
    state: &SinkState,
    metrics: &Metrics,
    shutdown: &watch::Receiver<bool>,
) -> bool {
    let spool = state.spool.clone();
    let stop = shutdown.clone();
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    let adoption = tokio::task::spawn_blocking(move || {
        tracing::dispatcher::with_default(&dispatch, || spool.adopt_orphans(|| *stop.borrow()))
    })
    .await
    .unwrap_or_default();
    if adoption.events > 0 {
        metrics.audit_spool(
            &state.name,
            state.spool.events() as i64,
            state.spool.bytes() as i64,
        );
    }
    adoption.full
}

/// The delivery loop of one sink: batch from the spool, deliver, ack; and
/// at start and every `adopt_every`, adopt orphaned spools.
async fn deliver(
    state: Arc<SinkState>,
    mut deliverer: Deliverer,
    metrics: Metrics,
    adopt_every: Duration,
    durability: Durability,
    mut shutdown: watch::Receiver<bool>,
) {
    let (max_batch, max_wait) = match &deliverer {
        Deliverer::Webhook(w) => (w.config().batch_max_size.max(1), w.config().batch_max_wait),
        // Write-ahead: the events are already safe in the spool, and a file
        // sink's write and sync run on the audit thread, where each one
        // would hold up the next request's spooling: deliver in batches.
        _ if durability == Durability::Spooled => (1024, INGEST_LINGER),
        _ => (1024, Duration::ZERO),
    };
    let mut failures = 0u32;
    let mut next_adoption = tokio::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if tokio::time::Instant::now() >= next_adoption {
            let again = if adopt_orphans(&state, &metrics, &shutdown).await {
                Duration::from_secs(1).min(adopt_every)
            } else {
                adopt_every
            };
            next_adoption = tokio::time::Instant::now() + again;
        }
        // Wait for events, then (webhook) for a full batch or max_wait.
        if state.spool.events() == 0 {
            let wake = next_adoption.min(tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                () = state.notify.notified() => {}
                _ = shutdown.changed() => return,
                () = tokio::time::sleep_until(wake) => {}
            }
            continue;
        }
        if (state.spool.events() as usize) < max_batch && !max_wait.is_zero() {
            let deadline = tokio::time::Instant::now() + max_wait;
            while (state.spool.events() as usize) < max_batch {
                tokio::select! {
                    () = state.notify.notified() => {}
                    () = tokio::time::sleep_until(deadline) => break,
                    _ = shutdown.changed() => return,
                }
            }
        }
        let batch = match state.spool.read(max_batch) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(%error, sink = %state.name, "cannot read the audit spool; check the disk");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        if batch.is_empty() {
            // The counters said there were events, but a read to the end found
            // none (it resynced them): wait for new ones, never spin.
            metrics.audit_spool(
                &state.name,
                state.spool.events() as i64,
                state.spool.bytes() as i64,
            );
            tokio::select! {
                () = state.notify.notified() => {}
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let result = match &mut deliverer {
            Deliverer::File(file) => file.write(&batch.events).map_err(DeliveryError::from),
            Deliverer::Stdout => {
                let mut out = std::io::stdout().lock();
                batch
                    .events
                    .iter()
                    .try_for_each(|e| {
                        use std::io::Write;
                        out.write_all(e)?;
                        out.write_all(b"\n")
                    })
                    .and_then(|()| {
                        use std::io::Write;
                        out.flush()
                    })
                    .map_err(DeliveryError::from)
            }
            Deliverer::Webhook(webhook) => {
                tokio::select! {
                    result = webhook.post(&batch.events) => result,
                    _ = shutdown.changed() => return,
                }
            }
        };
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(sink = %state.name, failures, "audit sink delivers again");
                }
                failures = 0;
                if let Err(error) = state.spool.ack(&batch) {
                    tracing::error!(%error, sink = %state.name, "cannot move the audit spool cursor; events may be delivered again");
                }
                metrics.audit_delivered(&state.name, batch.events.len() as u64);
                metrics.audit_spool(
                    &state.name,
                    state.spool.events() as i64,
                    state.spool.bytes() as i64,
                );
            }
            Err(error) => {
                metrics.audit_delivery_failed(&state.name);
                let backoff = match &deliverer {
                    Deliverer::Webhook(w) => {
                        let c = w.config();
                        c.initial_backoff
                            .saturating_mul(1u32 << failures.min(16))
                            .min(c.max_backoff)
                    }
                    _ => Duration::from_secs(1),
                };
                failures = failures.saturating_add(1);
                tracing::warn!(
                    sink = %state.name,
                    %error,
                    retry_in = ?backoff,
                    spooled = state.spool.events(),
                    "audit delivery failed; the events stay spooled and will be retried"
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! `agent-load`: replays a realistic agent mix against an API server (the
//! simulator directly, chaperone, or any reverse proxy) and reports latency
//! percentiles and throughput. Open-loop mode schedules requests at a fixed
//! rate and measures from each request's *intended* start, so a stall is
//! charged to every request it delayed (no coordinated omission).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::{Deserialize, Serialize};

/// One kind of request in the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    GetPod,
    ListPods,
    GetSecret,
    CreateDeleteConfigMap,
    /// Every Secret of the namespace (not in the mix: the bench's big
    /// list, a namespace of large Secrets that chaperone masks).
    ListSecrets,
}

impl Op {
    pub const ALL: [Op; 5] = [
        Op::GetPod,
        Op::ListPods,
        Op::GetSecret,
        Op::CreateDeleteConfigMap,
        Op::ListSecrets,
    ];

    /// Relative weight in the mix: agents mostly read.
    fn weight(self) -> u32 {
        match self {
            Op::GetPod => 5,
            Op::ListPods => 1,
            Op::GetSecret => 2,
            Op::CreateDeleteConfigMap => 1,
            Op::ListSecrets => 0,
        }
    }
}

/// What the load runs against and how.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// `https://host:port`.
    pub base: String,
    pub ca_pem: Vec<u8>,
    pub token: String,
    pub namespace: String,
    pub http2: bool,
    /// Concurrent workers (closed loop) or in-flight cap (open loop).
    pub concurrency: usize,
    /// `Some(rate)`: open loop at `rate` requests/s; `None`: closed loop.
    pub rate: Option<u32>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Long-lived watch streams held open during the run.
    pub watches: usize,
    /// Only this op instead of the mix (profiling one path).
    pub only: Option<Op>,
    /// Closed loop: stop after this many operations instead of at the
    /// deadline (the bench's callgrind runs count a fixed number).
    pub requests: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OpReport {
    pub op: Op,
    pub count: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Response body bytes of the recorded successful requests.
    #[serde(default)]
    pub bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LoadReport {
    pub base: String,
    pub mode: String,
    pub http: String,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub watch_events: u64,
    /// Every HTTP request this run sent (the first probe, warm-up, watches
    /// and both halves of create+delete): what an audit log must account for.
    pub http_requests_sent: u64,
    pub ops: Vec<OpReport>,
}

/// HTTP requests sent by this process (see [`LoadReport::http_requests_sent`]).
static HTTP_REQUESTS_SENT: AtomicU64 = AtomicU64::new(0);

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn client(spec: &LoadSpec) -> Result<HttpsClient> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&spec.ca_pem)? {
        roots.add(cert).context("CA certificate")?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let mut client = Client::builder(TokioExecutor::new());
    let connector = if spec.http2 {
        client.http2_only(true);
        builder.enable_http2().build()
    } else {
        client.pool_max_idle_per_host(spec.concurrency);
        builder.enable_http1().build()
    };
    Ok(client.build(connector))
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .context("the CA bundle is not PEM")?;
    if certs.is_empty() {
        bail!("the CA bundle holds no certificate");
    }
    Ok(certs)
}

struct Recorder {
    /// Per op: latencies, errors, body bytes.
    per_op: Vec<(Op, std::sync::Mutex<Histogram<u64>>, AtomicU64, AtomicU64)>,
    recording: std::sync::atomic::AtomicBool,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            per_op: Op::ALL
                .iter()
                .map(|op| {
                    (
                        *op,
                        std::sync::Mutex::new(
                            Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
                        ),
                        AtomicU64::new(0),
                        AtomicU64::new(0),
                    )
                })
                .collect(),
            recording: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `bytes`: the response body's length, `None` for a failed request.
    fn record(&self, op: Op, latency: Duration, bytes: Option<u64>) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let slot = self
            .per_op
            .iter()
            .find(|(o, _, _, _)| *o == op)
            .expect("every op has a slot");
        if let Some(bytes) = bytes {
            slot.3.fetch_add(bytes, Ordering::Relaxed);
            let micros = latency.as_micros().clamp(1, 60_000_000) as u64;
            let _ = slot
                .1
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(micros);
        } else {
            slot.2.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The response body's length, or `None` if the request failed.
async fn request(
    client: &HttpsClient,
    spec: &LoadSpec,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Option<u64> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("{}{path}", spec.base))
        .header("authorization", format!("Bearer {}", spec.token))
        .header("accept", "application/json");
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder
        .body(Full::new(body.map(Bytes::from).unwrap_or_default()))
        .expect("valid request");
    HTTP_REQUESTS_SENT.fetch_add(1, Ordering::Relaxed);
    let response = client.request(request).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    // Counted frame by frame: a 50 MB list is not held whole.
    let mut body = response.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.ok()?.data_ref() {
            bytes += data.len() as u64;
        }
    }
    Some(bytes)
}

/// The response body's length (of the last request, for two), or `None`
/// if a request failed.
async fn run_op(client: &HttpsClient, spec: &LoadSpec, op: Op, n: u64) -> Option<u64> {
    let ns = &spec.namespace;
    match op {
        Op::GetPod => {
            request(
                client,
                spec,
                Method::GET,
                &format!("/api/v1/namespaces/{ns}/pods/pod-{}", n % 500),
                None,
            )
            .await
        }
        Op::ListPods => {
            request(
                client,
                spec,
                Method::GET,
                &format!("/api/v1/namespaces/{ns}/pods"),
                None,
            )
            .await
        }
        Op::GetSecret => {
            request(
                client,
                spec,
                Method::GET,
                &format!("/api/v1/namespaces/{ns}/secrets/db-credentials"),
                None,
            )
            .await
        }
        Op::CreateDeleteConfigMap => {
            let name = format!("load-{}-{n}", std::process::id());
            let body = format!(
                r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}},"data":{{"k":"v"}}}}"#
            );
            request(
                client,
                spec,
                Method::POST,
                &format!("/api/v1/namespaces/{ns}/configmaps"),
                Some(body),
            )
            .await?;
            request(
                client,
                spec,
                Method::DELETE,
                &format!("/api/v1/namespaces/{ns}/configmaps/{name}"),
                None,
            )
            .await
        }
        Op::ListSecrets => {
            request(
                client,
                spec,
                Method::GET,
                &format!("/api/v1/namespaces/{ns}/secrets"),
                None,
            )
            .await
        }
    }
}

/// When an open-loop request counts as started. Behind schedule (the pacer
/// reached `intended` only after it passed, because it waited for a free
/// slot behind a slow target), the intended start: the backlog counts, no
/// coordinated omission. On schedule, when the timer woke the pacer: its
/// lateness (tokio's wheel ticks in milliseconds) is the client's, not the
/// target's.
fn start_of(intended: Instant, reached: Instant, woke: Instant) -> Instant {
    if reached >= intended { intended } else { woke }
}

/// The op for the n-th request of the mix.
fn pick(n: u64) -> Op {
    let total: u32 = Op::ALL.iter().map(|o| o.weight()).sum();
    let mut slot = (n % u64::from(total)) as u32;
    for op in Op::ALL {
        if slot < op.weight() {
            return op;
        }
        slot -= op.weight();
    }
    Op::GetPod
}

/// Runs the load and reports.
pub async fn run(spec: LoadSpec) -> Result<LoadReport> {
    let sent_before = HTTP_REQUESTS_SENT.load(Ordering::Relaxed);
    let client = client(&spec)?;
    // Fail early and clearly if the target is not usable.
    let probe = spec.only.unwrap_or(Op::GetPod);
    if run_op(&client, &spec, probe, 0).await.is_none() {
        bail!(
            "the first {probe:?} in namespace {} against {} failed: is the target up and seeded?",
            spec.namespace,
            spec.base
        );
    }
    let recorder = Arc::new(Recorder::new());
    let counter = Arc::new(AtomicU64::new(0));
    let watch_events = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut watches = Vec::new();
    for _ in 0..spec.watches {
        let (client, spec, events, stop) = (
            client.clone(),
            spec.clone(),
            watch_events.clone(),
            stop.clone(),
        );
        watches.push(tokio::spawn(async move {
            let request = Request::get(format!(
                "{}/api/v1/namespaces/{}/configmaps?watch=true",
                spec.base, spec.namespace
            ))
            .header("authorization", format!("Bearer {}", spec.token))
            .body(Full::new(Bytes::new()))
            .expect("valid request");
            HTTP_REQUESTS_SENT.fetch_add(1, Ordering::Relaxed);
            if let Ok(response) = client.request(request).await {
                let mut body = response.into_body();
                while !stop.load(Ordering::Relaxed) {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                let n = data.iter().filter(|b| **b == b'\n').count();
                                events.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                        _ => break,
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    let deadline = started + spec.warmup + spec.duration;
    let recording_from = started + spec.warmup;
    {
        let recorder = recorder.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(recording_from.into()).await;
            recorder.recording.store(true, Ordering::Relaxed);
        });
    }
    let mut workers = Vec::new();
    match spec.rate {
        None => {
            for _ in 0..spec.concurrency {
                let (client, spec, recorder, counter) = (
                    client.clone(),
                    spec.clone(),
                    recorder.clone(),
                    counter.clone(),
                );
                workers.push(tokio::spawn(async move {
                    loop {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let done = match spec.requests {
                            Some(max) => n >= max,
                            None => Instant::now() >= deadline,
                        };
                        if done {
                            break;
                        }
                        let op = spec.only.unwrap_or_else(|| pick(n));
                        let begun = Instant::now();
                        let ok = run_op(&client, &spec, op, n).await;
                        recorder.record(op, begun.elapsed(), ok);
                    }
                }));
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(spec.concurrency.max(1)));
            let mut next = Instant::now();
            let mut n = 0u64;
            while next < deadline {
                let reached = Instant::now();
                if reached < next {
                    tokio::time::sleep_until(next.into()).await;
                }
                let intended = start_of(next, reached, Instant::now());
                let permit = in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open");
                let (client, spec2, recorder) = (client.clone(), spec.clone(), recorder.clone());
                let op = spec.only.unwrap_or_else(|| pick(n));
                workers.push(tokio::spawn(async move {
                    let ok = run_op(&client, &spec2, op, n).await;
                    // Measured from the intended start: queueing counts.
                    recorder.record(op, intended.elapsed(), ok);
                    drop(permit);
                }));
                n += 1;
                next += interval;
            }
        }
    }
    for worker in workers {
        let _ = worker.await;
    }
    stop.store(true, Ordering::Relaxed);
    for watch in watches {
        watch.abort();
    }

    let seconds = spec.duration.as_secs_f64();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut ops = Vec::new();
    let mut errors = 0;
    for (op, histogram, op_errors, op_bytes) in &recorder.per_op {
        let histogram = histogram.lock().unwrap_or_else(|p| p.into_inner());
        let _ = all.add(&*histogram);
        let op_errors = op_errors.load(Ordering::Relaxed);
        errors += op_errors;
        ops.push(OpReport {
            op: *op,
            count: histogram.len(),
            errors: op_errors,
            p50_us: histogram.value_at_quantile(0.5),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            bytes: op_bytes.load(Ordering::Relaxed),
        });
    }
    Ok(LoadReport {
        base: spec.base.clone(),
        mode: match spec.rate {
            Some(rate) => format!("open-loop {rate}/s"),
            None => format!("closed-loop x{}", spec.concurrency),
        },
        http: if spec.http2 { "h2" } else { "http/1.1" }.into(),
        seconds,
        requests: all.len(),
        errors,
        requests_per_second: all.len() as f64 / seconds,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        p999_us: all.value_at_quantile(0.999),
        watch_events: watch_events.load(Ordering::Relaxed),
        http_requests_sent: HTTP_REQUESTS_SENT.load(Ordering::Relaxed) - sent_before,
        ops,
    })
}

/// Opens `count` idle watch streams (a namespace nothing changes in, no
/// bookmarks) spread over `connections` HTTP/2 connections, calls `opened`
/// with how many got their response headers within `settle`, then holds them
/// until `hold` resolves.
pub async fn idle_watches(
    spec: &LoadSpec,
    count: usize,
    connections: usize,
    settle: Duration,
    opened: impl FnOnce(usize),
    hold: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let clients = (0..connections.max(1))
        .map(|_| client(spec))
        .collect::<Result<Vec<_>>>()?;
    let open = Arc::new(AtomicU64::new(0));
    // Why a stream did not open: reason -> count, printed on stderr.
    let failed = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let client = clients[i % clients.len()].clone();
        let (spec, open, failed) = (spec.clone(), open.clone(), failed.clone());
        streams.push(tokio::spawn(async move {
            let request = Request::get(format!(
                "{}/api/v1/namespaces/{}/configmaps?watch=true",
                spec.base, spec.namespace
            ))
            .header("authorization", format!("Bearer {}", spec.token))
            .body(Full::new(Bytes::new()))
            .expect("valid request");
            HTTP_REQUESTS_SENT.fetch_add(1, Ordering::Relaxed);
            let reason = match client.request(request).await {
                Ok(response) if response.status().is_success() => {
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut body = response.into_body();
                    while let Some(Ok(_)) = body.frame().await {}
                    return;
                }
                Ok(response) => format!("HTTP {}", response.status()),
                Err(error) => format!("{error:?}"),
            };
            *failed.lock().unwrap().entry(reason).or_insert(0usize) += 1;
        }));
    }
    // Wait until every stream is open, or until nothing moves for `settle`.
    let mut last = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = open.load(Ordering::Relaxed) as usize;
        if now >= count {
            break;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > settle {
            break;
        }
    }
    let now = open.load(Ordering::Relaxed) as usize;
    if now < count {
        let failed = failed.lock().unwrap().clone();
        let waiting = (count - now).saturating_sub(failed.values().sum());
        eprintln!(
            "idle watches: {now} of {count} open, {waiting} still waiting, failed: {failed:?}"
        );
    }
    opened(now);
    hold.await;
    for stream in streams {
        stream.abort();
    }
    Ok(())
}

/// Opens `count` agent connections, each its own TLS + HTTP/2 connection
/// that sends one GET (the secret: identity, policy and masking have run for
/// it) and then stays open and idle; calls `opened` with how many answered,
/// then holds them until `hold` resolves.
pub async fn idle_connections(
    spec: &LoadSpec,
    count: usize,
    opened: impl FnOnce(usize),
    hold: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut clients = Vec::with_capacity(count);
    let mut tasks = tokio::task::JoinSet::new();
    // A few handshakes at a time: the proxies' accept queues are not the
    // question.
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    for n in 0..count {
        let client = idle_client(spec)?;
        clients.push(client.clone());
        let (spec, gate) = (spec.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            run_op(&client, &spec, Op::GetSecret, n as u64)
                .await
                .is_some()
        });
    }
    let mut ok = 0;
    while let Some(done) = tasks.join_next().await {
        if matches!(done, Ok(true)) {
            ok += 1;
        }
    }
    if ok < count {
        eprintln!("idle connections: {ok} of {count} answered their GET");
    }
    opened(ok);
    hold.await;
    drop(clients);
    Ok(())
}

/// A client whose one pooled connection stays open while idle (hyper's pool
/// closes idle connections after 90 s by default).
fn idle_client(spec: &LoadSpec) -> Result<HttpsClient> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&spec.ca_pem)? {
        roots.add(cert).context("CA certificate")?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(None)
        .build(connector))
}

/// Creates Secrets `big-0` .. `big-{count-1}` in `spec.namespace`, each
/// holding `bytes` characters of base64 data (decoded, 3/4 of that: under
/// the API server's 1 MiB per Secret for `bytes` up to 1,398,100), a few
/// at a time; one that already exists (409) counts as made.
pub async fn create_secrets(spec: &LoadSpec, count: usize, bytes: usize) -> Result<()> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // Whole base64 quanta, no padding: valid base64 of bytes * 3/4 bytes.
    let data: String = (0..bytes / 4 * 4)
        .map(|i| ALPHABET[(i * 7 + i / 64) % 64] as char)
        .collect();
    let client = client(spec)?;
    let gate = Arc::new(tokio::sync::Semaphore::new(4));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let (client, spec, gate) = (client.clone(), spec.clone(), gate.clone());
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"Secret","metadata":{{"name":"big-{i}"}},"type":"Opaque","data":{{"blob":"{data}"}}}}"#
        );
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            let request = Request::post(format!(
                "{}/api/v1/namespaces/{}/secrets",
                spec.base, spec.namespace
            ))
            .header("authorization", format!("Bearer {}", spec.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
            let response = client
                .request(request)
                .await
                .with_context(|| format!("creating Secret big-{i}"))?;
            let status = response.status();
            if status.is_success() || status == http::StatusCode::CONFLICT {
                return Ok(());
            }
            let text = response.into_body().collect().await?.to_bytes();
            bail!(
                "creating Secret big-{i} in {}: HTTP {status}: {}",
                spec.namespace,
                String::from_utf8_lossy(&text)
            )
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The agents [`agents`] runs: one per token.
#[derive(Clone, Debug)]
pub struct AgentsSpec {
    pub tokens: Vec<String>,
    pub watches: usize,
    pub watch_namespace: String,
    /// GETs per second per agent.
    pub rate: f64,
}

/// What [`agents`] measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentsReport {
    pub pods: usize,
    pub watches_open: usize,
    pub watches_asked: usize,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub seconds: f64,
}

/// Many agents at once: one HTTP/2 connection per token (a pod), each
/// holding `watches` idle watches (in `watch_namespace`, where nothing
/// changes) and sending one GET every `1 / rate` seconds (get pod and get
/// secret in turn). Calls `ready` once the watches are open, runs for
/// `spec.duration`, calls `done` with the report, then holds everything
/// open until `hold` resolves (the caller reads memory meanwhile).
pub async fn agents(
    spec: &LoadSpec,
    agents: &AgentsSpec,
    ready: impl FnOnce(usize),
    done: impl FnOnce(&AgentsReport),
    hold: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let AgentsSpec {
        tokens,
        watches,
        watch_namespace,
        rate,
    } = agents;
    let (pods, watches, rate) = (tokens.len(), *watches, *rate);
    let open = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    let mut clients = Vec::new();
    for token in tokens {
        let spec = LoadSpec {
            token: token.clone(),
            ..spec.clone()
        };
        let client = idle_client(&spec)?;
        for _ in 0..watches {
            let (client, spec, open) = (client.clone(), spec.clone(), open.clone());
            let ns = watch_namespace.to_owned();
            held.push(tokio::spawn(async move {
                let request = Request::get(format!(
                    "{}/api/v1/namespaces/{ns}/configmaps?watch=true",
                    spec.base
                ))
                .header("authorization", format!("Bearer {}", spec.token))
                .body(Full::new(Bytes::new()))
                .expect("valid request");
                HTTP_REQUESTS_SENT.fetch_add(1, Ordering::Relaxed);
                if let Ok(response) = client.request(request).await
                    && response.status().is_success()
                {
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut body = response.into_body();
                    while let Some(Ok(_)) = body.frame().await {}
                }
            }));
        }
        clients.push((client, spec));
    }
    let asked = pods * watches;
    let settle = Instant::now() + Duration::from_secs(60);
    while (open.load(Ordering::Relaxed) as usize) < asked && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watches_open = open.load(Ordering::Relaxed) as usize;
    ready(watches_open);

    let histogram = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    ));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + spec.duration;
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let mut running = Vec::new();
    for (i, (client, spec)) in clients.iter().enumerate() {
        let (client, spec) = (client.clone(), spec.clone());
        let (histogram, errors) = (histogram.clone(), errors.clone());
        // Spread the pods' ticks over the interval.
        let first = started + interval.mul_f64(i as f64 / pods.max(1) as f64);
        running.push(tokio::spawn(async move {
            let mut next = first;
            let mut n = i as u64;
            while next < deadline {
                tokio::time::sleep_until(next.into()).await;
                let op = if n.is_multiple_of(2) {
                    Op::GetPod
                } else {
                    Op::GetSecret
                };
                let ok = run_op(&client, &spec, op, n).await;
                if ok.is_some() {
                    let micros = next.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                    let _ = histogram
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(micros);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                next += interval;
            }
        }));
    }
    for agent in running {
        let _ = agent.await;
    }
    let histogram = histogram.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let report = AgentsReport {
        pods,
        watches_open,
        watches_asked: asked,
        requests: histogram.len(),
        errors: errors.load(Ordering::Relaxed),
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        seconds: started.elapsed().as_secs_f64(),
    };
    done(&report);
    hold.await;
    for watch in held {
        watch.abort();
    }
    drop(clients);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_counts_and_the_timers_lateness_does_not() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Reached 95 ms late (it waited for a slot): counts from t.
        assert_eq!(start_of(t, t + ms(95), t + ms(95)), t);
        // Reached early, the timer woke it 1 ms late: counts from the wake.
        assert_eq!(start_of(t + ms(10), t, t + ms(11)), t + ms(11));
    }

    #[test]
    fn the_mix_follows_the_weights() {
        let mut counts = std::collections::HashMap::new();
        for n in 0..900 {
            *counts.entry(pick(n)).or_insert(0) += 1;
        }
        assert_eq!(counts[&Op::GetPod], 500);
        assert_eq!(counts[&Op::ListPods], 100);
        assert_eq!(counts[&Op::GetSecret], 200);
        assert_eq!(counts[&Op::CreateDeleteConfigMap], 100);
    }
}

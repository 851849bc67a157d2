//! The proxy's HTTP mechanics against a small TLS upstream: forwarding,
//! hop-by-hop headers, streaming without buffering, upgrades, limits,
//! upstream failures, HTTP/2, client disconnects and graceful drain.
//! (End-to-end tests with kubectl and the API-server simulator live in
//! tests/.)

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use chaperone::proxy::{
    ConnectionInfo, Forward, Guard, Passthrough, Proxy, ProxyConfig, StaticTls, Upstream,
    UpstreamSpec, Verdict, body::RequestBody, upstream::client_tls_trusting,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};

type TestBody = BoxBody<Bytes, Infallible>;

struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, http::HeaderMap)>,
    /// The HTTP version each request arrived over, in order.
    versions: Vec<http::Version>,
    stream_closed: bool,
}

/// A TLS upstream: `/echo` echoes the request line and headers, `/stream`
/// sends a chunk, waits for the test's go, sends another, `/upgrade`
/// switches to an echo protocol, `/big` posts are counted.
/// The test API server's HTTP/2 `MAX_CONCURRENT_STREAMS`.
const UPSTREAM_STREAMS: u32 = 4;

async fn upstream(pki: &Pki, seen: Arc<Mutex<Seen>>, go: Arc<tokio::sync::Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            let go = go.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    let go = go.clone();
                    async move { Ok::<_, Infallible>(answer(req, seen, go).await) }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // Few streams per connection, so that long-lived streams
                // need more than one (the harness's upstream carries 2 each).
                builder.http2().max_concurrent_streams(UPSTREAM_STREAMS);
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

async fn answer(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Seen>>,
    go: Arc<tokio::sync::Notify>,
) -> Response<TestBody> {
    let line = format!(
        "{} {}",
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    {
        let mut seen = seen.lock().unwrap();
        seen.requests.push((line.clone(), req.headers().clone()));
        seen.versions.push(req.version());
    }
    match req.uri().path() {
        "/stream" => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            let seen = seen.clone();
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(Bytes::from_static(
                    b"{\"type\":\"ADDED\"}\n",
                ))))
                .await
                .unwrap();
                go.notified().await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(
                        b"{\"type\":\"MODIFIED\"}\n",
                    ))))
                    .await
                    .is_err()
                {
                    seen.lock().unwrap().stream_closed = true;
                    return;
                }
                // Keep going until the client disappears.
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx
                        .send(Ok(Frame::data(Bytes::from_static(b"\n"))))
                        .await
                        .is_err()
                    {
                        seen.lock().unwrap().stream_closed = true;
                        return;
                    }
                }
            });
            Response::new(StreamBody::new(tokio_stream_from(rx)).boxed())
        }
        "/upgrade" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let upgraded = on_upgrade.await.unwrap();
                let mut io = TokioIo::new(upgraded);
                let mut buf = Vec::new();
                // Echo everything until the client half-closes, then say bye.
                io.read_to_end(&mut buf).await.unwrap();
                io.write_all(&buf).await.unwrap();
                io.write_all(b"|bye").await.unwrap();
                io.shutdown().await.unwrap();
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "SPDY/3.1")
                .header("x-stream-protocol-version", "v4.channel.k8s.io")
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Response::new(Full::new(Bytes::from_static(b"slow done")).boxed())
        }
        _ => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            Response::builder()
                .header("content-type", "text/plain")
                .header("connection", "x-upstream-hop")
                .header("x-upstream-hop", "1")
                .body(Full::new(Bytes::from(format!("{line} body={body}"))).boxed())
                .unwrap()
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

struct Harness {
    proxy_addr: SocketAddr,
    ca_pem: String,
    seen: Arc<Mutex<Seen>>,
    go: Arc<tokio::sync::Notify>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
    upstream: Upstream,
}

async fn harness(config: ProxyConfig, upstream_addr: Option<SocketAddr>) -> Harness {
    harness_with(config, upstream_addr, 0).await
}

async fn harness_with(
    config: ProxyConfig,
    upstream_addr: Option<SocketAddr>,
    http1_connections: usize,
) -> Harness {
    harness_guarded(config, upstream_addr, http1_connections, Passthrough).await
}

async fn harness_guarded<G: Guard>(
    config: ProxyConfig,
    upstream_addr: Option<SocketAddr>,
    http1_connections: usize,
    guard: G,
) -> Harness {
    let pki = pki();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let go = Arc::new(tokio::sync::Notify::new());
    let upstream_addr = match upstream_addr {
        Some(addr) => addr,
        None => upstream(&pki, seen.clone(), go.clone()).await,
    };
    let upstream = Upstream::new(UpstreamSpec {
        base: format!("https://{upstream_addr}").parse().unwrap(),
        tls: client_tls_trusting(pki.ca_pem.as_bytes()).unwrap(),
        tls_server_name: None,
        connector: chaperone::tls::ConnectorOptions {
            connect_timeout: Duration::from_secs(2),
            keepalive: None,
        },
        streams_per_connection: 2,
        http1_connections,
    })
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let terminator = Arc::new(StaticTls(tokio_rustls::TlsAcceptor::from(
        pki.server.clone(),
    )));
    let proxy = Proxy::new(config, guard, upstream.clone(), terminator, Arc::new(()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(proxy.serve(vec![listener], async {
        let _ = rx.await;
    }));
    Harness {
        proxy_addr,
        ca_pem: pki.ca_pem,
        seen,
        go,
        shutdown: Some(tx),
        served,
        upstream,
    }
}

fn local_config() -> ProxyConfig {
    ProxyConfig {
        require_attestation: false,
        ..ProxyConfig::default()
    }
}

async fn client(
    h: &Harness,
    alpn: &[u8],
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let tls = client_tls_trusting(h.ca_pem.as_bytes()).unwrap();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if alpn == b"h2" {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    if alpn == b"h2" {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// A GET of `path` through the proxy, with no body.
fn get(h: &Harness, path: &str) -> Request<Full<Bytes>> {
    Request::get(url(h, path))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn url(h: &Harness, path: &str) -> String {
    format!("https://localhost:{}{path}", h.proxy_addr.port())
}

#[tokio::test]
async fn requests_are_forwarded_with_path_query_and_end_to_end_headers() {
    let h = harness(local_config(), None).await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let client = client(&h, alpn).await;
        let mut req = Request::get(url(&h, "/echo?watch=1&labelSelector=a%3Db"))
            .header("authorization", "Bearer agent-token")
            .header("x-agent", "yes")
            .body(Full::new(Bytes::new()))
            .unwrap();
        if alpn == b"http/1.1" {
            req.headers_mut()
                .insert("connection", "x-agent-hop".parse().unwrap());
            req.headers_mut()
                .insert("x-agent-hop", "1".parse().unwrap());
        }
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers().get("x-upstream-hop").is_none(),
            "hop-by-hop from upstream removed"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "GET /echo?watch=1&labelSelector=a%3Db body=0");
    }
    let seen = h.seen.lock().unwrap();
    assert_eq!(seen.requests.len(), 2);
    for (_, headers) in &seen.requests {
        assert_eq!(headers["authorization"], "Bearer agent-token");
        assert_eq!(headers["x-agent"], "yes");
        assert!(headers.get("x-agent-hop").is_none());
    }
}

#[tokio::test]
async fn streams_are_not_buffered_and_a_client_going_away_closes_upstream() {
    let h = harness(local_config(), None).await;
    let client = client(&h, b"h2").await;
    let resp = client.request(get(&h, "/stream")).await.unwrap();
    let mut body = resp.into_body();
    // The first event arrives while the upstream is still holding the second.
    let first = tokio::time::timeout(Duration::from_secs(3), body.frame())
        .await
        .expect("the first chunk arrives before the stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "{\"type\":\"ADDED\"}\n");
    h.go.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(3), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.into_data().unwrap(), "{\"type\":\"MODIFIED\"}\n");
    drop(body);
    drop(client);
    for _ in 0..100 {
        if h.seen.lock().unwrap().stream_closed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream stream was not closed after the client went away");
}

#[tokio::test]
async fn more_watches_than_one_upstream_connection_carries_all_get_answered() {
    let h = harness(local_config(), None).await;
    let client = client(&h, b"h2").await;
    let watches = 3 * UPSTREAM_STREAMS as usize;
    let mut bodies = Vec::new();
    for _ in 0..watches {
        let client = client.clone();
        let request = get(&h, "/stream?watch=true");
        bodies.push(tokio::spawn(async move {
            let mut body = client.request(request).await.unwrap().into_body();
            let first = body.frame().await.unwrap().unwrap();
            (first.into_data().unwrap(), body)
        }));
    }
    // Every stream stays open until all have answered: none frees a slot.
    let answered = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(bodies))
        .await
        .expect("every watch is answered, none waits for a free upstream stream");
    for answer in &answered {
        let (first, _still_open) = answer.as_ref().unwrap();
        assert_eq!(first, "{\"type\":\"ADDED\"}\n");
    }
    // Two streams per connection (the harness's setting): six connections.
    assert_eq!(h.upstream.stream_shards(), (watches / 2, watches));
    drop(answered);
    for _ in 0..100 {
        if h.upstream.stream_shards().1 == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("streams still counted open after their bodies were dropped");
}

#[tokio::test]
async fn short_requests_go_over_bounded_http1_connections_and_watches_stay_on_http2() {
    // (HTTP/1.1 connections allowed, versions the three concurrent slow
    // requests arrive in)
    let cases = [
        (0, vec![http::Version::HTTP_2; 3]),
        (4, vec![http::Version::HTTP_11; 3]),
        (
            2,
            vec![
                http::Version::HTTP_11,
                http::Version::HTTP_11,
                http::Version::HTTP_2,
            ],
        ),
    ];
    for (http1_connections, expected) in cases {
        let h = harness_with(local_config(), None, http1_connections).await;
        assert_eq!(
            h.upstream.warm_up().await.unwrap(),
            http::Version::HTTP_2,
            "warm-up learns that the server speaks HTTP/2 either way"
        );
        let client = client(&h, b"h2").await;
        // Concurrent short requests: over HTTP/1.1 each needs a connection
        // of its own, past the bound they share HTTP/2, and none waits for
        // another to finish.
        let started = std::time::Instant::now();
        let slow = (0..3).map(|_| {
            let client = client.clone();
            let request = get(&h, "/slow");
            async move { client.request(request).await.unwrap().status() }
        });
        for status in futures::future::join_all(slow).await {
            assert_eq!(status, 200);
        }
        assert!(
            started.elapsed() < Duration::from_millis(1400),
            "three 500 ms requests took {:?}: they were serialized",
            started.elapsed()
        );
        // Their bodies are done with: the HTTP/1.1 connections are free
        // again for the next request.
        let after = client.request(get(&h, "/after")).await.unwrap();
        assert_eq!(after.status(), 200);
        after.into_body().collect().await.unwrap();
        let watch = client.request(get(&h, "/stream?watch=true")).await.unwrap();
        let mut body = watch.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "{\"type\":\"ADDED\"}\n");

        let seen = h.seen.lock().unwrap();
        let version_of = |wanted: &str| -> Vec<http::Version> {
            seen.requests
                .iter()
                .zip(&seen.versions)
                .filter(|((line, _), _)| line == wanted)
                .map(|(_, version)| *version)
                .collect()
        };
        let mut slow = version_of("GET /slow");
        slow.sort();
        assert_eq!(slow, expected, "{http1_connections} HTTP/1.1 connections");
        let short = if http1_connections > 0 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_2
        };
        assert_eq!(version_of("GET /after"), vec![short]);
        assert_eq!(
            version_of("GET /stream?watch=true"),
            vec![http::Version::HTTP_2]
        );
    }
}

#[tokio::test]
async fn upgrades_are_tunneled_both_ways_with_half_close() {
    let h = harness(local_config(), None).await;
    let mut tls = client_tls_trusting(h.ca_pem.as_bytes()).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(h.proxy_addr).await.unwrap();
    let stream = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection.with_upgrades());
    let resp = sender
        .send_request(
            Request::post("/upgrade")
                .header("host", "localhost")
                .header("connection", "Upgrade")
                .header("upgrade", "SPDY/3.1")
                .header("x-stream-protocol-version", "v4.channel.k8s.io")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        resp.headers()["x-stream-protocol-version"],
        "v4.channel.k8s.io"
    );
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"hello through the tunnel").await.unwrap();
    io.shutdown().await.unwrap(); // half-close: the upstream sees EOF and answers
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"hello through the tunnel|bye");
    let seen = h.seen.lock().unwrap();
    let (_, headers) = seen
        .requests
        .iter()
        .find(|(l, _)| l.contains("/upgrade"))
        .unwrap();
    assert_eq!(headers["upgrade"], "SPDY/3.1");
}

#[tokio::test]
async fn an_oversized_body_gets_a_413_status() {
    let h = harness(
        ProxyConfig {
            max_request_body: 1024,
            ..local_config()
        },
        None,
    )
    .await;
    let client = client(&h, b"http/1.1").await;
    let resp = client
        .request(
            Request::post(url(&h, "/big"))
                .body(Full::new(Bytes::from(vec![b'x'; 4096])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let status: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    let ok = client
        .request(
            Request::post(url(&h, "/small"))
                .body(Full::new(Bytes::from(vec![b'x'; 512])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        ok.into_body().collect().await.unwrap().to_bytes(),
        "POST /small body=512"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_is_a_clear_503_status() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let h = harness(local_config(), Some(dead)).await;
    let client = client(&h, b"h2").await;
    let resp = client.request(get(&h, "/api")).await.unwrap();
    assert_eq!(resp.status(), 503);
    let status: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(status["reason"], "ServiceUnavailable");
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("cannot reach the API server"), "{message}");
    assert!(message.contains(&dead.to_string()), "{message}");
}

#[tokio::test]
async fn unattested_connections_are_refused_when_attestation_is_required() {
    let h = harness(ProxyConfig::default(), None).await;
    let client = client(&h, b"h2").await;
    let result = client.request(get(&h, "/echo")).await;
    assert!(
        result.is_err(),
        "the connection must be closed without an answer"
    );
    assert!(h.seen.lock().unwrap().requests.is_empty());
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let mut h = harness(local_config(), None).await;
    let client = client(&h, b"h2").await;
    let in_flight = tokio::spawn({
        let req = client.request(get(&h, "/slow"));
        async move {
            req.await
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.shutdown.take().unwrap().send(()).unwrap();
    assert_eq!(in_flight.await.unwrap(), "slow done");
    tokio::time::timeout(Duration::from_secs(5), &mut h.served)
        .await
        .unwrap()
        .unwrap();
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(h.proxy_addr).await.is_err());
}

/// A guard that numbers the connections it is told of and counts the
/// per-connection states alive; each request is forwarded naming its
/// connection's number.
#[derive(Clone, Default)]
struct Numbering {
    made: Arc<std::sync::atomic::AtomicUsize>,
    alive: Arc<std::sync::atomic::AtomicUsize>,
}

struct Numbered {
    number: usize,
    alive: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Numbered {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Guard for Numbering {
    type Connection = Numbered;

    fn connect(&self, _conn: &Arc<ConnectionInfo>) -> Numbered {
        use std::sync::atomic::Ordering::SeqCst;
        self.alive.fetch_add(1, SeqCst);
        Numbered {
            number: self.made.fetch_add(1, SeqCst) + 1,
            alive: self.alive.clone(),
        }
    }

    async fn check(
        &self,
        _conn: &Arc<ConnectionInfo>,
        connection: &Arc<Numbered>,
        parts: &mut http::request::Parts,
        _body: &mut RequestBody,
    ) -> Verdict {
        parts
            .headers
            .insert("x-connection", connection.number.into());
        Verdict::Forward(Forward::default())
    }
}

#[tokio::test]
async fn the_guard_keeps_state_per_connection_from_accept_until_it_closes() {
    use std::sync::atomic::Ordering::SeqCst;
    let guard = Numbering::default();
    let h = harness_guarded(local_config(), None, 0, guard.clone()).await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let before = guard.made.load(SeqCst);
        let seen_before = h.seen.lock().unwrap().requests.len();
        let client = client(&h, alpn).await;
        // Sequential and concurrent requests on one connection share its state.
        for _ in 0..3 {
            let response = client.request(get(&h, "/echo")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().collect().await.unwrap();
        }
        if alpn == b"h2" {
            let concurrent = (0..4).map(|_| client.request(get(&h, "/echo")));
            for response in futures::future::join_all(concurrent).await {
                response.unwrap().into_body().collect().await.unwrap();
            }
        }
        assert_eq!(
            guard.made.load(SeqCst),
            before + 1,
            "{alpn:?}: one state per connection"
        );
        assert_eq!(guard.alive.load(SeqCst), 1, "{alpn:?}");
        let numbers: Vec<String> = h.seen.lock().unwrap().requests[seen_before..]
            .iter()
            .map(|(_, headers)| headers["x-connection"].to_str().unwrap().to_owned())
            .collect();
        let expected = (before + 1).to_string();
        assert!(
            numbers.iter().all(|n| *n == expected),
            "{alpn:?}: {numbers:?}"
        );
        // The connection closes: its state goes with it.
        drop(client);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while guard.alive.load(SeqCst) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{alpn:?}: the state outlived its connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

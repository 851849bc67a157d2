//! The way to the real API server: pooled HTTP/1.1 and HTTP/2 (HTTP/1.1
//! alone when the server does not offer h2) over rustls trusting the
//! cluster CA. The eBPF programs never redirect these sockets because
//! chaperone's cgroup is not an agent cgroup; they carry no mark.
//! Upgrades (exec, attach, port-forward) need HTTP/1.1, so they use a second
//! pool that only offers `http/1.1`.
//!
//! Short requests go over keep-alive HTTP/1.1 connections while at most
//! [`UpstreamSpec::http1_connections`] of them are in flight (one
//! connection each, kept for the next), as nginx's `proxy_pass` does, and
//! over the pooled HTTP/2 connection past that. An HTTP/1.1 request costs
//! chaperone and the API server less CPU than an HTTP/2 stream (about
//! 100 µs less added latency per GET and 10 % less proxy CPU in the bench,
//! issue 9); the bound keeps a burst (kubectl's parallel discovery, a
//! controller's resync) from opening a connection per request. Long-lived
//! streams stay on HTTP/2 shards either way.
//!
//! Long-lived streams (watches, followed logs) do not share the pool of
//! short requests: an HTTP/2 connection carries at most the server's
//! `MAX_CONCURRENT_STREAMS` at once and queues the rest, so a thousand
//! agent watches on one connection would wait behind each other forever.
//! They are spread over [`StreamShards`]: connections of their own, each
//! carrying at most `streams_per_connection`, opened as they fill. Once the
//! server is known to speak HTTP/2, a shard dials as HTTP/2 from the start,
//! so a burst of new watches opens one connection, not one per watch.
//!
//! Agents never borrow chaperone's credentials. When chaperone's own
//! configuration authenticates with a client certificate, the API server
//! would take that certificate over an agent's bearer token, so the pools
//! that carry agents' own credentials (passthrough) present no client
//! certificate at all; the certificate goes only on the separate pools of
//! [`Upstream::with_own_credentials`], for requests sent with chaperone's
//! identity and impersonation headers.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Uri, uri::Authority};
use hyper::body::{Body, Frame, Incoming};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::pki_types::ServerName;

use super::body::ProxyBody;
use crate::tls::{ConnectorOptions, connect::http_connector};

/// Long-lived streams per upstream connection unless configured: at or
/// below what API servers and the balancers in front of them announce
/// (kube-apiserver 1000, Go's default 250, common proxies 100 to 128).
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 100;

/// How long an idle pooled HTTP/2 connection is kept (it answers pings
/// meanwhile).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long an idle HTTP/1.1 connection is kept for the next request:
/// well below the idle timeouts of API servers (90 s) and of the balancers
/// commonly in front of them (from 20 s), so chaperone closes first and
/// never sends a request into a connection the other end is closing (which
/// would fail it with nothing to retry safely). HTTP/2 connections answer
/// pings instead and stay open.
const HTTP1_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Short requests in flight over HTTP/1.1 at once, per pool (that is, per
/// data-path thread) unless configured: a handful of agents' sequential
/// kubectl calls, each on a kept-alive connection of its own.
pub const DEFAULT_HTTP1_CONNECTIONS: usize = 4;

/// At most this many connections carry long-lived streams; past that, a new
/// stream goes to the least loaded one (and may wait for a free stream).
const MAX_STREAM_CONNECTIONS: usize = 256;

type HttpsClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// Where the API server is and how to talk to it.
#[derive(Clone)]
pub struct UpstreamSpec {
    /// `https://host:port` of the API server.
    pub base: Uri,
    /// Trusts the cluster CA (and carries a client certificate, if any).
    pub tls: rustls::ClientConfig,
    /// The name to verify the server certificate against when it differs
    /// from the URL's host (kubeconfig `tls-server-name`).
    pub tls_server_name: Option<String>,
    /// Socket options (timeouts, keepalive).
    pub connector: ConnectorOptions,
    /// Long-lived streams (watches, followed logs) per HTTP/2 connection.
    pub streams_per_connection: usize,
    /// Short requests in flight over pooled HTTP/1.1 connections at once;
    /// past that they share the pooled HTTP/2 connection. 0: HTTP/2 only.
    pub http1_connections: usize,
}

/// Pooled clients to the API server.
#[derive(Clone)]
pub struct Upstream {
    base: Uri,
    authority: Authority,
    pooled: HttpsClient,
    /// Short requests while fewer than `http1_connections` are in flight.
    http1: Option<Http1Pool>,
    upgrades: HttpsClient,
    streams: Arc<StreamShards>,
    /// What the pools were built from, for [`Upstream::with_own_pools`].
    spec: Arc<UpstreamSpec>,
    /// Pools that present chaperone's client certificate, when its
    /// configuration has one: only for requests made with chaperone's own
    /// credentials (impersonate mode).
    own_credentials: Option<Arc<Upstream>>,
}

/// Presents no client certificate, whatever the server asks for.
#[derive(Debug)]
struct NoClientCertificate;

impl rustls::client::ResolvesClientCert for NoClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

impl Upstream {
    /// Pools for agents' requests, which carry no client certificate of
    /// chaperone's; if `spec.tls` has one, [`Upstream::with_own_credentials`]
    /// pools that present it.
    pub fn new(spec: UpstreamSpec) -> Result<Self, UpstreamError> {
        let own_credentials = if spec.tls.client_auth_cert_resolver.has_certs() {
            Some(Arc::new(Self::pools(spec.clone(), None)?))
        } else {
            None
        };
        let mut agents = spec.clone();
        agents.tls.client_auth_cert_resolver = Arc::new(NoClientCertificate);
        Self::pools(agents, own_credentials).map(|mut upstream| {
            // with_own_pools rebuilds both from the spec as configured.
            upstream.spec = Arc::new(spec);
            upstream
        })
    }

    /// The pools for requests sent with chaperone's own credentials
    /// (impersonate mode): they present chaperone's client certificate if
    /// it has one; otherwise they are these pools.
    pub fn with_own_credentials(&self) -> &Upstream {
        self.own_credentials.as_deref().unwrap_or(self)
    }

    fn pools(
        spec: UpstreamSpec,
        own_credentials: Option<Arc<Upstream>>,
    ) -> Result<Self, UpstreamError> {
        let kept = Arc::new(spec.clone());
        let authority = spec
            .base
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::NoAuthority(spec.base.clone()))?;
        if spec.base.scheme_str() != Some("https") {
            return Err(UpstreamError::NotHttps(spec.base.clone()));
        }
        let server_name = match &spec.tls_server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| UpstreamError::ServerName(name.clone()))?,
            ),
            None => None,
        };
        let tcp = http_connector(&spec.connector);
        // hyper-rustls sets ALPN from the versions enabled below: h2 and
        // http/1.1 for the pool, http/1.1 alone for upgrades.
        let mut h1_tls = spec.tls.clone();
        h1_tls.alpn_protocols.clear();
        let mut any_tls = spec.tls;
        any_tls.alpn_protocols.clear();

        let any_https = https(any_tls, &server_name, true, tcp.clone());
        let pooled = pooled_client(any_https.clone(), false, POOL_IDLE_TIMEOUT);
        let http1 = (spec.http1_connections > 0).then(|| Http1Pool {
            client: pooled_client(
                https(h1_tls.clone(), &server_name, false, tcp.clone()),
                false,
                HTTP1_IDLE_TIMEOUT,
            ),
            limit: spec.http1_connections,
            in_flight: Arc::new(AtomicUsize::new(0)),
        });
        let streams = Arc::new(StreamShards::new(
            spec.streams_per_connection.max(1),
            any_https,
        ));
        let upgrades = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(https(h1_tls, &server_name, false, tcp));
        Ok(Upstream {
            base: spec.base,
            authority,
            pooled,
            http1,
            upgrades,
            streams,
            spec: kept,
            own_credentials,
        })
    }

    /// The same API server with pools of its own: a data-path thread's
    /// connections are driven by that thread, so its requests never wait
    /// for another thread to write or read them.
    pub fn with_own_pools(&self) -> Self {
        Self::new((*self.spec).clone()).expect("the spec was valid when this upstream was built")
    }

    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// The upstream URI for an agent's request path and query.
    pub fn uri_for(&self, path_and_query: Option<&http::uri::PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).expect("scheme, authority and path make a URI")
    }

    /// Sends one request: upgrades over HTTP/1.1, long-lived streams over
    /// their shards, everything else over the pooled HTTP/1.1 connections
    /// while they have room, else over the pooled HTTP/2 connection.
    pub async fn send(
        &self,
        request: http::Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<http::Response<UpstreamBody>, hyper_util::client::legacy::Error> {
        let route = if upgrade {
            Route::Upgrade
        } else if is_long_lived(request.uri()) {
            Route::Shard
        } else {
            Route::Pool
        };
        self.send_over(request, route).await
    }

    async fn send_over(
        &self,
        request: http::Request<ProxyBody>,
        route: Route,
    ) -> Result<http::Response<UpstreamBody>, hyper_util::client::legacy::Error> {
        let route = match (route, &self.http1) {
            (Route::Pool, Some(http1)) if http1.try_take() => Route::PoolHttp1,
            (route, _) => route,
        };
        let (client, lease, h2_only) = match route {
            Route::Upgrade => (self.upgrades.clone(), None, false),
            Route::Shard => {
                let (client, lease, h2_only) = self.streams.checkout();
                (client, Some(lease), h2_only)
            }
            Route::Pool => (self.pooled.clone(), None, false),
            Route::PoolHttp1 => {
                let http1 = self.http1.as_ref().expect("routed here only with a pool");
                // Taken above: held until the response body is done with,
                // as long as the connection carries this request.
                (
                    http1.client.clone(),
                    Some(Lease(http1.in_flight.clone())),
                    false,
                )
            }
        };
        let response = match client.request(request).await {
            Ok(response) => response,
            Err(error) => {
                if h2_only && !error.is_connect() {
                    // Perhaps the server stopped offering HTTP/2: negotiate
                    // again until a response says which.
                    self.streams.learn_http2(false);
                }
                return Err(error);
            }
        };
        // Only a connection that offered h2 tells whether the server speaks it.
        let negotiated = match route {
            Route::Upgrade | Route::PoolHttp1 => false,
            Route::Shard | Route::Pool => true,
        };
        if negotiated {
            self.streams
                .learn_http2(response.version() == http::Version::HTTP_2);
        }
        Ok(response.map(|inner| UpstreamBody {
            inner,
            _lease: lease,
        }))
    }

    /// Asks the API server for `/version` (any answer, even 401, will do):
    /// opens the first pooled connection (HTTP/1.1 unless that is turned
    /// off) and learns whether the server speaks HTTP/2 before the first
    /// burst of agent watches (through the first connection for long-lived
    /// streams, which those watches then use).
    pub async fn warm_up(&self) -> Result<http::Version, hyper_util::client::legacy::Error> {
        let version = || {
            http::Request::get(
                self.uri_for(Some(&http::uri::PathAndQuery::from_static("/version"))),
            )
            .body(super::body::empty())
            .expect("a GET of a valid URI")
        };
        let pooled = self.send_over(version(), Route::Pool).await?.version();
        if self.http1.is_some() {
            return Ok(self.send_over(version(), Route::Shard).await?.version());
        }
        Ok(pooled)
    }

    /// Connections opened for long-lived streams so far, and the streams
    /// they carry now.
    pub fn stream_shards(&self) -> (usize, usize) {
        self.streams.load()
    }
}

/// Which of the pools a request goes over.
#[derive(Clone, Copy)]
enum Route {
    /// HTTP/1.1 alone: exec, attach, port-forward.
    Upgrade,
    /// A long-lived stream's shard.
    Shard,
    /// The pool of short requests (over HTTP/2 where the server speaks it).
    Pool,
    /// The pool of short requests over HTTP/1.1, a connection each.
    PoolHttp1,
}

/// Kept-alive HTTP/1.1 connections for short requests, at most `limit`
/// requests (and so connections) busy at once.
#[derive(Clone)]
struct Http1Pool {
    client: HttpsClient,
    limit: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Http1Pool {
    /// Counts one more request in flight if there is room.
    fn try_take(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }
}

/// `h2_only`: speak HTTP/2 without waiting for ALPN, so that concurrent
/// first requests share one connection attempt (hyper-util dials once per
/// HTTP/2 pool, but once per request while the version is unknown).
fn pooled_client(
    https: HttpsConnector<HttpConnector>,
    h2_only: bool,
    idle_timeout: Duration,
) -> HttpsClient {
    Client::builder(TokioExecutor::new())
        .http2_only(h2_only)
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_adaptive_window(true)
        .build(https)
}

/// A watch (`?watch=true`, or the legacy `/watch/` path) or a followed log
/// (`?follow=true`): a response that stays open as long as the agent wants.
/// `uri` is the canonical target the guard forwards (keys decoded), and a
/// flag reads as the API server reads a bool parameter: its first value,
/// true unless `0` or `false` in any case (so `?watch` and `?watch=True`).
fn is_long_lived(uri: &http::Uri) -> bool {
    let flag = |name: &str| {
        uri.query().is_some_and(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == name)
                .is_some_and(|(_, value)| !(value == "0" || value.eq_ignore_ascii_case("false")))
        })
    };
    let path = uri.path();
    flag("watch")
        || flag("follow")
        || path.starts_with("/api/v1/watch/")
        || (path.starts_with("/apis/") && path.split('/').nth(4) == Some("watch"))
}

// === impl StreamShards ===

/// Connections for long-lived streams: each a client (and so a pooled
/// connection) of its own, filled up to `per_connection` streams in order,
/// so streams pack onto as few connections as their number needs.
pub(crate) struct StreamShards {
    per_connection: usize,
    https: HttpsConnector<HttpConnector>,
    shards: Mutex<Vec<Shard>>,
    /// The last response said HTTP/2: shards dial as HTTP/2 at once.
    http2: AtomicBool,
}

/// One connection's worth of streams: its client while the server's
/// protocol is unknown (ALPN decides), and once it is known to be HTTP/2.
struct Shard {
    negotiating: HttpsClient,
    http2: HttpsClient,
    open: Arc<AtomicUsize>,
}

/// One request's place on a connection (a long-lived stream on its shard,
/// a short request on an HTTP/1.1 connection), released when dropped.
struct Lease(Arc<AtomicUsize>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamShards {
    fn new(per_connection: usize, https: HttpsConnector<HttpConnector>) -> Self {
        StreamShards {
            per_connection,
            https,
            shards: Mutex::new(Vec::new()),
            http2: AtomicBool::new(false),
        }
    }

    fn learn_http2(&self, http2: bool) {
        self.http2.store(http2, Ordering::Relaxed);
    }

    /// The first shard with a free stream, a new one when all are full, or
    /// (at [`MAX_STREAM_CONNECTIONS`]) the least loaded.
    /// Also tells whether the client dials as HTTP/2 without negotiating.
    fn checkout(&self) -> (HttpsClient, Lease, bool) {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let free = shards
            .iter()
            .position(|s| s.open.load(Ordering::Relaxed) < self.per_connection);
        let index = match free {
            Some(index) => index,
            None if shards.len() < MAX_STREAM_CONNECTIONS => {
                tracing::debug!(
                    connections = shards.len() + 1,
                    per_connection = self.per_connection,
                    "opening another upstream connection for long-lived streams"
                );
                shards.push(Shard {
                    negotiating: pooled_client(self.https.clone(), false, POOL_IDLE_TIMEOUT),
                    http2: pooled_client(self.https.clone(), true, POOL_IDLE_TIMEOUT),
                    open: Arc::new(AtomicUsize::new(0)),
                });
                shards.len() - 1
            }
            None => {
                tracing::warn!(
                    connections = shards.len(),
                    per_connection = self.per_connection,
                    "every upstream connection for long-lived streams is full: \
                     this stream may wait for another to end"
                );
                shards
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.open.load(Ordering::Relaxed))
                    .map(|(i, _)| i)
                    .expect("MAX_STREAM_CONNECTIONS is not zero")
            }
        };
        let shard = &shards[index];
        shard.open.fetch_add(1, Ordering::Relaxed);
        let http2 = self.http2.load(Ordering::Relaxed);
        let client = if http2 {
            shard.http2.clone()
        } else {
            shard.negotiating.clone()
        };
        (client, Lease(shard.open.clone()), http2)
    }

    fn load(&self) -> (usize, usize) {
        let shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let open = shards.iter().map(|s| s.open.load(Ordering::Relaxed)).sum();
        (shards.len(), open)
    }
}

// === impl UpstreamBody ===

/// An upstream response body; a long-lived stream (or a request on an
/// HTTP/1.1 connection) keeps its place on its connection until the body
/// is dropped (the agent went away or it ended).
pub struct UpstreamBody {
    inner: Incoming,
    _lease: Option<Lease>,
}

impl Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// hyper-rustls over the marked TCP connector; `h2` offers HTTP/2 as well
/// as HTTP/1.1 (ALPN is set by hyper-rustls from these choices).
fn https(
    tls: rustls::ClientConfig,
    server_name: &Option<ServerName<'static>>,
    h2: bool,
    tcp: HttpConnector,
) -> HttpsConnector<HttpConnector> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    match (server_name, h2) {
        (Some(name), true) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name.clone()))
            .enable_all_versions()
            .wrap_connector(tcp),
        (Some(name), false) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name.clone()))
            .enable_http1()
            .wrap_connector(tcp),
        (None, true) => builder.enable_all_versions().wrap_connector(tcp),
        (None, false) => builder.enable_http1().wrap_connector(tcp),
    }
}

/// An upstream chaperone cannot re-originate to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream URL {0} has no host:port")]
    NoAuthority(Uri),
    #[error("upstream URL {0} must be https: chaperone only re-originates over TLS")]
    NotHttps(Uri),
    #[error("tls-server-name {0:?} is not a valid name")]
    ServerName(String),
}

/// A CA bundle that cannot be trusted as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("the CA bundle is not valid PEM: {0}")]
    NotPem(String),
    #[error("the CA bundle holds a certificate rustls refuses: {0}")]
    Refused(String),
    #[error("the CA bundle holds no certificate")]
    Empty,
    #[error("{0}")]
    Tls(String),
}

/// A rustls client config trusting exactly the given PEM CA bundle.
pub fn client_tls_trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig, TrustError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| TrustError::NotPem(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TrustError::Refused(e.to_string()))?;
        found += 1;
    }
    if found == 0 {
        return Err(TrustError::Empty);
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TrustError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_and_followed_logs_are_long_lived() {
        let long = |uri: &str| is_long_lived(&uri.parse().unwrap());
        assert!(long("https://h/api/v1/namespaces/default/pods?watch=true"));
        assert!(long("https://h/api/v1/pods?resourceVersion=5&watch=1"));
        assert!(long(
            "https://h/apis/apps/v1/deployments?labelSelector=a%3Db&watch=true"
        ));
        assert!(long(
            "https://h/api/v1/namespaces/default/pods/web/log?follow=true"
        ));
        assert!(long("https://h/api/v1/watch/namespaces/default/pods"));
        assert!(long("https://h/apis/apps/v1/watch/deployments"));
        assert!(!long("https://h/api/v1/namespaces/default/pods"));
        assert!(!long("https://h/api/v1/pods?watch=false"));
        assert!(!long("https://h/api/v1/namespaces/default/pods/web/log"));
        assert!(!long("https://h/api/v1/namespaces/watch/pods"));
        assert!(!long("https://h/api/v1/pods?notwatch=true"));
        // Bool parameters as the API server reads them.
        assert!(long("https://h/api/v1/pods?watch=True"));
        assert!(long("https://h/api/v1/pods?watch="));
        assert!(long("https://h/api/v1/pods?watch"));
        assert!(!long("https://h/api/v1/pods?watch=FALSE"));
        assert!(!long("https://h/api/v1/pods?watch=0&watch=1"));
    }
}

//! The way to the real API server: pooled HTTP/2 (HTTP/1.1 when the server
//! does not offer h2) over rustls trusting the cluster CA, on sockets that
//! carry chaperone's `SO_MARK` so the eBPF programs never redirect them.
//! Upgrades (exec, attach, port-forward) need HTTP/1.1, so they use a second
//! pool that only offers `http/1.1`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Uri, uri::Authority};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

use super::body::ProxyBody;

/// Where the API server is and how to talk to it.
#[derive(Clone)]
pub struct UpstreamSpec {
    /// `https://host:port` of the API server.
    pub base: Uri,
    /// Trusts the cluster CA (and carries a client certificate, if any).
    pub tls: rustls::ClientConfig,
    /// `SO_MARK` for chaperone's own sockets (0: no mark).
    pub mark: u32,
    pub connect_timeout: Duration,
}

/// Pooled clients to the API server.
#[derive(Clone)]
pub struct Upstream {
    base: Uri,
    authority: Authority,
    pooled: Client<HttpsConnector<MarkedConnector>, ProxyBody>,
    upgrades: Client<HttpsConnector<MarkedConnector>, ProxyBody>,
}

impl Upstream {
    pub fn new(spec: UpstreamSpec) -> Result<Self, String> {
        let authority = spec
            .base
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream URL {} has no host:port", spec.base))?;
        if spec.base.scheme_str() != Some("https") {
            return Err(format!(
                "upstream URL {} must be https: chaperone only re-originates over TLS",
                spec.base
            ));
        }
        let connector = MarkedConnector {
            mark: spec.mark,
            connect_timeout: spec.connect_timeout,
        };
        // hyper-rustls sets ALPN from the versions enabled below: h2 and
        // http/1.1 for the pool, http/1.1 alone for upgrades.
        let mut h1_tls = spec.tls.clone();
        h1_tls.alpn_protocols.clear();
        let mut any_tls = spec.tls;
        any_tls.alpn_protocols.clear();

        let pooled = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_adaptive_window(true)
            .build(
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(any_tls)
                    .https_only()
                    .enable_all_versions()
                    .wrap_connector(connector.clone()),
            );
        let upgrades = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(h1_tls)
                    .https_only()
                    .enable_http1()
                    .wrap_connector(connector),
            );
        Ok(Upstream {
            base: spec.base,
            authority,
            pooled,
            upgrades,
        })
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

    pub async fn send(
        &self,
        request: http::Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        if upgrade {
            self.upgrades.request(request).await
        } else {
            self.pooled.request(request).await
        }
    }
}

/// Dials TCP with `SO_MARK` set before `connect()`, so the eBPF programs see
/// the mark on the very connect they would otherwise redirect.
#[derive(Clone, Debug)]
pub struct MarkedConnector {
    mark: u32,
    connect_timeout: Duration,
}

impl MarkedConnector {
    pub fn new(mark: u32, connect_timeout: Duration) -> Self {
        MarkedConnector {
            mark,
            connect_timeout,
        }
    }

    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if self.mark != 0 {
            socket.set_mark(self.mark).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot set SO_MARK {:#x} on the upstream socket (needs CAP_NET_ADMIN): {e}", self.mark),
                )
            })?;
        }
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        tokio::time::timeout(self.connect_timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {addr} timed out after {:?}",
                        self.connect_timeout
                    ),
                )
            })?
    }
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host"))
                })?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let addrs = tokio::net::lookup_host((host.as_str(), port)).await?;
            let mut last = io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            );
            for addr in addrs {
                match this.connect(addr).await {
                    Ok(stream) => return Ok(TokioIo::new(stream)),
                    Err(error) => last = error,
                }
            }
            Err(last)
        })
    }
}

/// A rustls client config trusting exactly the given PEM CA bundle.
pub fn client_tls_trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| format!("the CA bundle is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA bundle holds a certificate rustls refuses: {e}"))?;
        found += 1;
    }
    if found == 0 {
        return Err("the CA bundle holds no certificate".into());
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

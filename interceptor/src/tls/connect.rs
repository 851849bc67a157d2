//! The connector chaperone's upstream client dials the API server with.
//!
//! Its sockets carry no `SO_MARK`. The eBPF programs never redirect
//! chaperone's own connections because chaperone's cgroup is not an agent
//! cgroup (and [`crate::redirect::Redirector`] refuses to make it one), not
//! because of anything on the socket: a mark can be set by any process with
//! `CAP_NET_RAW` (Linux 5.17+), and the node's networking owns the mark bits
//! (kube-proxy's 0x4000 masquerade and 0x8000 drop bits, Calico's
//! 0xffff0000, Cilium's). [`socket_mark`] reads a socket's mark back.

use std::{io, os::fd::AsFd, time::Duration};

use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::pki_types::ServerName;

use super::{TlsError, upstream::UpstreamConfig};

/// HTTPS to the API server over plain TCP sockets.
pub type UpstreamConnector = HttpsConnector<HttpConnector>;

/// How upstream sockets are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectorOptions {
    pub connect_timeout: Duration,
    /// TCP keepalive idle time; `None` leaves the kernel default.
    pub keepalive: Option<Duration>,
}

impl Default for ConnectorOptions {
    fn default() -> Self {
        ConnectorOptions {
            connect_timeout: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(30)),
        }
    }
}

/// A plain TCP connector (no mark on its sockets).
pub fn http_connector(options: &ConnectorOptions) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.connect_timeout));
    http.set_keepalive(options.keepalive);
    http
}

/// The connector for hyper-util's client: TLS trusting only the cluster CA,
/// ALPN h2 and http/1.1, chaperone's client certificate if it has one.
pub fn upstream_connector(
    upstream: &UpstreamConfig,
    options: &ConnectorOptions,
) -> Result<UpstreamConnector, TlsError> {
    let mut tls = upstream.client_config()?;
    // hyper-rustls sets ALPN itself from the enabled HTTP versions.
    tls.alpn_protocols.clear();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let builder = match &upstream.tls_server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                TlsError::Upstream(format!("tls-server-name {name:?} is not a valid name"))
            })?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    Ok(builder
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector(options)))
}

/// A pooled client to the API server over `connector`: HTTP/2 when the
/// server offers it (one multiplexed connection, kept alive with pings),
/// HTTP/1.1 otherwise. Requests must carry absolute `https://` URIs.
///
/// Note for many long-lived watches: HTTP/2 streams share one connection,
/// bounded by the server's `MAX_CONCURRENT_STREAMS` (kube-apiserver:
/// `--http2-max-streams-per-connection`, 1000 by default); requests beyond
/// it wait for a free stream.
pub fn upstream_client<B>(connector: UpstreamConnector) -> Client<UpstreamConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .build(connector)
}

/// The `SO_MARK` of a socket.
pub fn socket_mark(socket: &impl AsFd) -> io::Result<u32> {
    socket2::SockRef::from(socket).mark()
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper::{Request, Response, body::Bytes, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;
    use tower_service::Service as _;

    use super::*;
    use crate::tls::{
        BearerToken, LeafCache, LeafConfig, LocalCa, TlsTerminator, negotiated_alpn, server::Alpn,
    };

    /// A fake API server on loopback, with a certificate from `ca`, that
    /// answers every request with the Authorization header it received and
    /// the HTTP version; the server-side ALPN goes to `alpns`.
    async fn fake_api_server(
        ca: Arc<LocalCa>,
    ) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Option<Alpn>>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let terminator = TlsTerminator::new(Arc::new(LeafCache::new(ca, LeafConfig::default())));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(tls) = terminator.accept(tcp, Ipv4Addr::LOCALHOST.into()).await else {
                    continue;
                };
                let _ = tx.send(negotiated_alpn(&tls));
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let auth = req
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let body = format!("{:?} {auth}", req.version());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (port, rx)
    }

    fn upstream_for(ca: &LocalCa, port: u16) -> UpstreamConfig {
        UpstreamConfig {
            server: format!("https://127.0.0.1:{port}").parse().unwrap(),
            tls_server_name: None,
            cluster_ca: vec![ca.certificate_der().clone()],
            cluster_ca_pem: ca.bundle_pem().as_bytes().to_vec(),
            token: Some(BearerToken::fixed("chaperone-token")),
            client_identity: None,
        }
    }

    /// No mark: the node's networking owns the mark bits (kube-proxy
    /// masquerades packets with 0x4000), and a mark never exempted anything
    /// an agent could not set itself.
    #[tokio::test]
    async fn upstream_sockets_carry_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let (port, _alpns) = fake_api_server(ca.clone()).await;
        let upstream = upstream_for(&ca, port);
        let mut connector = upstream_connector(&upstream, &ConnectorOptions::default()).unwrap();
        let stream = connector.call(upstream.server.clone()).await.unwrap();
        let hyper_rustls::MaybeHttpsStream::Https(tls) = stream else {
            panic!("the upstream connection is not TLS");
        };
        let (tcp, session) = tls.inner().get_ref();
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
        let tcp = tcp.inner().inner();
        assert_eq!(socket_mark(tcp).unwrap(), 0);

        let mut plain = http_connector(&ConnectorOptions::default());
        let tcp = plain.call(upstream.server.clone()).await.unwrap();
        assert_eq!(socket_mark(tcp.inner()).unwrap(), 0);
    }

    #[tokio::test]
    async fn the_upstream_client_speaks_h2_to_a_server_the_cluster_ca_vouches_for() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let (port, mut alpns) = fake_api_server(ca.clone()).await;
        let upstream = upstream_for(&ca, port);
        let connector = upstream_connector(&upstream, &ConnectorOptions::default()).unwrap();
        let client = upstream_client::<Empty<Bytes>>(connector);
        let request = Request::get(format!("https://127.0.0.1:{port}/version"))
            .header(
                http::header::AUTHORIZATION,
                upstream.token.as_ref().unwrap().header_value().unwrap(),
            )
            .body(Empty::new())
            .unwrap();
        let response = client.request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"HTTP/2.0 Bearer chaperone-token");
        assert_eq!(alpns.recv().await.unwrap(), Some(Alpn::H2));
        // A second request reuses the pooled HTTP/2 connection.
        let response = client
            .get(format!("https://127.0.0.1:{port}/api").parse().unwrap())
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"HTTP/2.0 ");
        assert!(alpns.try_recv().is_err(), "a second connection was opened");

        // A server whose certificate another CA signed is refused.
        let other_dir = tempfile::tempdir().unwrap();
        let other = LocalCa::load_or_create(other_dir.path()).unwrap();
        let wrong = upstream_for(&other, port);
        let connector = upstream_connector(&wrong, &ConnectorOptions::default()).unwrap();
        let client = upstream_client::<Empty<Bytes>>(connector);
        let err = client
            .get(format!("https://127.0.0.1:{port}/version").parse().unwrap())
            .await
            .unwrap_err();
        assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    }
}

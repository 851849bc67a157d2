//! Terminating the TLS of a redirected agent connection.
//!
//! The certificate is chosen per connection, after the ClientHello: from the
//! SNI when there is one, and always for the connection's original
//! destination (kubectl sends no SNI when it dials `https://10.96.0.1`).

use std::{io, net::IpAddr, sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

use super::leaf::LeafCache;

/// The HTTP version the agent and chaperone agreed on through ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
}

/// How long a client may take to complete its handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS on redirected agent connections with leaves from a
/// [`LeafCache`].
#[derive(Clone, Debug)]
pub struct TlsTerminator {
    leaves: Arc<LeafCache>,
    handshake_timeout: Duration,
}

// === impl TlsTerminator ===

impl TlsTerminator {
    pub fn new(leaves: Arc<LeafCache>) -> Self {
        TlsTerminator {
            leaves,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    pub fn leaves(&self) -> &Arc<LeafCache> {
        &self.leaves
    }

    /// Complete the server side of the handshake on `io`, a connection whose
    /// original destination was `orig_dst`. Use [`negotiated_alpn`] on the
    /// result to pick HTTP/2 or HTTP/1.1.
    pub async fn accept<IO>(&self, io: IO, orig_dst: IpAddr) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
            let sni = start.client_hello().server_name().map(str::to_owned);
            let leaf = self
                .leaves
                .get(sni.as_deref(), orig_dst)
                .map_err(io::Error::other)?;
            start.into_stream(leaf.server_config.clone()).await
        };
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "TLS handshake with the agent did not complete within {:?}",
                    self.handshake_timeout
                ),
            )),
        }
    }
}

/// The protocol the handshake settled on; `None` when the client offered no
/// ALPN (treat it as HTTP/1.1).
pub fn negotiated_alpn<IO>(stream: &TlsStream<IO>) -> Option<Alpn> {
    match stream.get_ref().1.alpn_protocol()? {
        b"h2" => Some(Alpn::H2),
        b"http/1.1" => Some(Alpn::Http11),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::tls::{LeafConfig, LocalCa, crypto_provider};

    fn client_config(roots: &[&LocalCa], alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut store = RootCertStore::empty();
        for ca in roots {
            store.add(ca.certificate_der().clone()).unwrap();
        }
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A terminator on loopback that echoes one line per connection, with
    /// the ALPN it negotiated. The "original destination" is the cluster IP.
    async fn serve(
        ca: Arc<LocalCa>,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Vec<io::Result<Option<Alpn>>>>,
    ) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let terminator = TlsTerminator::new(Arc::new(LeafCache::new(ca, LeafConfig::default())))
            .with_handshake_timeout(Duration::from_secs(2));
        let task = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..3 {
                let (tcp, _) = listener.accept().await.unwrap();
                match terminator.accept(tcp, "10.96.0.1".parse().unwrap()).await {
                    Ok(mut tls) => {
                        let alpn = negotiated_alpn(&tls);
                        let mut buf = [0u8; 5];
                        tls.read_exact(&mut buf).await.unwrap();
                        tls.write_all(&buf).await.unwrap();
                        tls.shutdown().await.unwrap();
                        results.push(Ok(alpn));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
            results
        });
        (addr, task)
    }

    async fn roundtrip(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
    ) -> io::Result<Option<Vec<u8>>> {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(config).connect(server_name, tcp).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok(alpn)
    }

    #[tokio::test]
    async fn a_client_trusting_only_the_ca_completes_the_handshake_for_both_alpns() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let (addr, server) = serve(ca.clone()).await;

        // kubectl against https://10.96.0.1: no SNI, verified against the IP.
        let by_ip = ServerName::IpAddress("10.96.0.1".parse::<IpAddr>().unwrap().into());
        let alpn = roundtrip(addr, client_config(&[&ca], &[b"h2", b"http/1.1"]), by_ip)
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

        // An in-cluster client using the service name, HTTP/1.1 only.
        let by_name = ServerName::try_from("kubernetes.default.svc").unwrap();
        let alpn = roundtrip(addr, client_config(&[&ca], &[b"http/1.1"]), by_name)
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

        // No ALPN at all still works (HTTP/1.1 by default).
        let by_name = ServerName::try_from("kubernetes").unwrap();
        let alpn = roundtrip(addr, client_config(&[&ca], &[]), by_name)
            .await
            .unwrap();
        assert_eq!(alpn, None);

        let results = server.await.unwrap();
        let alpns: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(alpns, [Some(Alpn::H2), Some(Alpn::Http11), None]);
    }

    #[tokio::test]
    async fn a_client_that_does_not_trust_the_ca_fails_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let other_dir = tempfile::tempdir().unwrap();
        let other = LocalCa::load_or_create(other_dir.path()).unwrap();
        let (addr, server) = serve(ca.clone()).await;

        let name = || ServerName::try_from("kubernetes.default.svc").unwrap();
        for _ in 0..2 {
            let err = roundtrip(addr, client_config(&[&other], &[b"h2"]), name())
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("UnknownIssuer"),
                "expected an untrusted-issuer error, got {err}"
            );
        }
        // The right CA but a name the certificate does not carry.
        let err = roundtrip(
            addr,
            client_config(&[&ca], &[b"h2"]),
            ServerName::IpAddress("10.0.0.9".parse::<IpAddr>().unwrap().into()),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");

        let results = server.await.unwrap();
        assert!(results.iter().all(Result::is_err), "{results:?}");
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let terminator = TlsTerminator::new(Arc::new(LeafCache::new(ca, LeafConfig::default())))
            .with_handshake_timeout(Duration::from_millis(100));
        let (server_io, _client_io) = tokio::io::duplex(1024);
        let err = terminator
            .accept(server_io, "10.96.0.1".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}

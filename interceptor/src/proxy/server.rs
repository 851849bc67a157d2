//! Accepting agent connections: attestation from the kernel, TLS, and
//! HTTP/1.1 + HTTP/2 with upgrades, until a graceful shutdown drains them.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::SystemTime,
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use super::{
    Guard, ProxyConfig, Shared, Upstream, forward, guard::ConnectionInfo, workers::DataWorkers,
};
use crate::redirect::{AgentAddr, AttestedConnection, ProxyAddr, Redirector};

/// Terminates TLS for one accepted connection. The original destination is
/// given because clients send no SNI when they dial an IP address, and the
/// certificate must name the address they dialed.
pub trait Terminate: Send + Sync + 'static {
    fn accept(
        &self,
        tcp: TcpStream,
        orig_dst: Option<IpAddr>,
    ) -> impl Future<Output = io::Result<TlsStream<TcpStream>>> + Send;
}

/// A fixed server configuration (tests and simple setups).
#[derive(Clone)]
pub struct StaticTls(pub tokio_rustls::TlsAcceptor);

impl Terminate for StaticTls {
    async fn accept(
        &self,
        tcp: TcpStream,
        _orig_dst: Option<IpAddr>,
    ) -> io::Result<TlsStream<TcpStream>> {
        self.0.accept(tcp).await
    }
}

/// Tells what the kernel attested about an accepted connection.
pub trait Attestor: Send + Sync + 'static {
    fn attest(&self, agent: AgentAddr, proxy: ProxyAddr) -> Option<AttestedConnection>;
}

impl Attestor for Redirector {
    fn attest(&self, agent: AgentAddr, proxy: ProxyAddr) -> Option<AttestedConnection> {
        self.take_connection(agent, proxy)
    }
}

/// No kernel redirect (local mode without eBPF, tests of the HTTP layer).
impl Attestor for () {
    fn attest(&self, _agent: AgentAddr, _proxy: ProxyAddr) -> Option<AttestedConnection> {
        None
    }
}

pub struct Proxy<G, T, A> {
    shared: Arc<Shared<G>>,
    terminator: Arc<T>,
    attestor: Arc<A>,
}

impl<G: Guard, T: Terminate, A: Attestor> Proxy<G, T, A> {
    pub fn new(
        config: ProxyConfig,
        guard: G,
        upstream: Upstream,
        terminator: Arc<T>,
        attestor: Arc<A>,
    ) -> Self {
        Proxy {
            shared: Arc::new(Shared {
                config,
                guard,
                upstream,
                tunnels: tokio_util::task::TaskTracker::new(),
            }),
            terminator,
            attestor,
        }
    }

    /// Serves the listeners until `shutdown` resolves, then stops accepting,
    /// lets in-flight requests finish (up to the drain timeout) and returns.
    /// With [`ProxyConfig::data_threads`] set, connections are served on
    /// those threads (see [`super::workers`]); otherwise on this runtime.
    pub async fn serve(
        self,
        listeners: Vec<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let workers = match self.shared.config.data_threads {
            0 => None,
            count => match DataWorkers::start(count, &self.shared.upstream) {
                Ok(workers) => {
                    workers.warm_up();
                    tracing::debug!(threads = workers.len(), "data-path threads started");
                    Some(Arc::new(workers))
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot start the data-path threads; serving agents on the main runtime");
                    None
                }
            },
        };
        let own_upstream = Arc::new(self.shared.upstream.clone());
        let graceful = Arc::new(GracefulShutdown::new());
        let connections = tokio_util::task::TaskTracker::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut acceptors = tokio::task::JoinSet::new();
        for listener in listeners {
            let this = self.clone_handles();
            let graceful = graceful.clone();
            let connections = connections.clone();
            let mut stop = stop_rx.clone();
            let workers = workers.clone();
            let own_upstream = own_upstream.clone();
            acceptors.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, peer)) => {
                                let this = this.clone_handles();
                                let watcher = graceful.watcher();
                                match &workers {
                                    Some(workers) => this.hand_over(workers, &connections, tcp, peer, watcher),
                                    None => {
                                        let upstream = own_upstream.clone();
                                        connections.spawn(async move { this.connection(tcp, peer, watcher, upstream).await });
                                    }
                                }
                            }
                            Err(error) => {
                                // EMFILE and friends: back off instead of spinning.
                                tracing::warn!(%error, "accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            });
        }
        shutdown.await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = stop_tx.send(true);
        while acceptors.join_next().await.is_some() {}
        let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| GracefulShutdown::new());
        let drain = async {
            graceful.shutdown().await;
            connections.close();
            connections.wait().await;
            self.shared.tunnels.close();
            self.shared.tunnels.wait().await;
        };
        if tokio::time::timeout(self.shared.config.drain_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?self.shared.config.drain_timeout,
                "drain timeout: closing the connections still open"
            );
        }
        if let Some(workers) = workers.and_then(|w| Arc::try_unwrap(w).ok()) {
            workers.stop().await;
        }
    }

    /// Moves an accepted connection to the least loaded data-path thread:
    /// its socket is registered with that thread's reactor, so its reads and
    /// writes wake that thread alone.
    fn hand_over(
        self,
        workers: &DataWorkers,
        connections: &tokio_util::task::TaskTracker,
        tcp: TcpStream,
        peer: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(error) => {
                tracing::debug!(%peer, %error, "connection closed before it was handed over");
                return;
            }
        };
        let worker = workers.least_loaded();
        let upstream = worker.upstream.clone();
        worker.spawn(connections.track_future(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => self.connection(tcp, peer, watcher, upstream).await,
                Err(error) => tracing::warn!(%peer, %error, "cannot register a connection on its data-path thread"),
            }
        }));
    }

    fn clone_handles(&self) -> Self {
        Proxy {
            shared: self.shared.clone(),
            terminator: self.terminator.clone(),
            attestor: self.attestor.clone(),
        }
    }

    async fn connection(
        self,
        tcp: TcpStream,
        peer: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
        upstream: Arc<Upstream>,
    ) {
        let peer = AgentAddr(peer);
        let local = match tcp.local_addr() {
            Ok(local) => ProxyAddr(local),
            Err(error) => {
                tracing::debug!(%peer, %error, "connection closed before it was set up");
                return;
            }
        };
        // Claim the kernel's record at once: it is keyed by the four
        // addresses and must not be left for a later connection to reuse.
        let attested = self.attestor.attest(peer, local);
        if attested.is_none() && self.shared.config.require_attestation {
            tracing::warn!(
                %peer, %local,
                "refusing a connection the kernel did not redirect: agents reach chaperone only \
                 through the eBPF redirect (set require_attestation=false for local mode)"
            );
            return;
        }
        let orig_ip = attested.as_ref().map(|a| a.orig_dst.0.ip());
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(
            self.shared.config.handshake_timeout,
            self.terminator.accept(tcp, orig_ip),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::info!(%peer, %error, "TLS handshake failed (does the agent trust chaperone's CA?)");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let conn = Arc::new(ConnectionInfo {
            id: uuid::Uuid::new_v4(),
            peer,
            local,
            sni: session.server_name().map(str::to_owned),
            alpn: session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            attested,
            accepted_at: SystemTime::now(),
        });
        tracing::debug!(conn = %conn.id, %peer, alpn = ?conn.alpn, attested = ?conn.attested, "agent connected");

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.shared.config.header_read_timeout)
            .max_buf_size(self.shared.config.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(self.shared.config.max_header_bytes as u32)
            .max_concurrent_streams(1000)
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(20));
        // The guard's state for this connection: dropped when the
        // connection and its last request have ended.
        let connection = Arc::new(self.shared.guard.connect(&conn));
        let shared = self.shared.clone();
        let service_conn = conn.clone();
        let service = service_fn(move |request| {
            forward::handle(
                shared.clone(),
                upstream.clone(),
                service_conn.clone(),
                connection.clone(),
                request,
            )
        });
        let serving = builder
            .serve_connection_with_upgrades(TokioIo::new(tls), service)
            .into_owned();
        if let Err(error) = watcher.watch(serving).await {
            tracing::debug!(conn = %conn.id, error = %error, "connection ended with an error");
        }
    }
}

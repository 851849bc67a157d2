//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and in local
//! mode the approvals API ([`approvals`]).
//!
//! It runs on its own thread with its own single-threaded tokio runtime, so a
//! slow scrape or a flood of probes never takes a worker thread from the data
//! path, and a busy data path never makes the node look dead to the kubelet.
//! The data path only touches [`Metrics`] (atomic updates) and [`Check`]s.

pub mod approvals;
mod health;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;

pub use crate::metrics::{CONTENT_TYPE, Metrics};
pub use health::{Check, Health, Probe, Report};

use crate::approval::LocalStore;

/// Errors starting the admin listener.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot listen on {addr} for the admin endpoints: {source}; pick a free port with --admin-addr"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the admin thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The running admin listener.
pub struct AdminServer {
    local_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

impl AdminServer {
    /// Binds `addr` and serves on a new thread `chaperone-admin`.
    pub fn start(addr: SocketAddr, metrics: Metrics, health: Health) -> Result<Self, AdminError> {
        Self::start_with(addr, metrics, health, None)
    }

    /// [`AdminServer::start`], serving the approvals API for the local
    /// approval store `approvals`.
    pub fn start_with(
        addr: SocketAddr,
        metrics: Metrics,
        health: Health,
        approvals: Option<LocalStore>,
    ) -> Result<Self, AdminError> {
        let serves_approvals = approvals.is_some();
        // SO_REUSEPORT, like the proxy: the next node agent's probes answer
        // while the old one still runs.
        let listener =
            reuseport_listener(addr).map_err(|source| AdminError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| AdminError::Bind { addr, source })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AdminError::Thread)?;
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("chaperone-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, "admin listener failed");
                            return;
                        }
                    };
                    tokio::select! {
                        () = serve(listener, metrics, health, approvals) => {}
                        _ = shutdown_rx => {}
                    }
                });
            })
            .map_err(AdminError::Thread)?;
        if serves_approvals {
            tracing::info!(%local_addr, "admin listener started (/metrics, /healthz, /readyz, /approvals)");
        } else {
            tracing::info!(%local_addr, "admin listener started (/metrics, /healthz, /readyz)");
        }
        Ok(Self {
            local_addr,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the listener and waits for its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Health,
    approvals: Option<LocalStore>,
) {
    let approvals = std::sync::Arc::new(approvals);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let health = health.clone();
        let approvals = approvals.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let metrics = metrics.clone();
                let health = health.clone();
                let approvals = approvals.clone();
                async move {
                    let response = if approvals::is_approvals_path(request.uri().path()) {
                        approvals::handle(request, peer, approvals.as_ref().as_ref()).await
                    } else {
                        route(&request, &metrics, &health)
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Answers one admin request.
pub fn route<B>(request: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET\n".into(),
        );
    }
    let probe = |probe| {
        let report = health.report(probe);
        let status = if report.ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        reply(status, "text/plain; charset=utf-8", report.body)
    };
    match request.uri().path() {
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, metrics.encode()),
        "/healthz" | "/livez" => probe(Probe::Liveness),
        "/readyz" => probe(Probe::Readiness),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the admin listener serves /metrics, /healthz and /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests;

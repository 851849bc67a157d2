//! The proxy: accepts redirected agent connections, terminates TLS,
//! attaches what the kernel attested, asks the [`Guard`] about each request,
//! and re-originates allowed requests to the real API server, streaming
//! bodies both ways and tunneling upgrades.
//!
//! - [`server`]: listeners, attestation, TLS, HTTP/1.1 + HTTP/2, graceful drain.
//! - [`forward`]: one request: guard, rewrite, forward, stream back.
//! - [`tunnel`]: upgraded connections (exec, attach, port-forward).
//! - [`upstream`]: pooled clients to the API server on marked sockets.
//! - [`workers`]: the data-path threads connections are served on.
//! - [`guard`]: the seam where identity, policy, masking and recording plug in.
//! - [`body`]: the body type and the streaming transform hook.

pub mod body;
mod forward;
pub mod guard;
pub mod server;
mod tunnel;
pub mod upstream;
mod workers;

use std::time::Duration;

pub use guard::{
    ConnectionInfo, Forward, Guard, Passthrough, ResponseObserver, TapError, TunnelTap, Verdict,
};
pub use server::{Attestor, Proxy, StaticTls, Terminate};
pub use upstream::{TrustError, Upstream, UpstreamError, UpstreamSpec};
pub use workers::defer_until_idle;

/// Limits and timeouts of the proxy's agent-facing side.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// A TLS handshake that takes longer is dropped.
    pub handshake_timeout: Duration,
    /// HTTP/1.1: a request head that takes longer to arrive is dropped.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Largest request body forwarded (the API server's own limit is 3 MiB).
    pub max_request_body: usize,
    /// On shutdown, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// Refuse connections the kernel did not redirect (no attestation).
    pub require_attestation: bool,
    /// Serve connections on this many single-threaded data-path threads;
    /// 0 serves them on the runtime that calls [`Proxy::serve`].
    pub data_threads: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 1 << 20,
            max_request_body: 3 << 20,
            drain_timeout: Duration::from_secs(20),
            require_attestation: true,
            data_threads: 0,
        }
    }
}

/// What every connection task shares.
pub(crate) struct Shared<G> {
    pub(crate) config: ProxyConfig,
    pub(crate) guard: G,
    pub(crate) upstream: Upstream,
    pub(crate) tunnels: tokio_util::task::TaskTracker,
}

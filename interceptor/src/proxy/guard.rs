//! The seam between HTTP mechanics (this module) and chaperone's decisions
//! (identity, policy, masking, approval, recording): a [`Guard`] looks at
//! each request before it is forwarded and says what to do with it.

use std::{future::Future, sync::Arc, time::SystemTime};

use http::request::Parts;

use super::body::{BodyObserver, BodyTransform, ProxyBody, RequestBody};
use crate::redirect::{AgentAddr, AttestedConnection, ProxyAddr};

/// One accepted agent connection, as the proxy knows it.
#[derive(Debug)]
pub struct ConnectionInfo {
    /// Unique per connection: the recording session id.
    pub id: uuid::Uuid,
    pub peer: AgentAddr,
    pub local: ProxyAddr,
    /// What the kernel attested, when the connection came through the redirect.
    pub attested: Option<AttestedConnection>,
    /// The server name the agent asked for in its TLS ClientHello.
    pub sni: Option<String>,
    /// `h2` or `http/1.1`.
    pub alpn: Option<String>,
    pub accepted_at: SystemTime,
}

/// What to do with one request.
pub enum Verdict {
    /// Answer the agent directly (a denial, an error); nothing goes upstream.
    Respond(http::Response<ProxyBody>),
    /// Forward it (with the request parts as the guard left them).
    Forward(Forward),
}

/// Chooses the response body transform from the response headers (its
/// `Content-Type`): `Ok(None)` forwards the body as is, `Err` refuses the
/// response with that `Status` (the upstream body is dropped unread).
pub type TransformFactory = Box<
    dyn FnOnce(
            &http::HeaderMap,
        ) -> Result<Option<Box<dyn BodyTransform>>, Box<crate::kstatus::Status>>
        + Send,
>;

/// How to forward one request and handle its response.
#[derive(Default)]
pub struct Forward {
    /// Rewrites the response body (masking). Applied to 2xx responses.
    pub response_transform: Option<TransformFactory>,
    /// Sees what the agent receives and when it ends (recording, audit).
    pub observer: Option<Box<dyn ResponseObserver>>,
    /// Sees the request body as it is forwarded (recording, audit).
    pub request_observer: Option<Box<dyn BodyObserver>>,
    /// The request carries chaperone's own credentials (impersonate mode):
    /// it goes over the pools that may present chaperone's client
    /// certificate. Otherwise it carries the agent's, and no certificate of
    /// chaperone's goes with it.
    pub own_credentials: bool,
}

/// Follows one forwarded exchange: the response head, then the body.
pub trait ResponseObserver: Send + 'static {
    /// The upstream answered (or could not be reached: status 502/503).
    /// Returns the observer for the body, if it wants one.
    fn on_response(
        self: Box<Self>,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> Option<Box<dyn BodyObserver>>;
    /// The request was upgraded (exec, attach, port-forward): the tunnel
    /// tap, if any, sees (and may rewrite) the two byte streams. `headers`
    /// are the API server's `101` response headers (the chosen subprotocol).
    fn on_upgrade(&mut self, _headers: &http::HeaderMap) -> Option<Box<dyn TunnelTap>> {
        None
    }
}

/// Why a tap closed a tunnel: the stream could not be read where it must be
/// (masking), so nothing more is forwarded.
pub type TapError = Box<dyn std::error::Error + Send + Sync>;

/// Sees the bytes of an upgraded connection, both ways, as they pass, and
/// may rewrite what the API server sends (exec output masking).
pub trait TunnelTap: Send + 'static {
    /// Bytes from the agent; forwarded unchanged.
    fn agent_sent(&mut self, bytes: &[u8]);
    /// Bytes from the agent: appends what the API server receives to `out`
    /// (by default, the bytes unchanged, seen by [`TunnelTap::agent_sent`]).
    /// An error closes the tunnel. A tap that rewrites output may have to
    /// rewrite flow control the agent sends (SPDY WINDOW_UPDATE).
    fn agent_rewrite(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), TapError> {
        self.agent_sent(bytes);
        out.extend_from_slice(bytes);
        Ok(())
    }
    /// Bytes from the API server: appends what the agent receives to `out`
    /// (by default, the bytes unchanged). An error closes the tunnel.
    fn upstream_sent(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), TapError> {
        out.extend_from_slice(bytes);
        Ok(())
    }
    /// Something is held back (a partial line being masked): the tunnel
    /// calls [`TunnelTap::upstream_idle`] when the API server has sent
    /// nothing for this long, and at its end.
    fn held_back(&self) -> Option<std::time::Duration> {
        None
    }
    /// The API server went idle (or ended): appends what was held back.
    fn upstream_idle(&mut self, _out: &mut Vec<u8>) {}
    fn closed(&mut self);
}

/// Decides, per request, what the proxy does.
pub trait Guard: Send + Sync + 'static {
    /// What the guard keeps for one agent connection. The proxy makes it
    /// with [`Guard::connect`] when it accepts the connection and drops it
    /// when the connection and the last of its requests have ended: no
    /// state shared between connections is needed to find it.
    type Connection: Send + Sync + 'static;

    /// A connection was accepted: attested by the kernel (when it came
    /// through the redirect), TLS set up, no request read yet.
    fn connect(&self, conn: &Arc<ConnectionInfo>) -> Self::Connection;

    /// Inspect (and possibly rewrite: credentials, Accept) the request head
    /// of a request on `connection`. The body is forwarded as a stream
    /// after the verdict; a guard that needs it to decide may read it first
    /// (bounded, see [`RequestBody::read_whole`]), and what it read is
    /// forwarded unchanged.
    fn check(
        &self,
        conn: &Arc<ConnectionInfo>,
        connection: &Arc<Self::Connection>,
        parts: &mut Parts,
        body: &mut RequestBody,
    ) -> impl Future<Output = Verdict> + Send;
}

/// Forwards everything untouched: faithful proxying, no decisions. The
/// proxy's mechanics are tested with it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Passthrough;

impl Guard for Passthrough {
    type Connection = ();

    fn connect(&self, _conn: &Arc<ConnectionInfo>) {}

    async fn check(
        &self,
        _conn: &Arc<ConnectionInfo>,
        _connection: &Arc<()>,
        _parts: &mut Parts,
        _body: &mut RequestBody,
    ) -> Verdict {
        Verdict::Forward(Forward::default())
    }
}

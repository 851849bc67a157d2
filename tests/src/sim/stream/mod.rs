//! Streaming subresources of pods: `exec`, `attach` and `portforward`, over
//! WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) and SPDY/3.1.
//!
//! This file is the seam between the simulator's router and the stream
//! protocols: the router resolves the pod and calls these functions with the
//! upgrade request. Each answers `101 Switching Protocols` and serves the
//! upgraded connection on a task of its own, which ends when the process has
//! exited or the client has gone away (the router's hyper connection must be
//! served `with_upgrades()`).
//!
//! | module | what |
//! | --- | --- |
//! | `options` | the query (`command`, `stdin`, `tty`, `ports`, ...) |
//! | `process`, `shell` | the container side: pipes, terminal, the programs |
//! | `status` | the exit `Status` on the error stream |
//! | `websocket` | channel protocols v4/v5 (and base64), the port-forward tunnel |
//! | `spdy` | SPDY/3.1 framing, header compression, flow control |
//! | `remotecommand` | exec/attach over SPDY (`v4.channel.k8s.io`) |
//! | `portforward` | `portforward.k8s.io` over SPDY (plain or tunneled in WebSocket) |
//!
//! What kubectl 1.32 sends (seen on the wire, and pinned by
//! `tests/tests/sim_streams.rs`):
//!
//! - exec and attach: first `GET` with `Upgrade: websocket` offering only
//!   `v5.channel.k8s.io`; if that upgrade fails (any non-101 answer) it
//!   retries with `POST`, `Upgrade: SPDY/3.1` and `X-Stream-Protocol-Version`
//!   v5, v4, v3, v2, `channel.k8s.io`, where a kubelet (and this simulator)
//!   picks v4. `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false` skips the WebSocket.
//! - port-forward: first `GET` with `Upgrade: websocket` and the subprotocol
//!   `SPDY/3.1+portforward.k8s.io` (SPDY frames inside binary messages), then
//!   `POST` with `Upgrade: SPDY/3.1` and `portforward.k8s.io`.
//!   `KUBECTL_PORT_FORWARD_WEBSOCKETS=false` skips the WebSocket.
//! - upgrades always use HTTP/1.1, so a TLS listener must offer `http/1.1`
//!   in ALPN besides `h2`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

pub mod options;
pub mod portforward;
pub mod process;
pub mod remotecommand;
pub mod shell;
pub mod spdy;
pub mod status;
pub mod websocket;

use options::StreamOptions;
use process::{Command, Container, Program};

/// The simulator's response body type.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// What the simulator knows about the container a stream targets.
#[derive(Clone, Debug, Default)]
pub struct StreamTarget {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The container's environment (from the pod spec), for `env`.
    pub env: Vec<(String, String)>,
    /// For port-forward: pod port -> where it is really served on this machine.
    pub ports: BTreeMap<u16, SocketAddr>,
    /// Counts the upgraded connections being served for this target; shared
    /// by clones, so a test can see streams end when clients go away.
    pub live: LiveStreams,
}

/// How many stream tasks (upgraded connections, the processes they run,
/// forwarded connections) are alive right now.
#[derive(Clone, Debug, Default)]
pub struct LiveStreams(Arc<AtomicUsize>);

impl LiveStreams {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    pub(crate) fn enter(&self) -> LiveGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        LiveGuard(self.0.clone())
    }
}

/// One served connection; counted until dropped with its task.
pub(crate) struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl StreamTarget {
    fn container(&self) -> Container {
        Container {
            hostname: self.pod.clone(),
            env: self.env.clone(),
        }
    }
}

/// `GET|POST /api/v1/namespaces/NS/pods/NAME/exec?command=...&stdin=...`
pub async fn exec(
    req: http::Request<hyper::body::Incoming>,
    target: StreamTarget,
) -> http::Response<Body> {
    let options = StreamOptions::from_query(req.uri().query());
    if options.command.is_empty() {
        return bad_request("you must specify at least one command for the container");
    }
    if !(options.pipes.stdin || options.pipes.stdout || options.pipes.stderr) {
        return bad_request("you must specify at least 1 of stdin, stdout, stderr");
    }
    let command = Command {
        program: Program::Exec(options.command),
        pipes: options.pipes,
        container: target.container(),
        live: target.live.clone(),
    };
    remote_command(req, command, &target.live)
}

/// `GET|POST /api/v1/namespaces/NS/pods/NAME/attach?...`
pub async fn attach(
    req: http::Request<hyper::body::Incoming>,
    target: StreamTarget,
) -> http::Response<Body> {
    let options = StreamOptions::from_query(req.uri().query());
    if !(options.pipes.stdin || options.pipes.stdout || options.pipes.stderr) {
        return bad_request("you must specify at least 1 of stdin, stdout, stderr");
    }
    let command = Command {
        program: Program::Attach,
        pipes: options.pipes,
        container: target.container(),
        live: target.live.clone(),
    };
    remote_command(req, command, &target.live)
}

/// `GET|POST /api/v1/namespaces/NS/pods/NAME/portforward?ports=...`
pub async fn port_forward(
    mut req: http::Request<hyper::body::Incoming>,
    target: StreamTarget,
) -> http::Response<Body> {
    if websocket::is_upgrade(&req) {
        let Some(protocol) = websocket::choose(&req, &[websocket::PORT_FORWARD_TUNNEL]) else {
            return bad_request(&format!(
                "unable to upgrade: no supported WebSocket subprotocol (supported: {})",
                websocket::PORT_FORWARD_TUNNEL
            ));
        };
        let Some(response) = websocket::accept(&req, protocol) else {
            return bad_request("missing Sec-WebSocket-Key");
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let live = target.live.enter();
        tokio::spawn(async move {
            let _live = live;
            if let Ok(upgraded) = upgrade.await {
                let ws = websocket::server(upgraded).await;
                let io = websocket::ByteStream::new(ws);
                portforward::serve(io, target).await;
            }
        });
        return empty(response);
    }
    if spdy::is_upgrade(&req) {
        let Some(response) = spdy::accept(&req, &[portforward::PROTOCOL]) else {
            return spdy::refuse(&req, &[portforward::PROTOCOL]);
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let live = target.live.enter();
        tokio::spawn(async move {
            let _live = live;
            if let Ok(upgraded) = upgrade.await {
                portforward::serve(hyper_util::rt::TokioIo::new(upgraded), target).await;
            }
        });
        return empty(response);
    }
    bad_request("Upgrade request required")
}

/// Exec and attach: the upgrade to whichever protocol the client offers.
fn remote_command(
    mut req: http::Request<hyper::body::Incoming>,
    command: Command,
    live: &LiveStreams,
) -> http::Response<Body> {
    if websocket::is_upgrade(&req) {
        let Some(protocol) = websocket::choose(&req, websocket::REMOTE_COMMAND) else {
            return bad_request(&format!(
                "unable to upgrade: no supported WebSocket subprotocol (supported: {})",
                websocket::REMOTE_COMMAND.join(", ")
            ));
        };
        let Some(response) = websocket::accept(&req, protocol) else {
            return bad_request("missing Sec-WebSocket-Key");
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let live = live.enter();
        tokio::spawn(async move {
            let _live = live;
            if let Ok(upgraded) = upgrade.await {
                let ws = websocket::server(upgraded).await;
                websocket::remote_command(ws, protocol, command).await;
            }
        });
        return empty(response);
    }
    if spdy::is_upgrade(&req) {
        let Some(response) = spdy::accept(&req, remotecommand::PROTOCOLS) else {
            return spdy::refuse(&req, remotecommand::PROTOCOLS);
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let live = live.enter();
        tokio::spawn(async move {
            let _live = live;
            if let Ok(upgraded) = upgrade.await {
                remotecommand::serve(hyper_util::rt::TokioIo::new(upgraded), command).await;
            }
        });
        return empty(response);
    }
    bad_request("Upgrade request required")
}

fn empty(response: http::response::Builder) -> http::Response<Body> {
    response
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .expect("static response")
}

/// A `Status` error answer, as the API server writes them.
pub(crate) fn status_response(code: u16, reason: &str, message: &str) -> http::Response<Body> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
    .to_string()
        + "\n";
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response")
}

fn bad_request(message: &str) -> http::Response<Body> {
    status_response(400, "BadRequest", message)
}

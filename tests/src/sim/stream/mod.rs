//! Streaming subresources of pods: `exec`, `attach` and `portforward`, over
//! WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) and SPDY/3.1.
//!
//! This file is the seam between the simulator's router and the stream
//! protocols: the router resolves the pod and calls these functions with the
//! upgrade request. (Interface fixed here; implementation lands with the
//! streams work.)

use std::{collections::BTreeMap, net::SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

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
}

fn not_yet(what: &str) -> http::Response<Body> {
    let body = format!(
        "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{{}},\"status\":\"Failure\",\"message\":\"{what} is not supported by this simulator build\",\"reason\":\"BadRequest\",\"code\":400}}\n"
    );
    http::Response::builder()
        .status(400)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response")
}

/// `GET|POST /api/v1/namespaces/NS/pods/NAME/exec?command=...&stdin=...`
pub async fn exec(
    _req: http::Request<hyper::body::Incoming>,
    _target: StreamTarget,
) -> http::Response<Body> {
    not_yet("exec")
}

/// `GET|POST /api/v1/namespaces/NS/pods/NAME/attach?...`
pub async fn attach(
    _req: http::Request<hyper::body::Incoming>,
    _target: StreamTarget,
) -> http::Response<Body> {
    not_yet("attach")
}

/// `GET|POST /api/v1/namespaces/NS/pods/NAME/portforward?ports=...`
pub async fn port_forward(
    _req: http::Request<hyper::body::Incoming>,
    _target: StreamTarget,
) -> http::Response<Body> {
    not_yet("portforward")
}

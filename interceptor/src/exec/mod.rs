//! Exec and attach streams: what the agent typed and saw, masked and
//! recorded, without adding latency to an interactive session.
//!
//! An exec/attach request is upgraded and tunneled by [`crate::proxy`]; the
//! [`ExecTap`] plugged into the tunnel decodes the WebSocket channel
//! protocol ([`websocket`]) both ways:
//!
//! - API server to agent: stdout and stderr payloads go through the
//!   masker's pattern rules ([`crate::mask::Masker::exec_output`], one
//!   line-aware stream per channel) and are re-framed, one binary message per
//!   masked piece. Everything else (the error channel, control frames) is
//!   forwarded byte for byte. A partial line is held back to see a secret
//!   that straddles two frames, and released after [`IDLE_FLUSH`] without
//!   more output (so a prompt without a newline shows) or at the end.
//! - Agent to API server: forwarded unchanged; stdin (masked for the
//!   recording only) and the terminal size are read for the recording.
//!
//! Memory is bounded: a frame is read piece by piece, and what masking
//! holds back is bounded by `maxLineBytes`.
//!
//! Only the binary channel protocols are read. [`negotiate`] removes the
//! `base64` variants and any extension from the agent's WebSocket offer, and
//! refuses SPDY where exec output must be masked (kubectl 1.30+ uses
//! WebSocket, and falls back to SPDY only when the WebSocket upgrade fails).
//! Port-forward is never touched: its data is binary and not masked.

mod tap;
pub mod websocket;

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};

use crate::kstatus::Status;
use crate::mask::{Masker, Target};
use crate::proxy::{TapError, TunnelTap};
use crate::record::StreamInfo;
use crate::request::RequestInfo;

pub use tap::{ExecTap, OnClosed, StartRecording};

/// How long output may be held back for masking while the API server sends
/// nothing more: well under what a person notices when typing.
pub const IDLE_FLUSH: Duration = Duration::from_millis(20);

/// Whether `request` is an exec or attach stream.
pub fn is_exec(request: &RequestInfo) -> bool {
    request.is_resource_request
        && request.api_group.is_empty()
        && request.resource == "pods"
        && matches!(request.subresource.as_str(), "exec" | "attach")
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether an upgrade request or `101` response is a WebSocket.
pub fn is_websocket(headers: &HeaderMap) -> bool {
    header_has(headers, header::UPGRADE, "websocket")
}

/// Prepares the upgrade request of an exec/attach whose output chaperone
/// must mask: keeps only the binary channel subprotocols and no extensions.
/// `Err`: the request cannot be served masked (SPDY, or only protocols
/// chaperone does not read), answer the `Status`.
pub fn negotiate(headers: &mut HeaderMap) -> Result<(), Box<Status>> {
    if !headers.contains_key(header::UPGRADE) {
        return Ok(());
    }
    if !is_websocket(headers) {
        let upgrade = headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        return Err(Box::new(Status::bad_request(format!(
            "chaperone masks exec and attach output and reads it over WebSocket \
             (v5.channel.k8s.io or v4.channel.k8s.io); this request asked for {upgrade:?}. \
             Use kubectl 1.30 or newer, which uses WebSocket unless \
             KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false"
        ))));
    }
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let kept: Vec<&str> = offered
        .iter()
        .map(String::as_str)
        .filter(|p| websocket::CHANNEL_PROTOCOLS.contains(p))
        .collect();
    if kept.is_empty() {
        return Err(Box::new(Status::bad_request(format!(
            "chaperone masks exec and attach output and reads the binary channel protocols ({}); \
             the request offered {offered:?}",
            websocket::CHANNEL_PROTOCOLS.join(", ")
        ))));
    }
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_str(&kept.join(", ")).expect("protocol names are header-safe"),
    );
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    Ok(())
}

/// The subprotocol a `101` response chose, if it is one chaperone reads.
pub fn chosen_protocol(headers: &HeaderMap) -> Option<&'static str> {
    let chosen = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)?
        .to_str()
        .ok()?
        .trim();
    websocket::CHANNEL_PROTOCOLS
        .iter()
        .find(|p| p.eq_ignore_ascii_case(chosen))
        .copied()
}

/// The tap for an upgraded exec/attach: masks stdout/stderr when `masker`
/// says so (and the `101` chose a protocol chaperone reads; otherwise the
/// tunnel is closed before any output passes), records when `record` is
/// given, and calls `on_closed` at the end.
pub fn tap(
    masker: &Masker,
    request: &RequestInfo,
    response: &HeaderMap,
    record: Option<(StreamInfo, tap::StartRecording)>,
    masked: Arc<AtomicU32>,
    on_closed: tap::OnClosed,
) -> Box<dyn TunnelTap> {
    let mask = masker.target(request) == Some(Target::ExecOutput);
    let readable = is_websocket(response) && chosen_protocol(response).is_some();
    if !readable {
        if mask {
            return Box::new(Unreadable {
                on_closed: Some(on_closed),
            });
        }
        // Nothing to mask and nothing we read: tunnel it as it is.
        return Box::new(
            Unreadable {
                on_closed: Some(on_closed),
            }
            .passing(),
        );
    }
    Box::new(ExecTap::new(masker, mask, record, masked).on_closed(on_closed))
}

/// A stream chaperone cannot read: closed if it must be masked, otherwise
/// passed through.
struct Unreadable {
    on_closed: Option<tap::OnClosed>,
}

struct Passing(Unreadable);

impl Unreadable {
    fn passing(self) -> Passing {
        Passing(self)
    }
}

impl TunnelTap for Unreadable {
    fn agent_sent(&mut self, _bytes: &[u8]) {}

    fn upstream_sent(&mut self, _bytes: &[u8], _out: &mut Vec<u8>) -> Result<(), TapError> {
        Err("the API server chose an exec stream protocol chaperone cannot read to mask it".into())
    }

    fn closed(&mut self) {
        if let Some(f) = self.on_closed.take() {
            f();
        }
    }
}

impl TunnelTap for Passing {
    fn agent_sent(&mut self, _bytes: &[u8]) {}

    fn closed(&mut self) {
        self.0.closed();
    }
}

/// What the cast header says about a stream, from its request.
pub fn stream_info(request: &RequestInfo, query: Option<&str>) -> StreamInfo {
    let mut container = String::new();
    let mut tty = false;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "container" => container = value.into_owned(),
            "tty" => tty = matches!(&*value, "true" | "1"),
            _ => {}
        }
    }
    StreamInfo {
        kind: request.subresource.clone(),
        namespace: request.namespace.clone(),
        pod: request.name.clone(),
        container,
        command: request.command.clone(),
        tty,
        width: 0,
        height: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_offers_keep_only_binary_channel_protocols() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v5.base64.channel.k8s.io, v5.channel.k8s.io"),
        );
        headers.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        negotiate(&mut headers).unwrap();
        assert_eq!(
            headers.get(header::SEC_WEBSOCKET_PROTOCOL).unwrap(),
            "v5.channel.k8s.io, v4.channel.k8s.io"
        );
        assert!(headers.get(header::SEC_WEBSOCKET_EXTENSIONS).is_none());

        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v4.base64.channel.k8s.io"),
        );
        assert_eq!(negotiate(&mut headers).unwrap_err().code, 400);
    }

    #[test]
    fn spdy_is_refused_with_a_way_out() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let status = negotiate(&mut headers).unwrap_err();
        assert!(status.message.contains("WebSocket"), "{}", status.message);
        // Not an upgrade: nothing to do.
        assert!(negotiate(&mut HeaderMap::new()).is_ok());
    }

    #[test]
    fn stream_info_reads_container_and_tty() {
        let request = RequestInfo::parse(
            &http::Method::GET,
            "/api/v1/namespaces/dev/pods/web-0/exec",
            Some("command=sh&container=app&stdin=true&tty=true"),
        );
        assert!(is_exec(&request));
        let info = stream_info(
            &request,
            Some("command=sh&container=app&stdin=true&tty=true"),
        );
        assert_eq!(info.title(), "exec dev/web-0 -c app -- sh");
        assert!(info.tty);
    }
}

//! Exec and attach streams: what the agent typed and saw, masked and
//! recorded, without adding latency to an interactive session.
//!
//! An exec/attach request is upgraded and tunneled by [`crate::proxy`]; the
//! tap plugged into the tunnel decodes the stream protocol both ways:
//! [`ExecTap`] the WebSocket channel protocols ([`websocket`]),
//! [`SpdyTap`] SPDY/3.1 streams ([`spdy`]). Both share [`tap::Core`]:
//!
//! - API server to agent: stdout and stderr payloads go through the
//!   masker's pattern rules ([`crate::mask::Masker::exec_output`], one
//!   line-aware stream per channel) and are re-framed, one message (or data
//!   frame) per masked piece. Everything else (the error channel, control
//!   frames) is forwarded byte for byte. A partial line is held back to see
//!   a secret that straddles two frames, and released after [`IDLE_FLUSH`]
//!   without more output (so a prompt without a newline shows) or at the
//!   end.
//! - Agent to API server: forwarded unchanged (but for SPDY window updates
//!   of masked streams, see [`spdy_tap`]); stdin (masked for the recording
//!   only) and the terminal size are read for the recording.
//!
//! Memory is bounded: a frame is read piece by piece, and what masking
//! holds back is bounded by `maxLineBytes`.
//!
//! Only protocols chaperone reads are let through where output must be
//! masked: [`negotiate`] removes the `base64` variants and any extension
//! from the agent's WebSocket offer, keeps the remote command protocols of
//! a SPDY/3.1 offer (kubectl before 1.30, client-go before 1.30, and
//! kubectl 1.30+ with `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false` or when the
//! WebSocket upgrade fails), and refuses any other upgrade. Port-forward is
//! never touched: its data is binary and not masked.
//!
//! Every other upgrade (a watch or a log over WebSocket, with or without the
//! `base64.channel.k8s.io`/`base64.binary.k8s.io` subprotocols, a proxy
//! subresource) would be a tunnel chaperone does not read: the API server
//! sends watch events and log chunks as frames no masker sees. Such an
//! upgrade is refused by [`refuse_unread_upgrade`] whenever anything of its
//! response must be masked or recorded; the agent is told to use the plain
//! HTTP form, which chaperone masks and records.

pub mod spdy;
pub mod spdy_tap;
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

pub use spdy_tap::SpdyTap;
pub use tap::{ExecTap, OnClosed, StartRecording};

/// How long output may be held back for masking while the API server sends
/// nothing more: well under what a person notices when typing.
pub const IDLE_FLUSH: Duration = Duration::from_millis(20);

/// Whether the upgraded stream of `request` is one chaperone reads or that
/// carries nothing of the API server's: exec and attach (tapped), and
/// port-forward (the agent's own bytes to its pod, never masked).
pub fn is_inspected_upgrade(request: &RequestInfo) -> bool {
    is_exec(request)
        || (request.is_resource_request
            && request.api_group.is_empty()
            && request.resource == "pods"
            && request.subresource == "portforward")
}

/// Refuses an upgrade chaperone would tunnel unread (anything but
/// [`is_inspected_upgrade`]) when its response must be masked (`masked`) or
/// its body recorded (`bodies_recorded`): a watch or log over WebSocket
/// would otherwise carry Secrets past the masker. A request without an
/// `Upgrade` header is never refused here.
pub fn refuse_unread_upgrade(
    request: &RequestInfo,
    headers: &HeaderMap,
    masked: bool,
    bodies_recorded: bool,
) -> Result<(), Box<Status>> {
    if !headers.contains_key(header::UPGRADE) || is_inspected_upgrade(request) {
        return Ok(());
    }
    if !masked && !bodies_recorded {
        return Ok(());
    }
    let what = if request.verb == "watch" {
        "a watch"
    } else if request.subresource == "log" {
        "a log"
    } else {
        "this request"
    };
    let plain = if request.verb == "watch" {
        " (?watch=true without Upgrade, as kubectl does)"
    } else {
        ""
    };
    let why = if masked {
        "must be masked"
    } else {
        "must be recorded"
    };
    Err(Box::new(Status::bad_request(format!(
        "chaperone: {what} on {} {why}, and chaperone does not read it over an upgraded connection ({}); send it as plain HTTP{plain}",
        request.resource_path(),
        headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("upgrade"),
    ))))
}

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

/// Whether an upgrade request or `101` response is SPDY/3.1.
pub fn is_spdy(headers: &HeaderMap) -> bool {
    header_has(headers, header::UPGRADE, spdy::UPGRADE)
}

/// The values of a comma-separated header, all of its lines.
fn header_list(headers: &HeaderMap, name: impl header::AsHeaderName + Copy) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Keeps of the offer in header `name` the protocols in `readable`.
fn keep_offered(
    headers: &mut HeaderMap,
    name: header::HeaderName,
    readable: &[&str],
) -> Result<(), Box<Status>> {
    let offered = header_list(headers, &name);
    let kept: Vec<&str> = offered
        .iter()
        .map(String::as_str)
        .filter(|p| readable.contains(p))
        .collect();
    if kept.is_empty() {
        return Err(Box::new(Status::bad_request(format!(
            "chaperone masks exec and attach output and reads the remote command protocols \
             ({}); the request offered {offered:?}. Use kubectl or client-go, which offer them",
            readable.join(", ")
        ))));
    }
    let kept = HeaderValue::from_str(&kept.join(", ")).expect("protocol names are header-safe");
    headers.remove(&name);
    headers.insert(name, kept);
    Ok(())
}

/// Prepares the upgrade request of an exec/attach whose output chaperone
/// must mask: keeps only the protocols chaperone reads (WebSocket: the
/// binary channel subprotocols and no extensions; SPDY/3.1: the remote
/// command protocols). `Err`: the request cannot be served masked (another
/// upgrade, or only protocols chaperone does not read), answer the
/// `Status`.
pub fn negotiate(headers: &mut HeaderMap) -> Result<(), Box<Status>> {
    if !headers.contains_key(header::UPGRADE) {
        return Ok(());
    }
    if is_websocket(headers) {
        keep_offered(
            headers,
            header::SEC_WEBSOCKET_PROTOCOL,
            websocket::CHANNEL_PROTOCOLS,
        )?;
        headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
        return Ok(());
    }
    if is_spdy(headers) {
        let name = header::HeaderName::from_static("x-stream-protocol-version");
        // No offer at all: the oldest protocol, `channel.k8s.io`, implied.
        if headers.contains_key(&name) {
            keep_offered(headers, name, spdy::REMOTE_COMMAND_PROTOCOLS)?;
        }
        return Ok(());
    }
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Err(Box::new(Status::bad_request(format!(
        "chaperone masks exec and attach output and reads it over WebSocket \
         (v5.channel.k8s.io or v4.channel.k8s.io) or SPDY/3.1; this request asked for \
         {upgrade:?}. Use kubectl or a client-go based client"
    ))))
}

/// The protocol a `101` response chose, if it is one chaperone reads.
pub fn chosen_protocol(headers: &HeaderMap) -> Option<&'static str> {
    let (name, readable) = if is_websocket(headers) {
        (header::SEC_WEBSOCKET_PROTOCOL, websocket::CHANNEL_PROTOCOLS)
    } else if is_spdy(headers) {
        let name = header::HeaderName::from_static("x-stream-protocol-version");
        if !headers.contains_key(&name) {
            // The kubelet names no protocol for the oldest one.
            return Some("channel.k8s.io");
        }
        (name, spdy::REMOTE_COMMAND_PROTOCOLS)
    } else {
        return None;
    };
    let chosen = headers.get(name)?.to_str().ok()?.trim();
    readable
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
    if chosen_protocol(response).is_none() {
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
    if is_spdy(response) {
        return Box::new(SpdyTap::new(masker, mask, record, masked).on_closed(on_closed));
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
    fn spdy_offers_keep_the_remote_command_protocols_and_other_upgrades_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        // kubectl sends one header line per protocol.
        for p in [
            "v5.channel.k8s.io",
            "v4.channel.k8s.io",
            "x.example.com",
            "channel.k8s.io",
        ] {
            headers.append("x-stream-protocol-version", HeaderValue::from_static(p));
        }
        negotiate(&mut headers).unwrap();
        assert_eq!(
            headers.get("x-stream-protocol-version").unwrap(),
            "v5.channel.k8s.io, v4.channel.k8s.io, channel.k8s.io"
        );
        headers.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static("portforward.k8s.io"),
        );
        assert_eq!(negotiate(&mut headers).unwrap_err().code, 400);

        // What the API server answers: read when it chose one of them.
        let mut response = HeaderMap::new();
        response.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        response.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        assert_eq!(chosen_protocol(&response), Some("v4.channel.k8s.io"));
        response.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static("v9.example"),
        );
        assert_eq!(chosen_protocol(&response), None);

        // Neither WebSocket nor SPDY: refused, naming what works.
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        let status = negotiate(&mut headers).unwrap_err();
        assert!(status.message.contains("SPDY/3.1"), "{}", status.message);
        // Not an upgrade: nothing to do.
        assert!(negotiate(&mut HeaderMap::new()).is_ok());
    }

    /// A watch or log over WebSocket is refused where masking or body
    /// recording applies; exec, attach and port-forward go on to their
    /// taps, plain HTTP is never refused here.
    #[test]
    fn unread_upgrades_are_refused_where_masking_or_recording_applies() {
        let parse = |url: &str| {
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            RequestInfo::parse(&http::Method::GET, path, Some(query))
        };
        let mut websocket = HeaderMap::new();
        websocket.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        websocket.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        websocket.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("base64.channel.k8s.io"),
        );
        let watch = parse("/api/v1/namespaces/a/secrets?watch=true");
        let status = refuse_unread_upgrade(&watch, &websocket, true, false).unwrap_err();
        assert_eq!(status.code, 400);
        assert!(
            status.message.contains("a watch on secrets must be masked"),
            "{}",
            status.message
        );
        assert!(
            status.message.contains("?watch=true without Upgrade"),
            "{}",
            status.message
        );
        let log = parse("/api/v1/namespaces/a/pods/p/log?follow=true");
        let status = refuse_unread_upgrade(&log, &websocket, false, true).unwrap_err();
        assert!(
            status
                .message
                .contains("a log on pods/log must be recorded"),
            "{}",
            status.message
        );
        // Nothing to mask or record: tunneled as before.
        assert!(refuse_unread_upgrade(&watch, &websocket, false, false).is_ok());
        // Plain HTTP: masked by the body transform, never refused here.
        assert!(refuse_unread_upgrade(&watch, &HeaderMap::new(), true, true).is_ok());
        for url in [
            "/api/v1/namespaces/a/pods/p/exec?command=sh",
            "/api/v1/namespaces/a/pods/p/attach",
            "/api/v1/namespaces/a/pods/p/portforward",
        ] {
            assert!(
                refuse_unread_upgrade(&parse(url), &websocket, true, true).is_ok(),
                "{url}"
            );
        }
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

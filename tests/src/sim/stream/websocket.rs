//! Remote commands over WebSocket: the Kubernetes channel protocols
//! `v5.channel.k8s.io` and `v4.channel.k8s.io` (binary messages whose first
//! byte is the channel) and their `base64` variants (text messages, channel
//! as an ASCII digit, payload base64). Channels: 0 stdin, 1 stdout,
//! 2 stderr, 3 error (the exit Status), 4 resize; v5 adds the message
//! `[255, channel]` that closes a channel (the client's stdin end-of-file).

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};

use super::process::Command;

pub const V5: &str = "v5.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";
pub const V5_BASE64: &str = "v5.base64.channel.k8s.io";
pub const V4_BASE64: &str = "v4.base64.channel.k8s.io";
/// The remote-command subprotocols, in no particular order: the client's
/// order of preference decides.
pub const REMOTE_COMMAND: &[&str] = &[V5, V4, V5_BASE64, V4_BASE64];
/// Port-forward tunneled over WebSocket: SPDY/3.1 frames inside binary
/// messages (kubectl 1.31+ tries it first).
pub const PORT_FORWARD_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// How long to wait for the client's half of the closing handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// `true` for `Upgrade: websocket` requests.
pub fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    header_has(req, http::header::UPGRADE, "websocket")
}

/// The first subprotocol the client offered that is in `supported`.
pub fn choose<B>(req: &http::Request<B>, supported: &[&'static str]) -> Option<&'static str> {
    req.headers()
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|offered| supported.iter().copied().find(|s| *s == offered))
}

/// The `101 Switching Protocols` answer, or `None` without a key.
pub fn accept<B>(req: &http::Request<B>, protocol: &str) -> Option<http::response::Builder> {
    let key = req.headers().get(http::header::SEC_WEBSOCKET_KEY)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Some(
        http::Response::builder()
            .status(http::StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::SEC_WEBSOCKET_ACCEPT, accept)
            .header(http::header::SEC_WEBSOCKET_PROTOCOL, protocol),
    )
}

fn header_has<B>(req: &http::Request<B>, name: http::header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

pub async fn server(upgraded: Upgraded) -> WebSocketStream<TokioIo<Upgraded>> {
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await
}

/// Framing of one negotiated channel protocol.
#[derive(Clone, Copy, Debug)]
struct Channels {
    base64: bool,
    /// v5: the client may close its stdin with `[255, 0]`.
    close: bool,
}

impl Channels {
    fn new(protocol: &str) -> Self {
        Channels {
            base64: protocol.contains(".base64."),
            close: protocol.starts_with("v5."),
        }
    }

    fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            text.push((b'0' + channel) as char);
            STANDARD.encode_string(data, &mut text);
            Message::text(text)
        } else {
            let mut frame = Vec::with_capacity(1 + data.len());
            frame.push(channel);
            frame.extend_from_slice(data);
            Message::binary(frame)
        }
    }

    /// `(channel, payload)` of a client message; `None` for what carries no
    /// channel data (pings, empty or undecodable messages).
    fn decode(self, message: &Message) -> Option<(u8, Bytes)> {
        match message {
            Message::Binary(data) if !data.is_empty() => {
                if self.base64 && data[0] != CLOSE {
                    let channel = data[0].wrapping_sub(b'0');
                    let payload = STANDARD.decode(&data[1..]).ok()?;
                    return Some((channel, Bytes::from(payload)));
                }
                Some((data[0], data.slice(1..)))
            }
            Message::Text(text) if self.base64 && !text.is_empty() => {
                let bytes = text.as_bytes();
                let channel = bytes[0].wrapping_sub(b'0');
                let payload = STANDARD.decode(&bytes[1..]).ok()?;
                Some((channel, Bytes::from(payload)))
            }
            _ => None,
        }
    }
}

/// Runs `command` for a client that negotiated `protocol`, until the process
/// has exited and its status is sent, or the client has gone away.
pub async fn remote_command(
    mut ws: WebSocketStream<TokioIo<Upgraded>>,
    protocol: &'static str,
    command: Command,
) {
    let channels = Channels::new(protocol);
    let (mut process, ends) = command.start();
    let mut stdin = ends.stdin;
    let mut stdout = ends.stdout;
    let mut stderr = ends.stderr;

    // Like the API server: an empty message on the lowest writable channel
    // tells the client the streams are ready.
    let first = if stdout.is_some() {
        STDOUT
    } else if stderr.is_some() {
        STDERR
    } else {
        ERROR
    };
    if ws.send(channels.encode(first, &[])).await.is_err() {
        return;
    }
    let (mut sink, mut source) = ws.split();

    let reader = async {
        while let Some(Ok(message)) = source.next().await {
            if message.is_close() {
                break;
            }
            let Some((channel, payload)) = channels.decode(&message) else {
                continue;
            };
            match channel {
                STDIN => {
                    if let Some(tx) = &stdin
                        && !payload.is_empty()
                        && tx.send(payload).await.is_err()
                    {
                        stdin = None;
                    }
                }
                CLOSE if channels.close && payload.first() == Some(&STDIN) => stdin = None,
                RESIZE => {
                    // The terminal size changes nothing in this simulator.
                }
                _ => {}
            }
        }
    };
    let writer = async {
        loop {
            let (channel, chunk) = tokio::select! {
                Some(chunk) = recv(&mut stdout) => (STDOUT, chunk),
                Some(chunk) = recv(&mut stderr) => (STDERR, chunk),
                else => break,
            };
            if sink.send(channels.encode(channel, &chunk)).await.is_err() {
                return false;
            }
        }
        let status = command.status((&mut process.0).await);
        let _ = sink.send(channels.encode(ERROR, status.as_bytes())).await;
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        true
    };
    let finished = tokio::select! {
        () = reader => false,
        finished = writer => finished,
    };
    if finished {
        // The client answers our close; wait for it briefly so nothing it
        // sent resets the connection under the status we wrote.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(_)) = source.next().await {}
        })
        .await;
    }
}

/// Receives from an optional pipe; a finished pipe becomes `None`.
async fn recv(pipe: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    let rx = pipe.as_mut()?;
    let chunk = rx.recv().await;
    if chunk.is_none() {
        *pipe = None;
    }
    chunk
}

/// A WebSocket as a byte stream: binary messages in, one binary message per
/// write out. This is how kubectl tunnels SPDY port-forwarding through a
/// WebSocket (`SPDY/3.1+portforward.k8s.io`).
pub struct ByteStream {
    ws: WebSocketStream<TokioIo<Upgraded>>,
    unread: Bytes,
    closed: bool,
}

impl ByteStream {
    pub fn new(ws: WebSocketStream<TokioIo<Upgraded>>) -> Self {
        ByteStream {
            ws,
            unread: Bytes::new(),
            closed: false,
        }
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl tokio::io::AsyncRead for ByteStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.unread.is_empty() {
                let n = self.unread.len().min(buf.remaining());
                let chunk = self.unread.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(data))) => self.unread = data,
                Some(Ok(Message::Close(_))) | None => self.closed = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl tokio::io::AsyncWrite for ByteStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.ws.poll_ready_unpin(cx)).map_err(ws_error)?;
        self.ws
            .start_send_unpin(Message::binary(buf.to_vec()))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ws.poll_flush_unpin(cx).map_err(ws_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ws.poll_close_unpin(cx).map_err(ws_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_framing_binary_and_base64() {
        let v5 = Channels::new(V5);
        assert_eq!(v5.encode(1, b"hi"), Message::binary(vec![1, b'h', b'i']));
        assert_eq!(
            v5.decode(&Message::binary(vec![0, b'x'])),
            Some((0, Bytes::from_static(b"x")))
        );
        assert_eq!(
            v5.decode(&Message::binary(vec![255, 0])),
            Some((255, Bytes::from_static(&[0])))
        );
        let b64 = Channels::new(V4_BASE64);
        assert!(!b64.close);
        assert_eq!(b64.encode(2, b"hi"), Message::text("2aGk="));
        assert_eq!(
            b64.decode(&Message::text("0aGk=")),
            Some((0, Bytes::from_static(b"hi")))
        );
    }
}

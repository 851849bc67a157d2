//! Exec and attach over SPDY: the kubelet's remotecommand protocol v4
//! (`v4.channel.k8s.io`). The client opens one stream per pipe, named by the
//! `streamType` header (`error`, `stdin`, `stdout`, `stderr`, `resize`); the
//! process starts once all the expected streams exist; its exit Status goes
//! on the error stream, after stdout and stderr have been half-closed.
//!
//! kubectl also offers `v5.channel.k8s.io` over SPDY; a kubelet does not
//! speak v5 over SPDY (v5 exists for WebSocket's missing half-close), so
//! neither does this simulator, and kubectl settles on v4.

use std::{collections::VecDeque, time::Duration};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    process::Command,
    spdy::{self, Event, Session, frame::rst},
};

pub const V4: &str = "v4.channel.k8s.io";
/// What this side negotiates over SPDY.
pub const PROTOCOLS: &[&str] = &[V4];

/// How long the kubelet waits for the client to open all its streams.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve<IO: AsyncRead + AsyncWrite>(io: IO, command: Command) {
    spdy::serve(io, move |session| run(session, command)).await;
}

/// The streams of one remote command, by the client's stream ids.
#[derive(Debug, Default)]
struct Streams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl Streams {
    fn complete(&self, command: &Command) -> bool {
        let p = command.pipes;
        self.error.is_some()
            && (!p.stdin || self.stdin.is_some())
            && (!p.stdout || self.stdout.is_some())
            && (!p.stderr || p.tty || self.stderr.is_some())
            && (!p.tty || self.resize.is_some())
    }
}

async fn run(mut session: Session, command: Command) {
    let sender = session.sender.clone();
    let mut streams = Streams::default();
    // Data that arrives before every stream exists waits here.
    let mut early: VecDeque<Event> = VecDeque::new();
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !streams.complete(&command) {
        let event = match tokio::time::timeout_at(deadline, session.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(_timeout) => {
                if let Some(error) = streams.error {
                    let status = super::status::internal_error(
                        "timed out waiting for client to create streams",
                    );
                    let _ = sender.data(error, Bytes::from(status)).await;
                    let _ = sender.fin(error).await;
                }
                return;
            }
        };
        match event {
            Event::Open {
                stream,
                headers,
                fin,
            } => {
                if fin {
                    // Opened and closed at once: an empty stdin.
                    early.push_back(Event::Data {
                        stream,
                        data: Bytes::new(),
                        fin,
                    });
                }
                let slot = match spdy::header(&headers, "streamType") {
                    Some("error") => &mut streams.error,
                    Some("stdin") => &mut streams.stdin,
                    Some("stdout") => &mut streams.stdout,
                    Some("stderr") => &mut streams.stderr,
                    Some("resize") => &mut streams.resize,
                    _ => {
                        let _ = sender.reset(stream, rst::PROTOCOL_ERROR).await;
                        continue;
                    }
                };
                *slot = Some(stream);
                if sender.reply(stream).await.is_err() {
                    return;
                }
            }
            other => early.push_back(other),
        }
    }

    let (mut process, ends) = command.start();
    let mut stdin = ends.stdin;
    let mut stdout = ends.stdout;
    let mut stderr = ends.stderr;

    let reader = async {
        loop {
            let event = match early.pop_front() {
                Some(event) => event,
                None => match session.events.recv().await {
                    Some(event) => event,
                    None => return,
                },
            };
            match event {
                Event::Data { stream, data, fin } => {
                    let n = data.len();
                    if Some(stream) == streams.stdin {
                        if let Some(tx) = &stdin
                            && !data.is_empty()
                            && tx.send(data).await.is_err()
                        {
                            stdin = None;
                        }
                        if fin {
                            stdin = None;
                        }
                    }
                    // Resize messages change nothing here; error is unused
                    // by the client. Either way the window is granted back.
                    let _ = sender.consumed(stream, n).await;
                }
                Event::Reset { stream } if Some(stream) == streams.stdin => stdin = None,
                Event::Open { stream, .. } => {
                    let _ = sender.reset(stream, rst::REFUSED_STREAM).await;
                }
                Event::Reset { .. } => {}
            }
        }
    };
    let writer = async {
        loop {
            let (stream, chunk) = tokio::select! {
                Some(chunk) = recv(&mut stdout) => (streams.stdout, chunk),
                Some(chunk) = recv(&mut stderr) => (streams.stderr, chunk),
                else => break,
            };
            if let Some(stream) = stream
                && sender.data(stream, chunk).await.is_err()
            {
                return;
            }
        }
        let status = command.status((&mut process.0).await);
        for stream in [streams.stdout, streams.stderr].into_iter().flatten() {
            let _ = sender.fin(stream).await;
        }
        if let Some(error) = streams.error {
            let _ = sender.data(error, Bytes::from(status)).await;
            let _ = sender.fin(error).await;
        }
        for stream in [streams.stdin, streams.resize].into_iter().flatten() {
            let _ = sender.fin(stream).await;
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
}

async fn recv(pipe: &mut Option<tokio::sync::mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    let rx = pipe.as_mut()?;
    let chunk = rx.recv().await;
    if chunk.is_none() {
        *pipe = None;
    }
    chunk
}

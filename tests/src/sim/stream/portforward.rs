//! Port-forward: the kubelet's `portforward.k8s.io` protocol over SPDY. Per
//! forwarded connection the client opens an `error` and a `data` stream with
//! the same `requestID` and the pod `port`; the data stream carries the TCP
//! bytes both ways (FIN is a half-close), the error stream any failure text.
//! kubectl 1.31+ first tries the same SPDY session tunneled in WebSocket
//! binary messages (`SPDY/3.1+portforward.k8s.io`), which
//! [`super::websocket::ByteStream`] unwraps into a byte stream for this module.

use std::{collections::HashMap, net::SocketAddr};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::{AbortHandle, JoinSet},
};

use super::{
    StreamTarget,
    spdy::{self, Event, Sender, Session, frame::rst},
};

pub const PROTOCOL: &str = "portforward.k8s.io";

pub async fn serve<IO: AsyncRead + AsyncWrite>(io: IO, target: StreamTarget) {
    spdy::serve(io, move |session| run(session, target)).await;
}

/// Half of a forwarded connection, waiting for its other half.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<u32>,
    port: u16,
}

/// A running forward: where client bytes go, and how to stop it.
struct Forward {
    to_pod: Option<mpsc::Sender<Bytes>>,
    task: AbortHandle,
}

async fn run(mut session: Session, target: StreamTarget) {
    let sender = session.sender.clone();
    let mut pending: HashMap<String, Pair> = HashMap::new();
    let mut forwards: HashMap<u32, Forward> = HashMap::new();
    // Dropped with this function: a vanished client stops every forward.
    let mut tasks = JoinSet::new();
    while let Some(event) = session.events.recv().await {
        match event {
            Event::Open {
                stream, headers, ..
            } => {
                let kind = spdy::header(&headers, "streamType").unwrap_or_default();
                let port = spdy::header(&headers, "port").and_then(|p| p.parse::<u16>().ok());
                let (Some(port), "error" | "data") = (port, kind) else {
                    let _ = sender.reset(stream, rst::PROTOCOL_ERROR).await;
                    continue;
                };
                let request = spdy::header(&headers, "requestID")
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        // Clients older than requestID: error stream first,
                        // then its data stream two ids later.
                        let base = if kind == "data" { stream - 2 } else { stream };
                        base.to_string()
                    });
                if sender.reply(stream).await.is_err() {
                    return;
                }
                let pair = pending.entry(request.clone()).or_default();
                pair.port = port;
                if kind == "error" {
                    pair.error = Some(stream);
                } else {
                    pair.data = Some(stream);
                }
                if let Pair {
                    error: Some(error),
                    data: Some(data),
                    port,
                } = *pair
                {
                    pending.remove(&request);
                    let (tx, rx) = mpsc::channel(16);
                    let live = target.live.enter();
                    let forwarding = forward(
                        target.ports.get(&port).copied(),
                        port,
                        target.pod.clone(),
                        sender.clone(),
                        error,
                        data,
                        rx,
                    );
                    let task = tasks.spawn(async move {
                        let _live = live;
                        forwarding.await
                    });
                    forwards.insert(
                        data,
                        Forward {
                            to_pod: Some(tx),
                            task,
                        },
                    );
                }
            }
            Event::Data { stream, data, fin } => {
                let n = data.len();
                if let Some(forward) = forwards.get_mut(&stream) {
                    if let Some(tx) = &forward.to_pod
                        && !data.is_empty()
                        && tx.send(data).await.is_err()
                    {
                        forward.to_pod = None;
                    }
                    if fin {
                        forward.to_pod = None;
                    }
                }
                let _ = sender.consumed(stream, n).await;
            }
            Event::Reset { stream } => {
                if let Some(forward) = forwards.remove(&stream) {
                    forward.task.abort();
                }
            }
        }
        // Forget finished forwards.
        while tasks.try_join_next().is_some() {}
        forwards.retain(|_, f| !f.task.is_finished());
    }
}

/// One forwarded connection: the pod's port (really `addr` on this machine)
/// to and from the data stream.
async fn forward(
    addr: Option<SocketAddr>,
    port: u16,
    pod: String,
    sender: Sender,
    error: u32,
    data: u32,
    mut from_client: mpsc::Receiver<Bytes>,
) {
    let connected = match addr {
        Some(addr) => TcpStream::connect(addr).await.map_err(|e| e.to_string()),
        None => Err(format!(
            "dial tcp4 127.0.0.1:{port}: connect: connection refused"
        )),
    };
    let tcp = match connected {
        Ok(tcp) => tcp,
        Err(e) => {
            let message = format!(
                "error forwarding port {port} to pod {pod}, uid : failed to connect to localhost:{port} inside namespace \"{pod}\", IPv4: {e} "
            );
            let _ = sender.data(error, Bytes::from(message)).await;
            let _ = sender.fin(error).await;
            let _ = sender.fin(data).await;
            return;
        }
    };
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let upstream = async {
        while let Some(chunk) = from_client.recv().await {
            if to_pod.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to_pod.shutdown().await;
    };
    let downstream = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sender
                        .data(data, Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sender.fin(data).await;
    };
    tokio::join!(upstream, downstream);
    let _ = sender.fin(error).await;
}

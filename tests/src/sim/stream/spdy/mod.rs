//! SPDY/3.1 as Kubernetes uses it (`Upgrade: SPDY/3.1`, the client opens
//! every stream): the upgrade, and a server session that turns frames into
//! [`Event`]s for a protocol handler and sends what the handler asks for.
//!
//! Flow control: this side grants its receive window back with
//! WINDOW_UPDATE (per stream and, as SPDY/3.1 adds, for the session) as the
//! handler consumes data. It honours the peer's windows once the peer shows
//! that it does flow control (it sends a WINDOW_UPDATE or a SETTINGS
//! initial window size): Go's spdystream, under every kubectl and kubelet,
//! never does and never grants windows, so enforcing a 64 KiB window against
//! it from the start would stall every large output.

use std::{
    collections::HashMap,
    future::Future,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    sync::{Notify, mpsc},
};

use super::Body;

pub mod dictionary;
pub mod frame;

pub use frame::{Frame, Headers, header};

/// The upgrade token.
pub const UPGRADE: &str = "SPDY/3.1";
/// The header that carries the offered and chosen sub-protocols.
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
/// SPDY/3's initial window, per stream and for the session.
pub const INITIAL_WINDOW: i64 = 64 * 1024;
/// Largest DATA frame this side sends.
const MAX_DATA: usize = 32 * 1024;
/// How long to wait for the client to close after the last frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// `true` for `Upgrade: SPDY/3.1` requests.
pub fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(UPGRADE))
}

/// The protocols the client offers, in its order.
fn offered<B>(req: &http::Request<B>) -> Vec<String> {
    req.headers()
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The `101 Switching Protocols` answer with the first offered protocol in
/// `supported`, or `None` when there is none in common.
pub fn accept<B>(
    req: &http::Request<B>,
    supported: &[&'static str],
) -> Option<http::response::Builder> {
    let chosen = offered(req)
        .into_iter()
        .find_map(|o| supported.iter().copied().find(|s| *s == o))?;
    Some(
        http::Response::builder()
            .status(http::StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, UPGRADE)
            .header(PROTOCOL_HEADER, chosen),
    )
}

/// The kubelet's answer when no protocol is in common.
pub fn refuse<B>(req: &http::Request<B>, supported: &[&'static str]) -> http::Response<Body> {
    let message = format!(
        "unable to upgrade: unable to negotiate protocol: client supports {:?}, server accepts {:?}",
        offered(req),
        supported
    );
    super::status_response(403, "Forbidden", &message)
}

// === session ===

/// What the client did, for the protocol handler.
#[derive(Debug)]
pub enum Event {
    /// SYN_STREAM: the handler answers with [`Sender::reply`] (or a reset).
    Open {
        stream: u32,
        headers: Headers,
        fin: bool,
    },
    /// DATA; `fin` is the client's half-close of the stream.
    Data { stream: u32, data: Bytes, fin: bool },
    /// RST_STREAM: the client abandoned the stream.
    Reset { stream: u32 },
}

/// The handler's side of a session.
pub struct Session {
    /// Ends when the client has closed the connection.
    pub events: mpsc::Receiver<Event>,
    pub sender: Sender,
}

enum Out {
    Frame(Frame),
    /// The handler is done: GOAWAY, flush, and wait for the client to close.
    Finish,
}

/// Sends frames on the session; cheap to clone.
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::Sender<Out>,
    flow: Arc<Flow>,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "SPDY connection closed")
}

impl Sender {
    async fn frame(&self, frame: Frame) -> io::Result<()> {
        self.tx.send(Out::Frame(frame)).await.map_err(|_| gone())
    }

    /// Accepts a stream the client opened (SYN_REPLY without headers).
    pub async fn reply(&self, stream: u32) -> io::Result<()> {
        self.frame(Frame::SynReply {
            stream,
            flags: 0,
            headers: Vec::new(),
        })
        .await
    }

    /// Sends `data` on `stream`, in frames the peer's windows allow.
    pub async fn data(&self, stream: u32, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.flow.acquire(stream, data.len().min(MAX_DATA)).await;
            let chunk = data.split_to(n);
            self.frame(Frame::Data {
                stream,
                flags: 0,
                data: chunk,
            })
            .await?;
        }
        Ok(())
    }

    /// Half-closes this side of `stream` (an empty DATA frame with FIN).
    pub async fn fin(&self, stream: u32) -> io::Result<()> {
        self.frame(Frame::Data {
            stream,
            flags: frame::FLAG_FIN,
            data: Bytes::new(),
        })
        .await
    }

    pub async fn reset(&self, stream: u32, status: u32) -> io::Result<()> {
        self.frame(Frame::RstStream { stream, status }).await
    }

    /// The handler has taken `n` bytes of `stream`: grant them back to the
    /// client, for the stream and for the session.
    pub async fn consumed(&self, stream: u32, n: usize) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let delta = n as u32;
        self.frame(Frame::WindowUpdate { stream, delta }).await?;
        self.frame(Frame::WindowUpdate { stream: 0, delta }).await
    }
}

/// The peer's receive windows, as far as this side may send.
#[derive(Default)]
struct Flow {
    state: Mutex<FlowState>,
    changed: Notify,
}

struct FlowState {
    /// Whether the peer showed that it does flow control.
    enforced: bool,
    initial: i64,
    session: i64,
    streams: HashMap<u32, i64>,
    /// Highest stream id the client opened (for GOAWAY).
    last_stream: u32,
}

impl Default for FlowState {
    fn default() -> Self {
        FlowState {
            enforced: false,
            initial: INITIAL_WINDOW,
            session: INITIAL_WINDOW,
            streams: HashMap::new(),
            last_stream: 0,
        }
    }
}

impl Flow {
    /// Takes up to `want` bytes of window for `stream`, waiting while the
    /// window is closed.
    async fn acquire(&self, stream: u32, want: usize) -> usize {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.state.lock().expect("flow state");
                if !state.enforced {
                    return want;
                }
                let initial = state.initial;
                let session = state.session;
                let window = state.streams.entry(stream).or_insert(initial);
                let available = session.min(*window);
                if available > 0 {
                    let n = (available as usize).min(want);
                    *window -= n as i64;
                    state.session -= n as i64;
                    return n;
                }
            }
            changed.await;
        }
    }

    fn window_update(&self, stream: u32, delta: u32) {
        let mut state = self.state.lock().expect("flow state");
        state.enforced = true;
        if stream == 0 {
            state.session += i64::from(delta);
        } else {
            let initial = state.initial;
            *state.streams.entry(stream).or_insert(initial) += i64::from(delta);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    fn initial_window(&self, size: u32) {
        let mut state = self.state.lock().expect("flow state");
        state.enforced = true;
        let delta = i64::from(size) - state.initial;
        state.initial = i64::from(size);
        for window in state.streams.values_mut() {
            *window += delta;
        }
        drop(state);
        self.changed.notify_waiters();
    }

    fn opened(&self, stream: u32) {
        let mut state = self.state.lock().expect("flow state");
        state.last_stream = state.last_stream.max(stream);
    }

    fn last_stream(&self) -> u32 {
        self.state.lock().expect("flow state").last_stream
    }
}

/// Serves one SPDY connection: `handler` gets the session's events and
/// sender; the connection ends when the handler is done (after a GOAWAY and
/// the client's close) or as soon as the client closes it.
pub async fn serve<IO, H, F>(io: IO, handler: H)
where
    IO: AsyncRead + AsyncWrite,
    H: FnOnce(Session) -> F,
    F: Future<Output = ()>,
{
    let (read, write) = tokio::io::split(io);
    let (event_tx, event_rx) = mpsc::channel(32);
    let (out_tx, out_rx) = mpsc::channel(64);
    let flow = Arc::new(Flow::default());
    let sender = Sender {
        tx: out_tx,
        flow: flow.clone(),
    };
    let reader = read_frames(read, event_tx, sender.clone());
    let writer = write_frames(write, out_rx, flow);
    let finish = sender.tx.clone();
    let handler = async move {
        handler(Session {
            events: event_rx,
            sender,
        })
        .await;
        let _ = finish.send(Out::Finish).await;
    };
    tokio::pin!(reader, writer, handler);
    let mut handler_done = false;
    loop {
        tokio::select! {
            _ = &mut reader => return,
            () = &mut handler, if !handler_done => handler_done = true,
            _ = &mut writer => break,
        }
    }
    // Everything is written: wait for the client to close, so that closing
    // first cannot cut off frames it has not processed yet.
    let _ = tokio::time::timeout(CLOSE_GRACE, reader).await;
}

async fn read_frames<R: AsyncRead + Unpin>(
    read: R,
    events: mpsc::Sender<Event>,
    sender: Sender,
) -> io::Result<()> {
    let mut decoder = frame::Decoder::new(BufReader::new(read));
    while let Some(frame) = decoder.read().await? {
        // Once the handler is done nobody listens: keep reading anyway.
        let event = match frame {
            Frame::SynStream {
                stream,
                flags,
                headers,
                ..
            } => {
                sender.flow.opened(stream);
                Event::Open {
                    stream,
                    headers,
                    fin: flags & frame::FLAG_FIN != 0,
                }
            }
            Frame::Data {
                stream,
                flags,
                data,
            } => Event::Data {
                stream,
                data,
                fin: flags & frame::FLAG_FIN != 0,
            },
            Frame::RstStream { stream, .. } => Event::Reset { stream },
            Frame::Settings { entries, .. } => {
                for (_, id, value) in entries {
                    if id == frame::SETTINGS_INITIAL_WINDOW_SIZE {
                        sender.flow.initial_window(value);
                    }
                }
                continue;
            }
            Frame::WindowUpdate { stream, delta } => {
                sender.flow.window_update(stream, delta);
                continue;
            }
            Frame::Ping { id } => {
                // Answer the client's pings (odd ids); ours would be even.
                if id % 2 == 1 {
                    let _ = sender.frame(Frame::Ping { id }).await;
                }
                continue;
            }
            Frame::GoAway { .. }
            | Frame::SynReply { .. }
            | Frame::Headers { .. }
            | Frame::Unknown { .. } => continue,
        };
        let _ = events.send(event).await;
    }
    Ok(())
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut write: W,
    mut out: mpsc::Receiver<Out>,
    flow: Arc<Flow>,
) -> io::Result<()> {
    let mut encoder = frame::Encoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(item) = out.recv().await {
        match item {
            Out::Frame(frame) => encoder.encode(&frame, &mut buf),
            Out::Finish => {
                let last_good = flow.last_stream();
                encoder.encode(
                    &Frame::GoAway {
                        last_good,
                        status: 0,
                    },
                    &mut buf,
                );
                write.write_all(&buf).await?;
                write.flush().await?;
                return Ok(());
            }
        }
        if buf.len() >= 64 * 1024 || out.is_empty() {
            write.write_all(&buf).await?;
            buf.clear();
            write.flush().await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use frame::{Decoder, Encoder, FLAG_FIN, SETTINGS_INITIAL_WINDOW_SIZE};

    /// A test client: writes frames, and reads the server's frames on a task
    /// of its own so a timed-out wait never cuts a frame in half.
    struct Client {
        write: tokio::io::WriteHalf<tokio::io::DuplexStream>,
        encoder: Encoder,
        frames: mpsc::UnboundedReceiver<Frame>,
    }

    impl Client {
        fn start<H, F>(handler: H) -> Client
        where
            H: FnOnce(Session) -> F + Send + 'static,
            F: Future<Output = ()> + Send + 'static,
        {
            let (client, server) = tokio::io::duplex(1 << 20);
            tokio::spawn(serve(server, handler));
            let (read, write) = tokio::io::split(client);
            let (tx, frames) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut decoder = Decoder::new(read);
                while let Ok(Some(frame)) = decoder.read().await {
                    if tx.send(frame).is_err() {
                        return;
                    }
                }
            });
            Client {
                write,
                encoder: Encoder::new(),
                frames,
            }
        }

        async fn send(&mut self, frame: Frame) {
            let mut buf = BytesMut::new();
            self.encoder.encode(&frame, &mut buf);
            self.write.write_all(&buf).await.unwrap();
        }

        async fn next(&mut self) -> Option<Frame> {
            tokio::time::timeout(Duration::from_millis(300), self.frames.recv())
                .await
                .ok()
                .flatten()
        }

        /// Data bytes on `stream` until nothing more comes (or FIN).
        async fn drain_data(&mut self, stream: u32) -> (usize, bool) {
            let mut total = 0;
            while let Some(frame) = self.next().await {
                if let Frame::Data {
                    stream: s,
                    flags,
                    data,
                } = frame
                {
                    assert_eq!(s, stream);
                    total += data.len();
                    if flags & FLAG_FIN != 0 {
                        return (total, true);
                    }
                }
            }
            (total, false)
        }
    }

    fn open(stream: u32) -> Frame {
        Frame::SynStream {
            stream,
            associated: 0,
            priority: 0,
            flags: 0,
            headers: vec![("streamtype".into(), "stdout".into())],
        }
    }

    /// Answers the first stream and sends it `len` bytes, then FIN.
    fn sends(
        len: usize,
    ) -> impl FnOnce(Session) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        move |mut session: Session| {
            Box::pin(async move {
                let Some(Event::Open { stream, .. }) = session.events.recv().await else {
                    panic!("expected a stream");
                };
                session.sender.reply(stream).await.unwrap();
                session
                    .sender
                    .data(stream, Bytes::from(vec![7u8; len]))
                    .await
                    .unwrap();
                session.sender.fin(stream).await.unwrap();
                // Stay until the client is gone.
                while session.events.recv().await.is_some() {}
            })
        }
    }

    #[tokio::test]
    async fn a_peer_without_flow_control_gets_everything_at_once() {
        let mut client = Client::start(sends(200_000));
        client.send(open(1)).await;
        assert!(matches!(
            client.next().await,
            Some(Frame::SynReply { stream: 1, .. })
        ));
        assert_eq!(client.drain_data(1).await, (200_000, true));
    }

    #[tokio::test]
    async fn a_flow_controlled_peer_gets_no_more_than_its_windows() {
        let mut client = Client::start(sends(200_000));
        client
            .send(Frame::Settings {
                flags: 0,
                entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 65_536)],
            })
            .await;
        client.send(open(1)).await;
        assert!(matches!(
            client.next().await,
            Some(Frame::SynReply { stream: 1, .. })
        ));
        // The stream and the session windows are both 64 KiB.
        assert_eq!(client.drain_data(1).await, (65_536, false));
        // A bigger stream window alone does not help: the session is empty.
        client
            .send(Frame::WindowUpdate {
                stream: 1,
                delta: 200_000,
            })
            .await;
        assert_eq!(client.drain_data(1).await, (0, false));
        client
            .send(Frame::WindowUpdate {
                stream: 0,
                delta: 50_000,
            })
            .await;
        assert_eq!(client.drain_data(1).await, (50_000, false));
        client
            .send(Frame::WindowUpdate {
                stream: 0,
                delta: 1 << 20,
            })
            .await;
        assert_eq!(client.drain_data(1).await, (200_000 - 115_536, true));
    }

    #[tokio::test]
    async fn consumed_data_is_granted_back_and_pings_answered() {
        let mut client = Client::start(|mut session: Session| async move {
            while let Some(event) = session.events.recv().await {
                match event {
                    Event::Open { stream, .. } => session.sender.reply(stream).await.unwrap(),
                    Event::Data { stream, data, .. } => {
                        session.sender.consumed(stream, data.len()).await.unwrap()
                    }
                    Event::Reset { .. } => {}
                }
            }
        });
        client.send(open(1)).await;
        assert!(matches!(
            client.next().await,
            Some(Frame::SynReply { stream: 1, .. })
        ));
        client
            .send(Frame::Data {
                stream: 1,
                flags: 0,
                data: Bytes::from(vec![1u8; 1000]),
            })
            .await;
        assert_eq!(
            client.next().await,
            Some(Frame::WindowUpdate {
                stream: 1,
                delta: 1000
            })
        );
        assert_eq!(
            client.next().await,
            Some(Frame::WindowUpdate {
                stream: 0,
                delta: 1000
            })
        );
        client.send(Frame::Ping { id: 1 }).await;
        assert_eq!(client.next().await, Some(Frame::Ping { id: 1 }));
    }

    #[tokio::test]
    async fn a_finished_handler_says_goaway_with_the_last_stream() {
        let mut client = Client::start(|mut session: Session| async move {
            if let Some(Event::Open { stream, .. }) = session.events.recv().await {
                session.sender.reply(stream).await.unwrap();
            }
        });
        client.send(open(3)).await;
        assert!(matches!(
            client.next().await,
            Some(Frame::SynReply { stream: 3, .. })
        ));
        assert_eq!(
            client.next().await,
            Some(Frame::GoAway {
                last_good: 3,
                status: 0
            })
        );
    }
}

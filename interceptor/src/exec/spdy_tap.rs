//! [`SpdyTap`]: the tunnel tap of one exec/attach over SPDY/3.1.
//!
//! Agent to API server: every frame is forwarded as it came, except
//! WINDOW_UPDATEs while output is masked (below). The agent's header blocks
//! are inflated to learn which stream is which ([`spdy::AgentFrames`]);
//! stdin is recorded (masked for the recording only), resize messages size
//! the cast.
//!
//! API server to agent: control frames and the data of every other stream
//! (error, and anything unknown) are forwarded byte for byte. Data frames
//! of stdout and stderr, when masked, are decoded, masked per line with the
//! same [`Core`] as WebSocket and re-framed: one data frame per masked
//! piece, an empty frame with FIN where the API server's frame had FIN.
//! What masking holds back (a partial line) goes before any frame that must
//! follow it (the error stream's exit status, RST_STREAM, GOAWAY), before
//! the stream's FIN, or after [`super::IDLE_FLUSH`] without more output
//! between frames (never in the middle of one: its rest is on its way).
//!
//! # Flow control
//!
//! SPDY/3.1 windows count DATA payload bytes, per stream and for the
//! session; the receiver grants more with WINDOW_UPDATE. Masking changes
//! how many bytes of stdout/stderr the agent receives (`delivered`) from
//! how many the API server sent (`received`), so without care the two ends
//! would disagree about the agent's window:
//!
//! - masking shrinks output: the agent grants back only what it received,
//!   the API server's window loses the difference every time, and a server
//!   that honours windows stalls for good;
//! - masking grows output (`password=x` becomes
//!   `password=<masked by chaperone: password-assignment>`): the agent
//!   would receive more than it granted.
//!
//! So, per masked stream and for the session:
//!
//! 1. `owed = received - delivered - (already added to grants)`. Every
//!    WINDOW_UPDATE the agent sends for a masked stream or the session is
//!    rewritten to `delta + owed` (dropped while that is not positive, the
//!    shortfall kept in `owed`). The API server's window is then the
//!    agent's, in the API server's bytes. Output chaperone still holds
//!    (a partial line) is granted early, which is bounded by what masking
//!    holds back.
//! 2. Once the agent shows that it does flow control (it sends a
//!    WINDOW_UPDATE or a SETTINGS initial window), masked output is never
//!    sent beyond the agent's windows (`initial + granted - delivered`);
//!    the rest waits in `pending` and goes out as grants arrive (the tunnel
//!    polls [`TunnelTap::upstream_idle`] while anything waits). Until then
//!    windows are only counted: Go's spdystream, under every kubectl and
//!    kubelet, never grants a window nor enforces one, and holding output
//!    to a 64 KiB window it never reopens would stall every large output.
//!    If `pending` grows past [`PENDING_LIMIT`] the peers plainly do not
//!    keep to windows, and chaperone stops holding output for them.
//!
//! Data of other streams is not rewritten, so its windows agree already;
//! it counts against the session window the same on both sides.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use super::spdy::{
    self, AgentEvent, AgentFrames, FLAG_FIN, FrameHead, FrameReader, INITIAL_WINDOW, PING, Piece,
    SETTINGS, StreamKind, WINDOW_UPDATE,
};
use super::tap::{Core, OnClosed, Output, StartRecording};
use crate::mask::Masker;
use crate::proxy::{TapError, TunnelTap};
use crate::record::StreamInfo;

/// Masked output held for the agent's window beyond which chaperone stops
/// holding (the peers do not keep to windows).
const PENDING_LIMIT: usize = 1 << 20;

/// Decodes, masks and records one exec/attach over SPDY. See [`self`].
pub struct SpdyTap {
    core: Core,
    up: AgentFrames,
    /// The agent's side could not be read (so neither which stream is
    /// stdout): with masking, the tunnel closes.
    up_error: Option<String>,
    /// Not masking and a side could not be read: bytes pass unread.
    up_dead: bool,
    down_dead: bool,
    down: FrameReader,
    current: Down,
    /// What each agent stream carries, from its SYN_STREAM.
    kinds: HashMap<u32, StreamKind>,
    /// The stream ids of stdout and stderr, once opened.
    outputs: [Option<u32>; 2],
    flow: Flow,
}

/// The API server's frame being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Down {
    /// Between frames: nothing half written.
    Between,
    /// Inside a frame forwarded as it is.
    Raw,
    /// Inside a data frame of stdout or stderr, forwarded and recorded.
    Observed { which: Output },
    /// Inside a data frame of stdout or stderr that is masked: its framing
    /// is chaperone's to write.
    Taken {
        stream: u32,
        which: Output,
        fin: bool,
    },
}

fn output_of(kind: StreamKind) -> Option<Output> {
    match kind {
        StreamKind::Stdout => Some(Output::Stdout),
        StreamKind::Stderr => Some(Output::Stderr),
        _ => None,
    }
}

/// Whether held-back output must go before this frame: anything that may
/// be about the output's end (the exit status, a reset, a GOAWAY), not the
/// connection's housekeeping.
fn orders(head: FrameHead) -> bool {
    !matches!(
        head,
        FrameHead::Control {
            kind: PING | SETTINGS | WINDOW_UPDATE,
            ..
        }
    )
}

impl SpdyTap {
    /// `mask`: whether stdout/stderr are masked (the masker's `exec` rule);
    /// `record`: the stream's description and how to start its cast.
    pub fn new(
        masker: &Masker,
        mask: bool,
        record: Option<(StreamInfo, StartRecording)>,
        masked: Arc<AtomicU32>,
    ) -> Self {
        Self {
            core: Core::new(masker, mask, record, masked),
            up: AgentFrames::new(),
            up_error: None,
            up_dead: false,
            down_dead: false,
            down: FrameReader::new(),
            current: Down::Between,
            kinds: HashMap::new(),
            outputs: [None, None],
            flow: Flow::new(),
        }
    }

    /// Runs `f` when the tunnel closes (after the recording ended).
    pub fn on_closed(mut self, f: OnClosed) -> Self {
        self.core.set_on_closed(f);
        self
    }

    fn can_inject(&self) -> bool {
        matches!(self.current, Down::Between | Down::Taken { .. })
    }
}

/// Where masked output goes: data frames on its stream, as the agent's
/// window allows.
fn deliver<'a>(
    flow: &'a mut Flow,
    outputs: &'a [Option<u32>; 2],
    out: &'a mut Vec<u8>,
) -> impl FnMut(Output, &[u8]) + 'a {
    move |which, data| {
        if let Some(stream) = outputs[which.index()] {
            flow.send(out, stream, data);
        }
    }
}

impl TunnelTap for SpdyTap {
    fn agent_sent(&mut self, bytes: &[u8]) {
        // Observed only (the tunnel calls `agent_rewrite`).
        let _ = self.agent_rewrite(bytes, &mut Vec::new());
    }

    fn agent_rewrite(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), TapError> {
        let masks = self.core.masks();
        if self.up_dead {
            out.extend_from_slice(bytes);
            return Ok(());
        }
        if let Some(error) = &self.up_error {
            return Err(error.clone().into());
        }
        let Self {
            core,
            up,
            kinds,
            outputs,
            flow,
            ..
        } = self;
        // Not masked: forwarded exactly as it came, only observed.
        let mut observed = Vec::new();
        let to = if masks { &mut *out } else { &mut observed };
        let result = up.push(bytes, &mut |event| match event {
            AgentEvent::Raw(raw) => to.extend_from_slice(raw),
            AgentEvent::Opened { stream, kind } => {
                kinds.insert(stream, kind);
                if let Some(which) = output_of(kind) {
                    outputs[which.index()] = Some(stream);
                    flow.streams.entry(stream).or_default();
                }
            }
            AgentEvent::Data { stream, data } => match kinds.get(&stream) {
                Some(StreamKind::Stdin) => core.stdin(data),
                Some(StreamKind::Resize) => core.resize(data),
                _ => {}
            },
            AgentEvent::WindowUpdate { stream, delta } => flow.grant(to, stream, delta),
            AgentEvent::InitialWindow(window) => flow.initial_window(window),
        });
        if !masks {
            out.extend_from_slice(bytes);
        }
        if let Err(error) = result {
            if masks {
                let error = format!(
                    "cannot read the agent's side of a SPDY exec stream, so not which stream \
                     is stdout to mask it: {error}"
                );
                self.up_error = Some(error.clone());
                return Err(error.into());
            }
            // Forwarded anyway (the API server judges it); the recording of
            // input stops making sense.
            tracing::debug!(%error, "cannot read the agent's side of a SPDY exec stream");
            self.up_dead = true;
        }
        Ok(())
    }

    fn upstream_sent(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), TapError> {
        if let Some(error) = &self.up_error {
            return Err(error.clone().into());
        }
        if self.down_dead {
            out.extend_from_slice(bytes);
            return Ok(());
        }
        let Self {
            core,
            down,
            current,
            kinds,
            outputs,
            flow,
            ..
        } = self;
        let masks = core.masks();
        let start = out.len();
        let result = down.push(bytes, &mut |piece| {
            match piece {
                Piece::Head(head, raw) => {
                    let which = match head {
                        FrameHead::Data { stream, .. } => {
                            kinds.get(&stream).copied().and_then(output_of)
                        }
                        FrameHead::Control { .. } => None,
                    };
                    *current = match (head, which) {
                        (FrameHead::Data { stream, flags, .. }, Some(which)) if masks => {
                            Down::Taken {
                                stream,
                                which,
                                fin: flags & FLAG_FIN != 0,
                            }
                        }
                        (head, which) => {
                            if masks {
                                if orders(head) {
                                    core.flush_all(&mut deliver(flow, outputs, out));
                                }
                                flow.drain(out);
                            }
                            if let FrameHead::Data { len, .. } = head {
                                flow.session.delivered += i64::from(len);
                            }
                            out.extend_from_slice(raw);
                            match which {
                                Some(which) => Down::Observed { which },
                                None => Down::Raw,
                            }
                        }
                    };
                }
                Piece::Payload(data) => match *current {
                    Down::Taken { stream, which, .. } => {
                        flow.received(stream, data.len());
                        core.output(which, data, &mut deliver(flow, outputs, out));
                    }
                    Down::Observed { which } => {
                        out.extend_from_slice(data);
                        core.output(which, data, &mut |_, _| {});
                    }
                    Down::Raw | Down::Between => out.extend_from_slice(data),
                },
                Piece::End => {
                    if let Down::Taken {
                        stream,
                        which,
                        fin: true,
                    } = *current
                    {
                        core.flush(which, &mut deliver(flow, outputs, out));
                        flow.fin(out, stream);
                    }
                    *current = Down::Between;
                }
            }
            Ok(())
        });
        if let Err(error) = result {
            if masks {
                return Err(Box::new(error));
            }
            tracing::debug!(%error, "cannot read the API server's side of a SPDY exec stream");
            out.truncate(start);
            out.extend_from_slice(bytes);
            self.down_dead = true;
        }
        self.core.count();
        Ok(())
    }

    fn held_back(&self) -> Option<Duration> {
        self.core
            .held_back()
            .or_else(|| self.flow.waiting().then(|| self.core.idle()))
    }

    fn upstream_idle(&mut self, out: &mut Vec<u8>) {
        if !self.core.masks() || !self.can_inject() {
            return;
        }
        let Self {
            core,
            outputs,
            flow,
            current,
            ..
        } = self;
        // Inside a data frame the rest of it is on its way: a partial line
        // is released only between frames (where the process's own writes
        // end), so a secret is not cut by the network's timing.
        if *current == Down::Between {
            core.flush_all(&mut deliver(flow, outputs, out));
        }
        flow.drain(out);
        core.count();
    }

    fn closed(&mut self) {
        self.core.closed();
    }
}

// === flow control ===

/// The agent's receive windows as chaperone keeps them consistent. See
/// [`self`] (Flow control).
struct Flow {
    /// The agent showed that it does flow control: masked output waits for
    /// its windows.
    enforced: bool,
    /// The agent's initial per-stream window.
    initial: i64,
    session: Window,
    /// The masked streams (stdout, stderr).
    streams: HashMap<u32, Window>,
}

#[derive(Default)]
struct Window {
    /// What the agent granted so far.
    granted: i64,
    /// Payload bytes the agent received.
    delivered: i64,
    /// Bytes the API server sent that its grants have not accounted for
    /// (negative: grants it got ahead of what the agent received).
    owed: i64,
    /// Masked output waiting for the agent's window.
    pending: Vec<u8>,
    /// A FIN waiting behind `pending`.
    fin: bool,
}

impl Flow {
    fn new() -> Self {
        Self {
            enforced: false,
            initial: INITIAL_WINDOW,
            session: Window::default(),
            streams: HashMap::new(),
        }
    }

    /// The API server sent `n` bytes of a masked stream.
    fn received(&mut self, stream: u32, n: usize) {
        let n = n as i64;
        self.session.owed += n;
        if let Some(window) = self.streams.get_mut(&stream) {
            window.owed += n;
        }
    }

    /// How much of a stream the agent's windows let through now.
    fn room(&self, window: &Window) -> usize {
        if !self.enforced {
            return usize::MAX;
        }
        let stream_room = self.initial + window.granted - window.delivered;
        let session_room = INITIAL_WINDOW + self.session.granted - self.session.delivered;
        stream_room.min(session_room).max(0) as usize
    }

    /// Masked output for the agent on `stream`.
    fn send(&mut self, out: &mut Vec<u8>, stream: u32, data: &[u8]) {
        let Some(window) = self.streams.get_mut(&stream) else {
            return;
        };
        window.pending.extend_from_slice(data);
        if self.enforced {
            let pending: usize = self.streams.values().map(|w| w.pending.len()).sum();
            if pending > PENDING_LIMIT {
                tracing::warn!(
                    pending,
                    "the agent's SPDY windows stay closed while the API server keeps sending; \
                     sending masked exec output without waiting for them"
                );
                self.enforced = false;
            }
        }
        self.drain(out);
    }

    /// The API server ended `stream`: FIN after what waits.
    fn fin(&mut self, out: &mut Vec<u8>, stream: u32) {
        if let Some(window) = self.streams.get_mut(&stream) {
            window.fin = true;
        }
        self.drain(out);
    }

    /// Whether output waits for the agent's window.
    fn waiting(&self) -> bool {
        self.streams
            .values()
            .any(|w| !w.pending.is_empty() || w.fin)
    }

    /// Writes what the agent's windows let through.
    fn drain(&mut self, out: &mut Vec<u8>) {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for stream in ids {
            loop {
                let window = &self.streams[&stream];
                if window.pending.is_empty() {
                    break;
                }
                let n = self
                    .room(window)
                    .min(window.pending.len())
                    .min(spdy::MAX_PAYLOAD);
                if n == 0 {
                    break;
                }
                let window = self.streams.get_mut(&stream).expect("listed");
                spdy::write_data(out, stream, 0, &window.pending[..n]);
                window.pending.drain(..n);
                let n = n as i64;
                window.delivered += n;
                window.owed -= n;
                self.session.delivered += n;
                self.session.owed -= n;
            }
            let window = self.streams.get_mut(&stream).expect("listed");
            if window.fin && window.pending.is_empty() {
                window.fin = false;
                spdy::write_data(out, stream, FLAG_FIN, &[]);
            }
        }
    }

    /// The agent granted `delta` more on `stream` (0: the session): passed
    /// on with what the API server is owed. See [`self`].
    fn grant(&mut self, out: &mut Vec<u8>, stream: u32, delta: u32) {
        self.enforced = true;
        let window = if stream == 0 {
            &mut self.session
        } else if let Some(window) = self.streams.get_mut(&stream) {
            window
        } else {
            // Not a masked stream: both ends agree already.
            spdy::write_window_update(out, stream, delta);
            return;
        };
        window.granted += i64::from(delta);
        let due = i64::from(delta) + window.owed;
        if due > 0 {
            let forwarded = due.min(0x7fff_ffff);
            window.owed = due - forwarded;
            spdy::write_window_update(out, stream, forwarded as u32);
        } else {
            window.owed = due;
        }
    }

    /// The agent's SETTINGS changed its initial stream window.
    fn initial_window(&mut self, window: u32) {
        self.enforced = true;
        self.initial = i64::from(window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::spdy::tests::{Client, control, data, window_update};
    use crate::exec::spdy::{GOAWAY, SYN_REPLY};
    use crate::mask::MaskRules;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXNlY3JldA";
    const ERROR: u32 = 1;
    const STDOUT: u32 = 3;
    const STDERR: u32 = 5;

    fn tap(mask: bool) -> SpdyTap {
        static MASKER: std::sync::LazyLock<Masker> =
            std::sync::LazyLock::new(|| Masker::new(&MaskRules::default()).unwrap());
        SpdyTap::new(&MASKER, mask, None, Arc::new(AtomicU32::new(0)))
    }

    /// kubectl opens error, stdout and stderr; returns what reached the
    /// API server.
    fn open(tap: &mut SpdyTap) -> Vec<u8> {
        let mut client = Client::new();
        let mut wire = Vec::new();
        for (id, kind) in [(ERROR, "error"), (STDOUT, "stdout"), (STDERR, "stderr")] {
            wire.extend(client.syn_stream(id, kind));
        }
        let mut out = Vec::new();
        tap.agent_rewrite(&wire, &mut out).unwrap();
        assert_eq!(out, wire, "SYN_STREAMs pass as they are");
        out
    }

    fn agent(tap: &mut SpdyTap, wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        tap.agent_rewrite(wire, &mut out).unwrap();
        out
    }

    /// What the agent sees: data per stream, in order, with FINs as `None`,
    /// and the control frames' bytes.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Seen {
        streams: Vec<(u32, Option<Vec<u8>>)>,
        control: Vec<u8>,
    }

    impl Seen {
        fn text(&self, stream: u32) -> String {
            let bytes: Vec<u8> = self
                .streams
                .iter()
                .filter(|(s, _)| *s == stream)
                .filter_map(|(_, d)| d.clone())
                .flatten()
                .collect();
            String::from_utf8(bytes).unwrap()
        }

        fn data_bytes(&self) -> usize {
            self.streams
                .iter()
                .filter_map(|(_, d)| d.as_ref())
                .map(Vec::len)
                .sum()
        }
    }

    fn seen(wire: &[u8]) -> Seen {
        let mut reader = FrameReader::new();
        let mut seen = Seen::default();
        let mut current: Option<(u32, u8)> = None;
        reader
            .push(wire, &mut |piece| {
                match piece {
                    Piece::Head(FrameHead::Data { stream, flags, .. }, _) => {
                        current = Some((stream, flags));
                    }
                    Piece::Head(_, raw) => {
                        current = None;
                        seen.control.extend_from_slice(raw);
                    }
                    Piece::Payload(bytes) => match current {
                        Some((stream, _)) => match seen.streams.last_mut() {
                            Some((s, Some(d))) if *s == stream => d.extend_from_slice(bytes),
                            _ => seen.streams.push((stream, Some(bytes.to_vec()))),
                        },
                        None => seen.control.extend_from_slice(bytes),
                    },
                    Piece::End => {
                        if let Some((stream, flags)) = current.take()
                            && flags & FLAG_FIN != 0
                        {
                            seen.streams.push((stream, None));
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
        seen
    }

    /// The API server's side of `sh -c 'env; echo secret >&2; printf "$ "'`.
    fn server_wire() -> Vec<u8> {
        let mut wire = Vec::new();
        for id in [ERROR, STDOUT, STDERR] {
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend([0x78, 0xbb, 1, 2, 3]);
            wire.extend(control(SYN_REPLY, 0, &payload));
        }
        let line = format!("TOKEN={JWT}\nHOME=/root\n");
        let (a, b) = line.split_at(30);
        wire.extend(data(STDOUT, 0, a.as_bytes()));
        wire.extend(control(PING, 0, &2u32.to_be_bytes()));
        wire.extend(data(STDOUT, 0, b.as_bytes()));
        wire.extend(data(STDERR, 0, b"password=x\n"));
        wire.extend(data(STDOUT, 0, b"$ "));
        wire.extend(data(STDOUT, FLAG_FIN, b""));
        wire.extend(data(STDERR, FLAG_FIN, b""));
        wire.extend(data(ERROR, 0, b"{\"status\":\"Success\"}"));
        wire.extend(data(ERROR, FLAG_FIN, b""));
        wire.extend(control(GOAWAY, 0, &[0; 8]));
        wire
    }

    fn run(tap: &mut SpdyTap, pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in pieces {
            tap.upstream_sent(piece, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn output_is_masked_and_everything_else_passes_split_at_every_byte_boundary() {
        let wire = server_wire();
        let mut whole_tap = tap(true);
        open(&mut whole_tap);
        let whole = seen(&run(&mut whole_tap, &[&wire]));
        let stdout = whole.text(STDOUT);
        assert!(!stdout.contains("c2lnbmF0dXJl"), "{stdout}");
        assert!(stdout.starts_with("TOKEN=<masked by chaperone"), "{stdout}");
        // The prompt held back goes before the FIN.
        assert!(stdout.ends_with(">\nHOME=/root\n$ "), "{stdout}");
        assert_eq!(
            whole.text(STDERR),
            "password=<masked by chaperone: password-assignment>\n"
        );
        assert_eq!(whole.text(ERROR), "{\"status\":\"Success\"}");
        // Every stream ends, stdout before the exit status.
        let fin = |stream| whole.streams.iter().position(|e| *e == (stream, None));
        let status = whole.streams.iter().position(|(s, _)| *s == ERROR).unwrap();
        assert!(fin(STDOUT).unwrap() < status && fin(STDERR).unwrap() < status);
        assert!(fin(ERROR).is_some());
        // Control frames byte for byte.
        let mut control_frames = Vec::new();
        for id in [ERROR, STDOUT, STDERR] {
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend([0x78, 0xbb, 1, 2, 3]);
            control_frames.extend(control(SYN_REPLY, 0, &payload));
        }
        control_frames.extend(control(PING, 0, &2u32.to_be_bytes()));
        control_frames.extend(control(GOAWAY, 0, &[0; 8]));
        assert_eq!(whole.control, control_frames);
        assert_eq!(whole_tap.core.masked_count(), 2);

        for at in 0..=wire.len() {
            let mut split = tap(true);
            open(&mut split);
            let got = run(&mut split, &[&wire[..at], &wire[at..]]);
            assert!(split.held_back().is_none(), "split at {at}");
            let got = seen(&got);
            for stream in [ERROR, STDOUT, STDERR] {
                assert_eq!(got.text(stream), whole.text(stream), "split at {at}");
            }
            assert_eq!(got.control, whole.control, "split at {at}");
            let ends = |s: &Seen| {
                s.streams
                    .iter()
                    .filter(|(id, d)| d.is_none() || *id == ERROR)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            assert_eq!(ends(&got), ends(&whole), "split at {at}");
        }
    }

    #[test]
    fn a_prompt_without_newline_is_released_when_idle() {
        let mut tap = tap(true);
        open(&mut tap);
        let out = run(&mut tap, &[&data(STDOUT, 0, b"$ ")]);
        assert!(out.is_empty());
        assert_eq!(tap.held_back(), Some(crate::exec::IDLE_FLUSH));
        let mut out = Vec::new();
        tap.upstream_idle(&mut out);
        assert_eq!(out, data(STDOUT, 0, b"$ "));
        assert!(tap.held_back().is_none());
    }

    #[test]
    fn a_partial_line_is_not_released_in_the_middle_of_a_frame() {
        let mut tap = tap(true);
        open(&mut tap);
        let frame = data(STDOUT, 0, format!("API_TOKEN={JWT}\n").as_bytes());
        let (a, b) = frame.split_at(20);
        let mut out = run(&mut tap, &[a]);
        assert!(tap.held_back().is_some());
        tap.upstream_idle(&mut out);
        assert!(out.is_empty(), "the rest of the frame is on its way");
        tap.upstream_sent(b, &mut out).unwrap();
        let text = seen(&out).text(STDOUT);
        assert!(!text.contains("c2lnbmF0dXJl"), "{text}");
        assert!(text.contains("masked by chaperone"), "{text}");
    }

    #[test]
    fn grants_are_rewritten_so_the_api_server_sees_the_agents_window_in_its_bytes() {
        let mut tap = tap(true);
        open(&mut tap);
        // Shrinks: a JWT is longer than its mask.
        let line = format!("TOKEN={JWT}\n");
        let out = run(&mut tap, &[&data(STDOUT, 0, line.as_bytes())]);
        let delivered = seen(&out).data_bytes();
        assert!(delivered < line.len());
        // The agent grants back what it read: the API server gets back what
        // it sent, per stream and for the session.
        let up = agent(&mut tap, &window_update(STDOUT, delivered as u32));
        assert_eq!(up, window_update(STDOUT, line.len() as u32));
        let up = agent(&mut tap, &window_update(0, delivered as u32));
        assert_eq!(up, window_update(0, line.len() as u32));

        // Grows: 11 bytes become 52.
        let out = run(&mut tap, &[&data(STDERR, 0, b"password=x\n")]);
        let delivered = seen(&out).data_bytes();
        assert_eq!(delivered, 52);
        // A grant smaller than the growth is held back entirely...
        assert!(agent(&mut tap, &window_update(STDERR, 30)).is_empty());
        // ...and the next carries what is due: 30 + 22 read, 11 sent.
        let up = agent(&mut tap, &window_update(STDERR, 22));
        assert_eq!(up, window_update(STDERR, 11));
        // Streams chaperone does not rewrite keep their grants.
        let up = agent(&mut tap, &window_update(ERROR, 5));
        assert_eq!(up, window_update(ERROR, 5));
    }

    #[test]
    fn output_never_exceeds_what_the_agent_granted() {
        let mut tap = tap(true);
        open(&mut tap);
        // The agent does flow control: a 20-byte initial stream window.
        let mut settings = 1u32.to_be_bytes().to_vec();
        settings.extend([0, 0, 0, 7]);
        settings.extend(20u32.to_be_bytes());
        let wire = control(SETTINGS, 0, &settings);
        assert_eq!(agent(&mut tap, &wire), wire);
        // 11 bytes, within the window; masked they are 52.
        let out = run(
            &mut tap,
            &[
                &data(STDERR, 0, b"password=x\n"),
                &data(STDERR, FLAG_FIN, b""),
            ],
        );
        let first = seen(&out);
        assert_eq!(first.data_bytes(), 20, "{first:?}");
        assert!(!first.streams.contains(&(STDERR, None)), "FIN waits");
        assert!(tap.held_back().is_some());
        let mut idle = Vec::new();
        tap.upstream_idle(&mut idle);
        assert!(idle.is_empty(), "the window is closed");
        // The agent read 20 and grants them back: 20 more may go; the API
        // server is owed 11 - 20 of them.
        let up = agent(&mut tap, &window_update(STDERR, 20));
        assert_eq!(up, window_update(STDERR, 11));
        tap.upstream_idle(&mut idle);
        assert_eq!(seen(&idle).data_bytes(), 20);
        let up = agent(&mut tap, &window_update(STDERR, 20));
        assert!(up.is_empty(), "owed -20: nothing for the API server yet");
        let mut last = Vec::new();
        tap.upstream_idle(&mut last);
        let last = seen(&last);
        assert_eq!(last.data_bytes(), 12);
        assert_eq!(last.streams.last(), Some(&(STDERR, None)), "then the FIN");
        let all = [
            first.text(STDERR),
            seen(&idle).text(STDERR),
            last.text(STDERR),
        ]
        .concat();
        assert_eq!(all, "password=<masked by chaperone: password-assignment>\n");
        assert!(tap.held_back().is_none());
    }

    #[test]
    fn unmasked_taps_forward_every_byte_both_ways() {
        let mut tap = tap(false);
        open(&mut tap);
        let wire = server_wire();
        assert_eq!(run(&mut tap, &[&wire]), wire);
        let grant = window_update(STDOUT, 7);
        assert_eq!(agent(&mut tap, &grant), grant);
        assert!(tap.held_back().is_none());
    }

    #[test]
    fn an_unreadable_agent_side_closes_a_masked_tunnel() {
        let mut tap = tap(true);
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend([0; 6]);
        payload.extend(b"not zlib");
        let wire = control(spdy::SYN_STREAM, 0, &payload);
        assert!(tap.agent_rewrite(&wire, &mut Vec::new()).is_err());
        assert!(
            tap.upstream_sent(&data(1, 0, b"x"), &mut Vec::new())
                .is_err()
        );
        // Unmasked, the same bytes pass.
        let mut tap = self::tap(false);
        assert_eq!(agent(&mut tap, &wire), wire);
    }
}

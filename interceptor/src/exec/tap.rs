//! The tunnel taps of exec/attach: [`ExecTap`] for the WebSocket channel
//! protocols, and [`Core`], what every wire protocol shares (masking of
//! output, typed input and terminal size for the recording, the counters).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use time::OffsetDateTime;

use super::websocket::{self, ChannelEvent, Messages, RESIZE, STDERR, STDIN, STDOUT};
use crate::mask::{Masker, ResponseMask};
use crate::proxy::{TapError, TunnelTap};
use crate::record::{Channel, StreamInfo, StreamRecorder};

/// Starts the recording of the stream once its terminal size is known.
pub type StartRecording = Box<dyn FnOnce(StreamInfo) -> StreamRecorder + Send>;

/// Called once when the tunnel closes.
pub type OnClosed = Box<dyn FnOnce() + Send>;

/// One of the two output streams of a remote command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

impl Output {
    pub const BOTH: [Output; 2] = [Output::Stdout, Output::Stderr];

    pub(super) fn index(self) -> usize {
        match self {
            Output::Stdout => 0,
            Output::Stderr => 1,
        }
    }

    fn channel(self) -> Channel {
        match self {
            Output::Stdout => Channel::Stdout,
            Output::Stderr => Channel::Stderr,
        }
    }
}

/// Where masked output goes: the wire protocol frames it.
pub type Emit<'a> = &'a mut dyn FnMut(Output, &[u8]);

/// What every exec/attach tap does whatever the wire protocol: masks
/// stdout and stderr (one line-aware stream each) when told to, records
/// output, typed input (masked for the recording only) and the terminal
/// size, counts masked values, and ends the recording when the tunnel
/// closes.
pub struct Core {
    /// Masking of stdout (`[0]`) and stderr (`[1]`); `None`: not masked.
    output: Option<[ResponseMask; 2]>,
    /// Masks typed input for the recording (never what is forwarded).
    input: ResponseMask,
    recording: Recording,
    masked: Arc<AtomicU32>,
    idle: Duration,
    scratch: Vec<u8>,
    on_closed: Option<OnClosed>,
}

impl Core {
    /// `mask`: whether stdout/stderr are masked (the masker's `exec` rule);
    /// `record`: the stream's description and how to start its cast.
    pub fn new(
        masker: &Masker,
        mask: bool,
        record: Option<(StreamInfo, StartRecording)>,
        masked: Arc<AtomicU32>,
    ) -> Self {
        Self {
            output: mask.then(|| [masker.exec_output(), masker.exec_output()]),
            input: masker.exec_output(),
            recording: match record {
                Some((info, start)) => Recording::Pending { info, start },
                None => Recording::Off,
            },
            masked,
            idle: super::IDLE_FLUSH,
            scratch: Vec::new(),
            on_closed: None,
        }
    }

    /// Runs `f` when the tunnel closes (after the recording ended).
    pub fn set_on_closed(&mut self, f: OnClosed) {
        self.on_closed = Some(f);
    }

    /// Whether output is masked (so the tap takes it over and re-frames it).
    pub fn masks(&self) -> bool {
        self.output.is_some()
    }

    /// Output from the API server. Masked: what the agent receives goes to
    /// `emit` (now or, for a partial line, later). Not masked: the caller
    /// forwards it as it is and this records it.
    pub fn output(&mut self, which: Output, data: &[u8], emit: Emit<'_>) {
        let Self {
            output,
            recording,
            scratch,
            ..
        } = self;
        match output {
            Some(masks) => {
                scratch.clear();
                let _ = masks[which.index()].push(data, scratch);
                if !scratch.is_empty() {
                    emit(which, scratch);
                    recording.data(which.channel(), scratch);
                }
            }
            None => recording.data(which.channel(), data),
        }
    }

    /// Releases what masking holds back of `which`: before its end, or
    /// before anything that must follow it, or when the API server is idle.
    pub fn flush(&mut self, which: Output, emit: Emit<'_>) {
        let Self {
            output,
            recording,
            scratch,
            ..
        } = self;
        if let Some(masks) = output {
            scratch.clear();
            masks[which.index()].flush(scratch);
            if !scratch.is_empty() {
                emit(which, scratch);
                recording.data(which.channel(), scratch);
            }
        }
    }

    pub fn flush_all(&mut self, emit: Emit<'_>) {
        for which in Output::BOTH {
            self.flush(which, emit);
        }
    }

    /// What the agent typed, recorded masked.
    pub fn stdin(&mut self, data: &[u8]) {
        self.scratch.clear();
        let _ = self.input.push(data, &mut self.scratch);
        // Keystrokes end lines with \r on a terminal.
        if data.iter().any(|&b| b == b'\r' || b == b'\n') {
            self.input.flush(&mut self.scratch);
        }
        self.recording.data(Channel::Stdin, &self.scratch);
    }

    /// A terminal size message (`{"Width":W,"Height":H}`) from the agent;
    /// the first one sizes the cast.
    pub fn resize(&mut self, message: &[u8]) {
        let mut sizes = serde_json::Deserializer::from_slice(message).into_iter::<TerminalSize>();
        if let Some(Ok(size)) = sizes.next() {
            self.recording.resize(size.width, size.height);
        }
    }

    /// How long to wait for more output before releasing what is held.
    pub fn held_back(&self) -> Option<Duration> {
        let output = self.output.as_ref()?;
        output
            .iter()
            .any(ResponseMask::holds_back)
            .then_some(self.idle)
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }

    #[cfg(test)]
    pub fn masked_count(&self) -> u32 {
        self.masked.load(Ordering::Relaxed)
    }

    /// Publishes how many values were masked so far.
    pub fn count(&self) {
        let mut total = 0;
        if let Some(output) = &self.output {
            for mask in output {
                total += mask.stats().values_masked + mask.stats().lines_dropped;
            }
        }
        self.masked
            .store(u32::try_from(total).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// The tunnel closed: what was held back could not be sent; it is
    /// recorded all the same. Ends the cast, then calls `on_closed`.
    pub fn closed(&mut self) {
        if let Some(masks) = &mut self.output {
            for which in Output::BOTH {
                self.scratch.clear();
                let _ = masks[which.index()].finish(&mut self.scratch);
                self.recording.data(which.channel(), &self.scratch);
            }
        }
        self.scratch.clear();
        let _ = self.input.finish(&mut self.scratch);
        self.recording.data(Channel::Stdin, &self.scratch);
        self.count();
        // Ends the cast before the exchange completes.
        self.recording = Recording::Off;
        if let Some(f) = self.on_closed.take() {
            f();
        }
    }
}

enum Recording {
    Off,
    /// Not started: waiting for the first data or the terminal size.
    Pending {
        info: StreamInfo,
        start: StartRecording,
    },
    On(StreamRecorder),
}

impl Recording {
    fn resize(&mut self, width: u16, height: u16) {
        if let Recording::Pending { info, .. } = self
            && info.width == 0
        {
            info.width = width;
            info.height = height;
        }
    }

    fn data(&mut self, channel: Channel, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if matches!(self, Recording::Pending { .. }) {
            let Recording::Pending { info, start } = std::mem::replace(self, Recording::Off) else {
                unreachable!("checked");
            };
            *self = Recording::On(start(info));
        }
        if let Recording::On(recorder) = self {
            recorder.data(
                channel,
                Bytes::copy_from_slice(bytes),
                OffsetDateTime::now_utc(),
            );
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TerminalSize {
    width: u16,
    height: u16,
}

// === WebSocket ===

/// Decodes, masks and records one exec/attach WebSocket. See [`super`].
pub struct ExecTap {
    /// API server to agent; stdout and stderr taken when masking.
    down: Messages,
    /// Agent to API server; observed only.
    up: Messages,
    core: Core,
}

impl ExecTap {
    /// `mask`: whether stdout/stderr are masked (the masker's `exec` rule);
    /// `record`: the stream's description and how to start its cast.
    pub fn new(
        masker: &Masker,
        mask: bool,
        record: Option<(StreamInfo, StartRecording)>,
        masked: Arc<AtomicU32>,
    ) -> Self {
        let take: &'static [u8] = if mask { &[STDOUT, STDERR] } else { &[] };
        Self {
            down: Messages::new(take),
            up: Messages::new(&[]),
            core: Core::new(masker, mask, record, masked),
        }
    }

    /// Runs `f` when the tunnel closes (after the recording ended).
    pub fn on_closed(mut self, f: OnClosed) -> Self {
        self.core.on_closed = Some(f);
        self
    }
}

fn channel_output(channel: u8) -> Option<Output> {
    match channel {
        STDOUT => Some(Output::Stdout),
        STDERR => Some(Output::Stderr),
        _ => None,
    }
}

fn output_channel(which: Output) -> u8 {
    match which {
        Output::Stdout => STDOUT,
        Output::Stderr => STDERR,
    }
}

/// Writes masked output as one binary message.
fn message_to(out: &mut Vec<u8>) -> impl FnMut(Output, &[u8]) + '_ {
    |which, data| websocket::write_channel_message(out, output_channel(which), data)
}

impl TunnelTap for ExecTap {
    fn agent_sent(&mut self, bytes: &[u8]) {
        let Self { up, core, .. } = self;
        let result = up.push(bytes, &mut |event| match event {
            ChannelEvent::Data {
                channel: STDIN,
                data,
            } => core.stdin(data),
            ChannelEvent::Data {
                channel: RESIZE,
                data,
            } => core.resize(data),
            _ => {}
        });
        if let Err(error) = result {
            // The bytes are forwarded anyway (the API server judges them);
            // the recording of input stops making sense.
            tracing::debug!(%error, "cannot read the agent's side of an exec stream");
        }
    }

    fn upstream_sent(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), TapError> {
        let Self { down, core, .. } = self;
        let masks = core.masks();
        down.push(bytes, &mut |event| match event {
            ChannelEvent::Raw { bytes: raw, starts } => {
                // Output held back goes before what follows it (the exit
                // status, a close): a last line without newline shows.
                if starts && masks {
                    core.flush_all(&mut message_to(out));
                }
                out.extend_from_slice(raw);
            }
            ChannelEvent::Data { channel, data } => {
                let Some(which) = channel_output(channel) else {
                    return;
                };
                if masks && data.is_empty() {
                    // A signal: what is held goes first, then it.
                    core.flush(which, &mut message_to(out));
                    websocket::write_channel_message(out, channel, &[]);
                    return;
                }
                // Masked: re-framed here. Not: forwarded raw already, and
                // recorded as the agent sees it.
                core.output(which, data, &mut message_to(out));
            }
        })?;
        core.count();
        Ok(())
    }

    fn held_back(&self) -> Option<Duration> {
        self.core.held_back()
    }

    fn upstream_idle(&mut self, out: &mut Vec<u8>) {
        if !self.down.can_inject() {
            return;
        }
        self.core.flush_all(&mut message_to(out));
        self.core.count();
    }

    fn closed(&mut self) {
        self.core.closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskRules;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXNlY3JldA";

    fn message(channel: u8, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        websocket::write_channel_message(&mut out, channel, data);
        out
    }

    /// The agent's view: channel data of every message in `wire`.
    fn decode(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut messages = Messages::new(&[]);
        let mut data: Vec<(u8, Vec<u8>)> = Vec::new();
        messages
            .push(wire, &mut |event| {
                if let ChannelEvent::Data { channel, data: d } = event {
                    match data.last_mut() {
                        Some((c, bytes)) if *c == channel => bytes.extend_from_slice(d),
                        _ => data.push((channel, d.to_vec())),
                    }
                }
            })
            .unwrap();
        data
    }

    fn tap() -> ExecTap {
        let masker = Masker::new(&MaskRules::default()).unwrap();
        ExecTap::new(&masker, true, None, Arc::new(AtomicU32::new(0)))
    }

    #[test]
    fn a_secret_split_across_frames_is_masked_and_the_error_channel_passes() {
        let mut tap = tap();
        let line = format!("TOKEN={JWT}\nHOME=/root\n");
        let (a, b) = line.split_at(20);
        let mut wire = message(STDOUT, a.as_bytes());
        wire.extend(message(STDOUT, b.as_bytes()));
        wire.extend(message(STDOUT, b"$ "));
        wire.extend(message(3, b"{\"status\":\"Success\"}"));
        let mut out = Vec::new();
        for chunk in wire.chunks(5) {
            tap.upstream_sent(chunk, &mut out).unwrap();
        }
        assert!(tap.held_back().is_none());
        let seen = decode(&out);
        let stdout = String::from_utf8(seen[0].1.clone()).unwrap();
        assert!(!stdout.contains("c2lnbmF0dXJl"), "{stdout}");
        assert!(stdout.contains("masked by chaperone"), "{stdout}");
        // The prompt held back is written before the exit status.
        assert!(stdout.ends_with("HOME=/root\n$ "), "{stdout}");
        assert_eq!(seen[1], (3, b"{\"status\":\"Success\"}".to_vec()));
        assert_eq!(tap.core.masked.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_prompt_without_newline_is_released_when_idle() {
        let mut tap = tap();
        let mut out = Vec::new();
        tap.upstream_sent(&message(STDOUT, b"$ "), &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(tap.held_back(), Some(crate::exec::IDLE_FLUSH));
        tap.upstream_idle(&mut out);
        assert_eq!(decode(&out), vec![(STDOUT, b"$ ".to_vec())]);
        assert!(tap.held_back().is_none());
    }

    #[test]
    fn the_streams_ready_message_and_a_last_line_without_newline_pass() {
        // What the API server sends for `sh -c 'echo -n ready'`.
        let mut wire = message(STDOUT, b"");
        wire.extend(message(STDOUT, b"ready"));
        wire.extend(message(3, b"{\"status\":\"Success\"}"));
        wire.extend([0x88, 0x02, 0x03, 0xe8]);
        for split in [0, 3, 6, 12, wire.len()] {
            let mut tap = tap();
            let mut out = Vec::new();
            tap.upstream_sent(&wire[..split], &mut out).unwrap();
            if tap.held_back().is_some() {
                tap.upstream_idle(&mut out);
            }
            tap.upstream_sent(&wire[split..], &mut out).unwrap();
            let mut expected = message(STDOUT, b"");
            expected.extend(message(STDOUT, b"ready"));
            expected.extend(message(3, b"{\"status\":\"Success\"}"));
            expected.extend([0x88, 0x02, 0x03, 0xe8]);
            assert_eq!(out, expected, "split at {split}");
        }
    }

    #[test]
    fn unmasked_taps_forward_every_byte() {
        let masker = Masker::new(&MaskRules::default()).unwrap();
        let mut tap = ExecTap::new(&masker, false, None, Arc::new(AtomicU32::new(0)));
        let wire = message(STDOUT, JWT.as_bytes());
        let mut out = Vec::new();
        tap.upstream_sent(&wire, &mut out).unwrap();
        assert_eq!(out, wire);
        assert!(tap.held_back().is_none());
    }

    #[test]
    fn broken_framing_closes_the_tunnel() {
        let mut tap = tap();
        assert!(tap.upstream_sent(&[0xF2, 0x00], &mut Vec::new()).is_err());
    }
}

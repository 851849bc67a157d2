//! RFC 6455 framing, streaming: frames are read a piece at a time as bytes
//! arrive (a header, then payload in whatever chunks the socket gives), so a
//! frame of any size costs a fixed amount of memory.
//!
//! On top of the frames, the Kubernetes channel protocols
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`, `v3`, `v2`, `channel.k8s.io`):
//! each binary message starts with one byte naming the channel (0 stdin,
//! 1 stdout, 2 stderr, 3 error, 4 resize; v5 adds `[255, channel]`, a
//! channel close). [`Messages`] turns a frame stream into channel events.

/// Binary channel protocols chaperone reads. The `base64` variants are not
/// among them: chaperone removes them from the agent's offer.
pub const CHANNEL_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const RESIZE: u8 = 4;

const OP_CONTINUATION: u8 = 0x0;
const OP_BINARY: u8 = 0x2;

/// The header of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    /// The RSV bits (zero without extensions).
    pub rsv: u8,
    pub opcode: u8,
    pub len: u64,
    pub mask: Option<[u8; 4]>,
}

impl FrameHead {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// A piece of the frame stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A frame begins; `raw` is its header as it was on the wire.
    Head(FrameHead, &'a [u8]),
    /// Payload bytes: `data` unmasked, `raw` as on the wire.
    Payload { data: &'a [u8], raw: &'a [u8] },
    /// The current frame's payload is complete.
    End,
}

/// The framing is broken: the tunnel must be closed (never forwarded).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(
        "a WebSocket frame uses reserved bits {0:#x} (an extension chaperone did not negotiate)"
    )]
    Reserved(u8),
    #[error("a WebSocket frame has a 64-bit length with the top bit set")]
    Length,
    #[error("a WebSocket control frame is fragmented or longer than 125 bytes")]
    Control,
}

enum State {
    Head,
    Payload { remaining: u64, offset: u64 },
}

/// Reads frames piece by piece.
pub struct FrameReader {
    head: [u8; 14],
    have: usize,
    state: State,
    current: Option<FrameHead>,
    scratch: Vec<u8>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        Self {
            head: [0; 14],
            have: 0,
            state: State::Head,
            current: None,
            scratch: Vec::new(),
        }
    }

    /// Whether the reader is between frames.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Head) && self.have == 0
    }

    /// Feeds bytes; `on` sees every piece they complete, in order.
    pub fn push(
        &mut self,
        mut input: &[u8],
        on: &mut dyn FnMut(Piece<'_>) -> Result<(), FrameError>,
    ) -> Result<(), FrameError> {
        while !input.is_empty() {
            match self.state {
                State::Head => {
                    let need = head_len(&self.head[..self.have]);
                    let take = (need - self.have).min(input.len());
                    self.head[self.have..self.have + take].copy_from_slice(&input[..take]);
                    self.have += take;
                    input = &input[take..];
                    if self.have < need || head_len(&self.head[..self.have]) > self.have {
                        continue;
                    }
                    let head = parse_head(&self.head[..self.have])?;
                    let raw_len = self.have;
                    self.have = 0;
                    self.current = Some(head);
                    on(Piece::Head(head, &self.head[..raw_len]))?;
                    if head.len == 0 {
                        on(Piece::End)?;
                    } else {
                        self.state = State::Payload {
                            remaining: head.len,
                            offset: 0,
                        };
                    }
                }
                State::Payload { remaining, offset } => {
                    let take = remaining.min(input.len() as u64) as usize;
                    let (raw, rest) = input.split_at(take);
                    input = rest;
                    let mask = self.current.and_then(|h| h.mask);
                    match mask {
                        None => on(Piece::Payload { data: raw, raw })?,
                        Some(key) => {
                            self.scratch.clear();
                            self.scratch.extend(
                                raw.iter()
                                    .enumerate()
                                    .map(|(i, b)| b ^ key[((offset + i as u64) % 4) as usize]),
                            );
                            on(Piece::Payload {
                                data: &self.scratch,
                                raw,
                            })?;
                        }
                    }
                    let remaining = remaining - take as u64;
                    if remaining == 0 {
                        self.state = State::Head;
                        on(Piece::End)?;
                    } else {
                        self.state = State::Payload {
                            remaining,
                            offset: offset + take as u64,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// How long the header is, as far as the bytes seen so far tell.
fn head_len(seen: &[u8]) -> usize {
    if seen.len() < 2 {
        return 2;
    }
    let masked = seen[1] & 0x80 != 0;
    let ext = match seen[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if masked { 4 } else { 0 }
}

fn parse_head(raw: &[u8]) -> Result<FrameHead, FrameError> {
    let fin = raw[0] & 0x80 != 0;
    let rsv = (raw[0] >> 4) & 0x7;
    let opcode = raw[0] & 0x0f;
    if rsv != 0 {
        return Err(FrameError::Reserved(rsv));
    }
    let masked = raw[1] & 0x80 != 0;
    let (len, at) = match raw[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes([raw[2], raw[3]])), 4),
        127 => {
            let len = u64::from_be_bytes(raw[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(FrameError::Length);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = masked.then(|| raw[at..at + 4].try_into().expect("4 bytes"));
    let head = FrameHead {
        fin,
        rsv,
        opcode,
        len,
        mask,
    };
    if head.is_control() && (!fin || len > 125) {
        return Err(FrameError::Control);
    }
    Ok(head)
}

/// Appends one complete, unmasked binary message `[channel, data...]` (the
/// server's side of the channel protocols).
pub fn write_channel_message(out: &mut Vec<u8>, channel: u8, data: &[u8]) {
    let len = data.len() as u64 + 1;
    out.push(0x80 | OP_BINARY);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.push(channel);
    out.extend_from_slice(data);
}

// === Messages ===

/// A channel event of the Kubernetes channel protocols.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelEvent<'a> {
    /// Bytes that are not channel data of a binary message (frame headers,
    /// control frames, the channel byte), as on the wire. Not sent for the
    /// data of channels [`Messages`] was told to take over. `starts`: these
    /// bytes begin a frame at a point where a new message could have been
    /// written instead (so what is held back can be written first).
    Raw { bytes: &'a [u8], starts: bool },
    /// Payload of a binary message on `channel` (unmasked). Empty for a
    /// message that holds only its channel byte.
    Data { channel: u8, data: &'a [u8] },
}

/// What the reader does with the current message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Message {
    /// Between messages.
    None,
    /// A data frame header was read; its channel byte has not arrived yet.
    /// The header is held in `held`.
    AwaitChannel { fin: bool },
    /// Passed through as raw bytes (text, unknown channel, or not taken);
    /// binary data is reported on its channel too.
    Raw { fin: bool, channel: Option<u8> },
    /// A message on a taken channel: its data is reported, its framing is
    /// the consumer's to write.
    Taken { channel: u8, fin: bool },
}

/// Channel events of one direction of a channel-protocol WebSocket.
///
/// Channels in `take` are reported as [`ChannelEvent::Data`] with no raw
/// framing (the consumer re-frames them); everything else is reported raw
/// (and, for binary messages, also as data, so observers see every channel).
pub struct Messages {
    frames: FrameReader,
    take: &'static [u8],
    message: Message,
    /// Inside a control frame interleaved with a message.
    control: bool,
    head: FrameHead,
    held: Vec<u8>,
}

impl Messages {
    pub fn new(take: &'static [u8]) -> Self {
        Self {
            frames: FrameReader::new(),
            take,
            message: Message::None,
            control: false,
            head: FrameHead {
                fin: true,
                rsv: 0,
                opcode: 0,
                len: 0,
                mask: None,
            },
            held: Vec::with_capacity(14),
        }
    }

    /// Whether a new message may be written to this direction's output now:
    /// no raw frame is half written and no raw message awaits continuation.
    pub fn can_inject(&self) -> bool {
        // Taken data and held headers were never written raw; a raw frame
        // (or message awaiting its continuation) was, in part.
        !self.control && !matches!(self.message, Message::Raw { .. })
    }

    pub fn push(
        &mut self,
        input: &[u8],
        on: &mut dyn FnMut(ChannelEvent<'_>),
    ) -> Result<(), FrameError> {
        let Self {
            frames,
            take,
            message,
            control,
            head,
            held,
        } = self;
        frames.push(input, &mut |piece| {
            match piece {
                Piece::Head(h, raw) => {
                    *head = h;
                    if h.is_control() {
                        *control = true;
                        let starts = !matches!(message, Message::Raw { .. });
                        on(ChannelEvent::Raw { bytes: raw, starts });
                        return Ok(());
                    }
                    match (h.opcode, *message) {
                        (OP_BINARY, _) if h.len > 0 => {
                            *message = Message::AwaitChannel { fin: h.fin };
                            held.clear();
                            held.extend_from_slice(raw);
                        }
                        (OP_CONTINUATION, Message::Taken { channel, .. }) => {
                            *message = Message::Taken {
                                channel,
                                fin: h.fin,
                            };
                        }
                        // Text, an empty message, a continuation of a raw one.
                        _ => {
                            let (starts, channel) = match *message {
                                Message::Raw { channel, .. } if h.opcode == OP_CONTINUATION => {
                                    (false, channel)
                                }
                                Message::Raw { .. } => (false, None),
                                _ => (true, None),
                            };
                            *message = Message::Raw {
                                fin: h.fin,
                                channel,
                            };
                            on(ChannelEvent::Raw { bytes: raw, starts });
                        }
                    }
                }
                Piece::Payload { data, raw } => {
                    if *control {
                        on(ChannelEvent::Raw {
                            bytes: raw,
                            starts: false,
                        });
                        return Ok(());
                    }
                    match *message {
                        Message::AwaitChannel { fin } => {
                            let channel = data[0];
                            if take.contains(&channel) {
                                *message = Message::Taken { channel, fin };
                                held.clear();
                                // An empty message is a signal (the API
                                // server's "streams ready"): reported too.
                                if data.len() > 1 || head.len == 1 {
                                    on(ChannelEvent::Data {
                                        channel,
                                        data: &data[1..],
                                    });
                                }
                            } else {
                                *message = Message::Raw {
                                    fin,
                                    channel: Some(channel),
                                };
                                on(ChannelEvent::Raw {
                                    bytes: held,
                                    starts: true,
                                });
                                held.clear();
                                on(ChannelEvent::Raw {
                                    bytes: raw,
                                    starts: false,
                                });
                                if data.len() > 1 {
                                    on(ChannelEvent::Data {
                                        channel,
                                        data: &data[1..],
                                    });
                                }
                            }
                        }
                        Message::Taken { channel, .. } => {
                            on(ChannelEvent::Data { channel, data });
                        }
                        Message::Raw { channel, .. } => {
                            on(ChannelEvent::Raw {
                                bytes: raw,
                                starts: false,
                            });
                            if let Some(channel) = channel {
                                on(ChannelEvent::Data { channel, data });
                            }
                        }
                        Message::None => {
                            on(ChannelEvent::Raw {
                                bytes: raw,
                                starts: false,
                            });
                        }
                    }
                }
                Piece::End => {
                    if *control {
                        *control = false;
                        return Ok(());
                    }
                    let fin = head.fin;
                    if fin {
                        *message = Message::None;
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        let len = payload.len();
        if len < 126 {
            out.push(m | len as u8);
        } else if len <= 0xffff {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        match mask {
            None => out.extend_from_slice(payload),
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
        }
        out
    }

    fn events(
        messages: &mut Messages,
        input: &[u8],
        chunk: usize,
    ) -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
        let mut raw = Vec::new();
        let mut data: Vec<(u8, Vec<u8>)> = Vec::new();
        for piece in input.chunks(chunk) {
            messages
                .push(piece, &mut |event| match event {
                    ChannelEvent::Raw { bytes, .. } => raw.extend_from_slice(bytes),
                    ChannelEvent::Data { channel, data: d } => match data.last_mut() {
                        Some((c, bytes)) if *c == channel => bytes.extend_from_slice(d),
                        _ => data.push((channel, d.to_vec())),
                    },
                })
                .unwrap();
        }
        (raw, data)
    }

    #[test]
    fn taken_channels_lose_their_framing_and_others_pass_raw_whatever_the_chunking() {
        let mut wire = Vec::new();
        wire.extend(frame(true, OP_BINARY, b"\x01hello ", None));
        wire.extend(frame(true, 0x9, b"ping", None));
        wire.extend(frame(
            true,
            OP_BINARY,
            b"\x03{\"status\":\"Success\"}",
            None,
        ));
        let long = vec![b'x'; 70_000];
        let mut stdout = vec![1u8];
        stdout.extend_from_slice(&long);
        wire.extend(frame(true, OP_BINARY, &stdout, None));
        wire.extend(frame(true, 0x8, b"\x03\xe8", None));
        let mut expected_raw = frame(true, 0x9, b"ping", None);
        expected_raw.extend(frame(
            true,
            OP_BINARY,
            b"\x03{\"status\":\"Success\"}",
            None,
        ));
        expected_raw.extend(frame(true, 0x8, b"\x03\xe8", None));
        for chunk in [1, 2, 3, 7, 100, 1 << 20] {
            let mut messages = Messages::new(&[STDOUT, STDERR]);
            let (raw, data) = events(&mut messages, &wire, chunk);
            assert_eq!(raw, expected_raw, "chunk {chunk}");
            assert_eq!(data[0], (STDOUT, b"hello ".to_vec()), "chunk {chunk}");
            assert_eq!(data[1], (3, b"{\"status\":\"Success\"}".to_vec()));
            assert_eq!(data[2].0, STDOUT);
            assert!(
                data[2].1 == long,
                "chunk {chunk}: {} bytes",
                data[2].1.len()
            );
            assert!(messages.can_inject());
        }
    }

    #[test]
    fn masked_client_frames_and_fragments_are_decoded() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let mut wire = frame(false, OP_BINARY, b"\x00echo ", Some(key));
        wire.extend(frame(true, 0xA, b"", Some(key)));
        wire.extend(frame(true, OP_CONTINUATION, b"hi\n", Some(key)));
        wire.extend(frame(
            true,
            OP_BINARY,
            b"\x04{\"Width\":100,\"Height\":30}",
            Some(key),
        ));
        for chunk in [1, 5, 1000] {
            let mut messages = Messages::new(&[]);
            let (raw, data) = events(&mut messages, &wire, chunk);
            assert_eq!(raw, wire, "nothing taken: the wire is reported raw");
            assert_eq!(data[0], (STDIN, b"echo hi\n".to_vec()));
            assert_eq!(data[1], (RESIZE, b"{\"Width\":100,\"Height\":30}".to_vec()));
        }
    }

    #[test]
    fn written_messages_read_back() {
        for len in [0, 1, 124, 125, 126, 65_534, 65_535, 70_000] {
            let data = vec![b'a'; len];
            let mut out = Vec::new();
            write_channel_message(&mut out, STDERR, &data);
            assert_eq!(
                out,
                frame(true, OP_BINARY, &[&[STDERR][..], &data].concat(), None)
            );
        }
    }

    #[test]
    fn reserved_bits_and_bad_control_frames_are_errors() {
        let mut reader = FrameReader::new();
        let err = reader.push(&[0xC2, 0x00], &mut |_| Ok(())).unwrap_err();
        assert_eq!(err, FrameError::Reserved(4));
        let mut reader = FrameReader::new();
        let err = reader.push(&[0x09, 0x00], &mut |_| Ok(())).unwrap_err();
        assert_eq!(err, FrameError::Control);
    }

    #[test]
    fn a_raw_message_awaiting_continuation_blocks_injection() {
        let mut messages = Messages::new(&[STDOUT]);
        let wire = frame(false, OP_BINARY, b"\x03{", None);
        events(&mut messages, &wire, 100);
        assert!(!messages.can_inject());
        events(
            &mut messages,
            &frame(true, OP_CONTINUATION, b"}", None),
            100,
        );
        assert!(messages.can_inject());
        // Half a frame header: nothing of it written yet.
        events(&mut messages, &[0x82], 1);
        assert!(messages.can_inject());
        // Inside a raw control frame.
        let mut messages = Messages::new(&[STDOUT]);
        events(&mut messages, &[0x89, 0x04, b'p'], 1);
        assert!(!messages.can_inject());
    }
}

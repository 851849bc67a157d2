//! SPDY/3.1 framing as Kubernetes remote commands use it (`Upgrade:
//! SPDY/3.1`, `X-Stream-Protocol-Version: v4.channel.k8s.io` and earlier),
//! read a piece at a time as bytes arrive, so a frame of any size costs a
//! fixed amount of memory.
//!
//! Every frame starts with 8 bytes. A control frame: `1`, a 15-bit version
//! (3), a 16-bit type, 8 bits of flags, a 24-bit length. A data frame: `0`,
//! a 31-bit stream id, 8 bits of flags (`FIN`), a 24-bit length.
//!
//! The client opens one stream per pipe with SYN_STREAM, naming it in the
//! `streamtype` header (`stdin`, `stdout`, `stderr`, `error`, `resize`).
//! Header blocks are zlib streams primed with the SPDY/3 dictionary, and
//! each direction has ONE compression context for the whole connection: to
//! learn a stream's type, every header block of that direction must be
//! inflated, in order. The server's blocks (SYN_REPLY) name nothing
//! chaperone needs, so only the client's are inflated.

use std::sync::LazyLock;

use flate2::{Decompress, FlushDecompress};

/// The upgrade token Kubernetes uses.
pub const UPGRADE: &str = "SPDY/3.1";
/// The header that carries the offered and the chosen sub-protocol.
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
/// Remote command protocols chaperone reads over SPDY: all of them name
/// their streams by `streamtype` and carry raw bytes on them.
pub const REMOTE_COMMAND_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

pub const VERSION: u16 = 3;

pub const SYN_STREAM: u16 = 1;
pub const SYN_REPLY: u16 = 2;
pub const RST_STREAM: u16 = 3;
pub const SETTINGS: u16 = 4;
pub const PING: u16 = 6;
pub const GOAWAY: u16 = 7;
pub const HEADERS: u16 = 8;
pub const WINDOW_UPDATE: u16 = 9;

/// The last frame of a stream from this side.
pub const FLAG_FIN: u8 = 0x01;
/// SETTINGS id of the initial per-stream window.
const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;
/// SPDY/3.1's initial window, per stream (unless SETTINGS changes it) and
/// for the session.
pub const INITIAL_WINDOW: i64 = 64 * 1024;
/// The largest payload a frame's 24-bit length can say.
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;
/// The largest inflated header block accepted (kubectl's are ~100 bytes).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// SETTINGS payloads larger than this are passed on unread.
const MAX_SETTINGS: u32 = 8 * 1024;

/// The SPDY/3 header compression dictionary (SPDY draft 3, section
/// 2.6.10.1): length-prefixed header names and values, then a run of
/// common text. Both peers prime zlib with exactly these 1423 bytes.
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412\
        413414415416417502504505203 Non-Authoritative Information204 No Content301 \
        Moved Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 \
        Internal Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr \
        May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, \
        GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,\
        application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,\
        deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";
    let mut dictionary = Vec::with_capacity(1423);
    for word in WORDS {
        dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(TAIL.as_bytes());
    dictionary
});

/// The stream cannot be read: where output must be masked, the tunnel is
/// closed (never forwarded unread).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpdyError {
    #[error("a SPDY control frame has version {0}; chaperone reads SPDY/3.1 (version 3)")]
    Version(u16),
    #[error("a SPDY header block does not inflate: {0}")]
    Inflate(String),
    #[error("a SPDY header block inflates to more than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    #[error("a SPDY header block is malformed")]
    HeaderBlock,
    #[error("a SPDY control frame of type {0} is shorter than its fixed fields")]
    Short(u16),
}

/// The 8-byte header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameHead {
    Control { kind: u16, flags: u8, len: u32 },
    Data { stream: u32, flags: u8, len: u32 },
}

impl FrameHead {
    fn parse(raw: &[u8; 8]) -> Result<Self, SpdyError> {
        let flags = raw[4];
        let len = u32::from_be_bytes([0, raw[5], raw[6], raw[7]]);
        if raw[0] & 0x80 != 0 {
            let version = u16::from_be_bytes([raw[0] & 0x7f, raw[1]]);
            if version != VERSION {
                return Err(SpdyError::Version(version));
            }
            let kind = u16::from_be_bytes([raw[2], raw[3]]);
            Ok(FrameHead::Control { kind, flags, len })
        } else {
            let stream = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) & 0x7fff_ffff;
            Ok(FrameHead::Data { stream, flags, len })
        }
    }

    /// The payload's length.
    pub fn payload_len(&self) -> u32 {
        match *self {
            FrameHead::Control { len, .. } | FrameHead::Data { len, .. } => len,
        }
    }
}

/// A piece of the frame stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A frame begins; `raw` is its header as it was on the wire.
    Head(FrameHead, &'a [u8]),
    /// Payload bytes of the current frame.
    Payload(&'a [u8]),
    /// The current frame is complete.
    End,
}

/// Reads frames piece by piece.
#[derive(Default)]
pub struct FrameReader {
    head: [u8; 8],
    have: usize,
    /// Payload bytes left in the current frame; `None` between frames.
    remaining: Option<u32>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the reader is between frames.
    pub fn at_boundary(&self) -> bool {
        self.remaining.is_none() && self.have == 0
    }

    /// Feeds bytes; `on` sees every piece they complete, in order.
    pub fn push(
        &mut self,
        mut input: &[u8],
        on: &mut dyn FnMut(Piece<'_>) -> Result<(), SpdyError>,
    ) -> Result<(), SpdyError> {
        while !input.is_empty() {
            match self.remaining {
                None => {
                    let take = (8 - self.have).min(input.len());
                    self.head[self.have..self.have + take].copy_from_slice(&input[..take]);
                    self.have += take;
                    input = &input[take..];
                    if self.have < 8 {
                        continue;
                    }
                    self.have = 0;
                    let head = FrameHead::parse(&self.head)?;
                    on(Piece::Head(head, &self.head))?;
                    if head.payload_len() == 0 {
                        on(Piece::End)?;
                    } else {
                        self.remaining = Some(head.payload_len());
                    }
                }
                Some(remaining) => {
                    let take = (remaining as usize).min(input.len());
                    let (payload, rest) = input.split_at(take);
                    input = rest;
                    let remaining = remaining - take as u32;
                    self.remaining = (remaining > 0).then_some(remaining);
                    on(Piece::Payload(payload))?;
                    if remaining == 0 {
                        on(Piece::End)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Appends one data frame.
pub fn write_data(out: &mut Vec<u8>, stream: u32, flags: u8, data: &[u8]) {
    debug_assert!(data.len() <= MAX_PAYLOAD);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(data);
}

/// Appends one WINDOW_UPDATE frame (`delta` is 31 bits).
pub fn write_window_update(out: &mut Vec<u8>, stream: u32, delta: u32) {
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&WINDOW_UPDATE.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 8]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
}

// === header blocks ===

/// The header decompression context of one direction of a connection.
pub struct HeaderInflater {
    zlib: Decompress,
}

impl Default for HeaderInflater {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderInflater {
    pub fn new() -> Self {
        Self {
            zlib: Decompress::new(true),
        }
    }

    /// Inflates the next compressed bytes of this direction, appending the
    /// header block bytes they hold to `out`.
    pub fn inflate(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), SpdyError> {
        loop {
            if out.len() >= MAX_HEADER_BLOCK {
                return Err(SpdyError::HeaderBlockTooLarge);
            }
            out.reserve(1024);
            let (before_in, before_out) = (self.zlib.total_in(), self.zlib.total_out());
            let result = self.zlib.decompress_vec(input, out, FlushDecompress::Sync);
            let consumed = (self.zlib.total_in() - before_in) as usize;
            let produced = self.zlib.total_out() - before_out;
            input = &input[consumed..];
            match result {
                Ok(_) => {}
                Err(error) if error.needs_dictionary().is_some() => {
                    self.zlib
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| SpdyError::Inflate(e.to_string()))?;
                    continue;
                }
                Err(error) => return Err(SpdyError::Inflate(error.to_string())),
            }
            // Done when the input is used up and zlib had room to spare
            // (so holds nothing more back); stuck when it made no progress.
            if (input.is_empty() && out.len() < out.capacity()) || (consumed == 0 && produced == 0)
            {
                return Ok(());
            }
        }
    }
}

/// A header's name and value (several values joined by NUL), as on the wire.
pub type HeaderPair<'a> = (&'a [u8], &'a [u8]);

/// The name/value pairs of an inflated header block: a 32-bit count, then
/// per pair a 32-bit length and the name, a 32-bit length and the value.
pub fn header_pairs(block: &[u8]) -> Result<Vec<HeaderPair<'_>>, SpdyError> {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], SpdyError> {
        if rest.len() < n {
            return Err(SpdyError::HeaderBlock);
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head)
    }
    fn length(rest: &mut &[u8]) -> Result<usize, SpdyError> {
        let bytes = take(rest, 4)?;
        Ok(u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize)
    }
    let mut rest = block;
    let count = length(&mut rest)?;
    let mut pairs = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = length(&mut rest)?;
        let name = take(&mut rest, n)?;
        let n = length(&mut rest)?;
        let value = take(&mut rest, n)?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// What a client stream carries, by its `streamtype` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    Error,
    Resize,
    Other,
}

impl StreamKind {
    fn of(pairs: &[HeaderPair<'_>]) -> Self {
        let value = pairs
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(b"streamtype"))
            .map(|(_, value)| *value);
        match value {
            Some(b"stdin") => StreamKind::Stdin,
            Some(b"stdout") => StreamKind::Stdout,
            Some(b"stderr") => StreamKind::Stderr,
            Some(b"error") => StreamKind::Error,
            Some(b"resize") => StreamKind::Resize,
            _ => StreamKind::Other,
        }
    }
}

// === the client's side ===

/// What the client sent, for the tap.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentEvent<'a> {
    /// Bytes to forward as they are (every frame but WINDOW_UPDATE).
    Raw(&'a [u8]),
    /// The client opened a stream (reported after its SYN_STREAM's bytes).
    Opened { stream: u32, kind: StreamKind },
    /// Payload of a data frame (its bytes are reported raw too).
    Data { stream: u32, data: &'a [u8] },
    /// A WINDOW_UPDATE: not reported raw, the consumer writes it (with
    /// [`write_window_update`], perhaps with another delta).
    WindowUpdate { stream: u32, delta: u32 },
    /// SETTINGS set the initial per-stream window (reported raw too).
    InitialWindow(u32),
}

enum Current {
    Between,
    /// A control frame with a header block: `fixed` bytes of fixed fields
    /// (stream id first), then the compressed block.
    Headers {
        kind: u16,
        fixed: usize,
        fields: Vec<u8>,
        block: Vec<u8>,
    },
    /// WINDOW_UPDATE: held until complete.
    WindowUpdate {
        head: [u8; 8],
        payload: Vec<u8>,
    },
    /// SETTINGS: forwarded as it comes, read when complete.
    Settings {
        payload: Vec<u8>,
    },
    /// Any other frame: forwarded as it comes.
    Raw,
    Data {
        stream: u32,
    },
}

/// Decodes the client's side of a SPDY connection: inflates every header
/// block (one zlib context for the connection), learns stream types,
/// reports data, and holds WINDOW_UPDATEs for the consumer to write.
pub struct AgentFrames {
    frames: FrameReader,
    inflater: HeaderInflater,
    current: Current,
}

impl Default for AgentFrames {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentFrames {
    pub fn new() -> Self {
        Self {
            frames: FrameReader::new(),
            inflater: HeaderInflater::new(),
            current: Current::Between,
        }
    }

    pub fn push(
        &mut self,
        input: &[u8],
        on: &mut dyn FnMut(AgentEvent<'_>),
    ) -> Result<(), SpdyError> {
        let Self {
            frames,
            inflater,
            current,
        } = self;
        frames.push(input, &mut |piece| {
            match piece {
                Piece::Head(head, raw) => {
                    *current = match head {
                        FrameHead::Data { stream, .. } => Current::Data { stream },
                        FrameHead::Control {
                            kind: WINDOW_UPDATE,
                            len: 8,
                            ..
                        } => Current::WindowUpdate {
                            head: raw.try_into().expect("8 bytes"),
                            payload: Vec::with_capacity(8),
                        },
                        FrameHead::Control {
                            kind: kind @ (SYN_STREAM | SYN_REPLY | HEADERS),
                            len,
                            ..
                        } => {
                            let fixed = if kind == SYN_STREAM { 10 } else { 4 };
                            if (len as usize) < fixed {
                                return Err(SpdyError::Short(kind));
                            }
                            Current::Headers {
                                kind,
                                fixed,
                                fields: Vec::with_capacity(fixed),
                                block: Vec::new(),
                            }
                        }
                        FrameHead::Control {
                            kind: SETTINGS,
                            len,
                            ..
                        } if len <= MAX_SETTINGS => Current::Settings {
                            payload: Vec::with_capacity(len as usize),
                        },
                        FrameHead::Control { .. } => Current::Raw,
                    };
                    if !matches!(current, Current::WindowUpdate { .. }) {
                        on(AgentEvent::Raw(raw));
                    }
                }
                Piece::Payload(bytes) => match current {
                    Current::WindowUpdate { payload, .. } => payload.extend_from_slice(bytes),
                    Current::Headers {
                        fixed,
                        fields,
                        block,
                        ..
                    } => {
                        on(AgentEvent::Raw(bytes));
                        let take = (*fixed - fields.len()).min(bytes.len());
                        fields.extend_from_slice(&bytes[..take]);
                        if take < bytes.len() {
                            inflater.inflate(&bytes[take..], block)?;
                        }
                    }
                    Current::Settings { payload } => {
                        on(AgentEvent::Raw(bytes));
                        payload.extend_from_slice(bytes);
                    }
                    Current::Data { stream } => {
                        on(AgentEvent::Raw(bytes));
                        on(AgentEvent::Data {
                            stream: *stream,
                            data: bytes,
                        });
                    }
                    Current::Raw | Current::Between => on(AgentEvent::Raw(bytes)),
                },
                Piece::End => {
                    match std::mem::replace(current, Current::Between) {
                        Current::WindowUpdate { head, payload } => {
                            let word = |at: usize| {
                                u32::from_be_bytes(payload[at..at + 4].try_into().expect("4"))
                                    & 0x7fff_ffff
                            };
                            let (stream, delta) = (word(0), word(4));
                            if delta == 0 {
                                // Not a grant (a protocol error the server
                                // judges): passed on as it was.
                                on(AgentEvent::Raw(&head));
                                on(AgentEvent::Raw(&payload));
                            } else {
                                on(AgentEvent::WindowUpdate { stream, delta });
                            }
                        }
                        Current::Headers {
                            kind: SYN_STREAM,
                            fields,
                            block,
                            ..
                        } => {
                            let stream =
                                u32::from_be_bytes(fields[..4].try_into().expect("fixed fields"))
                                    & 0x7fff_ffff;
                            let kind = StreamKind::of(&header_pairs(&block)?);
                            on(AgentEvent::Opened { stream, kind });
                        }
                        Current::Headers { block, .. } => {
                            header_pairs(&block)?;
                        }
                        Current::Settings { payload } => {
                            if let Some(window) = initial_window(&payload) {
                                on(AgentEvent::InitialWindow(window));
                            }
                        }
                        Current::Data { .. } | Current::Raw | Current::Between => {}
                    }
                }
            }
            Ok(())
        })
    }
}

/// The initial window a SETTINGS payload sets, if it does: a 32-bit count,
/// then per entry 8 bits of flags, a 24-bit id and a 32-bit value.
fn initial_window(payload: &[u8]) -> Option<u32> {
    let count = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?) as usize;
    payload
        .get(4..)?
        .chunks_exact(8)
        .take(count)
        .filter(|entry| {
            u32::from_be_bytes([0, entry[1], entry[2], entry[3]]) == SETTINGS_INITIAL_WINDOW_SIZE
        })
        .map(|entry| u32::from_be_bytes(entry[4..8].try_into().expect("4 bytes")))
        .next_back()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    /// The client's side of a connection, for tests: frames with header
    /// blocks compressed in one context, as spdystream writes them.
    pub(crate) struct Client {
        zlib: Compress,
    }

    impl Client {
        pub(crate) fn new() -> Self {
            let mut zlib = Compress::new(Compression::default(), true);
            zlib.set_dictionary(&DICTIONARY).unwrap();
            Self { zlib }
        }

        fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
            let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
            for (name, value) in headers {
                raw.extend((name.len() as u32).to_be_bytes());
                raw.extend(name.as_bytes());
                raw.extend((value.len() as u32).to_be_bytes());
                raw.extend(value.as_bytes());
            }
            let mut out = Vec::with_capacity(raw.len() + 64);
            self.zlib
                .compress_vec(&raw, &mut out, FlushCompress::Sync)
                .unwrap();
            assert!(out.len() < out.capacity(), "room to spare: all written");
            out
        }

        pub(crate) fn syn_stream(&mut self, stream: u32, kind: &str) -> Vec<u8> {
            let mut payload = stream.to_be_bytes().to_vec();
            payload.extend([0, 0, 0, 0, 0, 0]);
            payload.extend(self.block(&[("streamtype", kind), ("x-extra", "value")]));
            control(SYN_STREAM, 0, &payload)
        }
    }

    pub(crate) fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = (0x8000 | VERSION).to_be_bytes().to_vec();
        out.extend(kind.to_be_bytes());
        out.push(flags);
        out.extend(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend(payload);
        out
    }

    pub(crate) fn data(stream: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_data(&mut out, stream, flags, payload);
        out
    }

    pub(crate) fn window_update(stream: u32, delta: u32) -> Vec<u8> {
        let mut out = Vec::new();
        write_window_update(&mut out, stream, delta);
        out
    }

    #[derive(Debug, Default, PartialEq, Eq)]
    struct Seen {
        raw: Vec<u8>,
        opened: Vec<(u32, StreamKind)>,
        data: Vec<(u32, Vec<u8>)>,
        grants: Vec<(u32, u32)>,
        initial: Vec<u32>,
    }

    fn read(pieces: &[&[u8]]) -> Seen {
        let mut frames = AgentFrames::new();
        let mut seen = Seen::default();
        for piece in pieces {
            frames
                .push(piece, &mut |event| match event {
                    AgentEvent::Raw(raw) => seen.raw.extend_from_slice(raw),
                    AgentEvent::Opened { stream, kind } => seen.opened.push((stream, kind)),
                    AgentEvent::Data { stream, data } => match seen.data.last_mut() {
                        Some((s, bytes)) if *s == stream => bytes.extend_from_slice(data),
                        _ => seen.data.push((stream, data.to_vec())),
                    },
                    AgentEvent::WindowUpdate { stream, delta } => seen.grants.push((stream, delta)),
                    AgentEvent::InitialWindow(window) => seen.initial.push(window),
                })
                .unwrap();
        }
        seen
    }

    /// kubectl's opening of `exec -i -t`, some typing, flow control.
    fn agent_wire() -> (Vec<u8>, Vec<u8>) {
        let mut client = Client::new();
        let mut wire = Vec::new();
        let mut settings = 1u32.to_be_bytes().to_vec();
        settings.extend([0, 0, 0, 7]);
        settings.extend(1000u32.to_be_bytes());
        wire.extend(control(SETTINGS, 0, &settings));
        for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "resize")] {
            wire.extend(client.syn_stream(id, kind));
        }
        wire.extend(data(7, 0, b"{\"Width\":120,\"Height\":40}\n"));
        wire.extend(data(3, 0, b"echo hi\r"));
        wire.extend(window_update(5, 300));
        wire.extend(control(PING, 0, &1u32.to_be_bytes()));
        wire.extend(client.syn_stream(9, "stderr"));
        wire.extend(window_update(0, 70_000));
        wire.extend(data(3, FLAG_FIN, b""));
        // All but the window updates are forwarded as they came.
        let mut raw = wire.clone();
        for update in [window_update(5, 300), window_update(0, 70_000)] {
            let at = raw
                .windows(update.len())
                .position(|w| w == update.as_slice())
                .unwrap();
            raw.drain(at..at + update.len());
        }
        (wire, raw)
    }

    #[test]
    fn the_agent_side_reads_the_same_split_at_every_byte_boundary() {
        let (wire, raw) = agent_wire();
        let whole = read(&[&wire]);
        assert_eq!(whole.raw, raw);
        assert_eq!(
            whole.opened,
            vec![
                (1, StreamKind::Error),
                (3, StreamKind::Stdin),
                (5, StreamKind::Stdout),
                (7, StreamKind::Resize),
                (9, StreamKind::Stderr),
            ]
        );
        assert_eq!(
            whole.data,
            vec![
                (7, b"{\"Width\":120,\"Height\":40}\n".to_vec()),
                (3, b"echo hi\r".to_vec()),
            ]
        );
        assert_eq!(whole.grants, vec![(5, 300), (0, 70_000)]);
        assert_eq!(whole.initial, vec![1000]);
        for at in 0..=wire.len() {
            assert_eq!(read(&[&wire[..at], &wire[at..]]), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(read(&bytes), whole, "a byte at a time");
    }

    #[test]
    fn header_blocks_share_one_context_for_the_connection() {
        let mut client = Client::new();
        let first = client.syn_stream(1, "stdout");
        let second = client.syn_stream(3, "stdout");
        // The second block refers back to the first: smaller, and unreadable
        // without having inflated the first.
        assert!(
            second.len() < first.len(),
            "{} {}",
            second.len(),
            first.len()
        );
        let seen = read(&[&first, &second]);
        assert_eq!(
            seen.opened,
            vec![(1, StreamKind::Stdout), (3, StreamKind::Stdout)]
        );
        let mut alone = AgentFrames::new();
        assert!(alone.push(&second, &mut |_| {}).is_err());
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        // The Adler-32 a SPDY/3 header stream names as its dictionary id.
        let mut z = Decompress::new(true);
        let stream = [0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2];
        let need = z
            .decompress_vec(&stream, &mut Vec::with_capacity(16), FlushDecompress::Sync)
            .unwrap_err()
            .needs_dictionary();
        assert_eq!(need, Some(0xe3c6a7c2));
        assert_eq!(z.set_dictionary(&DICTIONARY).unwrap(), 0xe3c6a7c2);
    }

    #[test]
    fn broken_frames_are_errors() {
        let mut frames = AgentFrames::new();
        // A SPDY/2 control frame.
        let err = frames
            .push(&[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 0], &mut |_| {})
            .unwrap_err();
        assert_eq!(err, SpdyError::Version(2));
        // A header block that is not zlib.
        let mut frames = AgentFrames::new();
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend([0; 6]);
        payload.extend(b"not zlib");
        let err = frames
            .push(&control(SYN_STREAM, 0, &payload), &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, SpdyError::Inflate(_)), "{err:?}");
    }
}

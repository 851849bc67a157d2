//! SPDY/3 frames on the wire (draft 3, section 2.2) and the zlib-compressed
//! name/value header blocks (section 2.6.10), one compression context per
//! direction for the whole connection.

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::dictionary::DICTIONARY;

pub const VERSION: u16 = 3;
/// FLAG_FIN on DATA, SYN_STREAM, SYN_REPLY and HEADERS.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// The SETTINGS id of the initial stream window size.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;
/// The largest frame this side accepts (the 24-bit length's maximum).
pub const MAX_FRAME: usize = (1 << 24) - 1;

/// RST_STREAM status codes used here.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
}

/// Header names (lower case, as SPDY/3 requires) and values (several values
/// of one name joined by NUL on the wire).
pub type Headers = Vec<(String, String)>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream: u32,
        associated: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        /// `(flags, id, value)`
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream: u32,
        delta: u32,
    },
    Data {
        stream: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type this side ignores (CREDENTIAL, NOOP...).
    Unknown {
        kind: u16,
    },
}

/// The value of `name` (case-insensitive) in a header block.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

// === impl Encoder ===

/// Serializes frames; owns the connection's header compressor.
pub struct Encoder {
    compress: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        let mut compress = Compress::new(Compression::default(), true);
        compress
            .set_dictionary(DICTIONARY)
            .expect("a fresh compressor takes a dictionary");
        Encoder { compress }
    }

    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) {
        match frame {
            Frame::Data {
                stream,
                flags,
                data,
            } => {
                out.put_u32(stream & 0x7fff_ffff);
                out.put_u8(*flags);
                out.put_uint(data.len() as u64, 3);
                out.put_slice(data);
            }
            Frame::SynStream {
                stream,
                associated,
                priority,
                flags,
                headers,
            } => {
                let block = self.header_block(headers);
                control(out, 1, *flags, 10 + block.len());
                out.put_u32(stream & 0x7fff_ffff);
                out.put_u32(associated & 0x7fff_ffff);
                out.put_u8((priority & 0x7) << 5);
                out.put_u8(0);
                out.put_slice(&block);
            }
            Frame::SynReply {
                stream,
                flags,
                headers,
            } => {
                let block = self.header_block(headers);
                control(out, 2, *flags, 4 + block.len());
                out.put_u32(stream & 0x7fff_ffff);
                out.put_slice(&block);
            }
            Frame::RstStream { stream, status } => {
                control(out, 3, 0, 8);
                out.put_u32(stream & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Settings { flags, entries } => {
                control(out, 4, *flags, 4 + 8 * entries.len());
                out.put_u32(entries.len() as u32);
                for (flags, id, value) in entries {
                    out.put_u8(*flags);
                    out.put_uint(u64::from(*id), 3);
                    out.put_u32(*value);
                }
            }
            Frame::Ping { id } => {
                control(out, 6, 0, 4);
                out.put_u32(*id);
            }
            Frame::GoAway { last_good, status } => {
                control(out, 7, 0, 8);
                out.put_u32(last_good & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Headers {
                stream,
                flags,
                headers,
            } => {
                let block = self.header_block(headers);
                control(out, 8, *flags, 4 + block.len());
                out.put_u32(stream & 0x7fff_ffff);
                out.put_slice(&block);
            }
            Frame::WindowUpdate { stream, delta } => {
                control(out, 9, 0, 8);
                out.put_u32(stream & 0x7fff_ffff);
                out.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Unknown { .. } => {}
        }
    }

    /// The compressed name/value block, ending with a zlib sync flush so the
    /// peer can decompress it on its own.
    fn header_block(&mut self, headers: &Headers) -> Vec<u8> {
        let mut raw = BytesMut::new();
        raw.put_u32(headers.len() as u32);
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            raw.put_u32(name.len() as u32);
            raw.put_slice(name.as_bytes());
            raw.put_u32(value.len() as u32);
            raw.put_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let start = self.compress.total_in();
        loop {
            let consumed = (self.compress.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            self.compress
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .expect("zlib compression of headers in memory");
            let consumed = (self.compress.total_in() - start) as usize;
            if consumed == raw.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, length: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u8(flags);
    out.put_uint(length as u64, 3);
}

// === impl Decoder ===

/// Reads frames; owns the connection's header decompressor.
pub struct Decoder<R> {
    read: R,
    decompress: Decompress,
}

impl<R: AsyncRead + Unpin> Decoder<R> {
    pub fn new(read: R) -> Self {
        Decoder {
            read,
            decompress: Decompress::new(true),
        }
    }

    /// The next frame, or `None` at a clean end of the connection.
    pub async fn read(&mut self) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        match self.read.read_exact(&mut head[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        self.read.read_exact(&mut head[1..]).await?;
        let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = head[4];
        let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut payload = vec![0u8; length];
        self.read.read_exact(&mut payload).await?;
        let payload = Bytes::from(payload);
        if word & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream: word,
                flags,
                data: payload,
            }));
        }
        let version = ((word >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(invalid(format!(
                "SPDY version {version}, this side speaks 3"
            )));
        }
        let kind = (word & 0xffff) as u16;
        let u32_at = |at: usize| -> io::Result<u32> {
            payload
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| invalid(format!("control frame {kind} too short")))
        };
        let frame = match kind {
            1 => Frame::SynStream {
                stream: u32_at(0)? & 0x7fff_ffff,
                associated: u32_at(4)? & 0x7fff_ffff,
                priority: payload.get(8).copied().unwrap_or(0) >> 5,
                flags,
                headers: self.headers(payload.get(10..).unwrap_or_default())?,
            },
            2 => Frame::SynReply {
                stream: u32_at(0)? & 0x7fff_ffff,
                flags,
                headers: self.headers(payload.get(4..).unwrap_or_default())?,
            },
            3 => Frame::RstStream {
                stream: u32_at(0)? & 0x7fff_ffff,
                status: u32_at(4)?,
            },
            4 => {
                let count = u32_at(0)? as usize;
                let mut entries = Vec::with_capacity(count.min(64));
                for i in 0..count {
                    let at = 4 + 8 * i;
                    let id_word = u32_at(at)?;
                    entries.push(((id_word >> 24) as u8, id_word & 0xff_ffff, u32_at(at + 4)?));
                }
                Frame::Settings { flags, entries }
            }
            6 => Frame::Ping { id: u32_at(0)? },
            7 => Frame::GoAway {
                last_good: u32_at(0)? & 0x7fff_ffff,
                status: u32_at(4).unwrap_or(0),
            },
            8 => Frame::Headers {
                stream: u32_at(0)? & 0x7fff_ffff,
                flags,
                headers: self.headers(payload.get(4..).unwrap_or_default())?,
            },
            9 => Frame::WindowUpdate {
                stream: u32_at(0)? & 0x7fff_ffff,
                delta: u32_at(4)? & 0x7fff_ffff,
            },
            kind => Frame::Unknown { kind },
        };
        Ok(Some(frame))
    }

    /// Decompresses and parses one name/value block.
    fn headers(&mut self, block: &[u8]) -> io::Result<Headers> {
        let mut raw = Vec::with_capacity(block.len() * 4 + 64);
        let start = self.decompress.total_in();
        loop {
            let consumed = (self.decompress.total_in() - start) as usize;
            if raw.capacity() - raw.len() < 256 {
                raw.reserve(raw.capacity().max(1024));
            }
            match self.decompress.decompress_vec(
                &block[consumed..],
                &mut raw,
                FlushDecompress::Sync,
            ) {
                Ok(Status::StreamEnd) => return Err(invalid("header compression stream ended")),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.decompress
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| invalid(format!("SPDY header dictionary: {e}")))?;
                }
                Err(e) => return Err(invalid(format!("header block: {e}"))),
            }
            let consumed = (self.decompress.total_in() - start) as usize;
            if consumed == block.len() && raw.len() < raw.capacity() {
                break;
            }
        }
        parse_block(&raw)
    }
}

fn parse_block(raw: &[u8]) -> io::Result<Headers> {
    let mut at = 0;
    let mut take = |n: usize| -> io::Result<&[u8]> {
        let slice = raw
            .get(at..at + n)
            .ok_or_else(|| invalid("truncated header block"))?;
        at += n;
        Ok(slice)
    };
    let len = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = len(take(4)?);
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = len(take(4)?);
        let name = String::from_utf8_lossy(take(n)?).into_owned();
        let n = len(take(4)?);
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        headers.push((name, value));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_has_the_spec_checksum() {
        let mut c = Compress::new(Compression::default(), true);
        assert_eq!(c.set_dictionary(DICTIONARY).unwrap(), 0xe3c6_a7c2);
    }

    #[tokio::test]
    async fn frames_round_trip_with_a_shared_compression_context() {
        let frames = vec![
            Frame::SynStream {
                stream: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "error".into())],
            },
            Frame::SynStream {
                stream: 3,
                associated: 0,
                priority: 0,
                flags: FLAG_FIN,
                headers: vec![
                    ("streamtype".into(), "data".into()),
                    ("port".into(), "8080".into()),
                ],
            },
            Frame::SynReply {
                stream: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Data {
                stream: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::RstStream {
                stream: 3,
                status: rst::CANCEL,
            },
            Frame::Settings {
                flags: 0,
                entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good: 3,
                status: 0,
            },
            Frame::WindowUpdate {
                stream: 0,
                delta: 4096,
            },
        ];
        let mut encoder = Encoder::new();
        let mut wire = BytesMut::new();
        for frame in &frames {
            encoder.encode(frame, &mut wire);
        }
        let mut decoder = Decoder::new(&wire[..]);
        for frame in &frames {
            assert_eq!(decoder.read().await.unwrap().as_ref(), Some(frame));
        }
        assert_eq!(decoder.read().await.unwrap(), None);
    }

    #[test]
    fn header_lookup_ignores_case() {
        let headers = vec![("streamtype".to_string(), "stdout".to_string())];
        assert_eq!(header(&headers, "streamType"), Some("stdout"));
    }
}

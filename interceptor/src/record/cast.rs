//! asciicast v2 files for exec/attach streams, so `asciinema play FILE`
//! replays what the agent typed and saw.
//!
//! Format (<https://docs.asciinema.org/manual/asciicast/v2/>): a header line
//! `{"version": 2, "width": W, "height": H, "timestamp": UNIX, "env": {...},
//! "title": "..."}`, then one event per line, `[seconds, "o" | "i", "data"]`,
//! with seconds since the start as a float and data as UTF-8 text. stdout and
//! stderr become `"o"`, stdin becomes `"i"`. Bytes are decoded per channel so a
//! UTF-8 character split across two frames stays whole.

use std::io::{self, Write};

use serde_json::json;
use time::OffsetDateTime;

/// A channel of an exec/attach stream, as the proxy decoded it (WebSocket
/// `v4/v5.channel.k8s.io` channel bytes or SPDY stream types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Stdin,
    Stdout,
    Stderr,
}

impl Channel {
    fn index(self) -> usize {
        match self {
            Channel::Stdin => 0,
            Channel::Stdout => 1,
            Channel::Stderr => 2,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Channel::Stdin => "i",
            Channel::Stdout | Channel::Stderr => "o",
        }
    }
}

/// What kind of stream and what ran in it; becomes the cast's title.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamInfo {
    /// `exec` or `attach`.
    pub kind: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The exec command (empty for attach).
    pub command: Vec<String>,
    pub tty: bool,
    /// Terminal size, when the client sent one; 80x24 otherwise.
    pub width: u16,
    pub height: u16,
}

impl StreamInfo {
    pub fn title(&self) -> String {
        let mut title = format!("{} {}/{}", self.kind, self.namespace, self.pod);
        if !self.container.is_empty() {
            title.push_str(" -c ");
            title.push_str(&self.container);
        }
        if !self.command.is_empty() {
            title.push_str(" -- ");
            title.push_str(&self.command.join(" "));
        }
        title
    }
}

/// Writes one cast file.
pub struct CastWriter<W: Write> {
    out: W,
    started: OffsetDateTime,
    /// Per channel, bytes of an incomplete UTF-8 character held back.
    pending: [Vec<u8>; 3],
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl<W: Write> CastWriter<W> {
    /// Writes the header.
    pub fn new(mut out: W, info: &StreamInfo, started: OffsetDateTime) -> io::Result<Self> {
        let width = if info.width == 0 { 80 } else { info.width };
        let height = if info.height == 0 { 24 } else { info.height };
        let header = json!({
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": started.unix_timestamp(),
            "env": {"SHELL": info.command.first().cloned().unwrap_or_default(), "TERM": "xterm-256color"},
            "title": info.title(),
        });
        serde_json::to_writer(&mut out, &header)?;
        out.write_all(b"\n")?;
        Ok(Self {
            out,
            started,
            pending: Default::default(),
            bytes_in: 0,
            bytes_out: 0,
        })
    }

    /// Appends the bytes of one frame.
    pub fn data(&mut self, channel: Channel, bytes: &[u8], at: OffsetDateTime) -> io::Result<()> {
        match channel {
            Channel::Stdin => self.bytes_in += bytes.len() as u64,
            _ => self.bytes_out += bytes.len() as u64,
        }
        let pending = &mut self.pending[channel.index()];
        pending.extend_from_slice(bytes);
        let text = take_utf8(pending);
        if text.is_empty() {
            return Ok(());
        }
        self.event(channel, &text, at)
    }

    fn event(&mut self, channel: Channel, text: &str, at: OffsetDateTime) -> io::Result<()> {
        let secs = (at - self.started).as_seconds_f64().max(0.0);
        // Microsecond precision, as asciinema itself writes.
        let secs = (secs * 1e6).round() / 1e6;
        serde_json::to_writer(&mut self.out, &json!([secs, channel.code(), text]))?;
        self.out.write_all(b"\n")
    }

    /// The underlying writer (to flush it).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes what is held back (as replacement characters if it never became
    /// valid UTF-8) and returns the writer.
    pub fn finish(mut self, at: OffsetDateTime) -> io::Result<W> {
        for channel in [Channel::Stdin, Channel::Stdout, Channel::Stderr] {
            let rest = std::mem::take(&mut self.pending[channel.index()]);
            if !rest.is_empty() {
                let text = String::from_utf8_lossy(&rest).into_owned();
                self.event(channel, &text, at)?;
            }
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Takes the longest decodable prefix of `buf` (invalid sequences become
/// U+FFFD), leaving an incomplete trailing character in `buf`.
fn take_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&buf[start..]) {
            Ok(s) => {
                out.push_str(s);
                buf.clear();
                return out;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[start..valid]).expect("validated"));
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start = valid + n;
                    }
                    None => {
                        buf.drain(..valid);
                        return out;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_stay_whole_and_bad_bytes_are_replaced() {
        let mut buf = "é".as_bytes()[..1].to_vec();
        assert_eq!(take_utf8(&mut buf), "");
        buf.push("é".as_bytes()[1]);
        assert_eq!(take_utf8(&mut buf), "é");
        let mut buf = vec![b'a', 0xff, b'b'];
        assert_eq!(take_utf8(&mut buf), "a\u{FFFD}b");
        assert!(buf.is_empty());
    }
}

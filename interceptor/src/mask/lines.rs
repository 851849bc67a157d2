//! Pattern rules on a text stream: pod logs and exec/attach output.
//!
//! Text is masked a line at a time, whatever the chunking: the partial line
//! at the end of a chunk is carried over (bounded by
//! [`Limits::max_line_bytes`]), so a secret split across chunks is still
//! seen whole. A line longer than the limit is masked and forwarded in
//! pieces, keeping a tail of [`Limits::carry_bytes`] (moved back to the
//! start of any secret that reaches it) for the next piece.
//!
//! A PEM private key spans lines: from a line with `-----BEGIN ... PRIVATE
//! KEY-----` and no END, every following line is dropped up to and
//! including the END marker (the BEGIN line shows the marker). A block with
//! no END stops being dropped after [`MAX_PEM_LINES`] lines, so a stray
//! BEGIN cannot swallow a whole log.

use std::sync::Arc;

use memchr::memchr;
use memchr::memmem;

use super::patterns::Hit;
use super::{Compiled, MaskStats};

/// Lines dropped inside one PEM block at most.
pub(crate) const MAX_PEM_LINES: u32 = 1000;

pub(crate) struct LineMask {
    compiled: Arc<Compiled>,
    pending: Vec<u8>,
    /// Pending size that triggers the next over-long-line check: raised
    /// while a secret keeps a long line from being cut, so tiny chunks do
    /// not rescan the whole line each time.
    next_overflow: usize,
    /// A secret ran past a forced cut of an over-long line: its rest (up to
    /// the next delimiter) is dropped.
    swallow: bool,
    /// Inside a PEM private key block: lines dropped so far.
    pem: Option<u32>,
    /// The start of the current line, already forwarded by [`Self::flush`]:
    /// the context the rest of the line is masked in.
    released: Vec<u8>,
    hits: Vec<Hit>,
    stats: MaskStats,
}

impl LineMask {
    pub(crate) fn new(compiled: Arc<Compiled>) -> Self {
        Self {
            next_overflow: compiled.limits.max_line_bytes,
            compiled,
            pending: Vec::new(),
            swallow: false,
            pem: None,
            released: Vec::new(),
            hits: Vec::new(),
            stats: MaskStats::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn holds_back(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(crate) fn stats(&self) -> &MaskStats {
        &self.stats
    }

    pub(crate) fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if self.swallow {
            match input.iter().position(|&b| is_delimiter(b)) {
                Some(at) => {
                    self.swallow = false;
                    input = &input[at..];
                }
                None => return,
            }
        }
        while let Some(nl) = memchr(b'\n', input) {
            let (line, rest) = input.split_at(nl + 1);
            if self.pending.is_empty() && self.released.is_empty() {
                self.line(line, out, 0);
            } else {
                // The line's start: what a flush released, then what waits.
                let mut whole = std::mem::take(&mut self.released);
                let skip = whole.len();
                whole.extend_from_slice(&self.pending);
                whole.extend_from_slice(line);
                self.pending.clear();
                self.line(&whole, out, skip);
            }
            input = rest;
        }
        self.pending.extend_from_slice(input);
        if self.pending.len() > self.next_overflow {
            self.overflow(out);
        }
    }

    /// Forwards the partial line held back, masked. For interactive exec
    /// sessions when the upstream is idle (a prompt without a newline); a
    /// secret that continues in a later chunk is then only masked from there.
    ///
    /// What was released is kept as the line's context: the rest of the line
    /// is masked as part of the whole, so `API_TOKEN=` released before an
    /// idle pause still masks the value that follows it, and a secret cut
    /// by the pause has its rest masked too.
    pub(crate) fn flush(&mut self, out: &mut Vec<u8>) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        if self.pem.is_some() {
            // Inside a key block nothing is released; the END may follow.
            self.line(&pending, out, 0);
            return;
        }
        let mut whole = std::mem::take(&mut self.released);
        let skip = whole.len();
        whole.extend_from_slice(&pending);
        self.mask(&whole, skip, out);
        if whole.len() <= self.compiled.limits.max_line_bytes {
            self.released = whole;
        }
    }

    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        self.flush(out);
    }

    /// One line, with its terminator if it has one; its first `skip` bytes
    /// were already forwarded (released by a flush).
    fn line(&mut self, line: &[u8], out: &mut Vec<u8>, skip: usize) {
        self.next_overflow = self.compiled.limits.max_line_bytes;
        let body_len = line.strip_suffix(b"\n").map_or(line.len(), |l| {
            l.strip_suffix(b"\r").map_or(l.len(), <[u8]>::len)
        });
        let (body, terminator) = line.split_at(body_len);
        let body = if let Some(dropped) = self.pem {
            match find_pem_end(body) {
                Some(end) => {
                    self.pem = None;
                    self.stats.lines_dropped += 1;
                    let rest = &body[end..];
                    if rest.iter().all(u8::is_ascii_whitespace) {
                        return;
                    }
                    rest
                }
                None => {
                    self.pem = (dropped + 1 < MAX_PEM_LINES).then_some(dropped + 1);
                    self.stats.lines_dropped += 1;
                    return;
                }
            }
        } else {
            body
        };
        self.mask(body, skip, out);
        out.extend_from_slice(&terminator[skip.saturating_sub(body.len())..]);
        if self.compiled.pem_blocks && opens_pem(body) {
            self.pem = Some(0);
        }
    }

    /// Masks `text` and forwards it from `skip` on (what comes before was
    /// forwarded already): hits inside that start were masked then, a hit
    /// running past it is masked from there.
    fn mask(&mut self, text: &[u8], skip: usize, out: &mut Vec<u8>) {
        let mut hits = std::mem::take(&mut self.hits);
        self.compiled.patterns.hits(text, &mut hits);
        if skip > 0 {
            hits.retain(|hit| hit.end > skip);
            for hit in &mut hits {
                hit.start = hit.start.max(skip) - skip;
                hit.end -= skip;
                hit.context = hit.context.saturating_sub(skip);
            }
        }
        let text = &text[skip.min(text.len())..];
        if hits.is_empty() {
            out.extend_from_slice(text);
        } else {
            self.compiled.patterns.write_masked(text, &hits, out);
            self.stats.values_masked += 1;
            self.stats.pattern_matches += hits.len() as u64;
            for hit in &hits {
                if self.stats.wants_field() {
                    self.stats
                        .add_field(self.compiled.patterns.rule_name(hit.rule));
                }
            }
        }
        self.hits = hits;
    }

    /// The partial line outgrew the limit: forward all but a tail.
    fn overflow(&mut self, out: &mut Vec<u8>) {
        let limits = &self.compiled.limits;
        let pending = std::mem::take(&mut self.pending);
        // An over-long line is masked in pieces, each on its own.
        self.released.clear();
        if self.pem.is_some() {
            // Key material: dropped, keeping a tail where END may begin.
            let keep = limits.carry_bytes.min(pending.len());
            if let Some(end) = find_pem_end(&pending) {
                self.pem = None;
                self.pending = pending[end..].to_vec();
            } else {
                self.pending = pending[pending.len() - keep..].to_vec();
            }
            return;
        }
        let mut cut = pending.len().saturating_sub(limits.carry_bytes);
        let mut hits = std::mem::take(&mut self.hits);
        self.compiled.patterns.hits(&pending, &mut hits);
        // Never cut through a secret or its context, nor right after a
        // secret that may go on.
        for hit in &hits {
            if hit.context < cut && (hit.end > cut || hit.end == pending.len()) {
                cut = hit.context;
                break;
            }
        }
        let runs_on = hits.last().is_some_and(|hit| hit.end == pending.len());
        self.hits = hits;
        if cut == 0 && pending.len() < 2 * limits.max_line_bytes {
            self.next_overflow = pending.len() + limits.carry_bytes;
            self.pending = pending;
            return;
        }
        self.next_overflow = limits.max_line_bytes;
        if cut == 0 {
            // One secret fills the buffer: mask what there is, drop its rest.
            cut = pending.len();
            self.swallow = runs_on;
        }
        let (head, tail) = pending.split_at(cut);
        self.mask(head, 0, out);
        if self.compiled.pem_blocks && opens_pem(head) {
            self.pem = Some(0);
        }
        self.pending = tail.to_vec();
    }
}

/// Where a token (and so a secret the rules match) ends.
fn is_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'"' | b'\'' | b',' | b';' | b'&' | b'<' | b'>')
}

const BEGIN: &[u8] = b"-----BEGIN";
const END: &[u8] = b"-----END";
const PRIVATE_KEY: &[u8] = b"PRIVATE KEY-----";

/// Whether `text` has a private-key BEGIN line with no END after it.
fn opens_pem(text: &[u8]) -> bool {
    let Some(begin) = memmem::rfind(text, BEGIN) else {
        return false;
    };
    let rest = &text[begin..];
    let Some(header_end) = memmem::find(rest, PRIVATE_KEY) else {
        return false;
    };
    let header = &rest[BEGIN.len()..header_end];
    if !header
        .iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b' ')
    {
        return false;
    }
    find_pem_end(&rest[header_end..]).is_none()
}

/// The offset just past a private-key END marker in `text`.
fn find_pem_end(text: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = memmem::find(&text[from..], END) {
        let start = from + at + END.len();
        let rest = &text[start..];
        let header_len = rest
            .iter()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || **b == b' ')
            .count();
        let header = &rest[..header_len];
        if header.ends_with(b"PRIVATE KEY") && rest[header_len..].starts_with(b"-----") {
            return Some(start + header_len + 5);
        }
        from = start;
    }
    None
}

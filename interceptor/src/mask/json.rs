//! The streaming JSON transform: a small tokenizer that copies every byte
//! through unchanged except the string values the [`Schema`] marks as
//! sensitive, which it replaces.
//!
//! Memory is bounded whatever the body size: the container stack (depth
//! limit), the current key (only kept where the schema needs it, capped) and
//! the one value being masked. Secret `data`/`stringData` values are never
//! buffered at all (only their size is counted); values that must be read
//! (pattern rules, the last-applied annotation) are buffered up to
//! [`Limits::max_value_bytes`] and replaced whole beyond it.
//!
//! Anything that is not JSON is an error: the caller stops forwarding, it
//! never passes the rest through raw.

use std::sync::Arc;

use super::schema::{IGNORE, Leaf, NodeId};
use super::{Compiled, MaskError, MaskStats, marker, scan};

/// Deepest nesting accepted; Kubernetes objects stay far below it.
pub(crate) const MAX_DEPTH: usize = 512;
/// Longest key or env var name kept; longer keys match no named schema
/// entry, longer env var names are not checked against the name rule.
const MAX_CAPTURE: usize = 1024;

/// One document (get, list, Table) or a stream of them (watch events).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Single,
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a value (after `:`, `,` in an array, or at the top level).
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    ObjectKey,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket.
    After,
    /// Inside a key or a string value that passes through.
    Str,
    /// Just after a backslash in [`State::Str`].
    StrEscape,
    /// Inside a string value being masked.
    Leaf,
    /// Inside `true`, `false` or `null`.
    Literal,
    /// Inside a number.
    Number,
    /// Inside an array or object where nothing needs masking ([`IGNORE`]):
    /// brackets and strings are followed to find its end, nothing else is
    /// interpreted ([`Skip`]).
    Skip,
    /// After the single document: whitespace only.
    End,
}

/// Where [`State::Skip`] is inside the container it skips.
#[derive(Clone, Copy, Debug, Default)]
struct Skip {
    /// The stack depth of the skipped container: it ends when a closing
    /// bracket takes the stack below this.
    base: usize,
    in_string: bool,
    /// Just after a backslash in a string.
    escape: bool,
}

/// How [`State::Skip`] reads a byte outside strings.
const SKIP_PLAIN: u8 = 0;
const SKIP_QUOTE: u8 = 1;
const SKIP_OPEN: u8 = 2;
const SKIP_CLOSE: u8 = 3;
const SKIP_INVALID: u8 = 4;

/// Outside strings a JSON value holds only whitespace, punctuation,
/// numbers and the letters of `true`, `false` and `null`: anything else is
/// refused as in the rest of the document.
const SKIP_CLASS: [u8; 256] = {
    let mut table = [SKIP_INVALID; 256];
    let plain = b" \t\n\r,:-+.0123456789eEtrufalsn";
    let mut k = 0;
    while k < plain.len() {
        table[plain[k] as usize] = SKIP_PLAIN;
        k += 1;
    }
    table[b'"' as usize] = SKIP_QUOTE;
    table[b'{' as usize] = SKIP_OPEN;
    table[b'[' as usize] = SKIP_OPEN;
    table[b'}' as usize] = SKIP_CLOSE;
    table[b']' as usize] = SKIP_CLOSE;
    table
};

#[derive(Clone, Copy, Debug)]
struct Frame {
    object: bool,
    node: NodeId,
}

/// Escape decoding inside a masked string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// `\u`: hex digits still expected, code point so far.
    Unicode(u8, u32),
}

/// The string value being masked.
struct LeafValue {
    leaf: Leaf,
    node: NodeId,
    /// Raw (still escaped) bytes, for leaves that must be read.
    raw: Vec<u8>,
    /// The same bytes decoded as they are read, while every escape decodes
    /// to one byte (`decoded_exact`); after a `\u` escape, [`unescape`]
    /// decodes `raw` at the end instead.
    decoded: Vec<u8>,
    /// Each escape read: (offset in `decoded`, its length in `raw`), so an
    /// embedded document can be rewritten around its masked values
    /// ([`splice`]) instead of escaped anew.
    escapes: Vec<(usize, usize)>,
    decoded_exact: bool,
    buffered: bool,
    overflow: bool,
    /// Decoded size in bytes.
    len: u64,
    /// Trailing `=` count, for base64 sizes.
    pad: u64,
    escape: Escape,
}

pub(crate) struct JsonMask {
    compiled: Arc<Compiled>,
    root: NodeId,
    framing: Framing,
    state: State,
    stack: Vec<Frame>,
    /// The node of the next value.
    value_node: NodeId,
    /// Whether the string in [`State::Str`] is a key.
    in_key: bool,
    /// Copying the current string into `capture`.
    capturing: bool,
    capture: Vec<u8>,
    /// `capture` holds a backslash (it must be unescaped).
    capture_escaped: bool,
    /// The last key read where the schema needed it (label of `any_key` leaves).
    key: Vec<u8>,
    env_name: Vec<u8>,
    literal: &'static [u8],
    literal_at: usize,
    leaf: LeafValue,
    offset: u64,
    seen_value: bool,
    failed: Option<MaskError>,
    stats: MaskStats,
    /// Reused buffers: masked embedded document, field label.
    masked: Vec<u8>,
    label: String,
    /// Reused transform for embedded documents (last-applied).
    nested: Option<Box<JsonMask>>,
    skip: Skip,
    /// In an embedded document: the string values that went through
    /// [`Self::finish_leaf`] and what they became, so the outer string can
    /// be rewritten around them ([`splice`]). `None` at the top level.
    spans: Option<Vec<Span>>,
    /// Where the current leaf began: its opening quote in the input, and
    /// the output length then.
    leaf_at: (usize, usize),
    /// Fields already in `stats` (leaf node and key or env var name), so a
    /// list of a thousand Secrets builds each label once.
    recorded: Vec<(NodeId, Vec<u8>)>,
    /// The embedded-document fields last merged into `stats`: the leaf
    /// node, and how many fields the nested stats held (they only grow).
    merged: Option<(NodeId, usize, bool)>,
}

/// A string value of an embedded document and what replaced it: input
/// `start..end` (quotes included) became output `out_start..out_end`.
/// Everything between spans is the input unchanged.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    end: usize,
    out_start: usize,
    out_end: usize,
}

impl JsonMask {
    pub(crate) fn new(compiled: Arc<Compiled>, root: NodeId, framing: Framing) -> Self {
        Self {
            compiled,
            root,
            framing,
            state: State::Value,
            stack: Vec::new(),
            value_node: root,
            in_key: false,
            capturing: false,
            capture: Vec::new(),
            capture_escaped: false,
            key: Vec::new(),
            env_name: Vec::new(),
            literal: b"",
            literal_at: 0,
            leaf: LeafValue {
                leaf: Leaf::PlainSecret,
                node: IGNORE,
                raw: Vec::new(),
                decoded: Vec::new(),
                escapes: Vec::new(),
                decoded_exact: true,
                buffered: false,
                overflow: false,
                len: 0,
                pad: 0,
                escape: Escape::None,
            },
            offset: 0,
            seen_value: false,
            failed: None,
            stats: MaskStats::default(),
            masked: Vec::new(),
            label: String::new(),
            nested: None,
            skip: Skip::default(),
            spans: None,
            leaf_at: (0, 0),
            recorded: Vec::new(),
            merged: None,
        }
    }

    /// Ready for a new document at `root`, keeping allocations.
    fn reset(&mut self, root: NodeId, framing: Framing) {
        self.root = root;
        self.framing = framing;
        self.state = State::Value;
        self.stack.clear();
        self.value_node = root;
        self.in_key = false;
        self.capturing = false;
        self.capture.clear();
        self.capture_escaped = false;
        self.key.clear();
        self.env_name.clear();
        self.offset = 0;
        self.seen_value = false;
        self.failed = None;
        // The fields stay: `recorded` and `merged` know them.
        self.stats.reset_counts();
        if let Some(spans) = &mut self.spans {
            spans.clear();
        }
    }

    pub(crate) fn stats(&self) -> &MaskStats {
        &self.stats
    }

    pub(crate) fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let result = self.run(input, out);
        self.offset += input.len() as u64;
        if let Err(error) = &result {
            self.failed = Some(error.clone());
        }
        result
    }

    pub(crate) fn finish(&mut self, _out: &mut Vec<u8>) -> Result<(), MaskError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let complete = match self.state {
            State::End => true,
            State::Value => {
                self.stack.is_empty() && (self.framing == Framing::Stream || !self.seen_value)
            }
            State::Number => self.stack.is_empty(),
            _ => false,
        };
        if complete {
            Ok(())
        } else {
            let error = MaskError::Truncated {
                offset: self.offset,
            };
            self.failed = Some(error.clone());
            Err(error)
        }
    }

    fn invalid(&self, at: usize, reason: &'static str) -> MaskError {
        MaskError::InvalidJson {
            offset: self.offset + at as u64,
            reason,
        }
    }

    fn run(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        let n = input.len();
        let mut i = 0;
        // Start of the bytes not yet copied to `out`.
        let mut emit = 0;
        while i < n {
            match self.state {
                State::Str => match find_quote_or_backslash(&input[i..]) {
                    None => {
                        if self.capturing {
                            self.capture_extend(&input[i..]);
                        }
                        i = n;
                    }
                    Some(k) => {
                        let j = i + k;
                        if self.capturing {
                            self.capture_extend(&input[i..=j]);
                        }
                        i = j + 1;
                        if input[j] == b'\\' {
                            self.state = State::StrEscape;
                        } else {
                            self.end_string(j)?;
                            i = self.shortcut(input, i);
                        }
                    }
                },
                State::StrEscape => {
                    if self.capturing {
                        self.capture_escaped = true;
                        self.capture_extend(&input[i..=i]);
                    }
                    i += 1;
                    self.state = State::Str;
                }
                State::Skip => {
                    let (consumed, closed) = self.skip_scan(&input[i..], i)?;
                    i += consumed;
                    if closed {
                        self.after_value();
                        i = self.shortcut(input, i);
                    }
                }
                State::Leaf => {
                    let (consumed, closed) = self.leaf_scan(&input[i..], i)?;
                    i += consumed;
                    if closed {
                        let out_start = out.len();
                        self.finish_leaf(out)?;
                        if let Some(spans) = &mut self.spans {
                            debug_assert_eq!(self.leaf_at.1, out_start);
                            spans.push(Span {
                                start: self.leaf_at.0,
                                end: self.offset as usize + i,
                                out_start,
                                out_end: out.len(),
                            });
                        }
                        emit = i;
                        self.after_value();
                    }
                }
                State::Value | State::ArrayFirst => {
                    let c = input[i];
                    match c {
                        b' ' | b'\t' | b'\n' | b'\r' => i = skip_whitespace(input, i + 1),
                        b']' if self.state == State::ArrayFirst => {
                            i += 1;
                            self.stack.pop();
                            self.after_value();
                        }
                        b'{' | b'[' => {
                            if self.stack.len() >= MAX_DEPTH {
                                return Err(MaskError::TooDeep {
                                    offset: self.offset + i as u64,
                                    limit: MAX_DEPTH,
                                });
                            }
                            self.seen_value = true;
                            let node = self.value_node;
                            i += 1;
                            if node == IGNORE {
                                // Nothing inside can need masking: find its
                                // end without reading it token by token.
                                self.stack.push(Frame {
                                    object: c == b'{',
                                    node,
                                });
                                self.skip = Skip {
                                    base: self.stack.len(),
                                    in_string: false,
                                    escape: false,
                                };
                                self.state = State::Skip;
                            } else if c == b'{' {
                                self.stack.push(Frame { object: true, node });
                                self.state = State::ObjectFirst;
                            } else {
                                self.stack.push(Frame {
                                    object: false,
                                    node,
                                });
                                self.value_node = self.compiled.schema.child_index(node);
                                self.state = State::ArrayFirst;
                            }
                        }
                        b'"' => {
                            self.seen_value = true;
                            let node = self.value_node;
                            match self.compiled.schema.node(node).leaf {
                                None => {
                                    self.in_key = false;
                                    self.capturing = false;
                                    self.state = State::Str;
                                }
                                Some(Leaf::EnvName) => {
                                    self.in_key = false;
                                    self.capturing = true;
                                    self.capture.clear();
                                    self.capture_escaped = false;
                                    self.state = State::Str;
                                }
                                Some(leaf) => {
                                    out.extend_from_slice(&input[emit..i]);
                                    self.leaf_at = (self.offset as usize + i, out.len());
                                    self.start_leaf(leaf, node);
                                    self.state = State::Leaf;
                                }
                            }
                            i += 1;
                        }
                        b't' | b'f' | b'n' => {
                            self.seen_value = true;
                            self.literal = match c {
                                b't' => b"true",
                                b'f' => b"false",
                                _ => b"null",
                            };
                            self.literal_at = 1;
                            self.state = State::Literal;
                            i += 1;
                        }
                        b'-' | b'0'..=b'9' => {
                            self.seen_value = true;
                            self.state = State::Number;
                            i += 1;
                        }
                        _ => return Err(self.invalid(i, "expected a JSON value")),
                    }
                }
                State::ObjectFirst | State::ObjectKey => match input[i] {
                    b' ' | b'\t' | b'\n' | b'\r' => i = skip_whitespace(input, i + 1),
                    b'"' => {
                        i += 1;
                        self.start_key();
                    }
                    b'}' if self.state == State::ObjectFirst => {
                        i += 1;
                        self.stack.pop();
                        self.after_value();
                    }
                    _ => return Err(self.invalid(i, "expected an object key")),
                },
                State::Colon => match input[i] {
                    b' ' | b'\t' | b'\n' | b'\r' => i = skip_whitespace(input, i + 1),
                    b':' => {
                        i += 1;
                        self.state = State::Value;
                    }
                    _ => return Err(self.invalid(i, "expected ':' after an object key")),
                },
                State::After => match input[i] {
                    b' ' | b'\t' | b'\n' | b'\r' => i = skip_whitespace(input, i + 1),
                    b',' => {
                        i += 1;
                        let frame = *self.stack.last().expect("After is inside a container");
                        if frame.object {
                            self.state = State::ObjectKey;
                        } else {
                            self.value_node = self.compiled.schema.child_index(frame.node);
                            self.state = State::Value;
                        }
                    }
                    c @ (b'}' | b']') => {
                        let frame = *self.stack.last().expect("After is inside a container");
                        if frame.object != (c == b'}') {
                            return Err(self.invalid(i, "mismatched closing bracket"));
                        }
                        i += 1;
                        self.stack.pop();
                        self.after_value();
                    }
                    _ => return Err(self.invalid(i, "expected ',' or a closing bracket")),
                },
                State::Literal => {
                    if input[i] != self.literal[self.literal_at] {
                        return Err(self.invalid(i, "invalid literal"));
                    }
                    i += 1;
                    self.literal_at += 1;
                    if self.literal_at == self.literal.len() {
                        self.after_value();
                    }
                }
                State::Number => match input[i] {
                    b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-' => i += 1,
                    _ => self.after_value(),
                },
                State::End => match input[i] {
                    b' ' | b'\t' | b'\n' | b'\r' => i = skip_whitespace(input, i + 1),
                    _ => return Err(self.invalid(i, "data after the end of the JSON document")),
                },
            }
        }
        if self.state != State::Leaf {
            out.extend_from_slice(&input[emit..]);
        }
        Ok(())
    }

    /// After a string: takes the usual next steps (`:` and a plain string
    /// value after a key; `,` and the next key after a value) without a
    /// trip through the state dispatch. Returns the new position. Only ever
    /// does what the dispatch would do with the same bytes.
    #[inline]
    fn shortcut(&mut self, input: &[u8], mut i: usize) -> usize {
        match self.state {
            State::Colon if input.get(i) == Some(&b':') => {
                self.state = State::Value;
                i = skip_whitespace(input, i + 1);
                if input.get(i) == Some(&b'"')
                    && self.compiled.schema.node(self.value_node).leaf.is_none()
                {
                    i += 1;
                    self.seen_value = true;
                    self.in_key = false;
                    self.capturing = false;
                    self.state = State::Str;
                }
            }
            State::After
                if input.get(i) == Some(&b',')
                    && self.stack.last().is_some_and(|frame| frame.object) =>
            {
                self.state = State::ObjectKey;
                i = skip_whitespace(input, i + 1);
                if input.get(i) == Some(&b'"') {
                    i += 1;
                    self.start_key();
                }
            }
            _ => {}
        }
        i
    }

    /// After the opening quote of an object key.
    #[inline]
    fn start_key(&mut self) {
        self.in_key = true;
        let node = self.stack.last().map_or(IGNORE, |f| f.node);
        self.capturing = self.compiled.schema.needs_key(node);
        self.capture.clear();
        self.capture_escaped = false;
        self.state = State::Str;
    }

    /// Copies string bytes (with the closing quote) into `capture`, keeping
    /// at most one byte beyond [`MAX_CAPTURE`] to tell that it overflowed.
    #[inline]
    fn capture_extend(&mut self, bytes: &[u8]) {
        let room = (MAX_CAPTURE + 2).saturating_sub(self.capture.len());
        self.capture
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The captured string, unescaped into `into`; `false` when it was too
    /// long to keep. Without escapes the two buffers trade places.
    fn take_capture(&mut self, at: usize, into: &mut Vec<u8>) -> Result<bool, MaskError> {
        into.clear();
        if self.capture.len() > MAX_CAPTURE {
            return Ok(false);
        }
        self.capture.pop(); // the closing quote
        if self.capture_escaped {
            if unescape(&self.capture, into).is_err() {
                return Err(self.invalid(at, "invalid escape in a string"));
            }
        } else {
            std::mem::swap(&mut self.capture, into);
        }
        Ok(true)
    }

    /// The closing quote of a pass-through string at `at`.
    fn end_string(&mut self, at: usize) -> Result<(), MaskError> {
        if !self.in_key {
            if self.capturing {
                // An env var name: keep it for its value.
                self.capturing = false;
                let mut name = std::mem::take(&mut self.env_name);
                self.take_capture(at, &mut name)?;
                self.env_name = name;
            }
            self.after_value();
            return Ok(());
        }
        self.state = State::Colon;
        let node = self.stack.last().map_or(IGNORE, |f| f.node);
        if !self.capturing {
            self.value_node = self.compiled.schema.child_key(node, b"");
            return Ok(());
        }
        self.capturing = false;
        let mut key = std::mem::take(&mut self.key);
        let kept = self.take_capture(at, &mut key);
        self.key = key;
        self.value_node = if kept? {
            self.compiled.schema.child_key(node, &self.key)
        } else {
            self.compiled.schema.node(node).any_key
        };
        Ok(())
    }

    fn after_value(&mut self) {
        self.state = if self.stack.is_empty() {
            match self.framing {
                Framing::Single => State::End,
                Framing::Stream => {
                    self.value_node = self.root;
                    State::Value
                }
            }
        } else {
            State::After
        };
    }

    fn start_leaf(&mut self, leaf: Leaf, node: NodeId) {
        let value = &mut self.leaf;
        value.leaf = leaf;
        value.node = node;
        value.raw.clear();
        value.decoded.clear();
        value.escapes.clear();
        value.decoded_exact = true;
        value.buffered = !matches!(leaf, Leaf::Base64Secret | Leaf::PlainSecret);
        value.overflow = false;
        value.len = 0;
        value.pad = 0;
        value.escape = Escape::None;
    }

    /// Scans the bytes of a skipped container ([`State::Skip`]); returns how
    /// many were consumed and whether its closing bracket was among them.
    /// Strings and brackets are followed exactly as in the rest of the
    /// document (so the container ends where any JSON parser ends it), and
    /// brackets still count toward [`MAX_DEPTH`] and must match.
    fn skip_scan(&mut self, input: &[u8], base: usize) -> Result<(usize, bool), MaskError> {
        let n = input.len();
        let mut i = 0;
        while i < n {
            if self.skip.in_string {
                if self.skip.escape {
                    self.skip.escape = false;
                    i += 1;
                    continue;
                }
                match find_quote_or_backslash(&input[i..]) {
                    None => return Ok((n, false)),
                    Some(k) => {
                        let j = i + k;
                        if input[j] == b'\\' {
                            self.skip.escape = true;
                        } else {
                            self.skip.in_string = false;
                        }
                        i = j + 1;
                    }
                }
                continue;
            }
            while i < n && SKIP_CLASS[usize::from(input[i])] == SKIP_PLAIN {
                i = if input[i] == b' ' {
                    scan::skip_spaces(input, i + 1)
                } else {
                    i + 1
                };
            }
            if i == n {
                break;
            }
            let c = input[i];
            match SKIP_CLASS[usize::from(c)] {
                SKIP_QUOTE => self.skip.in_string = true,
                SKIP_OPEN => {
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(MaskError::TooDeep {
                            offset: self.offset + (base + i) as u64,
                            limit: MAX_DEPTH,
                        });
                    }
                    self.stack.push(Frame {
                        object: c == b'{',
                        node: IGNORE,
                    });
                }
                SKIP_CLOSE => {
                    let frame = *self.stack.last().expect("Skip is inside a container");
                    if frame.object != (c == b'}') {
                        return Err(self.invalid(base + i, "mismatched closing bracket"));
                    }
                    self.stack.pop();
                    if self.stack.len() < self.skip.base {
                        return Ok((i + 1, true));
                    }
                }
                _ => return Err(self.invalid(base + i, "expected a JSON value")),
            }
            i += 1;
        }
        Ok((n, false))
    }

    /// Scans masked string bytes; returns how many were consumed and whether
    /// the closing quote was among them.
    fn leaf_scan(&mut self, input: &[u8], base: usize) -> Result<(usize, bool), MaskError> {
        let cap = self.compiled.limits.max_value_bytes;
        let mut i = 0;
        while i < input.len() {
            let value = &mut self.leaf;
            match value.escape {
                Escape::None => match find_quote_or_backslash(&input[i..]) {
                    None => {
                        value.text(&input[i..], cap);
                        return Ok((input.len(), false));
                    }
                    Some(k) => {
                        value.text(&input[i..i + k], cap);
                        let j = i + k;
                        if input[j] == b'"' {
                            return Ok((j + 1, true));
                        }
                        value.raw_push(b'\\', cap);
                        value.escape = Escape::Backslash;
                        i = j + 1;
                    }
                },
                Escape::Backslash => {
                    let c = input[i];
                    value.raw_push(c, cap);
                    i += 1;
                    let byte = match c {
                        b'u' => {
                            value.escape = Escape::Unicode(4, 0);
                            // Decoded at the end: it may be half of a pair.
                            value.decoded_exact = false;
                            continue;
                        }
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        _ => return Err(self.invalid(base + i - 1, "invalid escape in a string")),
                    };
                    value.escape = Escape::None;
                    value.len += 1;
                    value.pad = 0;
                    value.decoded_push(byte);
                }
                Escape::Unicode(left, code) => {
                    let c = input[i];
                    let Some(digit) = (c as char).to_digit(16) else {
                        return Err(self.invalid(base + i, "invalid \\u escape in a string"));
                    };
                    value.raw_push(c, cap);
                    i += 1;
                    let code = code << 4 | digit;
                    if left > 1 {
                        value.escape = Escape::Unicode(left - 1, code);
                    } else {
                        value.escape = Escape::None;
                        value.pad = if code == u32::from(b'=') {
                            value.pad + 1
                        } else {
                            0
                        };
                        value.len += match code {
                            0..=0x7f => 1,
                            0x80..=0x7ff => 2,
                            // Each half of a surrogate pair: 4 bytes for the pair.
                            0xd800..=0xdfff => 2,
                            _ => 3,
                        };
                    }
                }
            }
        }
        Ok((input.len(), false))
    }

    fn finish_leaf(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let leaf = self.leaf.leaf;
        let len = self.leaf.len;
        if self.leaf.overflow {
            self.stats.oversized_values += 1;
            self.record(1, 0);
            match leaf {
                Leaf::Base64Secret | Leaf::PatternBase64 => {
                    marker::base64_json(base64_len(len, self.leaf.pad), out)
                }
                _ => marker::plain_json(len, out),
            }
            return Ok(());
        }
        match leaf {
            Leaf::Base64Secret => {
                marker::base64_json(base64_len(len, self.leaf.pad), out);
                self.record(1, 0);
            }
            Leaf::PlainSecret => {
                marker::plain_json(len, out);
                self.record(1, 0);
            }
            // Env names pass through as strings; never read as a leaf.
            Leaf::EnvName => self.passthrough_leaf(out),
            Leaf::PatternText | Leaf::EnvValue => {
                let text = self.take_decoded()?;
                if leaf == Leaf::EnvValue
                    && !self.env_name.is_empty()
                    && self.compiled.env_names.is_match(&self.env_name)
                {
                    marker::plain_json(text.len() as u64, out);
                    self.record(1, 0);
                } else {
                    self.mask_text(&text, out);
                }
                if leaf == Leaf::EnvValue {
                    self.env_name.clear();
                }
                self.leaf.decoded = text;
            }
            Leaf::PatternBase64 => {
                use base64::Engine as _;
                let engine = &base64::engine::general_purpose::STANDARD;
                let text = self.take_decoded()?;
                let decoded = engine.decode(&text);
                self.leaf.decoded = text;
                match decoded {
                    Err(_) => {
                        // Unreadable, so it cannot be checked: masked whole.
                        marker::base64_json(base64_len(len, self.leaf.pad), out);
                        self.record(1, 0);
                    }
                    Ok(decoded) => {
                        let mut hits = Vec::new();
                        self.compiled.patterns.hits(&decoded, &mut hits);
                        if hits.is_empty() {
                            self.passthrough_leaf(out);
                        } else {
                            let mut masked = Vec::with_capacity(decoded.len());
                            self.compiled
                                .patterns
                                .write_masked(&decoded, &hits, &mut masked);
                            out.push(b'"');
                            let encoded = engine.encode(&masked);
                            out.extend_from_slice(encoded.as_bytes());
                            out.push(b'"');
                            self.record(1, hits.len() as u64);
                        }
                    }
                }
            }
            Leaf::EmbeddedJson { root, secret } => {
                let text = self.take_decoded()?;
                let mut nested = match self.nested.take() {
                    Some(mut nested) => {
                        nested.reset(root, Framing::Single);
                        nested
                    }
                    None => {
                        let mut nested =
                            JsonMask::new(Arc::clone(&self.compiled), root, Framing::Single);
                        nested.spans = Some(Vec::new());
                        Box::new(nested)
                    }
                };
                let mut masked = std::mem::take(&mut self.masked);
                masked.clear();
                let parsed = nested
                    .push(&text, &mut masked)
                    .and_then(|()| nested.finish(&mut masked));
                match parsed {
                    Ok(()) if nested.stats.values_masked == 0 => self.passthrough_leaf(out),
                    Ok(()) => {
                        match &nested.spans {
                            Some(spans) if self.leaf.decoded_exact => {
                                splice(&self.leaf.raw, &self.leaf.escapes, spans, &masked, out)
                            }
                            _ => escape_json(&masked, out),
                        }
                        self.stats.add_counts(&nested.stats);
                        let fields = (
                            self.leaf.node,
                            nested.stats.fields.len(),
                            nested.stats.fields_truncated,
                        );
                        if self.merged != Some(fields) {
                            let mut label = std::mem::take(&mut self.label);
                            self.write_label(&mut label);
                            self.stats.merge_fields(&nested.stats, &label);
                            self.label = label;
                            self.merged = Some(fields);
                        }
                    }
                    Err(_) if secret => {
                        marker::plain_json(len, out);
                        self.record(1, 0);
                    }
                    Err(_) => self.mask_text(&text, out),
                }
                self.nested = Some(nested);
                self.masked = masked;
                self.leaf.decoded = text;
            }
        }
        Ok(())
    }

    /// The leaf's decoded value, taken out of it (give it back to
    /// `self.leaf.decoded` to keep the allocation).
    fn take_decoded(&mut self) -> Result<Vec<u8>, MaskError> {
        self.leaf
            .decode()
            .map_err(|()| self.invalid(0, "invalid escape in a string"))?;
        Ok(std::mem::take(&mut self.leaf.decoded))
    }

    /// Writes the buffered string unchanged.
    fn passthrough_leaf(&mut self, out: &mut Vec<u8>) {
        out.push(b'"');
        out.extend_from_slice(&self.leaf.raw);
        out.push(b'"');
    }

    /// Pattern rules on a decoded string value.
    fn mask_text(&mut self, text: &[u8], out: &mut Vec<u8>) {
        let mut hits = Vec::new();
        self.compiled.patterns.hits(text, &mut hits);
        if hits.is_empty() {
            self.passthrough_leaf(out);
            return;
        }
        let mut masked = Vec::with_capacity(text.len());
        self.compiled
            .patterns
            .write_masked(text, &hits, &mut masked);
        escape_json(&masked, out);
        self.record(1, hits.len() as u64);
    }

    /// The masked field's name for stats: `data.password`, `env.TOKEN`, ...
    fn write_label(&self, label: &mut String) {
        label.clear();
        let node = self.compiled.schema.node(self.leaf.node);
        match self.leaf.leaf {
            Leaf::Base64Secret | Leaf::PlainSecret | Leaf::PatternText | Leaf::PatternBase64 => {
                label.push_str(node.label);
                label.push('.');
                label.push_str(&String::from_utf8_lossy(&self.key));
            }
            Leaf::EnvValue if !self.env_name.is_empty() => {
                label.push_str("env.");
                label.push_str(&String::from_utf8_lossy(&self.env_name));
            }
            _ => label.push_str(node.label),
        }
    }

    fn record(&mut self, values: u64, patterns: u64) {
        self.stats.values_masked += values;
        self.stats.pattern_matches += patterns;
        if !self.stats.wants_field() {
            return;
        }
        let node = self.leaf.node;
        let name: &[u8] = match self.leaf.leaf {
            Leaf::Base64Secret | Leaf::PlainSecret | Leaf::PatternText | Leaf::PatternBase64 => {
                &self.key
            }
            Leaf::EnvValue => &self.env_name,
            _ => b"",
        };
        if self
            .recorded
            .iter()
            .any(|(n, recorded)| *n == node && recorded.as_slice() == name)
        {
            return;
        }
        if self.recorded.len() < super::MAX_FIELDS {
            self.recorded.push((node, name.to_vec()));
        }
        let mut label = std::mem::take(&mut self.label);
        self.write_label(&mut label);
        self.stats.add_field(&label);
        self.label = label;
    }
}

impl LeafValue {
    /// Unescaped string bytes.
    #[inline]
    fn text(&mut self, bytes: &[u8], cap: usize) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len() as u64;
        let trailing = bytes.iter().rev().take_while(|&&b| b == b'=').count() as u64;
        self.pad = if trailing == bytes.len() as u64 {
            self.pad + trailing
        } else {
            trailing
        };
        if self.buffered && !self.overflow {
            if self.raw.len() + bytes.len() > cap {
                self.spill();
            } else {
                self.raw.extend_from_slice(bytes);
                if self.decoded_exact {
                    self.decoded.extend_from_slice(bytes);
                }
            }
        }
    }

    /// One escape's decoded byte (its backslash and letter are in `raw`).
    #[inline]
    fn decoded_push(&mut self, byte: u8) {
        if self.buffered && !self.overflow && self.decoded_exact {
            self.escapes.push((self.decoded.len(), 2));
            self.decoded.push(byte);
        }
    }

    /// Makes `decoded` the whole decoded value.
    fn decode(&mut self) -> Result<(), ()> {
        if !self.decoded_exact {
            self.decoded.clear();
            unescape(&self.raw, &mut self.decoded)?;
        }
        Ok(())
    }

    #[inline]
    fn raw_push(&mut self, byte: u8, cap: usize) {
        if self.buffered && !self.overflow {
            if self.raw.len() + 1 > cap {
                self.spill();
            } else {
                self.raw.push(byte);
            }
        }
    }

    fn spill(&mut self) {
        self.overflow = true;
        self.raw = Vec::new();
        self.decoded = Vec::new();
        self.escapes = Vec::new();
    }
}

/// The first `"` or `\\` in `bytes`.
#[inline]
fn find_quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    scan::quote_or_backslash(bytes)
}

/// The index of the first non-whitespace byte at or after `i`.
#[inline]
fn skip_whitespace(input: &[u8], mut i: usize) -> usize {
    while i < input.len() {
        match input[i] {
            b' ' => i = scan::skip_spaces(input, i + 1),
            b'\t' | b'\n' | b'\r' => i += 1,
            _ => break,
        }
    }
    i
}

/// Decoded size of a base64 text of `chars` characters ending in `pad` `=`.
fn base64_len(chars: u64, pad: u64) -> u64 {
    chars.saturating_sub(pad.min(2)) * 3 / 4
}

/// Decodes the body of a JSON string (without quotes) into bytes.
pub(crate) fn unescape(raw: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
    let mut i = 0;
    while let Some(k) = memchr::memchr(b'\\', &raw[i..]) {
        out.extend_from_slice(&raw[i..i + k]);
        i += k + 1;
        let c = *raw.get(i).ok_or(())?;
        i += 1;
        let byte = match c {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let mut code = hex4(raw.get(i..i + 4).ok_or(())?)?;
                i += 4;
                if (0xd800..0xdc00).contains(&code)
                    && raw.get(i..i + 2) == Some(b"\\u")
                    && let Some(low) = raw.get(i + 2..i + 6).and_then(|h| hex4(h).ok())
                    && (0xdc00..0xe000).contains(&low)
                {
                    code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
                    i += 6;
                }
                let ch = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
                let mut buf = [0; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            _ => return Err(()),
        };
        out.push(byte);
    }
    out.extend_from_slice(&raw[i..]);
    Ok(())
}

fn hex4(digits: &[u8]) -> Result<u32, ()> {
    digits.iter().try_fold(0u32, |code, &d| {
        (d as char)
            .to_digit(16)
            .map(|digit| code << 4 | digit)
            .ok_or(())
    })
}

/// Appends `text` as a JSON string.
pub(crate) fn escape_json(text: &[u8], out: &mut Vec<u8>) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    escape_into(text, out);
    out.push(b'"');
}

/// Writes an embedded document back as a JSON string: the original string
/// `raw` (escapes at `escapes`: decoded offset, encoded length; each decodes
/// to one byte) with the `spans` of its decoded text replaced by their
/// masked output in `masked`, escaped. Decodes to the same text as
/// escaping `masked` whole, and leaves every unmasked byte as the API
/// server wrote it.
fn splice(
    raw: &[u8],
    escapes: &[(usize, usize)],
    spans: &[Span],
    masked: &[u8],
    out: &mut Vec<u8>,
) {
    let mut next_escape = 0;
    let mut extra = 0;
    // The offset in `raw` of decoded offset `at`, never inside an escape
    // (spans start and end at quotes of the decoded text).
    let mut encoded = |at: usize| {
        while let Some(&(decoded_at, len)) = escapes.get(next_escape)
            && decoded_at < at
        {
            extra += len - 1;
            next_escape += 1;
        }
        at + extra
    };
    out.reserve(raw.len() + 2);
    out.push(b'"');
    let mut copied = 0;
    for span in spans {
        let start = encoded(span.start);
        out.extend_from_slice(&raw[copied..start]);
        escape_into(&masked[span.out_start..span.out_end], out);
        copied = encoded(span.end);
    }
    out.extend_from_slice(&raw[copied..]);
    out.push(b'"');
}

/// Appends `text` escaped as the body of a JSON string.
fn escape_into(text: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = 0;
    while let Some(k) = scan::needs_escape(&text[at..]) {
        let i = at + k;
        out.extend_from_slice(&text[at..i]);
        let b = text[i];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        at = i + 1;
    }
    out.extend_from_slice(&text[at..]);
}

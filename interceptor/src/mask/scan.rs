//! Byte scans of the JSON transform, eight bytes at a time (SWAR: plain
//! `u64` arithmetic, no `unsafe`, no CPU features). Kubernetes JSON is
//! mostly short strings and indentation, where a byte loop costs several
//! instructions a byte and `memchr` costs its set-up per call.
//!
//! The word tricks: for a byte-wise comparison `v`, `(v - 0x01…01) & !v &
//! 0x80…80` has the high bit set in the lowest byte that is zero (bytes
//! above a hit may be false positives, which is why only the lowest set bit
//! is read). Words are read little-endian, so the lowest bit is the first
//! byte.

use memchr::memchr2;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

#[inline(always)]
fn word(bytes: &[u8], at: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(buf)
}

/// High bit set in (at least) the first byte of `v` equal to `byte`.
#[inline(always)]
fn eq_mask(v: u64, byte: u8) -> u64 {
    let x = v ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// High bit set in (at least) the first byte of `v` below `bound` (≤ 128).
#[inline(always)]
fn lt_mask(v: u64, bound: u8) -> u64 {
    v.wrapping_sub(ONES * u64::from(bound)) & !v & HIGHS
}

#[inline(always)]
fn first(mask: u64) -> usize {
    (mask.trailing_zeros() / 8) as usize
}

/// Past this many bytes, `memchr2` (vectorised) beats words.
const WORDS_FIRST: usize = 64;

/// The first `"` or `\\` in `bytes`.
#[inline]
pub(super) fn quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    let words_end = bytes.len().min(WORDS_FIRST);
    while i + 8 <= words_end {
        let v = word(bytes, i);
        let hit = eq_mask(v, b'"') | eq_mask(v, b'\\');
        if hit != 0 {
            return Some(i + first(hit));
        }
        i += 8;
    }
    if bytes.len() > WORDS_FIRST {
        return memchr2(b'"', b'\\', &bytes[i..]).map(|at| at + i);
    }
    bytes[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|at| at + i)
}

/// The first byte at or after `i` that is not a space (indentation), by
/// words: pretty-printed Kubernetes JSON indents by up to dozens of spaces.
#[inline]
pub(super) fn skip_spaces(bytes: &[u8], mut i: usize) -> usize {
    const SPACES: u64 = ONES * b' ' as u64;
    while i + 8 <= bytes.len() {
        let v = word(bytes, i) ^ SPACES;
        if v != 0 {
            return i + (v.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && bytes[i] == b' ' {
        i += 1;
    }
    i
}

/// The first byte of `text` that a JSON string must escape (`"`, `\\`,
/// control characters).
#[inline]
pub(super) fn needs_escape(text: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 8 <= text.len() {
        let v = word(text, i);
        let hit = eq_mask(v, b'"') | eq_mask(v, b'\\') | lt_mask(v, 0x20);
        if hit != 0 {
            return Some(i + first(hit));
        }
        i += 8;
    }
    text[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|at| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes at and around the ones scanned for, and above 0x80.
    const PROBES: [u8; 16] = [
        0x00, 0x1f, b' ', b'!', b'"', b'#', b'[', b'\\', b']', b'a', 0x7f, 0x80, 0xa0, 0xa2, 0xdc,
        0xff,
    ];

    /// Every position, against the obvious loop:
    /// a false positive above a hit or a missed hit at a word edge would
    /// show here.
    #[test]
    fn scans_agree_with_byte_loops_at_every_position() {
        for len in 0..80 {
            for at in 0..len {
                for probe in PROBES {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = probe;
                    // A second hit right after must not hide the first.
                    if at + 1 < len {
                        bytes[at + 1] = b'"';
                    }
                    let expect = bytes.iter().position(|&b| b == b'"' || b == b'\\');
                    assert_eq!(
                        quote_or_backslash(&bytes),
                        expect,
                        "len {len} at {at} {probe}"
                    );
                    let expect = bytes
                        .iter()
                        .position(|&b| b == b'"' || b == b'\\' || b < 0x20);
                    assert_eq!(needs_escape(&bytes), expect, "len {len} at {at} {probe}");
                    let mut spaces = vec![b' '; len];
                    spaces[at] = probe;
                    let expect = spaces.iter().position(|&b| b != b' ').unwrap_or(len);
                    assert_eq!(skip_spaces(&spaces, 0), expect, "len {len} at {at} {probe}");
                }
            }
            assert_eq!(skip_spaces(&vec![b' '; len], 0), len);
            assert_eq!(quote_or_backslash(&vec![b'x'; len]), None);
        }
    }

    #[test]
    fn bytes_above_0x80_are_not_mistaken_for_hits() {
        // 0xa2 = 0x22 | 0x80 and 0xdc = 0x5c | 0x80: the UTF-8 bytes that
        // share the low bits of `"` and `\`.
        let text = "é¢ü€\u{a2}\u{dc}\u{5c2}".as_bytes();
        assert_eq!(quote_or_backslash(text), None);
        assert_eq!(needs_escape(text), None);
    }
}

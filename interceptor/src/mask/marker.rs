//! What a masked value becomes.
//!
//! - A Secret value (`data.*`, base64) becomes the base64 of
//!   `<masked by chaperone: N bytes>`, N being the decoded size of the
//!   original value: still valid base64, so `kubectl get -o yaml`, client
//!   libraries and `base64 -d` keep working, and the size stays visible.
//! - A plain secret string (`stringData.*`, an oversized value) becomes
//!   `<masked by chaperone: N bytes>` itself.
//! - A pattern hit in text becomes `<masked by chaperone: RULE>`, RULE being
//!   the rule's name (`pem-private-key`, `jwt`, `password-in-url`, ...).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Every marker starts with this, so a reader (or a test) can find them.
pub const PREFIX: &str = "<masked by chaperone: ";

/// `<masked by chaperone: N bytes>`.
pub fn sized(len: u64) -> String {
    format!("{PREFIX}{len} bytes>")
}

/// Appends `<masked by chaperone: RULE>`.
pub(crate) fn pattern(rule: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(PREFIX.as_bytes());
    out.extend_from_slice(rule.as_bytes());
    out.push(b'>');
}

/// The sized marker written into `buf` without allocating (a list of
/// Secrets has one per value); returns its length.
fn sized_into(len: u64, buf: &mut [u8; 64]) -> usize {
    const SUFFIX: &[u8] = b" bytes>";
    let prefix = PREFIX.as_bytes();
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 20];
    let mut n = len;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut end = prefix.len();
    for &d in &digits[at..] {
        buf[end] = d;
        end += 1;
    }
    buf[end..end + SUFFIX.len()].copy_from_slice(SUFFIX);
    end + SUFFIX.len()
}

/// Appends the JSON string `"<base64 of the sized marker>"`.
pub(crate) fn base64_json(len: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 64];
    let n = sized_into(len, &mut buf);
    let text = &buf[..n];
    let start = out.len();
    out.resize(
        start + 2 + base64::encoded_len(text.len(), true).unwrap_or(0),
        b'"',
    );
    let written = STANDARD
        .encode_slice(text, &mut out[start + 1..])
        .expect("buffer sized by encoded_len");
    out.truncate(start + 1 + written);
    out.push(b'"');
}

/// Appends the JSON string `"<masked by chaperone: N bytes>"`.
pub(crate) fn plain_json(len: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 64];
    let n = sized_into(len, &mut buf);
    out.push(b'"');
    out.extend_from_slice(&buf[..n]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_marker_decodes_to_the_sized_marker() {
        let mut out = Vec::new();
        base64_json(14, &mut out);
        let s = std::str::from_utf8(&out).unwrap();
        let inner = s.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
        let decoded = STANDARD.decode(inner).unwrap();
        assert_eq!(decoded, b"<masked by chaperone: 14 bytes>");
    }

    #[test]
    fn markers_written_in_place_match_the_formatted_ones() {
        for len in [0, 7, 10, 14, 999, 1 << 20, u64::MAX] {
            let mut plain = Vec::new();
            plain_json(len, &mut plain);
            assert_eq!(plain, format!("\"{}\"", sized(len)).into_bytes());
            let mut b64 = Vec::new();
            base64_json(len, &mut b64);
            let inner = &b64[1..b64.len() - 1];
            assert_eq!(STANDARD.decode(inner).unwrap(), sized(len).into_bytes());
        }
    }
}

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

/// Appends the JSON string `"<base64 of the sized marker>"`.
pub(crate) fn base64_json(len: u64, out: &mut Vec<u8>) {
    let text = sized(len);
    let start = out.len();
    out.resize(
        start + 2 + base64::encoded_len(text.len(), true).unwrap_or(0),
        b'"',
    );
    let written = STANDARD
        .encode_slice(text.as_bytes(), &mut out[start + 1..])
        .expect("buffer sized by encoded_len");
    out.truncate(start + 1 + written);
    out.push(b'"');
}

/// Appends the JSON string `"<masked by chaperone: N bytes>"`.
pub(crate) fn plain_json(len: u64, out: &mut Vec<u8>) {
    out.push(b'"');
    out.extend_from_slice(sized(len).as_bytes());
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
}

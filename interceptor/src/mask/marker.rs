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

/// Base64 of the first 21 bytes of [`PREFIX`] (7 whole groups of 3), the
/// same in every base64 marker (a test checks it).
const PREFIX_21_BASE64: &[u8] = b"PG1hc2tlZCBieSBjaGFwZXJvbmU6";

/// Appends the JSON string `"<base64 of the sized marker>"`. A list of
/// Secrets has one per value: the constant head is copied, only the rest
/// (` N bytes>`) is encoded.
pub(crate) fn base64_json(len: u64, out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut buf = [0u8; 64];
    let n = sized_into(len, &mut buf);
    out.push(b'"');
    out.extend_from_slice(PREFIX_21_BASE64);
    for group in buf[21..n].chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let bits = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        let chars = [18, 12, 6, 0].map(|shift| ALPHABET[(bits >> shift & 0x3f) as usize]);
        let used = group.len() + 1;
        out.extend_from_slice(&chars[..used]);
        out.extend_from_slice(&b"=="[..4 - used]);
    }
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
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

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
        assert_eq!(
            STANDARD.encode(&PREFIX.as_bytes()[..21]).as_bytes(),
            PREFIX_21_BASE64
        );
        for len in (0..2000).chain([1 << 20, 12_345_678, u64::MAX]) {
            let mut plain = Vec::new();
            plain_json(len, &mut plain);
            assert_eq!(plain, format!("\"{}\"", sized(len)).into_bytes());
            let mut b64 = Vec::new();
            base64_json(len, &mut b64);
            let expected = format!("\"{}\"", STANDARD.encode(sized(len)));
            assert_eq!(text(&b64), expected);
        }
    }
}

//! The hash chain of a recording.
//!
//! Every line of a session file is one JSON object that ends with two fields:
//! `"prev"`, the hash of the record before it (for the session header: 64
//! zeros), and `"hash"`, the SHA-256 (hex) of the line's own text up to and
//! including `"prev"` with the closing brace put back:
//!
//! ```text
//! {"seq":3,"type":"exchange",...,"prev":"9f2c...","hash":"41ab..."}
//! hash = sha256('{"seq":3,"type":"exchange",...,"prev":"9f2c..."}')
//! ```
//!
//! Changing any byte of a record breaks its own `hash` (or, if the attacker
//! recomputes it, the `prev` of the record after it), so the first broken
//! record is found exactly. Removing records at the end is shown by the
//! missing `end` record (every session is sealed with one when it closes).

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The `prev` of the first record of a session.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_SUFFIX_LEN: usize = r#","hash":""#.len() + 64 + 2;

/// Serializes `record` with `prev` and `hash` appended; returns the line
/// (without newline) and its hash.
pub fn seal(mut record: Map<String, Value>, prev: &str) -> (String, String) {
    record.remove("hash");
    record.insert("prev".into(), Value::String(prev.to_owned()));
    let body = serde_json::to_string(&Value::Object(record)).expect("JSON values serialize");
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let mut line = body;
    line.pop(); // the closing brace
    line.push_str(",\"hash\":\"");
    line.push_str(&hash);
    line.push_str("\"}");
    (line, hash)
}

/// Why one line fails the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the line is not a sealed record (it is cut short or was edited): {0}")]
    Malformed(String),
    #[error("the record's content does not match its hash: it was edited")]
    HashMismatch,
    #[error(
        "the record does not follow the one before it (prev {found}, expected {expected}): a record was removed, inserted or reordered"
    )]
    Broken { expected: String, found: String },
}

/// Checks one line against the hash of the record before it; returns the
/// parsed record and its hash.
pub fn check(line: &str, expected_prev: &str) -> Result<(Map<String, Value>, String), LinkError> {
    let malformed = |why: &str| LinkError::Malformed(why.to_owned());
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.ends_with("\"}") {
        return Err(malformed("it does not end with a hash field"));
    }
    let split = line.len() - HASH_SUFFIX_LEN;
    let (head, tail) = line.split_at(split);
    let hash = tail
        .strip_prefix(",\"hash\":\"")
        .and_then(|t| t.strip_suffix("\"}"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| malformed("it does not end with a hash field"))?;
    let mut body = String::with_capacity(head.len() + 1);
    body.push_str(head);
    body.push('}');
    if hex::encode(Sha256::digest(body.as_bytes())) != hash {
        return Err(LinkError::HashMismatch);
    }
    let record: Map<String, Value> =
        serde_json::from_str(&body).map_err(|e| malformed(&format!("invalid JSON: {e}")))?;
    let prev = record.get("prev").and_then(Value::as_str).unwrap_or("");
    if prev != expected_prev {
        return Err(LinkError::Broken {
            expected: expected_prev.to_owned(),
            found: prev.to_owned(),
        });
    }
    Ok((record, hash.to_owned()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn sealed_lines_check_and_chain() {
        let (l1, h1) = seal(obj(json!({"seq": 0, "type": "session"})), GENESIS);
        let (l2, h2) = seal(obj(json!({"seq": 1, "type": "exchange"})), &h1);
        assert!(l1.ends_with(&format!("\"hash\":\"{h1}\"}}")), "{l1}");
        assert_eq!(check(&l1, GENESIS).unwrap().1, h1);
        let (record, hash) = check(&l2, &h1).unwrap();
        assert_eq!(hash, h2);
        assert_eq!(record["type"], "exchange");
        assert!(matches!(check(&l2, GENESIS), Err(LinkError::Broken { .. })));
    }

    #[test]
    fn any_edit_is_found() {
        let (line, h) = seal(obj(json!({"seq": 0, "verb": "get"})), GENESIS);
        for i in 0..line.len() {
            let mut bytes = line.clone().into_bytes();
            bytes[i] ^= 0x01;
            let Ok(edited) = String::from_utf8(bytes) else {
                continue;
            };
            assert!(check(&edited, GENESIS).is_err(), "edit at {i}: {edited}");
        }
        assert!(check(&line[..line.len() - 3], GENESIS).is_err());
        assert_eq!(check(&line, GENESIS).unwrap().1, h);
    }
}

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
//!
//! # Keyed chains
//!
//! A plain SHA-256 chain shows an edit, but not a session rewritten whole
//! with every hash recomputed. The node agent therefore keys the chain with
//! a secret of the node ([`ChainKey`], the file `record.key` beside the
//! recordings directory): `hash` is then HMAC-SHA256 of the same text under
//! that key, and the session header says so (`"chain":"hmac-sha256"`,
//! `"keyId"`: a fingerprint of the key, never the key). Whoever can write
//! the recordings but not read the key (a copy shipped elsewhere, a backup,
//! a log collector, an agent that escaped into the node's filesystem
//! without root) cannot forge a session that verifies.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The `prev` of the first record of a session.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_SUFFIX_LEN: usize = r#","hash":""#.len() + 64 + 2;

/// The `chain` of a keyed session header.
pub const KEYED: &str = "hmac-sha256";

/// The node's secret for keyed chains: 32 random bytes, kept as 64 hex
/// characters in a file only root reads.
#[derive(Clone)]
pub struct ChainKey {
    key: ring::hmac::Key,
    id: String,
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainKey({})", self.id)
    }
}

impl ChainKey {
    pub fn from_bytes(secret: &[u8]) -> Self {
        let mut id = Sha256::new();
        id.update(b"chaperone record key id\0");
        id.update(secret);
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            id: hex::encode(id.finalize())[..16].to_owned(),
        }
    }

    /// A fingerprint that names the key in session headers and messages.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads the key file.
    pub fn load(path: &std::path::Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let secret = hex::decode(text.trim())
            .ok()
            .filter(|s| s.len() >= 32)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold a record key (64 hex characters)",
                        path.display()
                    ),
                )
            })?;
        Ok(Self::from_bytes(&secret))
    }

    /// Reads the key file, or creates it (mode 0600) with a new random key.
    pub fn load_or_create(path: &std::path::Path) -> std::io::Result<Self> {
        use ring::rand::SecureRandom as _;
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        match Self::load(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| std::io::Error::other("the system random generator failed"))?;
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(mut file) => {
                file.write_all(hex::encode(secret).as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()?;
                Ok(Self::from_bytes(&secret))
            }
            // Another agent on the same directory (a rolling update) made it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(e),
        }
    }

    fn digest(&self, body: &[u8]) -> String {
        hex::encode(ring::hmac::sign(&self.key, body).as_ref())
    }
}

/// The hash of a record's text: SHA-256, or HMAC-SHA256 under `key`.
fn digest(body: &str, key: Option<&ChainKey>) -> String {
    match key {
        Some(key) => key.digest(body.as_bytes()),
        None => hex::encode(Sha256::digest(body.as_bytes())),
    }
}

/// Serializes `record` with `prev` and `hash` appended; returns the line
/// (without newline) and its hash.
pub fn seal(
    mut record: Map<String, Value>,
    prev: &str,
    key: Option<&ChainKey>,
) -> (String, String) {
    record.remove("hash");
    record.insert("prev".into(), Value::String(prev.to_owned()));
    let body = serde_json::to_string(&Value::Object(record)).expect("JSON values serialize");
    let hash = digest(&body, key);
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
        "the record's hash is not the node key's: the session was rewritten (or recorded with another key)"
    )]
    KeyMismatch,
    #[error(
        "the record does not follow the one before it (prev {found}, expected {expected}): a record was removed, inserted or reordered"
    )]
    Broken { expected: String, found: String },
}

/// Checks one line against the hash of the record before it; returns the
/// parsed record and its hash.
pub fn check(
    line: &str,
    expected_prev: &str,
    key: Option<&ChainKey>,
) -> Result<(Map<String, Value>, String), LinkError> {
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
    if digest(&body, key) != hash {
        // Consistent under plain SHA-256 but not under the key: rewritten
        // by someone without the key.
        if key.is_some() && hex::encode(Sha256::digest(body.as_bytes())) == hash {
            return Err(LinkError::KeyMismatch);
        }
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
        let (l1, h1) = seal(obj(json!({"seq": 0, "type": "session"})), GENESIS, None);
        let (l2, h2) = seal(obj(json!({"seq": 1, "type": "exchange"})), &h1, None);
        assert!(l1.ends_with(&format!("\"hash\":\"{h1}\"}}")), "{l1}");
        assert_eq!(check(&l1, GENESIS, None).unwrap().1, h1);
        let (record, hash) = check(&l2, &h1, None).unwrap();
        assert_eq!(hash, h2);
        assert_eq!(record["type"], "exchange");
        assert!(matches!(
            check(&l2, GENESIS, None),
            Err(LinkError::Broken { .. })
        ));
    }

    #[test]
    fn any_edit_is_found() {
        let (line, h) = seal(obj(json!({"seq": 0, "verb": "get"})), GENESIS, None);
        for i in 0..line.len() {
            let mut bytes = line.clone().into_bytes();
            bytes[i] ^= 0x01;
            let Ok(edited) = String::from_utf8(bytes) else {
                continue;
            };
            assert!(
                check(&edited, GENESIS, None).is_err(),
                "edit at {i}: {edited}"
            );
        }
        assert!(check(&line[..line.len() - 3], GENESIS, None).is_err());
        assert_eq!(check(&line, GENESIS, None).unwrap().1, h);
    }

    #[test]
    fn a_keyed_chain_cannot_be_recomputed_without_the_key() {
        let key = ChainKey::from_bytes(&[7; 32]);
        let other = ChainKey::from_bytes(&[8; 32]);
        assert_ne!(key.id(), other.id());
        let (line, h) = seal(obj(json!({"seq": 0, "verb": "get"})), GENESIS, Some(&key));
        assert_eq!(check(&line, GENESIS, Some(&key)).unwrap().1, h);
        assert_eq!(
            check(&line, GENESIS, Some(&other)),
            Err(LinkError::HashMismatch)
        );
        // Rewritten and resealed with plain SHA-256, as anyone can.
        let (forged, _) = seal(obj(json!({"seq": 0, "verb": "list"})), GENESIS, None);
        assert_eq!(
            check(&forged, GENESIS, Some(&key)),
            Err(LinkError::KeyMismatch)
        );
    }

    #[test]
    fn a_key_file_is_created_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.key");
        let made = ChainKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ChainKey::load_or_create(&path).unwrap().id(), made.id());
        std::fs::write(&path, "not a key").unwrap();
        let error = ChainKey::load(&path).unwrap_err();
        assert!(error.to_string().contains("record.key"), "{error}");
    }
}

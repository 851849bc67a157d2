//! JWT mechanics shared by the service-account and OIDC verifiers: parsing
//! without trusting, the algorithm policy, signature verification against
//! JWKS keys, and the time and audience checks, each refusal named.
//!
//! Claims are checked here rather than by `jsonwebtoken::Validation` so that
//! every refusal can say exactly what was wrong (which audience, expired
//! when); `jsonwebtoken` only verifies the signature.

use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::{Map, Value};

use super::error::AuthError;

/// The asymmetric algorithms chaperone accepts unless configured narrower.
pub const DEFAULT_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Longest `kid` looked up; anything longer is refused before it can cause
/// a JWKS refresh.
const MAX_KID_LEN: usize = 256;

/// A JWT split and decoded, nothing about it trusted yet.
#[derive(Debug)]
pub(crate) struct Jwt<'a> {
    /// The header's `alg`, as written.
    pub alg: String,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    signing_input: &'a str,
    signature: &'a str,
}

impl<'a> Jwt<'a> {
    /// `None` when the token is not shaped like a JWT at all (an opaque
    /// token for TokenReview); an error when it is a JWT but broken.
    pub fn parse(token: &'a str) -> Option<Result<Self, AuthError>> {
        let mut parts = token.split('.');
        let header_b64 = parts.next()?;
        let header = decode_json_object(header_b64)?;
        Some(Self::parse_rest(token, header_b64.len(), header))
    }

    fn parse_rest(
        token: &'a str,
        header_len: usize,
        header: Map<String, Value>,
    ) -> Result<Self, AuthError> {
        let malformed = |why: &str| AuthError::Malformed(why.to_string());
        let parts = token.split('.').count();
        if parts != 3 {
            return Err(AuthError::Malformed(format!(
                "expected 3 dot-separated parts, found {parts} (truncated?)"
            )));
        }
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg.clone(),
            Some(_) => return Err(malformed("header alg is not a string")),
            None => return Err(malformed("header has no alg")),
        };
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) if kid.len() <= MAX_KID_LEN => Some(kid.clone()),
            Some(Value::String(_)) => {
                return Err(AuthError::Malformed(format!(
                    "header kid is longer than {MAX_KID_LEN} characters"
                )));
            }
            Some(_) => return Err(malformed("header kid is not a string")),
        };
        if let Some(crit) = header.get("crit") {
            return Err(AuthError::Malformed(format!(
                "header lists critical extensions {crit}, which chaperone does not understand"
            )));
        }
        let rest = &token[header_len + 1..];
        let (payload_b64, signature) = rest
            .split_once('.')
            .ok_or_else(|| malformed("no signature part"))?;
        let claims = decode_json_object(payload_b64)
            .ok_or_else(|| malformed("payload is not base64url-encoded JSON (truncated?)"))?;
        if URL_SAFE_NO_PAD.decode(signature).is_err() {
            return Err(malformed("signature is not base64url (truncated?)"));
        }
        let signing_input = &token[..header_len + 1 + payload_b64.len()];
        Ok(Self {
            alg,
            kid,
            claims,
            signing_input,
            signature,
        })
    }

    /// The unverified `iss`, for choosing a verifier.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Whether `key` signed this token with `alg`.
    ///
    /// A signature check is a pure function of the key, `alg`, the signed
    /// input and the signature, so `key` remembers the ones it verified: an
    /// agent sends the same token with every request, and checking an RS256
    /// signature in software was the largest cost of a proxied GET. Claims
    /// (`exp`, `aud`, ...) are still checked on every request by the caller,
    /// and a key withdrawn from the JWKS takes what it remembered with it.
    pub fn signed_by(&self, key: &VerificationKey, alg: Algorithm) -> bool {
        if key
            .verified
            .contains(alg, self.signing_input, self.signature)
        {
            return true;
        }
        let valid = matches!(
            jsonwebtoken::crypto::verify(
                self.signature,
                self.signing_input.as_bytes(),
                &key.key,
                alg
            ),
            Ok(true)
        );
        if valid {
            key.verified.insert(alg, self.signing_input, self.signature);
        }
        valid
    }
}

fn decode_json_object(b64: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(b64).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Refuses the algorithms no verifier may ever accept, whatever the
/// configuration: `none` and the HMAC family.
pub(crate) fn refuse_forbidden_algorithm(alg: &str) -> Result<(), AuthError> {
    if alg.eq_ignore_ascii_case("none") {
        return Err(AuthError::AlgorithmNone);
    }
    if alg
        .as_bytes()
        .get(..2)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"HS"))
    {
        return Err(AuthError::SymmetricAlgorithm {
            alg: alg.to_string(),
        });
    }
    Ok(())
}

/// The token's algorithm, if the verifier's allow-list holds it.
pub(crate) fn allowed_algorithm(alg: &str, allowed: &[Algorithm]) -> Result<Algorithm, AuthError> {
    refuse_forbidden_algorithm(alg)?;
    let not_allowed = || AuthError::AlgorithmNotAllowed {
        alg: alg.to_string(),
        allowed: allowed.iter().map(|a| format!("{a:?}")).collect(),
    };
    let parsed = Algorithm::from_str(alg).map_err(|_| not_allowed())?;
    if allowed.contains(&parsed) {
        Ok(parsed)
    } else {
        Err(not_allowed())
    }
}

/// A configured algorithm name chaperone will not verify with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AlgorithmError {
    #[error("algorithm {0} cannot be allowed: only asymmetric signatures are safe")]
    Forbidden(String),
    #[error("unknown JWT algorithm {0:?}")]
    Unknown(String),
}

/// Why a key of a JWKS is not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not for signatures (use != sig)")]
    NotForSignatures,
    #[error("symmetric (oct) keys are never trusted")]
    Symmetric,
    #[error("unsupported key type")]
    UnsupportedType,
    #[error("key declares unsupported alg {0}")]
    UnsupportedAlgorithm(String),
    #[error("unusable key: {0}")]
    Unusable(String),
}

/// A JWKS document that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS is not JSON: {0}")]
    NotJson(String),
    #[error("JWKS has no keys array")]
    NoKeys,
}

/// Parses configured algorithm names, refusing `none` and HMAC.
pub(crate) fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, AlgorithmError> {
    if names.is_empty() {
        return Ok(DEFAULT_ALGORITHMS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            refuse_forbidden_algorithm(name)
                .map_err(|_| AlgorithmError::Forbidden(name.clone()))?;
            Algorithm::from_str(name).map_err(|_| AlgorithmError::Unknown(name.clone()))
        })
        .collect()
}

/// One public key from a JWKS, ready to verify.
#[derive(Clone, Debug)]
pub struct VerificationKey {
    pub kid: Option<String>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    /// The `alg` the JWK itself declares, if any.
    declared: Option<Algorithm>,
    key: DecodingKey,
    /// Signatures this key verified (see [`Jwt::signed_by`]).
    verified: VerifiedSignatures,
}

/// The exact `(alg, signed input, signature)` a key verified, bounded:
/// when full it starts over (an agent re-sends one token for its lifetime,
/// so the working set is one entry per live token). Kept whole and compared
/// byte for byte: a SHA-256 digest of each token cost a proxied GET more
/// than a tenth of its instructions, and an exact match needs no collision
/// argument.
#[derive(Clone, Debug, Default)]
struct VerifiedSignatures(std::sync::Arc<std::sync::Mutex<VerifiedSet>>);

#[derive(Debug, Default)]
struct VerifiedSet {
    /// `signed input` `.` `signature` (the token as sent), per algorithm.
    tokens: std::collections::HashSet<(Algorithm, Box<str>)>,
    /// Their total length, bounded by [`VERIFIED_SIGNATURES_MAX_BYTES`].
    bytes: usize,
}

/// Distinct verified tokens remembered per key.
const VERIFIED_SIGNATURES_MAX: usize = 4096;

/// Bytes of verified tokens remembered per key (tokens may be up to
/// `MAX_TOKEN_LEN` long).
const VERIFIED_SIGNATURES_MAX_BYTES: usize = 4 << 20;

impl VerifiedSignatures {
    fn entry(alg: Algorithm, signing_input: &str, signature: &str) -> (Algorithm, Box<str>) {
        let mut token = String::with_capacity(signing_input.len() + 1 + signature.len());
        token.push_str(signing_input);
        token.push('.');
        token.push_str(signature);
        (alg, token.into_boxed_str())
    }

    fn set(&self) -> std::sync::MutexGuard<'_, VerifiedSet> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contains(&self, alg: Algorithm, signing_input: &str, signature: &str) -> bool {
        let entry = Self::entry(alg, signing_input, signature);
        self.set().tokens.contains(&entry)
    }

    fn insert(&self, alg: Algorithm, signing_input: &str, signature: &str) {
        let entry = Self::entry(alg, signing_input, signature);
        let mut set = self.set();
        if set.tokens.len() >= VERIFIED_SIGNATURES_MAX
            || set.bytes + entry.1.len() > VERIFIED_SIGNATURES_MAX_BYTES
        {
            set.tokens.clear();
            set.bytes = 0;
        }
        let len = entry.1.len();
        if set.tokens.insert(entry) {
            set.bytes += len;
        }
    }
}

impl VerificationKey {
    /// The key of a JWK, or why it cannot be used. Symmetric (`oct`) keys are
    /// never accepted from a JWKS.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, KeyError> {
        if let Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_)) = &jwk.common.public_key_use
        {
            return Err(KeyError::NotForSignatures);
        }
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(ec) => (AlgorithmFamily::Ec, Some(ec.curve.clone())),
            AlgorithmParameters::OctetKeyPair(okp) => {
                (AlgorithmFamily::Ed, Some(okp.curve.clone()))
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(KeyError::Symmetric);
            }
            _ => return Err(KeyError::UnsupportedType),
        };
        let declared = match jwk.common.key_algorithm {
            Some(alg) => Some(
                Algorithm::try_from(alg)
                    .map_err(|_| KeyError::UnsupportedAlgorithm(alg.to_string()))?,
            ),
            None => None,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError::Unusable(e.to_string()))?;
        Ok(Self {
            kid: jwk.common.key_id.clone(),
            family,
            curve,
            declared,
            key,
            verified: VerifiedSignatures::default(),
        })
    }

    /// Why this key cannot verify `alg`, if it cannot.
    pub fn incompatibility(&self, alg: Algorithm) -> Option<String> {
        if alg.family() != self.family {
            return Some(format!("it is a {:?} key", self.family));
        }
        if let Some(declared) = self.declared
            && declared != alg
        {
            return Some(format!("the key is declared for {declared:?}"));
        }
        let expected_curve = match alg {
            Algorithm::ES256 => Some(EllipticCurve::P256),
            Algorithm::ES384 => Some(EllipticCurve::P384),
            Algorithm::EdDSA => Some(EllipticCurve::Ed25519),
            _ => None,
        };
        if expected_curve.is_some() && expected_curve != self.curve {
            return Some(format!("the key is on curve {:?}", self.curve));
        }
        None
    }
}

/// Parses a JWKS document, keeping the keys chaperone can use and logging
/// the others.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, JwksError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| JwksError::NotJson(e.to_string()))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(JwksError::NoKeys)?;
    Ok(keys
        .iter()
        .filter_map(|key| match serde_json::from_value::<Jwk>(key.clone()) {
            Ok(jwk) => Some(jwk),
            Err(error) => {
                tracing::warn!(%error, "skipping a JWKS key that does not parse");
                None
            }
        })
        .collect())
}

/// `exp`, `nbf` and `iat`, with `leeway` seconds for clock skew.
pub(crate) fn check_times(
    claims: &Map<String, Value>,
    now: i64,
    leeway: i64,
) -> Result<(), AuthError> {
    let exp = numeric_claim(claims, "exp")?.ok_or_else(|| AuthError::MissingClaim {
        claim: "exp".into(),
    })?;
    if now > exp.saturating_add(leeway) {
        return Err(AuthError::Expired { at: exp });
    }
    if let Some(nbf) = numeric_claim(claims, "nbf")?
        && now.saturating_add(leeway) < nbf
    {
        return Err(AuthError::NotYetValid { at: nbf });
    }
    if let Some(iat) = numeric_claim(claims, "iat")?
        && iat > now.saturating_add(leeway)
    {
        return Err(AuthError::IssuedInFuture { at: iat });
    }
    Ok(())
}

fn numeric_claim(claims: &Map<String, Value>, claim: &str) -> Result<Option<i64>, AuthError> {
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| AuthError::InvalidClaim {
                claim: claim.into(),
                reason: format!("{n} is not a time"),
            }),
        Some(other) => Err(AuthError::InvalidClaim {
            claim: claim.into(),
            reason: format!("{other} is not a number of seconds"),
        }),
    }
}

/// `aud` must name at least one of `accepted`.
pub(crate) fn check_audience(
    claims: &Map<String, Value>,
    accepted: &[String],
) -> Result<(), AuthError> {
    let token: Vec<String> = match claims.get("aud") {
        None | Some(Value::Null) => {
            return Err(AuthError::MissingClaim {
                claim: "aud".into(),
            });
        }
        Some(Value::String(aud)) => vec![aud.clone()],
        Some(Value::Array(auds)) => auds
            .iter()
            .map(|a| a.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| AuthError::InvalidClaim {
                claim: "aud".into(),
                reason: "not a list of strings".into(),
            })?,
        Some(other) => {
            return Err(AuthError::InvalidClaim {
                claim: "aud".into(),
                reason: format!("{other} is not a string or a list of strings"),
            });
        }
    };
    if token.iter().any(|aud| accepted.contains(aud)) {
        Ok(())
    } else {
        Err(AuthError::AudienceMismatch {
            token,
            accepted: accepted.to_vec(),
        })
    }
}

/// The current Unix time in seconds.
pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn the_verified_set_matches_exactly_and_starts_over_past_its_byte_bound() {
        let set = VerifiedSignatures::default();
        let input = "h".repeat(VERIFIED_SIGNATURES_MAX_BYTES / 2);
        set.insert(Algorithm::RS256, &input, "sig1");
        assert!(set.contains(Algorithm::RS256, &input, "sig1"));
        assert!(!set.contains(Algorithm::ES256, &input, "sig1"));
        assert!(!set.contains(Algorithm::RS256, &input, "sig2"));
        assert!(!set.contains(Algorithm::RS256, &input[1..], "sig1"));
        // A second token this long passes the bound: the set starts over.
        set.insert(Algorithm::RS256, &input, "sig2");
        assert!(set.contains(Algorithm::RS256, &input, "sig2"));
        assert!(!set.contains(Algorithm::RS256, &input, "sig1"));
    }

    #[test]
    fn opaque_tokens_are_not_jwts() {
        assert!(Jwt::parse("sha256~abcdef").is_none());
        assert!(Jwt::parse("not a token at all").is_none());
        assert!(Jwt::parse("").is_none());
    }

    #[test]
    fn a_jwt_cut_short_is_malformed_not_opaque() {
        let token = format!(
            "{}.{}",
            b64(&json!({"alg": "RS256"})),
            b64(&json!({"iss": "x"}))
        );
        let error = Jwt::parse(&token).unwrap().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("expected 3 dot-separated parts, found 2")
        );
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let token = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "RS256", "crit": ["exp"]})),
            b64(&json!({}))
        );
        let error = Jwt::parse(&token).unwrap().unwrap_err();
        assert!(error.to_string().contains("critical extensions"));
    }

    #[test]
    fn hostile_alg_names_do_not_panic() {
        assert!(refuse_forbidden_algorithm("H\u{e9}256").is_ok());
        assert!(refuse_forbidden_algorithm("").is_ok());
        assert!(refuse_forbidden_algorithm("hs512").is_err());
        assert!(allowed_algorithm("\u{e9}", DEFAULT_ALGORITHMS).is_err());
    }

    #[test]
    fn none_and_hmac_can_never_be_configured() {
        assert!(parse_algorithms(&["none".into()]).is_err());
        assert!(parse_algorithms(&["HS256".into()]).is_err());
        assert_eq!(
            parse_algorithms(&["ES256".into()]).unwrap(),
            vec![Algorithm::ES256]
        );
        assert_eq!(parse_algorithms(&[]).unwrap(), DEFAULT_ALGORITHMS.to_vec());
    }

    #[test]
    fn algorithm_outside_the_allow_list_is_named() {
        let error = allowed_algorithm("PS256", &[Algorithm::RS256]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "chaperone: token rejected: signed with alg PS256, which is not in the allowed algorithms [RS256]"
        );
        assert_eq!(
            allowed_algorithm("None", &[]),
            Err(AuthError::AlgorithmNone)
        );
    }

    #[test]
    fn times_allow_leeway_and_name_the_instant() {
        let claims = |v: Value| v.as_object().unwrap().clone();
        let now = 1_000_000;
        assert!(check_times(&claims(json!({"exp": now - 10})), now, 30).is_ok());
        assert_eq!(
            check_times(&claims(json!({"exp": now - 31})), now, 30),
            Err(AuthError::Expired { at: now - 31 })
        );
        assert_eq!(
            check_times(&claims(json!({"exp": now + 100, "nbf": now + 31})), now, 30),
            Err(AuthError::NotYetValid { at: now + 31 })
        );
        assert_eq!(
            check_times(
                &claims(json!({"exp": now + 100, "iat": now + 300})),
                now,
                30
            ),
            Err(AuthError::IssuedInFuture { at: now + 300 })
        );
        assert!(matches!(
            check_times(&claims(json!({"exp": "soon"})), now, 30),
            Err(AuthError::InvalidClaim { .. })
        ));
        assert!(matches!(
            check_times(&claims(json!({})), now, 30),
            Err(AuthError::MissingClaim { .. })
        ));
    }

    #[test]
    fn audience_accepts_a_string_or_a_list() {
        let accepted = vec!["chaperone".to_string()];
        let claims = |v: Value| v.as_object().unwrap().clone();
        assert!(check_audience(&claims(json!({"aud": "chaperone"})), &accepted).is_ok());
        assert!(check_audience(&claims(json!({"aud": ["a", "chaperone"]})), &accepted).is_ok());
        assert!(matches!(
            check_audience(&claims(json!({"aud": ["a"]})), &accepted),
            Err(AuthError::AudienceMismatch { .. })
        ));
    }
}

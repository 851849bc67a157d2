//! Why a caller was refused. Every variant says what was wrong with the
//! token precisely enough that the agent's operator knows what to fix, and
//! the ones that only an attacker produces are flagged as attack signals.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::PodUid;
use crate::kstatus::Status;

/// The prefix of every refusal, so an agent can tell chaperone's 401 from
/// the API server's.
const REJECTED: &str = "chaperone: token rejected";

/// A pod named by a token or by the kernel: `namespace/name (uid ...)`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: PodUid,
}

impl std::fmt::Display for PodIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let namespace = if self.namespace.is_empty() {
            "?"
        } else {
            &self.namespace
        };
        let name = if self.name.is_empty() {
            "?"
        } else {
            &self.name
        };
        write!(f, "{namespace}/{name} (uid {})", self.uid)
    }
}

/// The refusal of one bearer token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("chaperone: no bearer token: send `Authorization: Bearer <token>`")]
    MissingToken,
    #[error("chaperone: unusable Authorization header: {0}")]
    MalformedAuthorization(String),
    #[error("{REJECTED}: not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("{REJECTED}: signed with alg none, which is not allowed")]
    AlgorithmNone,
    #[error(
        "{REJECTED}: signed with {alg}, an HMAC algorithm, which is not allowed \
         (issuers sign with asymmetric keys; an HMAC token keyed with a public key is a forgery)"
    )]
    SymmetricAlgorithm { alg: String },
    #[error("{REJECTED}: signed with alg {alg}, which is not in the allowed algorithms [{}]", .allowed.join(", "))]
    AlgorithmNotAllowed { alg: String, allowed: Vec<String> },
    #[error("{REJECTED}: key {kid:?} of issuer {issuer} cannot verify alg {alg}: {reason}")]
    KeyAlgorithmMismatch {
        kid: String,
        alg: String,
        issuer: String,
        reason: String,
    },
    #[error("{REJECTED}: signing key id {kid:?} is not among the current keys of issuer {issuer}")]
    UnknownKeyId { kid: String, issuer: String },
    #[error("{REJECTED}: signature does not verify with the keys of issuer {issuer}")]
    BadSignature { issuer: String },
    #[error("{REJECTED}: expired at {}", rfc3339(*.at))]
    Expired { at: i64 },
    #[error("{REJECTED}: not valid before {}", rfc3339(*.at))]
    NotYetValid { at: i64 },
    #[error("{REJECTED}: issued in the future, at {} (check the clocks)", rfc3339(*.at))]
    IssuedInFuture { at: i64 },
    #[error("{REJECTED}: claim {claim:?} is missing")]
    MissingClaim { claim: String },
    #[error("{REJECTED}: claim {claim:?} is invalid: {reason}")]
    InvalidClaim { claim: String, reason: String },
    #[error("{REJECTED}: audience [{}] does not include any of [{}]", .token.join(", "), .accepted.join(", "))]
    AudienceMismatch {
        token: Vec<String>,
        accepted: Vec<String>,
    },
    #[error(
        "{REJECTED}: issuer {issuer:?} is not trusted (trusted issuers: [{}]){}",
        .trusted.join(", "),
        .review.as_ref().map(|r| format!(", and the API server's TokenReview did not authenticate it either: {r}")).unwrap_or_default()
    )]
    UntrustedIssuer {
        issuer: String,
        trusted: Vec<String>,
        review: Option<String>,
    },
    #[error(
        "{REJECTED}: a legacy secret-based service-account token (it never expires); \
         use a projected service-account token, or allow legacy tokens in the identity configuration"
    )]
    LegacyToken,
    #[error("{REJECTED}: the API server's TokenReview did not authenticate it: {reason}")]
    ReviewRejected { reason: String },
    #[error(
        "{REJECTED}: it is not a JWT and TokenReview is disabled, so chaperone cannot verify it"
    )]
    OpaqueTokenWithoutReview,
    #[error(
        "{REJECTED}: token was issued to pod {token} but the connection comes from pod {attested}"
    )]
    PodMismatch {
        token: Box<PodIdentity>,
        attested: Box<PodIdentity>,
    },
    #[error(
        "{REJECTED}: token of {username} is not bound to a pod, and connections from pod \
         {attested} must carry a token bound to it (a projected service-account token)"
    )]
    UnboundToken {
        username: String,
        attested: Box<PodIdentity>,
    },
    #[error("chaperone: cannot verify the token right now: no signing keys from {from}: {reason}")]
    KeysUnavailable { from: String, reason: String },
    #[error("chaperone: cannot verify the token right now: TokenReview failed: {reason}")]
    ReviewUnavailable { reason: String },
}

/// A refusal that an honest, merely misconfigured client does not produce.
/// The proxy counts these and audits them apart from ordinary 401s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttackSignal {
    /// A valid token replayed from a pod it was not issued to.
    ReplayedFromAnotherPod,
    /// `alg: none`: an unsigned token.
    UnsignedToken,
    /// An HMAC-signed token: the public-key-as-secret confusion attack.
    AlgorithmConfusion,
    /// A token from a trusted issuer whose signature does not verify.
    ForgedSignature,
}

impl AttackSignal {
    /// A stable name for metrics labels and audit annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReplayedFromAnotherPod => "replayed_from_another_pod",
            Self::UnsignedToken => "unsigned_token",
            Self::AlgorithmConfusion => "algorithm_confusion",
            Self::ForgedSignature => "forged_signature",
        }
    }
}

impl AuthError {
    /// Whether this refusal is evidence of an attack rather than of a
    /// stale or misconfigured client.
    pub fn attack_signal(&self) -> Option<AttackSignal> {
        match self {
            Self::PodMismatch { .. } => Some(AttackSignal::ReplayedFromAnotherPod),
            Self::AlgorithmNone => Some(AttackSignal::UnsignedToken),
            Self::SymmetricAlgorithm { .. } => Some(AttackSignal::AlgorithmConfusion),
            Self::BadSignature { .. } => Some(AttackSignal::ForgedSignature),
            _ => None,
        }
    }

    /// Whether chaperone, not the token, is at fault: the keys or the
    /// TokenReview API could not be reached.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::KeysUnavailable { .. } | Self::ReviewUnavailable { .. }
        )
    }

    /// The Kubernetes `Status` the agent receives: 401 Unauthorized naming
    /// the reason, or 503 when chaperone cannot verify tokens at the moment
    /// (a 401 would make clients discard credentials that may be fine).
    pub fn to_status(&self) -> Status {
        if self.is_unavailable() {
            Status::service_unavailable(self.to_string())
        } else {
            Status::unauthorized(self.to_string())
        }
    }
}

impl From<&AuthError> for Status {
    fn from(error: &AuthError) -> Self {
        error.to_status()
    }
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        error.to_status()
    }
}

/// A Unix time as RFC 3339 UTC, or the raw number if it is out of range.
pub(crate) fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("unix time {unix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_named_in_utc() {
        let status = AuthError::Expired { at: 1_795_428_000 }.to_status();
        assert_eq!(status.code, 401);
        assert_eq!(status.reason, "Unauthorized");
        assert_eq!(
            status.message,
            "chaperone: token rejected: expired at 2026-11-23T10:00:00Z"
        );
    }

    #[test]
    fn pod_mismatch_names_both_pods_and_is_an_attack_signal() {
        let error = AuthError::PodMismatch {
            token: Box::new(PodIdentity {
                namespace: "prod-a".into(),
                name: "agent-1".into(),
                uid: "u1".into(),
            }),
            attested: Box::new(PodIdentity {
                namespace: "dev-a".into(),
                name: "agent-2".into(),
                uid: "u2".into(),
            }),
        };
        assert_eq!(
            error.to_string(),
            "chaperone: token rejected: token was issued to pod prod-a/agent-1 (uid u1) \
             but the connection comes from pod dev-a/agent-2 (uid u2)"
        );
        assert_eq!(
            error.attack_signal(),
            Some(AttackSignal::ReplayedFromAnotherPod)
        );
    }

    #[test]
    fn unavailable_verification_is_503_not_401() {
        let error = AuthError::KeysUnavailable {
            from: "the API server".into(),
            reason: "connection refused".into(),
        };
        let status = error.to_status();
        assert_eq!(status.code, 503);
        assert!(status.message.contains("connection refused"));
        assert_eq!(error.attack_signal(), None);
    }

    #[test]
    fn audience_mismatch_lists_both_sides() {
        let error = AuthError::AudienceMismatch {
            token: vec!["x".into()],
            accepted: vec!["y".into(), "z".into()],
        };
        assert_eq!(
            error.to_string(),
            "chaperone: token rejected: audience [x] does not include any of [y, z]"
        );
    }
}

//! Decisions attested by the API server.
//!
//! Whoever may write `approvalrequests/status` (every node agent, every
//! approver) could write any `decidedBy` and `decidedByGroups` there. So in
//! cluster mode the decider's identity comes from the API server's own
//! authentication of the request that wrote the decision, as for
//! CertificateSigningRequests:
//!
//! 1. chaperone's mutating admission webhook (`chaperone webhook`, path
//!    [`crate::webhook::ATTEST_PATH`]) sees every CREATE and UPDATE of
//!    `approvalrequests` and `approvalrequests/status`. When a write changes
//!    the decision ([`DecisionFields`]: state, grant) to `Approved` or
//!    `Denied`, it overwrites `decidedBy`/`decidedByGroups` with the
//!    AdmissionReview's `userInfo`, `decidedAt` with its own clock, and
//!    signs them ([`Signer`], ed25519) into `status.attestation`. A write
//!    that leaves the decision as it was keeps the old attestation (a
//!    client can never supply one: what it sends there is replaced), and
//!    any other decision state loses it.
//! 2. Each node agent holds the webhook's public key ([`Verifier`]) and
//!    accepts only decisions whose attestation verifies over exactly the
//!    fields it acts on, bound to the object's namespace, name and uid (a
//!    signature cannot move to another approval). It then refuses the
//!    requester deciding its own request and chaperone's own service
//!    accounts (the namespace approvals live in), and asks a
//!    SubjectAccessReview for the attested user and groups.
//!
//! The signing key is a Secret mounted only into the webhook Deployment;
//! the nodes get the public key (deploy/bootstrap-certs.sh makes both).
//! Nobody else can produce an attestation: not a compromised node, not an
//! approver writing another person's name.
//!
//! Local mode (`--approval-dir`) keeps its trust model: whoever may write
//! the directory decides, and the filesystem's permissions say who that is.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ApprovalRequest, ApprovalStatus, State};

/// What the webhook writes into `status.attestation`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attestation {
    /// Which public key verifies it ([`key_id`]).
    pub key_id: String,
    /// base64 of the ed25519 signature over [`signed_bytes`].
    pub signature: String,
}

/// The fields of a status that make a decision: when one of them changes,
/// the decision is a new one and is attested again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionFields<'a> {
    pub state: State,
    pub decided_by: Option<&'a str>,
    pub decided_by_groups: &'a [String],
    pub decided_at: Option<&'a str>,
    pub grant: Option<&'a str>,
    pub grant_expires_at: Option<&'a str>,
    pub grant_scope: Option<super::GrantScope>,
}

impl<'a> DecisionFields<'a> {
    pub fn of(status: &'a ApprovalStatus) -> Self {
        DecisionFields {
            state: status.state,
            decided_by: status.decided_by.as_deref(),
            decided_by_groups: &status.decided_by_groups,
            decided_at: status.decided_at.as_deref(),
            grant: status.grant.as_deref(),
            grant_expires_at: status.grant_expires_at.as_deref(),
            grant_scope: status.grant_scope,
        }
    }
}

/// The bytes signed for `status` on `object`: a JSON array, so no field can
/// run into the next.
pub fn signed_bytes(object: &ApprovalRequest, status: &ApprovalStatus) -> Vec<u8> {
    let d = DecisionFields::of(status);
    let mut fields = serde_json::json!([
        "chaperone.dev/approval-decision/v1",
        object.metadata.namespace.as_deref().unwrap_or(""),
        object.name(),
        object.metadata.uid.as_deref().unwrap_or(""),
        d.state,
        d.decided_by,
        d.decided_by_groups,
        d.decided_at,
        d.grant,
        d.grant_expires_at,
    ]);
    // The grant's scope is signed too (a status writer must not widen an
    // object grant to the rule); appended only when set, so decisions
    // signed before scopes existed still verify.
    if let Some(scope) = d.grant_scope {
        fields
            .as_array_mut()
            .expect("an array")
            .push(serde_json::json!(scope));
    }
    serde_json::to_vec(&fields).expect("strings always serialize")
}

/// A short name for a public key: the first 8 bytes of its SHA-256, hex.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the raw
/// 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A webhook signing key or a node's verify key that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttestKeyError {
    #[error("a {0} block has no end line")]
    Unterminated(&'static str),
    #[error("a {label} block is not base64: {reason}")]
    NotBase64 { label: &'static str, reason: String },
    #[error("no PRIVATE KEY block (make one with `openssl genpkey -algorithm ed25519`)")]
    NoPrivateKey,
    #[error("not an ed25519 PKCS#8 key: {0}")]
    NotPkcs8(String),
    #[error("a PUBLIC KEY block is not an ed25519 key")]
    NotEd25519,
    #[error("no PUBLIC KEY block")]
    NoPublicKey,
}

/// Why a decision's attestation is not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unattested {
    #[error(
        "the decision carries no attestation from chaperone's admission webhook \
         (written while the webhook was not called, or by hand)"
    )]
    Missing,
    #[error("the decision is attested with key {0:?}, which this node does not trust")]
    UnknownKey(String),
    #[error("the attestation's signature is not base64")]
    NotBase64,
    #[error(
        "the attestation does not match the decision (decidedBy, groups, state or grant \
         were changed after the webhook signed them, or it was copied from elsewhere)"
    )]
    Mismatch,
}

/// The DER contents of every `-----BEGIN label-----` block in `pem`.
fn pem_blocks(pem: &str, label: &'static str) -> Result<Vec<Vec<u8>>, AttestKeyError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after
            .find(&end)
            .ok_or(AttestKeyError::Unterminated(label))?;
        let text: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        blocks.push(
            STANDARD
                .decode(text)
                .map_err(|e| AttestKeyError::NotBase64 {
                    label,
                    reason: e.to_string(),
                })?,
        );
        rest = &after[stop + end.len()..];
    }
    Ok(blocks)
}

// === impl Signer ===

/// The webhook's signing key.
pub struct Signer {
    key: Ed25519KeyPair,
    key_id: String,
}

impl Signer {
    /// From a PKCS#8 PEM (`openssl genpkey -algorithm ed25519`).
    pub fn from_pem(pem: &str) -> Result<Self, AttestKeyError> {
        let der = pem_blocks(pem, "PRIVATE KEY")?
            .into_iter()
            .next()
            .ok_or(AttestKeyError::NoPrivateKey)?;
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| AttestKeyError::NotPkcs8(e.to_string()))?;
        let key_id = key_id(key.public_key().as_ref());
        Ok(Signer { key, key_id })
    }

    /// A fresh key, for tests.
    pub fn generate() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system RNG works");
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a key ring just made");
        let key_id = key_id(key.public_key().as_ref());
        Signer { key, key_id }
    }

    /// The public key as a PEM SubjectPublicKeyInfo, for the nodes.
    pub fn public_key_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.key.public_key().as_ref());
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
    }

    pub fn sign(&self, object: &ApprovalRequest, status: &ApprovalStatus) -> Attestation {
        let signature = self.key.sign(&signed_bytes(object, status));
        Attestation {
            key_id: self.key_id.clone(),
            signature: STANDARD.encode(signature.as_ref()),
        }
    }
}

// === impl Verifier ===

/// The public keys a node accepts attestations from (more than one while
/// the webhook's key is rotated).
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    keys: Vec<(String, Vec<u8>)>,
}

impl Verifier {
    /// From one or more PEM `PUBLIC KEY` blocks (ed25519).
    pub fn from_pem(pem: &str) -> Result<Self, AttestKeyError> {
        let mut keys = Vec::new();
        for der in pem_blocks(pem, "PUBLIC KEY")? {
            let raw = der
                .strip_prefix(&ED25519_SPKI_PREFIX[..])
                .filter(|raw| raw.len() == 32)
                .ok_or(AttestKeyError::NotEd25519)?;
            keys.push((key_id(raw), raw.to_vec()));
        }
        if keys.is_empty() {
            return Err(AttestKeyError::NoPublicKey);
        }
        Ok(Verifier { keys })
    }

    /// `Ok` when `status` carries a valid attestation of its decision on
    /// `object`; `Err` says what is wrong.
    pub fn verify(
        &self,
        object: &ApprovalRequest,
        status: &ApprovalStatus,
    ) -> Result<(), Unattested> {
        let Some(attestation) = &status.attestation else {
            return Err(Unattested::Missing);
        };
        let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == attestation.key_id) else {
            return Err(Unattested::UnknownKey(attestation.key_id.clone()));
        };
        let signature = STANDARD
            .decode(&attestation.signature)
            .map_err(|_| Unattested::NotBase64)?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&signed_bytes(object, status), &signature)
            .map_err(|_| Unattested::Mismatch)
    }
}

/// Whether `status` holds a decision the node acts on.
pub fn is_decided(state: State) -> bool {
    matches!(state, State::Approved | State::Denied)
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Signer {
    fn eq(&self, other: &Self) -> bool {
        self.key_id == other.key_id
    }
}

impl Eq for Signer {}

/// Who the API server says wrote a change (an AdmissionReview's `userInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

// === the webhook's side ===

/// The status an ApprovalRequest write must store, given the stored object
/// (`None` for a create), the written one and who wrote it; `None` when the
/// written status may stay as it is.
///
/// - The decision unchanged (a node marking it used, a reason edited):
///   the stored attestation, whatever the write said.
/// - A grant ended early (`kubectl chaperone revoke`: only
///   `grantExpiresAt`, moved earlier): the decider stays who it was,
///   `revokedBy` is `user`, and the shorter grant is signed.
/// - Any other change to `Approved` or `Denied`: a new decision, made by
///   `user`, now; signed.
/// - Anything else (`Pending`, `Expired`): no attestation.
pub fn attest_write(
    signer: &Signer,
    old: Option<&ApprovalRequest>,
    new: &ApprovalRequest,
    user: &UserInfo,
    now: time::OffsetDateTime,
) -> Option<ApprovalStatus> {
    let written = new.status.clone().unwrap_or_default();
    let stored = old.and_then(|o| o.status.clone()).unwrap_or_default();
    let mut status = written.clone();
    let before = DecisionFields::of(&stored);
    let after = DecisionFields::of(&written);
    if old.is_some() && before == after {
        status.attestation = stored.attestation.clone();
    } else if !is_decided(written.state) {
        status.attestation = None;
    } else if old.is_some() && is_revocation(&before, &after) {
        status.decided_by = stored.decided_by.clone();
        status.decided_by_groups = stored.decided_by_groups.clone();
        status.decided_at = stored.decided_at.clone();
        status.revoked_by = Some(user.username.clone());
        status.attestation = Some(signer.sign(new, &status));
    } else {
        status.decided_by = Some(user.username.clone());
        status.decided_by_groups = user.groups.clone();
        status.decided_at = Some(super::format_time(now));
        status.attestation = Some(signer.sign(new, &status));
    }
    (status != written).then_some(status)
}

/// The same decided grant, only ending earlier.
fn is_revocation(before: &DecisionFields<'_>, after: &DecisionFields<'_>) -> bool {
    let earlier = match (
        before.grant_expires_at.and_then(super::parse_time),
        after.grant_expires_at.and_then(super::parse_time),
    ) {
        (Some(before), Some(after)) => after <= before,
        _ => false,
    };
    earlier
        && is_decided(before.state)
        && before.state == after.state
        && before.grant == after.grant
        && before.grant_scope == after.grant_scope
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::{ApprovalRequestSpec, HeldRequest, Requester, format_time, parse_time};
    use crate::webhook::{ADMISSION_V1, AdmissionReview, Injector};
    use serde_json::json;
    use std::sync::Arc;

    fn approval(name: &str, uid: &str, status: serde_json::Value) -> ApprovalRequest {
        let mut object = ApprovalRequest::new(
            name,
            ApprovalRequestSpec {
                requester: Requester {
                    username: "system:serviceaccount:agents:coder".into(),
                    ..Requester::default()
                },
                request: HeldRequest::default(),
                policy: "p".into(),
                rule: "r".into(),
                preview: None,
                expires_at: "2030-01-01T00:00:00Z".into(),
                hold_seconds: None,
                node: None,
            },
        );
        object.metadata.namespace = Some("chaperone-system".into());
        object.metadata.uid = Some(uid.into());
        object.status = Some(serde_json::from_value(status).unwrap());
        object
    }

    fn alice() -> UserInfo {
        UserInfo {
            username: "alice@example.com".into(),
            groups: vec!["approvers".into(), "system:authenticated".into()],
        }
    }

    fn now() -> time::OffsetDateTime {
        parse_time("2026-12-07T15:00:00Z").unwrap()
    }

    /// What the webhook makes of a write of `written` over `stored` by `user`.
    fn webhook(
        signer: &Signer,
        stored: &ApprovalRequest,
        written: serde_json::Value,
        user: &UserInfo,
    ) -> ApprovalRequest {
        let mut new = stored.clone();
        new.status = Some(serde_json::from_value(written).unwrap());
        if let Some(status) = attest_write(signer, Some(stored), &new, user, now()) {
            new.status = Some(status);
        }
        new
    }

    fn verifier(signer: &Signer) -> Verifier {
        Verifier::from_pem(&signer.public_key_pem()).unwrap()
    }

    #[test]
    fn the_decider_is_who_the_api_server_authenticated_whatever_the_body_says() {
        let signer = Signer::generate();
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        for state in ["Approved", "Denied"] {
            let decided = webhook(
                &signer,
                &pending,
                json!({"state": state, "decidedBy": "anyone", "decidedByGroups": ["system:masters"],
                       "decidedAt": "2001-01-01T00:00:00Z", "reason": "ok",
                       "attestation": {"keyId": "x", "signature": "AAAA"}}),
                &alice(),
            );
            let status = decided.status.clone().unwrap();
            assert_eq!(status.decided_by.as_deref(), Some("alice@example.com"));
            assert_eq!(status.decided_by_groups, alice().groups);
            assert_eq!(status.decided_at, Some(format_time(now())));
            assert_eq!(status.reason.as_deref(), Some("ok"));
            verifier(&signer).verify(&decided, &status).unwrap();
        }
    }

    #[test]
    fn a_write_that_keeps_the_decision_keeps_the_stored_attestation() {
        let signer = Signer::generate();
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        let approved = webhook(&signer, &pending, json!({"state": "Approved"}), &alice());
        let mut written = serde_json::to_value(approved.status.as_ref().unwrap()).unwrap();
        written["usedAt"] = json!("2026-12-07T15:01:00Z");
        written["attestation"] = json!({"keyId": "mine", "signature": "Zm9yZ2Vk"});
        let node = UserInfo {
            username: "system:serviceaccount:chaperone-system:chaperone-node".into(),
            groups: vec![],
        };
        let used = webhook(&signer, &approved, written, &node);
        let status = used.status.clone().unwrap();
        assert_eq!(status.attestation, approved.status.unwrap().attestation);
        assert_eq!(status.decided_by.as_deref(), Some("alice@example.com"));
        verifier(&signer).verify(&used, &status).unwrap();
    }

    #[test]
    fn a_node_rewriting_the_decider_becomes_the_decider() {
        let signer = Signer::generate();
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        let approved = webhook(&signer, &pending, json!({"state": "Approved"}), &alice());
        let mut written = serde_json::to_value(approved.status.as_ref().unwrap()).unwrap();
        written["decidedByGroups"] = json!(["system:masters"]);
        let node = UserInfo {
            username: "system:serviceaccount:chaperone-system:chaperone-node".into(),
            groups: vec!["system:serviceaccounts:chaperone-system".into()],
        };
        let forged = webhook(&signer, &approved, written, &node);
        let status = forged.status.unwrap();
        assert_eq!(status.decided_by, Some(node.username));
        assert_eq!(status.decided_by_groups, node.groups);
    }

    #[test]
    fn a_revocation_keeps_the_decider_and_names_the_revoker() {
        let signer = Signer::generate();
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        let approved = webhook(
            &signer,
            &pending,
            json!({"state": "Approved", "grant": "1h", "grantExpiresAt": "2026-12-07T16:00:00Z"}),
            &alice(),
        );
        let mut written = serde_json::to_value(approved.status.as_ref().unwrap()).unwrap();
        written["grantExpiresAt"] = json!("2026-12-07T15:10:00Z");
        written["revokedBy"] = json!("someone-else");
        let bob = UserInfo {
            username: "bob".into(),
            groups: vec![],
        };
        let revoked = webhook(&signer, &approved, written.clone(), &bob);
        let status = revoked.status.clone().unwrap();
        assert_eq!(status.decided_by.as_deref(), Some("alice@example.com"));
        assert_eq!(status.revoked_by.as_deref(), Some("bob"));
        verifier(&signer).verify(&revoked, &status).unwrap();
        // Lengthening a grant is a new decision, by whoever wrote it.
        written["grantExpiresAt"] = json!("2027-12-07T15:10:00Z");
        let extended = webhook(&signer, &approved, written, &bob);
        assert_eq!(extended.status.unwrap().decided_by.as_deref(), Some("bob"));
    }

    #[test]
    fn pending_and_expired_carry_no_attestation() {
        let signer = Signer::generate();
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        let approved = webhook(&signer, &pending, json!({"state": "Approved"}), &alice());
        let mut written = serde_json::to_value(approved.status.as_ref().unwrap()).unwrap();
        written["state"] = json!("Expired");
        let expired = webhook(&signer, &approved, written, &alice());
        assert_eq!(expired.status.unwrap().attestation, None);
    }

    #[test]
    fn forged_statuses_are_refused_by_the_node() {
        let signer = Signer::generate();
        let verify = verifier(&signer);
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        // Written by hand, without the webhook: no attestation.
        let forged: ApprovalStatus = serde_json::from_value(json!({
            "state": "Approved", "decidedBy": "anyone", "decidedByGroups": ["system:masters"]}))
        .unwrap();
        let why = verify.verify(&pending, &forged).unwrap_err().to_string();
        assert!(why.contains("no attestation"), "{why}");
        // With a made-up attestation.
        let mut made_up = forged.clone();
        made_up.attestation = Some(Attestation {
            key_id: key_id(&verify.keys[0].1),
            signature: STANDARD.encode([7u8; 64]),
        });
        assert!(verify.verify(&pending, &made_up).is_err());
        // Signed by another key.
        let other = Signer::generate();
        let mut other_key = forged.clone();
        other_key.attestation = Some(other.sign(&pending, &forged));
        let why = verify.verify(&pending, &other_key).unwrap_err().to_string();
        assert!(why.contains("does not trust"), "{why}");
        // A real attestation, then the groups changed.
        let approved = webhook(&signer, &pending, json!({"state": "Approved"}), &alice());
        let mut tampered = approved.status.clone().unwrap();
        tampered.decided_by_groups.push("system:masters".into());
        assert!(verify.verify(&approved, &tampered).is_err());
        let mut renamed = approved.status.clone().unwrap();
        renamed.decided_by = Some("carol".into());
        assert!(verify.verify(&approved, &renamed).is_err());
        // A real attestation copied onto another approval.
        let elsewhere = approval("a2", "uid-2", json!({"state": "Pending"}));
        assert!(
            verify
                .verify(&elsewhere, approved.status.as_ref().unwrap())
                .is_err()
        );
        // A denial turned into an approval.
        let denied = webhook(&signer, &pending, json!({"state": "Denied"}), &alice());
        let mut flipped = denied.status.clone().unwrap();
        flipped.state = State::Approved;
        assert!(verify.verify(&denied, &flipped).is_err());
        // A grant on one object widened to the whole rule (or its scope
        // dropped, which reads as the rule).
        let granted = webhook(
            &signer,
            &pending,
            json!({"state": "Approved", "grant": "1h", "grantExpiresAt": "2099-01-01T00:00:00Z", "grantScope": "Object"}),
            &alice(),
        );
        let status = granted.status.clone().unwrap();
        assert!(verify.verify(&granted, &status).is_ok());
        let mut widened = status.clone();
        widened.grant_scope = Some(crate::approval::GrantScope::Rule);
        assert!(verify.verify(&granted, &widened).is_err());
        let mut dropped = status;
        dropped.grant_scope = None;
        assert!(verify.verify(&granted, &dropped).is_err());
    }

    #[test]
    fn keys_load_from_the_pem_openssl_writes() {
        // `openssl genpkey -algorithm ed25519` (PKCS#8 v1) and its
        // `openssl pkey -pubout`.
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIICe97Ocjzw4pT83mdKnfbCyPd8j7ovSBiAwrvVDcFLF\n-----END PRIVATE KEY-----\n";
        let signer = Signer::from_pem(private).unwrap();
        let public = signer.public_key_pem();
        assert_eq!(
            public,
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAg2+Kd6izb9lUgS9OQMhpS8N05wf3l26NREhBBg6mdrE=\n-----END PUBLIC KEY-----\n"
        );
        let verify =
            Verifier::from_pem(&format!("{public}{}", Signer::generate().public_key_pem()))
                .unwrap();
        assert_eq!(verify.keys.len(), 2);
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        let approved = webhook(&signer, &pending, json!({"state": "Approved"}), &alice());
        verify
            .verify(&approved, approved.status.as_ref().unwrap())
            .unwrap();
        assert!(Verifier::from_pem("nothing").is_err());
        assert!(Signer::from_pem(&public).is_err());
    }

    #[test]
    fn the_webhook_patches_the_status_from_the_admission_review() {
        let signer = Arc::new(Signer::generate());
        let injector = Injector {
            attestor: Some(signer.clone()),
            ..Injector::default()
        };
        let pending = approval("a1", "uid-1", json!({"state": "Pending"}));
        let mut written = serde_json::to_value(&pending).unwrap();
        written["status"] = json!({"state": "Approved", "decidedBy": "anyone",
                                  "decidedByGroups": ["system:masters"]});
        let review: AdmissionReview = serde_json::from_value(json!({
            "apiVersion": ADMISSION_V1, "kind": "AdmissionReview",
            "request": {
                "uid": "r-1",
                "kind": {"group": "chaperone.dev", "version": "v1alpha1", "kind": "ApprovalRequest"},
                "resource": {"group": "chaperone.dev", "version": "v1alpha1", "resource": "approvalrequests"},
                "subResource": "status",
                "name": "a1", "namespace": "chaperone-system",
                "operation": "UPDATE",
                "userInfo": {"username": "alice@example.com", "uid": "u", "groups": ["approvers"]},
                "object": written,
                "oldObject": serde_json::to_value(&pending).unwrap(),
            },
        }))
        .unwrap();
        let answer = injector.attest(&review).response.unwrap();
        assert!(answer.allowed);
        let patch = answer.decoded_patch().unwrap().unwrap();
        assert_eq!(patch[0]["op"], "add");
        assert_eq!(patch[0]["path"], "/status");
        let status: ApprovalStatus = serde_json::from_value(patch[0]["value"].clone()).unwrap();
        assert_eq!(status.decided_by.as_deref(), Some("alice@example.com"));
        assert_eq!(status.decided_by_groups, vec!["approvers".to_owned()]);
        verifier(&signer).verify(&pending, &status).unwrap();
        // Without a key the webhook cannot attest: the write is denied.
        let answer = Injector::default().attest(&review).response.unwrap();
        assert!(!answer.allowed);
    }
}

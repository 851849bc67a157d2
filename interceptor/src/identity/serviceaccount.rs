//! Projected service-account tokens, verified locally against the keys the
//! API server publishes, turned into the user the API server itself would
//! see (username, uid, groups, extra).

use std::collections::BTreeMap;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::Caller;
use super::error::AuthError;
use super::jwt::{self, Jwt};
use super::keys::KeyCache;

/// The `iss` of legacy secret-based tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

/// The `extra` keys the API server sets for service-account tokens.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// Whether a token is a legacy secret-based service-account token.
pub(crate) fn is_legacy(claims: &Map<String, Value>) -> bool {
    claims.get("iss").and_then(Value::as_str) == Some(LEGACY_ISSUER)
        || claims
            .keys()
            .any(|k| k.starts_with("kubernetes.io/serviceaccount/"))
}

/// The `kubernetes.io` claim of a projected token.
#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: ObjectRef,
    pod: Option<ObjectRef>,
    node: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: String,
    uid: String,
}

pub(crate) struct ServiceAccountVerifier {
    configured_issuers: Vec<String>,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: i64,
    keys: KeyCache,
}

impl ServiceAccountVerifier {
    pub fn new(
        configured_issuers: Vec<String>,
        audiences: Vec<String>,
        algorithms: Vec<Algorithm>,
        leeway: i64,
        keys: KeyCache,
    ) -> Self {
        Self {
            configured_issuers,
            audiences,
            algorithms,
            leeway,
            keys,
        }
    }

    /// The issuers tokens may name: configured, or discovered from the API
    /// server (fetching its keys if that has not happened yet).
    pub async fn issuers(&self) -> Result<Vec<String>, AuthError> {
        if !self.configured_issuers.is_empty() {
            return Ok(self.configured_issuers.clone());
        }
        Ok(self.keys.discovered_issuer().await?.into_iter().collect())
    }

    fn accepted_audiences(&self, issuers: &[String]) -> Vec<String> {
        if self.audiences.is_empty() {
            issuers.to_vec()
        } else {
            self.audiences.clone()
        }
    }

    /// Verifies a token whose `iss` is one of [`Self::issuers`].
    pub async fn verify(&self, jwt: &Jwt<'_>, issuers: &[String]) -> Result<Caller, AuthError> {
        let issuer = jwt.issuer().unwrap_or_default();
        let alg = jwt::allowed_algorithm(&jwt.alg, &self.algorithms)?;
        verify_signature(jwt, alg, &self.keys, issuer).await?;
        jwt::check_times(&jwt.claims, jwt::now(), self.leeway)?;
        jwt::check_audience(&jwt.claims, &self.accepted_audiences(issuers))?;
        caller_from_claims(&jwt.claims)
    }
}

/// Checks that one of the issuer's keys for the token's `kid` signed it.
pub(crate) async fn verify_signature(
    jwt: &Jwt<'_>,
    alg: Algorithm,
    keys: &KeyCache,
    issuer: &str,
) -> Result<(), AuthError> {
    let candidates = keys.candidates(jwt.kid.as_deref(), issuer).await?;
    let mut mismatch = None;
    let mut tried = 0;
    for key in &candidates.keys {
        if let Some(reason) = key.incompatibility(alg) {
            mismatch.get_or_insert(reason);
            continue;
        }
        tried += 1;
        if jwt.signed_by(key, alg) {
            return Ok(());
        }
    }
    match (tried, mismatch, &jwt.kid) {
        (0, Some(reason), Some(kid)) => Err(AuthError::KeyAlgorithmMismatch {
            kid: kid.clone(),
            alg: jwt.alg.clone(),
            issuer: issuer.to_string(),
            reason,
        }),
        _ => Err(AuthError::BadSignature {
            issuer: issuer.to_string(),
        }),
    }
}

/// The user the API server derives from a projected token's claims.
fn caller_from_claims(claims: &Map<String, Value>) -> Result<Caller, AuthError> {
    let k8s = claims
        .get("kubernetes.io")
        .ok_or_else(|| AuthError::MissingClaim {
            claim: "kubernetes.io".into(),
        })?;
    let k8s: KubernetesClaims =
        serde_json::from_value(k8s.clone()).map_err(|e| AuthError::InvalidClaim {
            claim: "kubernetes.io".into(),
            reason: e.to_string(),
        })?;
    let namespace = k8s.namespace;
    let account = k8s.serviceaccount;
    if namespace.is_empty() || account.name.is_empty() {
        return Err(AuthError::InvalidClaim {
            claim: "kubernetes.io".into(),
            reason: "namespace or service account name is empty".into(),
        });
    }
    let username = format!("system:serviceaccount:{namespace}:{}", account.name);
    if let Some(sub) = claims.get("sub")
        && sub.as_str() != Some(username.as_str())
    {
        return Err(AuthError::InvalidClaim {
            claim: "sub".into(),
            reason: format!("{sub} does not match the service account {username}"),
        });
    }
    let mut extra = BTreeMap::new();
    if let Some(pod) = k8s.pod {
        extra.insert(EXTRA_POD_NAME.to_string(), vec![pod.name]);
        extra.insert(EXTRA_POD_UID.to_string(), vec![pod.uid]);
    }
    if let Some(node) = k8s.node {
        extra.insert(EXTRA_NODE_NAME.to_string(), vec![node.name]);
        extra.insert(EXTRA_NODE_UID.to_string(), vec![node.uid]);
    }
    if let Some(jti) = claims.get("jti").and_then(Value::as_str)
        && !jti.is_empty()
    {
        extra.insert(EXTRA_CREDENTIAL_ID.to_string(), vec![format!("JTI={jti}")]);
    }
    Ok(Caller {
        username,
        uid: account.uid,
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".into(),
        ],
        extra,
        ..Caller::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claims_become_the_api_servers_user() {
        let claims = json!({
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:agents:coder",
            "jti": "7f1c",
            "kubernetes.io": {
                "namespace": "agents",
                "serviceaccount": {"name": "coder", "uid": "sa-uid"},
                "pod": {"name": "coder-0", "uid": "pod-uid"},
                "node": {"name": "node-1", "uid": "node-uid"}
            }
        });
        let caller = caller_from_claims(claims.as_object().unwrap()).unwrap();
        assert_eq!(caller.username, "system:serviceaccount:agents:coder");
        assert_eq!(caller.uid, "sa-uid");
        assert_eq!(
            caller.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:agents",
                "system:authenticated"
            ]
        );
        assert_eq!(caller.extra[EXTRA_POD_NAME], ["coder-0"]);
        assert_eq!(caller.extra[EXTRA_POD_UID], ["pod-uid"]);
        assert_eq!(caller.extra[EXTRA_NODE_NAME], ["node-1"]);
        assert_eq!(caller.extra[EXTRA_CREDENTIAL_ID], ["JTI=7f1c"]);
    }

    #[test]
    fn a_sub_that_disagrees_with_the_claims_is_refused() {
        let claims = json!({
            "sub": "system:serviceaccount:kube-system:admin",
            "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "coder", "uid": "u"}}
        });
        let error = caller_from_claims(claims.as_object().unwrap()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("does not match the service account")
        );
    }

    #[test]
    fn legacy_tokens_are_recognized() {
        let legacy = json!({"iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": "default"});
        assert!(is_legacy(legacy.as_object().unwrap()));
        let bound = json!({"iss": "https://kubernetes.default.svc"});
        assert!(!is_legacy(bound.as_object().unwrap()));
    }
}

//! Authentication and authorization: static tokens (the admin token),
//! service-account JWTs signed RS256 with the simulator's own rotating keys
//! (published through OIDC discovery and JWKS), impersonation, and a small
//! RBAC model whose rules tests configure.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::{pkcs1::EncodeRsaPrivateKey, pkcs8::EncodePublicKey, traits::PublicKeyParts};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

/// Who a request runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// The `user` object of a TokenReview status.
    pub fn to_review_user(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("username".into(), self.username.clone().into());
        if !self.uid.is_empty() {
            m.insert("uid".into(), self.uid.clone().into());
        }
        m.insert("groups".into(), json!(self.groups));
        if !self.extra.is_empty() {
            m.insert("extra".into(), json!(self.extra));
        }
        Value::Object(m)
    }

    /// `(namespace, name)` when this is a service account.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        self.username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
    }
}

/// The attributes of a request, as RBAC sees them.
#[derive(Clone, Debug, Default)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Set for non-resource requests (`/version`, `/healthz`).
    pub path: Option<String>,
}

/// Who a grant applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    User(String),
    Group(String),
    ServiceAccount { namespace: String, name: String },
}

impl Subject {
    fn matches(&self, user: &UserInfo) -> bool {
        match self {
            Self::User(u) => &user.username == u,
            Self::Group(g) => user.groups.iter().any(|x| x == g),
            Self::ServiceAccount { namespace, name } => {
                user.username == format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }
}

/// One RBAC rule; empty `namespaces` means every namespace (a ClusterRole
/// binding), empty `names` every name; `*` matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    /// `pods`, `pods/log`, `*`.
    pub resources: Vec<String>,
    pub namespaces: Vec<String>,
    pub names: Vec<String>,
    /// Non-resource URLs (`/version`, `/healthz*`).
    pub non_resource_urls: Vec<String>,
}

fn strs(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl Rule {
    /// A resource rule in every namespace.
    pub fn new(verbs: &[&str], api_groups: &[&str], resources: &[&str]) -> Self {
        Self {
            verbs: strs(verbs),
            api_groups: strs(api_groups),
            resources: strs(resources),
            ..Self::default()
        }
    }

    /// Restricts the rule to some namespaces (a RoleBinding).
    pub fn in_namespaces(mut self, namespaces: &[&str]) -> Self {
        self.namespaces = strs(namespaces);
        self
    }

    /// Restricts the rule to some object names.
    pub fn named(mut self, names: &[&str]) -> Self {
        self.names = strs(names);
        self
    }

    fn any(list: &[String], v: &str) -> bool {
        list.iter().any(|x| x == "*" || x == v)
    }

    fn allows(&self, a: &Attributes) -> bool {
        if !Self::any(&self.verbs, &a.verb) {
            return false;
        }
        if let Some(path) = &a.path {
            return self.non_resource_urls.iter().any(|u| {
                u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
            });
        }
        let full = if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        Self::any(&self.api_groups, &a.group)
            && (Self::any(&self.resources, &full)
                || self.resources.iter().any(|r| {
                    r.strip_suffix("/*")
                        .is_some_and(|base| base == a.resource && !a.subresource.is_empty())
                        || r.strip_prefix("*/").is_some_and(|sub| sub == a.subresource)
                }))
            && (self.namespaces.is_empty() || Self::any(&self.namespaces, &a.namespace))
            && (self.names.is_empty() || Self::any(&self.names, &a.name))
    }
}

/// Rules granted to a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub subject: Subject,
    pub rules: Vec<Rule>,
}

/// The simulator's authorizer: `system:masters` may do everything; everyone
/// authenticated may read discovery, `/version`, `/healthz`, the OIDC
/// documents and create self-reviews; the rest comes from grants.
#[derive(Clone, Debug, Default)]
pub struct Authorizer {
    pub grants: Vec<Grant>,
    /// Every authenticated user may do everything (the demo's preset).
    pub permissive: bool,
}

impl Authorizer {
    /// Only the built-in rules; tests add grants.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Everyone authenticated may do everything.
    pub fn permissive() -> Self {
        Self {
            grants: Vec::new(),
            permissive: true,
        }
    }

    pub fn grant(&mut self, subject: Subject, rules: Vec<Rule>) {
        self.grants.push(Grant { subject, rules });
    }

    /// Whether `user` may do `a`, and the reason RBAC would give.
    pub fn authorize(&self, user: &UserInfo, a: &Attributes) -> (bool, String) {
        if user.groups.iter().any(|g| g == "system:masters") {
            return (true, String::new());
        }
        if self.permissive {
            return (true, "allowed by the simulator's permissive preset".into());
        }
        let authenticated = user.groups.iter().any(|g| g == "system:authenticated");
        if authenticated {
            if let Some(path) = &a.path {
                const PUBLIC: &[&str] = &[
                    "/api",
                    "/apis",
                    "/version",
                    "/healthz",
                    "/livez",
                    "/readyz",
                    "/openapi",
                    "/.well-known/openid-configuration",
                    "/openid/v1/jwks",
                ];
                if a.verb == "get"
                    && PUBLIC
                        .iter()
                        .any(|p| path == p || path.starts_with(&format!("{p}/")))
                {
                    return (true, "RBAC: allowed by ClusterRoleBinding \"system:discovery\" of ClusterRole \"system:discovery\" to Group \"system:authenticated\"".into());
                }
            }
            let self_review = match a.group.as_str() {
                "authorization.k8s.io" => {
                    a.resource == "selfsubjectaccessreviews"
                        || a.resource == "selfsubjectrulesreviews"
                }
                "authentication.k8s.io" => a.resource == "selfsubjectreviews",
                _ => false,
            };
            if a.verb == "create" && self_review {
                return (true, "RBAC: allowed by ClusterRoleBinding \"system:basic-user\" of ClusterRole \"system:basic-user\" to Group \"system:authenticated\"".into());
            }
        }
        for g in &self.grants {
            if g.subject.matches(user) && g.rules.iter().any(|r| r.allows(a)) {
                return (
                    true,
                    format!("RBAC: allowed by the simulator's grant to {:?}", g.subject),
                );
            }
        }
        (false, String::new())
    }
}

/// The claims of a projected service-account token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceAccountClaims {
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub iss: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
    pub nbf: i64,
    pub sub: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<NameUid>,
    pub serviceaccount: NameUid,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NameUid {
    pub name: String,
    pub uid: String,
}

/// What to put in a minted service-account token.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    /// `(name, uid)` of the pod the token is bound to.
    pub pod: Option<(String, String)>,
    /// `None`: the API server's own audience (the issuer).
    pub audience: Option<Vec<String>>,
    pub ttl: Duration,
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    n: String,
    e: String,
    /// When a rotated-out key stops being published and accepted.
    retired_until: Option<SystemTime>,
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `rand` 0.9's thread RNG behind the rand_core 0.6 traits the `rsa` crate asks for.
pub(crate) struct Rng06;

impl rsa::rand_core::RngCore for Rng06 {
    fn next_u32(&mut self) -> u32 {
        rand::Rng::random(&mut rand::rng())
    }
    fn next_u64(&mut self) -> u64 {
        rand::Rng::random(&mut rand::rng())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand::RngCore::fill_bytes(&mut rand::rng(), dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for Rng06 {}

fn new_signing_key() -> anyhow::Result<SigningKey> {
    let private = rsa::RsaPrivateKey::new(&mut Rng06, 2048)?;
    let public = private.to_public_key();
    let der = private.to_pkcs1_der()?;
    let spki = public.to_public_key_der()?;
    // Like the API server: the key id is the hash of the public key.
    let kid = b64url(&sha2::Sha256::digest(spki.as_bytes()));
    let n = b64url(&public.n().to_bytes_be());
    let e = b64url(&public.e().to_bytes_be());
    Ok(SigningKey {
        kid,
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        decoding: DecodingKey::from_rsa_components(&n, &e)?,
        n,
        e,
        retired_until: None,
    })
}

/// The service-account issuer: signing keys, minting and verification.
pub struct Issuer {
    pub issuer: String,
    pub jwks_uri: String,
    keys: Mutex<Vec<SigningKey>>,
    /// How long a rotated-out key stays valid and published.
    pub retention: Duration,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Issuer {
    pub fn new(issuer: String, jwks_uri: String, retention: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            issuer,
            jwks_uri,
            keys: Mutex::new(vec![new_signing_key()?]),
            retention,
        })
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Vec<SigningKey>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts signing with a new key; the old ones stay valid (and in JWKS)
    /// for [`Issuer::retention`]. Returns the new key id.
    pub fn rotate(&self) -> anyhow::Result<String> {
        let fresh = new_signing_key()?;
        let kid = fresh.kid.clone();
        let until = SystemTime::now() + self.retention;
        let mut keys = self.keys();
        for k in keys.iter_mut() {
            k.retired_until.get_or_insert(until);
        }
        keys.insert(0, fresh);
        Ok(kid)
    }

    /// The key id new tokens are signed with.
    pub fn current_kid(&self) -> String {
        self.keys()[0].kid.clone()
    }

    fn live(keys: &[SigningKey]) -> impl Iterator<Item = &SigningKey> {
        let now = SystemTime::now();
        keys.iter()
            .filter(move |k| k.retired_until.is_none_or(|t| t > now))
    }

    pub fn mint(&self, req: &TokenRequest, sa_uid: &str) -> anyhow::Result<String> {
        let now = SystemTime::now();
        let claims = ServiceAccountClaims {
            aud: req
                .audience
                .clone()
                .unwrap_or_else(|| vec![self.issuer.clone()]),
            exp: unix(now + req.ttl),
            iat: unix(now),
            iss: self.issuer.clone(),
            kubernetes: KubernetesClaims {
                namespace: req.namespace.clone(),
                pod: req.pod.as_ref().map(|(name, uid)| NameUid {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
                serviceaccount: NameUid {
                    name: req.service_account.clone(),
                    uid: sa_uid.to_string(),
                },
            },
            nbf: unix(now),
            sub: format!(
                "system:serviceaccount:{}:{}",
                req.namespace, req.service_account
            ),
        };
        let keys = self.keys();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(keys[0].kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &keys[0].encoding)?)
    }

    /// Verifies a service-account JWT for one of `audiences`; returns the
    /// user it authenticates and the audiences it was valid for.
    pub fn verify(&self, token: &str, audiences: &[String]) -> Option<(UserInfo, Vec<String>)> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if header.alg != Algorithm::RS256 {
            return None;
        }
        let keys = self.keys();
        let key = Self::live(&keys).find(|k| Some(&k.kid) == header.kid.as_ref())?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(audiences);
        validation.validate_nbf = true;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<ServiceAccountClaims>(token, &key.decoding, &validation).ok()?;
        let c = data.claims;
        let (ns, sa) = c
            .sub
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))?;
        let mut extra = BTreeMap::new();
        if let Some(pod) = &c.kubernetes.pod {
            extra.insert(
                "authentication.kubernetes.io/pod-name".into(),
                vec![pod.name.clone()],
            );
            extra.insert(
                "authentication.kubernetes.io/pod-uid".into(),
                vec![pod.uid.clone()],
            );
        }
        let user = UserInfo {
            username: c.sub.clone(),
            uid: c.kubernetes.serviceaccount.uid.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            extra,
        };
        let _ = sa;
        let valid_for = c
            .aud
            .into_iter()
            .filter(|a| audiences.contains(a))
            .collect();
        Some((user, valid_for))
    }

    /// `/.well-known/openid-configuration` (fixture `oidc-discovery`).
    pub fn discovery_document(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    }

    /// `/openid/v1/jwks` (fixture `oidc-jwks`).
    pub fn jwks(&self) -> Value {
        let keys = self.keys();
        let list: Vec<Value> = Self::live(&keys)
            .map(|k| {
                json!({"use": "sig", "kty": "RSA", "kid": k.kid, "alg": "RS256", "n": k.n, "e": k.e})
            })
            .collect();
        json!({ "keys": list })
    }
}

/// Impersonation headers of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Impersonation {
    pub user: Option<String>,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Impersonation {
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        let mut imp = Self::default();
        for (name, value) in headers {
            let Ok(v) = value.to_str() else { continue };
            let n = name.as_str();
            if n == "impersonate-user" {
                imp.user = Some(v.to_string());
            } else if n == "impersonate-uid" {
                imp.uid = Some(v.to_string());
            } else if n == "impersonate-group" {
                imp.groups.push(v.to_string());
            } else if let Some(key) = n.strip_prefix("impersonate-extra-") {
                imp.extra
                    .entry(percent_decode(key))
                    .or_default()
                    .push(v.to_string());
            }
        }
        imp
    }

    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.uid.is_none() && self.groups.is_empty() && self.extra.is_empty()
    }

    /// The user the request acts as, as the API server builds it.
    pub fn user_info(&self) -> Option<UserInfo> {
        let username = self.user.clone()?;
        let mut groups = self.groups.clone();
        if let Some(ns) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .map(|(ns, _)| ns)
        {
            for g in [
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{ns}"),
            ] {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        if username != "system:anonymous" && !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        Some(UserInfo {
            username,
            uid: self.uid.clone().unwrap_or_default(),
            groups,
            extra: self.extra.clone(),
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbac_rules_match_verbs_resources_namespaces() {
        let mut authz = Authorizer::strict();
        authz.grant(
            Subject::ServiceAccount {
                namespace: "a".into(),
                name: "agent".into(),
            },
            vec![Rule::new(&["get", "list"], &[""], &["pods", "pods/log"]).in_namespaces(&["a"])],
        );
        let user = UserInfo {
            username: "system:serviceaccount:a:agent".into(),
            groups: vec!["system:authenticated".into()],
            ..Default::default()
        };
        let attrs = |verb: &str, res: &str, sub: &str, ns: &str| Attributes {
            verb: verb.into(),
            resource: res.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            ..Default::default()
        };
        assert!(authz.authorize(&user, &attrs("list", "pods", "", "a")).0);
        assert!(authz.authorize(&user, &attrs("get", "pods", "log", "a")).0);
        assert!(!authz.authorize(&user, &attrs("get", "pods", "exec", "a")).0);
        assert!(!authz.authorize(&user, &attrs("list", "pods", "", "b")).0);
        assert!(!authz.authorize(&user, &attrs("list", "secrets", "", "a")).0);
    }

    #[test]
    fn impersonation_headers_build_the_user() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "impersonate-user",
            "system:serviceaccount:ns:sa".parse().unwrap(),
        );
        h.append("impersonate-group", "g1".parse().unwrap());
        h.append(
            "impersonate-extra-authentication.kubernetes.io%2fpod-name",
            "p".parse().unwrap(),
        );
        let user = Impersonation::from_headers(&h).user_info().unwrap();
        assert_eq!(
            user.groups,
            [
                "g1",
                "system:serviceaccounts",
                "system:serviceaccounts:ns",
                "system:authenticated"
            ]
        );
        assert_eq!(user.extra["authentication.kubernetes.io/pod-name"], ["p"]);
    }
}

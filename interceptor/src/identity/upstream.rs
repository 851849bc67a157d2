//! The identity a request carries upstream: the agent's own token
//! (`passthrough`), or chaperone's credentials plus impersonation headers
//! naming the verified caller (`impersonate`). Whatever identity headers the
//! agent sent are always dropped first, so an agent can never impersonate
//! anyone through chaperone.

use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use super::Caller;
use super::error::AuthError;

/// How a request is re-originated to the API server (ARCHITECTURE.md, the
/// data path: passthrough or impersonate). One type for the node, the webhook and `AgentPolicy`; its
/// `Deserialize` lives with the policy spec's other words.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum CredentialMode {
    /// Forward the agent's own `Authorization`; the API server still
    /// authenticates and authorizes the agent itself.
    #[default]
    Passthrough,
    /// The agent's token is minted for chaperone's audience, which the API
    /// server refuses; chaperone sends its own credentials (added by the
    /// upstream client, not here) and impersonates the verified caller.
    Impersonate,
}

impl CredentialMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialMode::Passthrough => "passthrough",
            CredentialMode::Impersonate => "impersonate",
        }
    }
}

/// chaperone's own credentials, for what it sends as itself (impersonate
/// mode): a bearer token read afresh for each request (it is rotated), or
/// the client certificate the upstream's own-credentials pools present.
#[derive(Clone, Default)]
pub struct OwnCredentials {
    /// chaperone's own `Authorization`, when it authenticates with a token.
    pub token: Option<std::sync::Arc<dyn Fn() -> Option<HeaderValue> + Send + Sync>>,
    /// chaperone authenticates with a client certificate, which only the
    /// upstream's own-credentials pools present: agents' own requests never
    /// carry it.
    pub client_certificate: bool,
}

/// Neither a token nor a client certificate of chaperone's is available.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("impersonate mode needs chaperone's own API credentials, which are not available")]
pub struct NoOwnCredentials;

impl OwnCredentials {
    /// The `Authorization` a request sent as chaperone carries: `Some`
    /// token, or `None` where the client certificate authenticates it.
    pub fn authorization(&self) -> Result<Option<HeaderValue>, NoOwnCredentials> {
        match self.token.as_ref().and_then(|token| token()) {
            Some(value) => Ok(Some(value)),
            None if self.client_certificate => Ok(None),
            None => Err(NoOwnCredentials),
        }
    }
}

impl std::fmt::Debug for OwnCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnCredentials")
            .field("token", &self.token.is_some())
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

pub const IMPERSONATE_USER: &str = "impersonate-user";
pub const IMPERSONATE_GROUP: &str = "impersonate-group";
pub const IMPERSONATE_UID: &str = "impersonate-uid";
pub const IMPERSONATE_EXTRA_PREFIX: &str = "impersonate-extra-";

/// Whether a header carries identity: `Authorization` or any
/// `Impersonate-*` (header names are compared case-insensitively).
pub fn is_identity_header(name: &HeaderName) -> bool {
    name == AUTHORIZATION || name.as_str().starts_with("impersonate-")
}

/// A caller that cannot be written as impersonation headers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot impersonate {what} {value:?}: not representable in an HTTP header")]
    Unrepresentable { what: &'static str, value: String },
    #[error("cannot impersonate a caller without a username")]
    NoUsername,
}

/// Sets the identity headers of the upstream request in `out`: every
/// `Authorization` and `Impersonate-*` header already in `out` (for
/// instance copied from the agent's request) is removed, then
/// - `Passthrough`: the agent's `Authorization` (`agent_authorization`,
///   taken from its request before the call);
/// - `Impersonate`: `Impersonate-User`, one `Impersonate-Group` per group
///   (except `system:authenticated`, which the API server adds to every
///   impersonated user itself), `Impersonate-Uid` and one
///   `Impersonate-Extra-<key>` per extra value, keys percent-encoded as
///   client-go does. Chaperone's own `Authorization` is the upstream
///   client's to add.
///
/// Agent-supplied `Impersonate-*` headers never pass, in either mode.
pub fn upstream_identity_headers(
    mode: CredentialMode,
    caller: &Caller,
    agent_authorization: Option<HeaderValue>,
    out: &mut HeaderMap,
) -> Result<(), HeaderError> {
    let stale: Vec<HeaderName> = out
        .keys()
        .filter(|name| is_identity_header(name))
        .cloned()
        .collect();
    for name in stale {
        out.remove(&name);
    }
    match mode {
        CredentialMode::Passthrough => {
            if let Some(authorization) = agent_authorization {
                out.insert(AUTHORIZATION, authorization);
            }
        }
        CredentialMode::Impersonate => {
            if caller.username.is_empty() {
                return Err(HeaderError::NoUsername);
            }
            out.insert(
                HeaderName::from_static(IMPERSONATE_USER),
                value("user", &caller.username)?,
            );
            for group in caller
                .groups
                .iter()
                .filter(|g| g.as_str() != "system:authenticated")
            {
                out.append(
                    HeaderName::from_static(IMPERSONATE_GROUP),
                    value("group", group)?,
                );
            }
            if !caller.uid.is_empty() {
                out.insert(
                    HeaderName::from_static(IMPERSONATE_UID),
                    value("uid", &caller.uid)?,
                );
            }
            for (key, values) in &caller.extra {
                let name = format!("{IMPERSONATE_EXTRA_PREFIX}{}", escape_extra_key(key));
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    HeaderError::Unrepresentable {
                        what: "extra key",
                        value: key.clone(),
                    }
                })?;
                for v in values {
                    out.append(name.clone(), value("extra value", v)?);
                }
            }
        }
    }
    Ok(())
}

fn value(what: &'static str, text: &str) -> Result<HeaderValue, HeaderError> {
    HeaderValue::from_str(text).map_err(|_| HeaderError::Unrepresentable {
        what,
        value: text.to_string(),
    })
}

/// An extra key as client-go writes it into a header name: every byte that
/// is not an RFC 7230 token character, and `%` itself, as `%XX`; the API
/// server lowercases and path-unescapes it.
pub fn escape_extra_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        let token_char = b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b);
        if token_char {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bearer token of a request: exactly one `Authorization: Bearer`
/// header, refused otherwise (two headers could make chaperone and the API
/// server read different tokens).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(first) = values.next() else {
        return Err(AuthError::MissingToken);
    };
    if values.next().is_some() {
        return Err(AuthError::MalformedAuthorization(
            "more than one Authorization header".into(),
        ));
    }
    let text = first
        .to_str()
        .map_err(|_| AuthError::MalformedAuthorization("not visible ASCII".into()))?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or_else(|| AuthError::MalformedAuthorization("expected `Bearer <token>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedAuthorization(format!(
            "scheme {scheme:?} is not supported; send a bearer token"
        )));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn caller() -> Caller {
        let mut extra = BTreeMap::new();
        extra.insert(
            "authentication.kubernetes.io/pod-name".to_string(),
            vec!["coder-0".to_string()],
        );
        extra.insert(
            "scopes".to_string(),
            vec!["read".to_string(), "write".to_string()],
        );
        Caller {
            username: "system:serviceaccount:agents:coder".into(),
            uid: "sa-uid".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:agents".into(),
                "system:authenticated".into(),
            ],
            extra,
            ..Caller::default()
        }
    }

    /// What a hostile agent sends: its token plus an attempt to become
    /// cluster-admin through impersonation, in mixed case.
    fn hostile_agent() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer agent-token"),
        );
        headers.insert("Impersonate-User", HeaderValue::from_static("system:admin"));
        headers.append(
            "IMPERSONATE-GROUP",
            HeaderValue::from_static("system:masters"),
        );
        headers.insert("impersonate-uid", HeaderValue::from_static("0"));
        headers.insert(
            "Impersonate-Extra-Scopes",
            HeaderValue::from_static("everything"),
        );
        headers.insert("accept", HeaderValue::from_static("application/json"));
        headers
    }

    fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn passthrough_forwards_the_token_and_drops_impersonation() {
        let agent = hostile_agent();
        let mut out = agent.clone();
        upstream_identity_headers(
            CredentialMode::Passthrough,
            &caller(),
            agent.get(AUTHORIZATION).cloned(),
            &mut out,
        )
        .unwrap();
        assert_eq!(values(&out, "authorization"), ["Bearer agent-token"]);
        assert!(out.keys().all(|k| !k.as_str().starts_with("impersonate-")));
        assert_eq!(values(&out, "accept"), ["application/json"]);
    }

    #[test]
    fn impersonate_names_the_verified_caller_only() {
        let agent = hostile_agent();
        let mut out = agent.clone();
        upstream_identity_headers(
            CredentialMode::Impersonate,
            &caller(),
            agent.get(AUTHORIZATION).cloned(),
            &mut out,
        )
        .unwrap();
        assert!(
            out.get(AUTHORIZATION).is_none(),
            "the agent's token must not go upstream"
        );
        assert_eq!(
            values(&out, "impersonate-user"),
            ["system:serviceaccount:agents:coder"]
        );
        assert_eq!(
            values(&out, "impersonate-group"),
            ["system:serviceaccounts", "system:serviceaccounts:agents"]
        );
        assert_eq!(values(&out, "impersonate-uid"), ["sa-uid"]);
        assert_eq!(
            values(
                &out,
                "impersonate-extra-authentication.kubernetes.io%2Fpod-name"
            ),
            ["coder-0"]
        );
        assert_eq!(values(&out, "impersonate-extra-scopes"), ["read", "write"]);
        let identity: Vec<_> = out.keys().filter(|k| is_identity_header(k)).collect();
        assert_eq!(identity.len(), 5, "{identity:?}");
        assert_eq!(values(&out, "accept"), ["application/json"]);
    }

    #[test]
    fn impersonate_into_an_empty_map_strips_nothing_it_should_keep() {
        let mut out = HeaderMap::new();
        upstream_identity_headers(
            CredentialMode::Impersonate,
            &caller(),
            hostile_agent().get(AUTHORIZATION).cloned(),
            &mut out,
        )
        .unwrap();
        assert!(!values(&out, "impersonate-group").contains(&"system:masters"));
        assert_eq!(values(&out, "impersonate-user").len(), 1);
    }

    #[test]
    fn unrepresentable_callers_are_refused_not_mangled() {
        let mut bad = caller();
        bad.username = "eve\nImpersonate-User: admin".into();
        let error = upstream_identity_headers(
            CredentialMode::Impersonate,
            &bad,
            None,
            &mut HeaderMap::new(),
        )
        .unwrap_err();
        assert!(matches!(
            error,
            HeaderError::Unrepresentable { what: "user", .. }
        ));
        let nobody = Caller::default();
        assert_eq!(
            upstream_identity_headers(
                CredentialMode::Impersonate,
                &nobody,
                None,
                &mut HeaderMap::new()
            ),
            Err(HeaderError::NoUsername)
        );
    }

    #[test]
    fn extra_keys_are_escaped_like_client_go() {
        assert_eq!(
            escape_extra_key("authentication.kubernetes.io/pod-uid"),
            "authentication.kubernetes.io%2Fpod-uid"
        );
        assert_eq!(escape_extra_key("100%sure key"), "100%25sure%20key");
        assert_eq!(escape_extra_key("é"), "%C3%A9");
    }

    #[test]
    fn exactly_one_bearer_token() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), Err(AuthError::MissingToken));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer_token(&headers), Ok("abc"));
        headers.append(AUTHORIZATION, HeaderValue::from_static("Bearer def"));
        assert!(matches!(
            bearer_token(&headers),
            Err(AuthError::MalformedAuthorization(_))
        ));
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, HeaderValue::from_static("Basic YTpi"));
        assert!(
            bearer_token(&basic)
                .unwrap_err()
                .to_string()
                .contains("\"Basic\"")
        );
    }
}

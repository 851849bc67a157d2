//! Who an approver is, on API servers that cannot say.
//!
//! `kubectl chaperone` asks the API server (SelfSubjectReview,
//! `authentication.k8s.io/v1`, Kubernetes 1.28 and later). Older servers
//! answer 404: there the approver's name comes from the credentials their
//! kubeconfig presents, read the way the API server's own authenticators
//! read them:
//!
//! - a client certificate: the subject's common name is the user, its
//!   organizations are the groups (the x509 authenticator);
//! - a service-account token: `sub` is `system:serviceaccount:NS:NAME` and
//!   the groups are `system:serviceaccounts` and
//!   `system:serviceaccounts:NS` (the service-account authenticator).
//!
//! Either way `system:authenticated` is added, as the API server does. Any
//! other credential (an OIDC or webhook token, an exec plugin) cannot be
//! read without the server: the error says so and what to use instead.
//! The name is what the plugin writes as the decider; what the node agents
//! trust is checked by them, not taken from here.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use kube::config::AuthInfo;
use secrecy::ExposeSecret as _;

/// The user and groups a credential authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
    pub groups: Vec<String>,
}

const AUTHENTICATED: &str = "system:authenticated";

/// The identity the API server gives the credentials in `auth`.
pub fn from_credentials(auth: &AuthInfo) -> Result<Identity> {
    if let Some(pem) = client_certificate(auth)? {
        return from_certificate(&pem);
    }
    if let Some(token) = bearer_token(auth)? {
        return from_service_account_token(&token);
    }
    bail!(
        "this API server has no SelfSubjectReview (Kubernetes < 1.28) and your kubeconfig \
         user has neither a client certificate nor a service-account token to read your name \
         from; decide with a kubeconfig that uses one of them"
    )
}

fn client_certificate(auth: &AuthInfo) -> Result<Option<Vec<u8>>> {
    if let Some(data) = &auth.client_certificate_data {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .context("the kubeconfig's client-certificate-data is not base64")?;
        return Ok(Some(pem));
    }
    if let Some(path) = &auth.client_certificate {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the kubeconfig's client-certificate {path}"))?;
        return Ok(Some(pem));
    }
    Ok(None)
}

fn bearer_token(auth: &AuthInfo) -> Result<Option<String>> {
    if let Some(token) = &auth.token {
        return Ok(Some(token.expose_secret().trim().to_owned()));
    }
    if let Some(path) = &auth.token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the kubeconfig's tokenFile {path}"))?;
        return Ok(Some(token.trim().to_owned()));
    }
    Ok(None)
}

fn from_certificate(pem: &[u8]) -> Result<Identity> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| anyhow::anyhow!("the kubeconfig's client certificate is not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("the kubeconfig's client certificate does not parse: {e}"))?;
    let subject = cert.subject();
    let username = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .context("the kubeconfig's client certificate has no common name (CN) to name you by")?
        .to_owned();
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    groups.push(AUTHENTICATED.into());
    Ok(Identity { username, groups })
}

fn from_service_account_token(token: &str) -> Result<Identity> {
    let not_readable = || {
        anyhow::anyhow!(
            "this API server has no SelfSubjectReview (Kubernetes < 1.28) and your kubeconfig's \
             token is not a service-account token, so chaperone cannot tell who you are; decide \
             with a client-certificate or service-account kubeconfig"
        )
    };
    let payload = token.split('.').nth(1).ok_or_else(not_readable)?;
    let claims: serde_json::Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or_else(not_readable)?;
    let sub = claims["sub"].as_str().ok_or_else(not_readable)?;
    let Some(namespace) = sub
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .map(|(namespace, _)| namespace)
    else {
        return Err(not_readable());
    };
    Ok(Identity {
        username: sub.to_owned(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}"),
            AUTHENTICATED.into(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(cn: &str, orgs: &[&str]) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        for org in orgs {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, *org);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_client_certificate_names_its_common_name_and_organizations() {
        // (rcgen writes one organization per subject; the API server and
        // this reader take every one there is.)
        let pem = certificate("alice", &["approvers"]);
        let auth = AuthInfo {
            client_certificate_data: Some(base64::engine::general_purpose::STANDARD.encode(pem)),
            ..AuthInfo::default()
        };
        assert_eq!(
            from_credentials(&auth).unwrap(),
            Identity {
                username: "alice".into(),
                groups: vec!["approvers".into(), AUTHENTICATED.into()],
            }
        );
    }

    #[test]
    fn a_client_certificate_file_is_read_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.crt");
        std::fs::write(&path, certificate("bob", &[])).unwrap();
        let auth = AuthInfo {
            client_certificate: Some(path.to_string_lossy().into_owned()),
            ..AuthInfo::default()
        };
        let identity = from_credentials(&auth).unwrap();
        assert_eq!(identity.username, "bob");
        assert_eq!(identity.groups, vec![AUTHENTICATED.to_owned()]);
    }

    fn unsigned_jwt(claims: serde_json::Value) -> String {
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.c2ln",
            b64(&serde_json::json!({"alg": "RS256"})),
            b64(&claims)
        )
    }

    #[test]
    fn a_service_account_token_names_the_account_and_its_groups() {
        let token = unsigned_jwt(serde_json::json!({"sub": "system:serviceaccount:ops:approver"}));
        let auth = AuthInfo {
            token: Some(token.into()),
            ..AuthInfo::default()
        };
        assert_eq!(
            from_credentials(&auth).unwrap(),
            Identity {
                username: "system:serviceaccount:ops:approver".into(),
                groups: vec![
                    "system:serviceaccounts".into(),
                    "system:serviceaccounts:ops".into(),
                    AUTHENTICATED.into()
                ],
            }
        );
    }

    #[test]
    fn other_tokens_are_refused_with_what_to_use_instead() {
        for token in [
            "opaque-static-token".to_owned(),
            unsigned_jwt(serde_json::json!({"sub": "alice@example.com"})),
        ] {
            let auth = AuthInfo {
                token: Some(token.into()),
                ..AuthInfo::default()
            };
            let error = from_credentials(&auth).unwrap_err().to_string();
            assert!(error.contains("client-certificate"), "{error}");
        }
        let error = from_credentials(&AuthInfo::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("SelfSubjectReview"), "{error}");
    }
}

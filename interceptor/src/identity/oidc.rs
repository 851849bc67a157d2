//! Tokens from trusted external OIDC issuers: verified against the keys of
//! the issuer's own discovery, mapped to a user the way the API server's
//! OIDC authenticator maps them (username and groups claims and prefixes).

use std::sync::Arc;

use jsonwebtoken::Algorithm;
use serde_json::Value;

use super::Caller;
use super::config::{ConfigError, OidcIssuerConfig};
use super::error::AuthError;
use super::jwt::{self, Jwt};
use super::keys::{HttpFetcher, KeyCache, OidcKeySource, RefreshPolicy};
use super::serviceaccount::verify_signature;

pub(crate) struct OidcVerifier {
    issuer: String,
    audiences: Vec<String>,
    username_claim: String,
    username_prefix: String,
    groups_claim: Option<String>,
    groups_prefix: String,
    algorithms: Vec<Algorithm>,
    leeway: i64,
    keys: KeyCache,
}

impl OidcVerifier {
    pub fn new(
        config: &OidcIssuerConfig,
        fetcher: Arc<dyn HttpFetcher>,
        policy: RefreshPolicy,
        leeway: i64,
    ) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::OidcIssuer {
            issuer: config.issuer_url.clone(),
            reason,
        };
        if !config.issuer_url.starts_with("https://") {
            return Err(invalid("issuerUrl must be an https:// URL".into()));
        }
        if config.audiences.is_empty() {
            return Err(invalid(
                "audiences is empty: name the client id(s) its tokens are minted for".into(),
            ));
        }
        if config.username_claim.is_empty() {
            return Err(invalid("usernameClaim is empty".into()));
        }
        let algorithms =
            jwt::parse_algorithms(&config.algorithms).map_err(|e| invalid(e.to_string()))?;
        let username_prefix = match config.username_prefix.as_deref() {
            Some("-") => String::new(),
            Some(prefix) => prefix.to_string(),
            None if config.username_claim == "email" => String::new(),
            None => format!("{}#", config.issuer_url),
        };
        let source = OidcKeySource::new(config.issuer_url.clone(), fetcher);
        Ok(Self {
            issuer: config.issuer_url.clone(),
            audiences: config.audiences.clone(),
            username_claim: config.username_claim.clone(),
            username_prefix,
            groups_claim: config.groups_claim.clone(),
            groups_prefix: config.groups_prefix.clone(),
            algorithms,
            leeway,
            keys: KeyCache::new(Arc::new(source), policy),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub async fn verify(&self, jwt: &Jwt<'_>) -> Result<Caller, AuthError> {
        let alg = jwt::allowed_algorithm(&jwt.alg, &self.algorithms)?;
        verify_signature(jwt, alg, &self.keys, &self.issuer).await?;
        jwt::check_times(&jwt.claims, jwt::now(), self.leeway)?;
        jwt::check_audience(&jwt.claims, &self.audiences)?;
        let claims = &jwt.claims;

        let username = match claims.get(&self.username_claim) {
            Some(Value::String(name)) if !name.is_empty() => name,
            Some(_) => {
                return Err(AuthError::InvalidClaim {
                    claim: self.username_claim.clone(),
                    reason: "not a non-empty string".into(),
                });
            }
            None => {
                return Err(AuthError::MissingClaim {
                    claim: self.username_claim.clone(),
                });
            }
        };
        if self.username_claim == "email"
            && let Some(verified) = claims.get("email_verified")
            && verified != &Value::Bool(true)
        {
            return Err(AuthError::InvalidClaim {
                claim: "email_verified".into(),
                reason: format!("is {verified}; an unverified email cannot be a username"),
            });
        }

        let mut groups: Vec<String> = match &self.groups_claim {
            None => Vec::new(),
            Some(claim) => match claims.get(claim) {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(group)) => vec![group.clone()],
                Some(Value::Array(list)) => list
                    .iter()
                    .map(|g| g.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| AuthError::InvalidClaim {
                        claim: claim.clone(),
                        reason: "not a list of strings".into(),
                    })?,
                Some(_) => {
                    return Err(AuthError::InvalidClaim {
                        claim: claim.clone(),
                        reason: "not a string or a list of strings".into(),
                    });
                }
            },
        };
        for group in &mut groups {
            group.insert_str(0, &self.groups_prefix);
        }
        let username = format!("{}{username}", self.username_prefix);
        // Only the API server's own authenticators may name system users
        // and groups; an external issuer must not mint a service account.
        if username.starts_with("system:") {
            return Err(AuthError::InvalidClaim {
                claim: self.username_claim.clone(),
                reason: format!("username {username:?} is reserved for Kubernetes (system:)"),
            });
        }
        if let Some(group) = groups.iter().find(|g| g.starts_with("system:")) {
            return Err(AuthError::InvalidClaim {
                claim: self.groups_claim.clone().unwrap_or_default(),
                reason: format!("group {group:?} is reserved for Kubernetes (system:)"),
            });
        }
        groups.push("system:authenticated".into());

        Ok(Caller {
            username,
            groups,
            ..Caller::default()
        })
    }
}

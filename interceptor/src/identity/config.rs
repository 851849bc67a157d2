//! The identity section of chaperone's configuration: which tokens are
//! trusted and how they are checked. Plain data; the `config` module owns
//! where it is read from, [`super::Authenticator::new`] validates it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::keys::RefreshPolicy;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub service_accounts: ServiceAccountConfig,
    /// External identity providers whose tokens agents may carry.
    pub oidc_issuers: Vec<OidcIssuerConfig>,
    pub token_review: TokenReviewConfig,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds (the API
    /// server's own leeway is 60).
    pub leeway_seconds: u64,
    pub key_refresh: KeyRefreshConfig,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            service_accounts: ServiceAccountConfig::default(),
            oidc_issuers: Vec::new(),
            token_review: TokenReviewConfig::default(),
            leeway_seconds: 60,
            key_refresh: KeyRefreshConfig::default(),
        }
    }
}

/// Projected service-account tokens, verified locally against the keys the
/// API server publishes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServiceAccountConfig {
    /// The service-account issuer(s) (`--service-account-issuer`). Empty:
    /// the issuer the API server's discovery document names.
    pub issuers: Vec<String>,
    /// Audiences a token must name one of: chaperone's own audience in
    /// impersonate mode, the API server's in passthrough mode. Empty: the
    /// issuers, which is the API server's default audience.
    pub audiences: Vec<String>,
    /// Legacy secret-based tokens never expire and name no pod. Refused
    /// unless allowed; when allowed they go to TokenReview, so the API
    /// server checks their secret still exists.
    pub allow_legacy_tokens: bool,
    /// On redirected connections, refuse service-account tokens that name
    /// no pod (`kubectl create token` without `--bound-object-kind Pod`,
    /// legacy tokens): only a token minted for the calling pod is accepted.
    /// On by default: an unbound token of any service account would
    /// otherwise work from any guarded pod. `false` is the explicit opt-in
    /// to unbound tokens; each request that uses one is audited with
    /// `chaperone.dev/token-binding: unbound`.
    pub require_pod_binding: bool,
    /// Allowed signature algorithms. Empty: RS256/384/512, PS256/384/512,
    /// ES256/384 and EdDSA. `none` and HMAC can never be allowed.
    pub algorithms: Vec<String>,
}

impl Default for ServiceAccountConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            audiences: Vec::new(),
            allow_legacy_tokens: false,
            require_pod_binding: true,
            algorithms: Vec::new(),
        }
    }
}

/// A trusted external OIDC issuer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcIssuerConfig {
    /// `https://...`, exactly as the tokens' `iss` says.
    pub issuer_url: String,
    /// The client id(s) tokens must be minted for.
    pub audiences: Vec<String>,
    /// The claim holding the username (`sub` unless configured).
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Put before the username. Unset: `<issuer_url>#` unless the claim is
    /// `email`, as the API server does; `-` for no prefix.
    #[serde(default)]
    pub username_prefix: Option<String>,
    /// The claim holding the groups (a string or a list of strings).
    #[serde(default)]
    pub groups_claim: Option<String>,
    #[serde(default)]
    pub groups_prefix: String,
    /// Allowed signature algorithms; empty as for service accounts.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// PEM bundle to trust when fetching discovery and keys; unset: the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_username_claim() -> String {
    "sub".into()
}

/// TokenReview for the tokens chaperone cannot verify itself.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TokenReviewConfig {
    pub enabled: bool,
    /// `spec.audiences` of each review; empty: the API server's.
    pub audiences: Vec<String>,
    /// How long an authenticated answer is reused, in seconds.
    pub positive_ttl_seconds: u64,
    /// How long a refusal is reused, in seconds.
    pub negative_ttl_seconds: u64,
    /// Most answers kept.
    pub max_entries: usize,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            audiences: Vec::new(),
            positive_ttl_seconds: 10,
            negative_ttl_seconds: 5,
            max_entries: 4096,
        }
    }
}

/// How often signing keys are fetched.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KeyRefreshConfig {
    /// At most one fetch per issuer per this many seconds, however many
    /// unknown key ids tokens name.
    pub min_interval_seconds: u64,
    /// Keys are refetched when older than this many seconds.
    pub max_age_seconds: u64,
}

impl Default for KeyRefreshConfig {
    fn default() -> Self {
        let policy = RefreshPolicy::default();
        Self {
            min_interval_seconds: policy.min_interval.as_secs(),
            max_age_seconds: policy.max_age.as_secs(),
        }
    }
}

impl KeyRefreshConfig {
    pub fn policy(&self) -> RefreshPolicy {
        RefreshPolicy {
            min_interval: Duration::from_secs(self.min_interval_seconds),
            max_age: Duration::from_secs(self.max_age_seconds),
        }
    }
}

/// A configuration the authenticator cannot work with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("identity.serviceAccounts.algorithms: {0}")]
    ServiceAccountAlgorithms(super::AlgorithmError),
    #[error(
        "identity.serviceAccounts.allowLegacyTokens needs identity.tokenReview.enabled: \
         legacy tokens are checked by the API server's TokenReview"
    )]
    LegacyWithoutTokenReview,
    #[error("identity.oidcIssuers[{issuer}]: {reason}")]
    OidcIssuer { issuer: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_defaults() {
        let config: IdentityConfig = serde_yaml::from_str(
            "serviceAccounts:\n  audiences: [chaperone.dev]\n\
             oidcIssuers:\n- issuerUrl: https://idp.example\n  audiences: [agents]\n  groupsClaim: groups\n",
        )
        .unwrap();
        assert_eq!(config.service_accounts.audiences, ["chaperone.dev"]);
        assert!(!config.service_accounts.allow_legacy_tokens);
        assert!(
            config.service_accounts.require_pod_binding,
            "tokens must be bound to the calling pod unless the config opts out"
        );
        assert_eq!(config.oidc_issuers[0].username_claim, "sub");
        assert_eq!(
            config.oidc_issuers[0].groups_claim.as_deref(),
            Some("groups")
        );
        assert!(config.token_review.enabled);
        assert_eq!(config.leeway_seconds, 60);
    }

    #[test]
    fn unbound_tokens_are_an_explicit_opt_in() {
        let config: IdentityConfig =
            serde_yaml::from_str("serviceAccounts:\n  requirePodBinding: false\n").unwrap();
        assert!(!config.service_accounts.require_pod_binding);
        let config: IdentityConfig =
            serde_yaml::from_str("serviceAccounts:\n  audiences: [x]\n").unwrap();
        assert!(config.service_accounts.require_pod_binding);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = serde_yaml::from_str::<IdentityConfig>("serviceAcounts: {}\n").unwrap_err();
        assert!(error.to_string().contains("serviceAcounts"));
    }
}

//! Who is calling: the kernel-attested pod and process, and the verified
//! token, bound together into one [`Caller`] that policy, masking, approval,
//! recording and audit all use.
//!
//! [`Authenticator::authenticate`] dispatches a bearer token: a projected
//! service-account JWT is verified locally against the API server's keys
//! (`serviceaccount`), a JWT from a configured external issuer against that
//! issuer's keys (`oidc`), anything else goes to TokenReview
//! (`tokenreview`). Then the token's pod must be the kernel-attested pod of
//! the connection. `upstream` writes the identity the request carries to
//! the API server (passthrough or impersonation); `process` reads the
//! calling process from `/proc`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

mod config;
mod error;
mod jwt;
mod keys;
mod oidc;
mod process;
mod serviceaccount;
mod tokenreview;
mod upstream;

#[cfg(test)]
mod tests;

pub use config::{
    ConfigError, IdentityConfig, KeyRefreshConfig, OidcIssuerConfig, ServiceAccountConfig,
    TokenReviewConfig,
};
pub use error::{AttackSignal, AuthError, PodIdentity};
pub use jwt::{AlgorithmError, JwksError, KeyError};
pub use keys::{
    ApiServerKeySource, CaBundleError, FetchError, HttpFetcher, HttpsFetcher, JWKS_ACCEPT,
    KeyFetchError, KeySet, KeySource, OidcKeySource, RefreshPolicy,
};
pub use process::MAX_PARENT_DEPTH;
pub use serviceaccount::{
    EXTRA_CREDENTIAL_ID, EXTRA_NODE_NAME, EXTRA_NODE_UID, EXTRA_POD_NAME, EXTRA_POD_UID,
    LEGACY_ISSUER,
};
pub use tokenreview::{
    CachedReviewer, KubeTokenReviewer, ReviewError, ReviewOutcome, TokenReviewer,
};
pub use upstream::{
    CredentialMode, HeaderError, IMPERSONATE_EXTRA_PREFIX, IMPERSONATE_GROUP, IMPERSONATE_UID,
    IMPERSONATE_USER, NoOwnCredentials, OwnCredentials, bearer_token, escape_extra_key,
    is_identity_header, upstream_identity_headers,
};

use jwt::Jwt;
use oidc::OidcVerifier;
use serviceaccount::ServiceAccountVerifier;

/// A pod's `metadata.uid`, as the pod tracker read it from the API server
/// or a token names it in `authentication.kubernetes.io/pod-uid`. Cheap to
/// clone (it travels with every connection of the pod); written as the bare
/// string wherever it is serialized.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(Arc<str>);

impl PodUid {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// No uid: a pod the tracker knows only by name.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for PodUid {
    fn default() -> Self {
        PodUid(Arc::from(""))
    }
}

impl From<&str> for PodUid {
    fn from(uid: &str) -> Self {
        PodUid(Arc::from(uid))
    }
}

impl From<String> for PodUid {
    fn from(uid: String) -> Self {
        PodUid(Arc::from(uid))
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for PodUid {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for PodUid {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl serde::Serialize for PodUid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// The pod a connection came from, as the pod tracker resolved it from the
/// kernel-attested cgroup id.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: PodUid,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

/// The process that opened the connection, from the kernel record and
/// `/proc` at accept time.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub uid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    /// `/proc/PID/exe`, when it could still be read.
    pub executable: String,
    /// Parents, nearest first: `(pid, comm)`.
    pub parents: Vec<(u32, String)>,
}

/// The authenticated caller of one request.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Caller {
    /// `system:serviceaccount:NS:NAME` for service accounts.
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// The kernel-attested pod, when the connection came through the redirect.
    pub pod: Option<PodRef>,
    pub process: Option<ProcessInfo>,
    /// The cgroup the kernel recorded for the connection.
    pub cgroup_id: Option<crate::redirect::CgroupId>,
}

impl Caller {
    /// `(namespace, name)` when the username is a service account's.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
    }

    /// The pod the token was issued to (`authentication.kubernetes.io/pod-uid`
    /// and `pod-name` in `extra`, the namespace of the service account), as
    /// opposed to [`Caller::pod`], the pod the connection came from.
    pub fn token_pod(&self) -> Option<PodIdentity> {
        let first = |key: &str| self.extra.get(key).and_then(|v| v.first()).cloned();
        let uid = first(EXTRA_POD_UID)?;
        Some(PodIdentity {
            namespace: self
                .service_account()
                .map(|(namespace, _)| namespace.to_string())
                .unwrap_or_default(),
            name: first(EXTRA_POD_NAME).unwrap_or_default(),
            uid: uid.into(),
        })
    }

    /// A service account's token that names no pod, used from a guarded
    /// pod: accepted only where `requirePodBinding: false` opts in, and
    /// then audited as such.
    pub fn is_unbound_on_pod(&self) -> bool {
        self.pod.is_some() && self.service_account().is_some() && self.token_pod().is_none()
    }
}

impl From<&PodRef> for PodIdentity {
    fn from(pod: &PodRef) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
        }
    }
}

// === impl Authenticator ===

/// What the authenticator talks to. Production: [`Backends::kube`]; tests
/// inject their own.
pub struct Backends {
    /// The service-account issuer's discovery and keys.
    pub service_account_keys: Arc<dyn KeySource>,
    /// Fetches external OIDC discovery and keys for every configured issuer;
    /// `None`: an HTTPS fetcher per issuer, trusting its `caFile` or the
    /// system's roots.
    pub oidc_fetcher: Option<Arc<dyn HttpFetcher>>,
    /// `None`: no TokenReview, so opaque tokens are refused.
    pub token_reviewer: Option<Arc<dyn TokenReviewer>>,
}

impl Backends {
    /// The API server (or its simulator) behind `client`, with chaperone's
    /// own credentials.
    pub fn kube(client: kube::Client, config: &IdentityConfig) -> Self {
        Self {
            service_account_keys: Arc::new(ApiServerKeySource::new(client.clone())),
            oidc_fetcher: None,
            token_reviewer: Some(Arc::new(KubeTokenReviewer::new(
                client,
                config.token_review.audiences.clone(),
            ))),
        }
    }
}

/// Turns a bearer token and the kernel's word on the connection into a
/// [`Caller`], or refuses.
pub struct Authenticator {
    service_accounts: ServiceAccountVerifier,
    oidc: Vec<OidcVerifier>,
    review: Option<CachedReviewer>,
    allow_legacy: bool,
    require_pod_binding: bool,
}

/// Longest bearer token considered; real ones are a few kilobytes.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// How long an external OIDC issuer has to answer a discovery fetch.
const OIDC_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

impl Authenticator {
    /// Production wiring: keys and TokenReview from the API server behind
    /// `client`, OIDC discovery over HTTPS.
    pub fn from_client(config: &IdentityConfig, client: kube::Client) -> Result<Self, ConfigError> {
        Self::new(config, Backends::kube(client, config))
    }

    pub fn new(config: &IdentityConfig, backends: Backends) -> Result<Self, ConfigError> {
        let leeway = i64::try_from(config.leeway_seconds).unwrap_or(i64::MAX);
        let policy = config.key_refresh.policy();
        let sa = &config.service_accounts;
        let algorithms =
            jwt::parse_algorithms(&sa.algorithms).map_err(ConfigError::ServiceAccountAlgorithms)?;
        let review = match (config.token_review.enabled, backends.token_reviewer) {
            (true, Some(reviewer)) => Some(CachedReviewer::new(
                reviewer,
                Duration::from_secs(config.token_review.positive_ttl_seconds),
                Duration::from_secs(config.token_review.negative_ttl_seconds),
                config.token_review.max_entries,
            )),
            _ => None,
        };
        if sa.allow_legacy_tokens && review.is_none() {
            return Err(ConfigError::LegacyWithoutTokenReview);
        }
        let mut oidc = Vec::new();
        for issuer in &config.oidc_issuers {
            if oidc
                .iter()
                .any(|o: &OidcVerifier| o.issuer() == issuer.issuer_url)
                || sa.issuers.contains(&issuer.issuer_url)
            {
                return Err(ConfigError::OidcIssuer {
                    issuer: issuer.issuer_url.clone(),
                    reason: "configured twice".into(),
                });
            }
            let fetcher = match &backends.oidc_fetcher {
                Some(fetcher) => fetcher.clone(),
                None => https_fetcher(issuer)?,
            };
            oidc.push(OidcVerifier::new(issuer, fetcher, policy, leeway)?);
        }
        if !sa.require_pod_binding {
            tracing::warn!(
                "identity.serviceAccounts.requirePodBinding is false: service-account tokens \
                 bound to no pod are accepted from guarded pods (each use is audited with \
                 chaperone.dev/token-binding: unbound)"
            );
        }
        Ok(Self {
            service_accounts: ServiceAccountVerifier::new(
                sa.issuers.clone(),
                sa.audiences.clone(),
                algorithms,
                leeway,
                keys::KeyCache::new(backends.service_account_keys, policy),
            ),
            oidc,
            review,
            allow_legacy: sa.allow_legacy_tokens,
            require_pod_binding: sa.require_pod_binding,
        })
    }

    /// Verifies `bearer` and binds it to the connection: when the kernel
    /// attested the pod (`attested`), a token issued to a pod must have been
    /// issued to that pod. The refusal's [`AuthError::to_status`] is the
    /// response; [`AuthError::attack_signal`] says whether to raise an alarm.
    pub async fn authenticate(
        &self,
        bearer: &str,
        attested: Option<&PodRef>,
        process: Option<ProcessInfo>,
    ) -> Result<Caller, AuthError> {
        let bearer = bearer.trim();
        if bearer.is_empty() {
            return Err(AuthError::MissingToken);
        }
        if bearer.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed(format!(
                "{} bytes long; tokens over {MAX_TOKEN_LEN} bytes are refused",
                bearer.len()
            )));
        }
        let mut caller = match Jwt::parse(bearer) {
            None => self.review_opaque(bearer).await?,
            Some(jwt) => self.verify_jwt(bearer, &jwt?).await?,
        };
        bind(&caller, attested, self.require_pod_binding)?;
        caller.pod = attested.cloned();
        caller.process = process;
        Ok(caller)
    }

    async fn verify_jwt(&self, bearer: &str, jwt: &Jwt<'_>) -> Result<Caller, AuthError> {
        // Whatever the issuer, an unsigned or HMAC token is a forgery.
        jwt::refuse_forbidden_algorithm(&jwt.alg)?;
        if serviceaccount::is_legacy(&jwt.claims) {
            if !self.allow_legacy {
                return Err(AuthError::LegacyToken);
            }
            // The API server checks that the token's secret still exists.
            return self.review_opaque(bearer).await;
        }
        let Some(issuer) = jwt.issuer() else {
            return match &self.review {
                Some(_) => self.review_opaque(bearer).await,
                None => Err(AuthError::MissingClaim {
                    claim: "iss".into(),
                }),
            };
        };
        if let Some(oidc) = self.oidc.iter().find(|o| o.issuer() == issuer) {
            return oidc.verify(jwt).await;
        }
        let sa_issuers = match self.service_accounts.issuers().await {
            Ok(issuers) => issuers,
            // Without the API server's discovery the issuer cannot be
            // placed; TokenReview may still know it.
            Err(unavailable) => {
                if let Some(review) = &self.review
                    && let Ok(ReviewOutcome::Authenticated(caller)) = review.review(bearer).await
                {
                    return Ok(*caller);
                }
                return Err(unavailable);
            }
        };
        if sa_issuers.iter().any(|i| i == issuer) {
            return self.service_accounts.verify(jwt, &sa_issuers).await;
        }
        let trusted: Vec<String> = sa_issuers
            .into_iter()
            .chain(self.oidc.iter().map(|o| o.issuer().to_string()))
            .collect();
        let review = match &self.review {
            None => None,
            Some(review) => match review.review(bearer).await? {
                ReviewOutcome::Authenticated(caller) => return Ok(*caller),
                ReviewOutcome::Rejected(reason) => Some(reason),
            },
        };
        Err(AuthError::UntrustedIssuer {
            issuer: issuer.to_string(),
            trusted,
            review,
        })
    }

    async fn review_opaque(&self, bearer: &str) -> Result<Caller, AuthError> {
        let Some(review) = &self.review else {
            return Err(AuthError::OpaqueTokenWithoutReview);
        };
        match review.review(bearer).await? {
            ReviewOutcome::Authenticated(caller) => Ok(*caller),
            ReviewOutcome::Rejected(reason) => Err(AuthError::ReviewRejected { reason }),
        }
    }
}

fn https_fetcher(issuer: &OidcIssuerConfig) -> Result<Arc<dyn HttpFetcher>, ConfigError> {
    let invalid = |reason: String| ConfigError::OidcIssuer {
        issuer: issuer.issuer_url.clone(),
        reason,
    };
    let ca = match &issuer.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| invalid(format!("reading caFile {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let fetcher =
        HttpsFetcher::new(ca.as_deref(), OIDC_FETCH_TIMEOUT).map_err(|e| invalid(e.to_string()))?;
    Ok(Arc::new(fetcher))
}

/// The token's pod must be the connection's pod. A token used from outside
/// the redirect has no attested pod to compare with. Tokens that name no
/// pod (external OIDC, TokenReview without pod extra) are not bound, except
/// that service-account tokens must name the pod when
/// `require_pod_binding` says so.
fn bind(
    caller: &Caller,
    attested: Option<&PodRef>,
    require_pod_binding: bool,
) -> Result<(), AuthError> {
    let Some(pod) = attested else {
        return Ok(());
    };
    let Some(token_pod) = caller.token_pod() else {
        if require_pod_binding && caller.service_account().is_some() {
            return Err(AuthError::UnboundToken {
                username: caller.username.clone(),
                attested: Box::new(pod.into()),
            });
        }
        return Ok(());
    };
    if !pod.uid.is_empty() && token_pod.uid == pod.uid {
        return Ok(());
    }
    let error = AuthError::PodMismatch {
        token: Box::new(token_pod),
        attested: Box::new(pod.into()),
    };
    tracing::warn!(
        signal = "replayed_from_another_pod",
        user = %caller.username,
        %error,
        "token replayed from another pod"
    );
    Err(error)
}

#[cfg(test)]
mod caller_tests {
    use super::*;

    #[test]
    fn service_account_is_split_from_the_username() {
        let caller = Caller {
            username: "system:serviceaccount:agents:coder".into(),
            ..Caller::default()
        };
        assert_eq!(caller.service_account(), Some(("agents", "coder")));
        let user = Caller {
            username: "alice".into(),
            ..Caller::default()
        };
        assert_eq!(user.service_account(), None);
    }
}

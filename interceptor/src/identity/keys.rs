//! Signing keys: where they come from ([`KeySource`]: the API server's
//! issuer discovery, or an external OIDC issuer's) and how they are kept
//! ([`KeyCache`]: cached, refreshed when a token names an unknown `kid`,
//! rate-limited so a flood of made-up kids cannot hammer the source).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;

use super::error::AuthError;
use super::jwt::{JwksError, VerificationKey, parse_jwks};

/// An issuer's signing keys as fetched, with the issuer its discovery
/// document names.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    pub issuer: Option<String>,
    pub keys: Vec<Jwk>,
}

/// Where an issuer's keys come from.
pub trait KeySource: Send + Sync {
    /// What is fetched from where, for logs and errors.
    fn describe(&self) -> String;
    /// Fetches the discovery document and the JWKS.
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, KeyFetchError>>;
}

/// `GET` of a URL, for external OIDC discovery; injectable for tests.
pub trait HttpFetcher: Send + Sync {
    fn get<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Vec<u8>, FetchError>>;
}

/// Why an issuer's keys could not be fetched; tokens are then checked
/// against the keys fetched before, if any.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyFetchError {
    #[error("building GET {path}: {reason}")]
    Request { path: &'static str, reason: String },
    #[error(
        "GET {path} from the API server failed: {reason} (chaperone's service account \
         needs the system:service-account-issuer-discovery ClusterRole)"
    )]
    ApiServer { path: &'static str, reason: String },
    #[error("{from} is not an OpenID configuration: {reason}")]
    NotDiscovery { from: String, reason: String },
    #[error("{url} names issuer {named:?}, not {configured:?}; refusing its keys")]
    IssuerMismatch {
        url: String,
        named: String,
        configured: String,
    },
    #[error("{0} has no jwks_uri")]
    NoJwksUri(String),
    #[error("{from}: {error}")]
    Jwks { from: String, error: JwksError },
    #[error(transparent)]
    Http(#[from] FetchError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A `GET` of an external issuer's URL that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("GET {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url}: HTTP {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("GET {url}: reading the body: {reason}")]
    Body { url: String, reason: String },
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// A configured CA bundle (an OIDC issuer's `caFile`) that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CaBundleError {
    #[error("CA bundle does not parse: {0}")]
    Parse(String),
    #[error("CA bundle holds an unusable certificate: {0}")]
    Unusable(String),
    #[error("CA bundle holds no certificates")]
    Empty,
    #[error("{0}")]
    Tls(String),
    #[error("loading the system's CA roots: {0}")]
    SystemRoots(String),
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: Option<String>,
}

// === impl ApiServerKeySource ===

/// The service-account issuer of the cluster: discovery and JWKS from the
/// API server itself, with chaperone's own credentials (the client may point
/// at the API-server simulator in tests).
pub struct ApiServerKeySource {
    client: kube::Client,
}

const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
const JWKS_PATH: &str = "/openid/v1/jwks";
/// The API server's discovery route produces only `application/json`.
const DISCOVERY_ACCEPT: &str = "application/json";
/// The JWKS route produces only `application/jwk-set+json` and answers
/// `Accept: application/json` alone with 406 Not Acceptable (v1.20 and
/// later); `application/json` stays second for servers that label it so.
pub const JWKS_ACCEPT: &str = "application/jwk-set+json, application/json";

impl ApiServerKeySource {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    async fn get(&self, path: &'static str, accept: &str) -> Result<String, KeyFetchError> {
        let request = http::Request::get(path)
            .header(http::header::ACCEPT, accept)
            .body(Vec::new())
            .map_err(|e| KeyFetchError::Request {
                path,
                reason: e.to_string(),
            })?;
        self.client
            .request_text(request)
            .await
            .map_err(|e| KeyFetchError::ApiServer {
                path,
                reason: describe_kube_error(&e),
            })
    }
}

impl KeySource for ApiServerKeySource {
    fn describe(&self) -> String {
        format!("the API server's {DISCOVERY_PATH} and {JWKS_PATH}")
    }

    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, KeyFetchError>> {
        Box::pin(async move {
            let discovery = self.get(DISCOVERY_PATH, DISCOVERY_ACCEPT).await?;
            let discovery: Discovery =
                serde_json::from_str(&discovery).map_err(|e| KeyFetchError::NotDiscovery {
                    from: DISCOVERY_PATH.into(),
                    reason: e.to_string(),
                })?;
            let jwks = self.get(JWKS_PATH, JWKS_ACCEPT).await?;
            let keys = parse_jwks(jwks.as_bytes()).map_err(|error| KeyFetchError::Jwks {
                from: JWKS_PATH.into(),
                error,
            })?;
            Ok(KeySet {
                issuer: Some(discovery.issuer),
                keys,
            })
        })
    }
}

/// A kube error in one line: the API server's own `Status` message when
/// there is one.
pub(crate) fn describe_kube_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("HTTP {}: {}", status.code, status.message),
        other => other.to_string(),
    }
}

// === impl OidcKeySource ===

/// An external OIDC issuer: `{issuer}/.well-known/openid-configuration`,
/// whose `issuer` must equal the configured one, then its `jwks_uri`.
pub struct OidcKeySource {
    issuer: String,
    fetcher: Arc<dyn HttpFetcher>,
}

impl OidcKeySource {
    pub fn new(issuer: impl Into<String>, fetcher: Arc<dyn HttpFetcher>) -> Self {
        Self {
            issuer: issuer.into(),
            fetcher,
        }
    }
}

impl KeySource for OidcKeySource {
    fn describe(&self) -> String {
        format!("the OIDC discovery of {}", self.issuer)
    }

    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, KeyFetchError>> {
        Box::pin(async move {
            let url = format!("{}{DISCOVERY_PATH}", self.issuer.trim_end_matches('/'));
            let body = self.fetcher.get(&url).await?;
            let discovery: Discovery = match serde_json::from_slice(&body) {
                Ok(discovery) => discovery,
                Err(e) => {
                    return Err(KeyFetchError::NotDiscovery {
                        from: url,
                        reason: e.to_string(),
                    });
                }
            };
            if discovery.issuer != self.issuer {
                return Err(KeyFetchError::IssuerMismatch {
                    url,
                    named: discovery.issuer,
                    configured: self.issuer.clone(),
                });
            }
            let Some(jwks_uri) = discovery.jwks_uri else {
                return Err(KeyFetchError::NoJwksUri(url));
            };
            let jwks = self.fetcher.get(&jwks_uri).await?;
            let keys = parse_jwks(&jwks).map_err(|error| KeyFetchError::Jwks {
                from: jwks_uri,
                error,
            })?;
            Ok(KeySet {
                issuer: Some(discovery.issuer),
                keys,
            })
        })
    }
}

// === impl HttpsFetcher ===

/// The production [`HttpFetcher`]: HTTPS only, the system roots or one
/// configured CA bundle, bounded in time and size.
pub struct HttpsFetcher {
    client: HyperClient<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

/// Discovery documents and JWKS are small; anything larger is refused.
const MAX_BODY: usize = 1024 * 1024;

impl HttpsFetcher {
    /// Trusts `ca_pem` only, when given; otherwise the system's roots.
    pub fn new(ca_pem: Option<&[u8]>, timeout: Duration) -> Result<Self, CaBundleError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                let mut reader = pem;
                for cert in rustls_pemfile::certs(&mut reader) {
                    let cert = cert.map_err(|e| CaBundleError::Parse(e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| CaBundleError::Unusable(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(CaBundleError::Empty);
                }
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| CaBundleError::Tls(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
            None => builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| CaBundleError::SystemRoots(e.to_string()))?,
        };
        let connector = builder.https_only().enable_http1().build();
        let client = HyperClient::builder(TokioExecutor::new()).build(connector);
        Ok(Self { client, timeout })
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let uri: http::Uri =
            url.parse()
                .map_err(|e: http::uri::InvalidUri| FetchError::BadUrl {
                    url: url.into(),
                    reason: e.to_string(),
                })?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| FetchError::Request {
                url: url.into(),
                reason: e.to_string(),
            })?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.into(),
                status: response.status(),
            });
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| FetchError::Body {
                url: url.into(),
                reason: e.to_string(),
            })?;
        Ok(body.to_bytes().to_vec())
    }
}

impl HttpFetcher for HttpsFetcher {
    fn get<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Vec<u8>, FetchError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.fetch(url))
                .await
                .map_err(|_| FetchError::Timeout {
                    url: url.into(),
                    timeout: self.timeout,
                })?
        })
    }
}

// === impl KeyCache ===

/// How often keys are fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// At most one fetch per this interval, whatever the tokens say.
    pub min_interval: Duration,
    /// Keys older than this are refetched before use (a removed key stops
    /// being trusted); stale keys still serve if the refetch fails.
    pub max_age: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(10),
            max_age: Duration::from_secs(300),
        }
    }
}

struct Snapshot {
    issuer: Option<String>,
    keys: Vec<VerificationKey>,
    fetched_at: Instant,
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    last_error: Option<KeyFetchError>,
}

/// Requests wait for a key fetch (an unknown kid) at most this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One issuer's keys, cached.
pub struct KeyCache {
    source: Arc<dyn KeySource>,
    policy: RefreshPolicy,
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// Held across a fetch: one fetch at a time, the others wait for it.
    fetch: tokio::sync::Mutex<FetchState>,
}

/// The keys that may have signed a token.
pub(crate) struct Candidates {
    pub keys: Vec<VerificationKey>,
}

impl KeyCache {
    pub fn new(source: Arc<dyn KeySource>, policy: RefreshPolicy) -> Self {
        Self {
            source,
            policy,
            snapshot: RwLock::new(None),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
        }
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn usable(&self, snapshot: &Snapshot, kid: Option<&str>) -> bool {
        snapshot.fetched_at.elapsed() < self.policy.max_age
            && kid.is_none_or(|kid| snapshot.keys.iter().any(|k| k.kid.as_deref() == Some(kid)))
    }

    /// The issuer the source's discovery document names, fetching if
    /// nothing was fetched yet.
    pub async fn discovered_issuer(&self) -> Result<Option<String>, AuthError> {
        if let Some(snapshot) = self.current() {
            return Ok(snapshot.issuer.clone());
        }
        Ok(self.refresh(None).await?.issuer.clone())
    }

    /// The keys for `kid` (all keys when the token names none), refreshing
    /// when it is unknown or the keys are old, at most once per
    /// `min_interval`.
    pub(crate) async fn candidates(
        &self,
        kid: Option<&str>,
        issuer: &str,
    ) -> Result<Candidates, AuthError> {
        let snapshot = match self.current() {
            Some(snapshot) if self.usable(&snapshot, kid) => snapshot,
            _ => self.refresh(kid).await?,
        };
        let keys: Vec<VerificationKey> = match kid {
            Some(kid) => snapshot
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .cloned()
                .collect(),
            None => snapshot.keys.clone(),
        };
        if let Some(kid) = kid
            && keys.is_empty()
        {
            return Err(AuthError::UnknownKeyId {
                kid: kid.to_string(),
                issuer: issuer.to_string(),
            });
        }
        Ok(Candidates { keys })
    }

    /// Fetches unless another task just did or the rate limit says no;
    /// returns the freshest snapshot there is.
    async fn refresh(&self, kid: Option<&str>) -> Result<Arc<Snapshot>, AuthError> {
        let mut state = self.fetch.lock().await;
        // Another task may have fetched while this one waited.
        if let Some(snapshot) = self.current()
            && self.usable(&snapshot, kid)
        {
            return Ok(snapshot);
        }
        let rate_limited = state
            .last_attempt
            .is_some_and(|at| at.elapsed() < self.policy.min_interval);
        if !rate_limited {
            state.last_attempt = Some(Instant::now());
            let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.source.fetch())
                .await
                .unwrap_or(Err(KeyFetchError::Timeout(FETCH_TIMEOUT)));
            match fetched {
                Ok(set) => {
                    let keys = usable_keys(&set.keys);
                    tracing::info!(
                        source = %self.source.describe(),
                        issuer = ?set.issuer,
                        keys = keys.len(),
                        "fetched signing keys"
                    );
                    let snapshot = Arc::new(Snapshot {
                        issuer: set.issuer,
                        keys,
                        fetched_at: Instant::now(),
                    });
                    *self
                        .snapshot
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(snapshot.clone());
                    state.last_error = None;
                    return Ok(snapshot);
                }
                Err(error) => {
                    tracing::warn!(source = %self.source.describe(), %error, "fetching signing keys failed");
                    state.last_error = Some(error);
                }
            }
        }
        // Rate-limited or failed: serve what there is, even if stale.
        self.current().ok_or_else(|| AuthError::KeysUnavailable {
            from: self.source.describe(),
            reason: state
                .last_error
                .as_ref()
                .map_or_else(|| "no keys fetched yet".into(), ToString::to_string),
        })
    }
}

fn usable_keys(jwks: &[Jwk]) -> Vec<VerificationKey> {
    jwks.iter()
        .filter_map(|jwk| match VerificationKey::from_jwk(jwk) {
            Ok(key) => Some(key),
            Err(reason) => {
                tracing::warn!(kid = ?jwk.common.key_id, %reason, "skipping a signing key");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_https_fetcher_refuses_plain_http() {
        let fetcher = HttpsFetcher::new(None, Duration::from_secs(2)).unwrap();
        let error = fetcher
            .get("http://127.0.0.1:1/.well-known/openid-configuration")
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("GET http://127.0.0.1:1/.well-known/openid-configuration: "),
            "{error}"
        );
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_named() {
        let error = HttpsFetcher::new(Some(b"not a certificate"), Duration::from_secs(1))
            .err()
            .unwrap();
        assert_eq!(error.to_string(), "CA bundle holds no certificates");
    }

    #[test]
    fn a_ca_bundle_with_a_certificate_is_trusted() {
        let cert = rcgen::generate_simple_self_signed(vec!["idp.example".into()]).unwrap();
        HttpsFetcher::new(Some(cert.cert.pem().as_bytes()), Duration::from_secs(1)).unwrap();
    }
}

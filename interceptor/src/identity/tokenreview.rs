//! TokenReview for the tokens chaperone cannot verify itself (opaque
//! tokens, webhook-authenticated tokens, allowed legacy tokens): the API
//! server answers, chaperone remembers the answer briefly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;
use sha2::{Digest, Sha256};

use super::Caller;
use super::error::AuthError;

/// What the API server said about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReviewOutcome {
    Authenticated(Box<Caller>),
    /// Not authenticated, with the API server's reason.
    Rejected(String),
}

/// Asks the API server who a token belongs to.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewOutcome, ReviewError>>;
}

/// Why the API server could not be asked (not a refusal of the token: the
/// agent gets a 503 and may retry).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error(
        "creating a TokenReview failed: {0} (chaperone's service account needs \
         create on tokenreviews.authentication.k8s.io)"
    )]
    Create(String),
    #[error("TokenReview authenticated the token but named no user")]
    NoUser,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

// === impl KubeTokenReviewer ===

/// `POST /apis/authentication.k8s.io/v1/tokenreviews` with chaperone's own
/// credentials (it needs `create` on `tokenreviews`).
pub struct KubeTokenReviewer {
    api: Api<TokenReview>,
    audiences: Vec<String>,
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        Self {
            api: Api::all(client),
            audiences,
        }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewOutcome, ReviewError>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_string(),
                    audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
                },
                ..TokenReview::default()
            };
            let answer = self
                .api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| ReviewError::Create(super::keys::describe_kube_error(&e)))?;
            let status = answer.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                return Ok(ReviewOutcome::Rejected(
                    status
                        .error
                        .filter(|e| !e.is_empty())
                        .unwrap_or_else(|| "the token was not authenticated".into()),
                ));
            }
            let user = status.user.unwrap_or_default();
            let username = user.username.unwrap_or_default();
            if username.is_empty() {
                return Err(ReviewError::NoUser);
            }
            Ok(ReviewOutcome::Authenticated(Box::new(Caller {
                username,
                uid: user.uid.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default().into_iter().collect(),
                ..Caller::default()
            })))
        })
    }
}

// === impl CachedReviewer ===

/// A request waits for the API server's TokenReview answer at most this
/// long.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers kept briefly, keyed by the token's SHA-256 (tokens themselves
/// are never stored), bounded in number.
pub struct CachedReviewer {
    inner: Arc<dyn TokenReviewer>,
    positive_ttl: Duration,
    negative_ttl: Duration,
    max_entries: usize,
    cache: Mutex<HashMap<[u8; 32], (Instant, ReviewOutcome)>>,
}

impl CachedReviewer {
    pub fn new(
        inner: Arc<dyn TokenReviewer>,
        positive_ttl: Duration,
        negative_ttl: Duration,
        max_entries: usize,
    ) -> Self {
        Self {
            inner,
            positive_ttl,
            negative_ttl,
            max_entries: max_entries.max(1),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Instant, ReviewOutcome)>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The API server's answer, from the cache while it is fresh. Failures
    /// to ask are not cached.
    pub async fn review(&self, token: &str) -> Result<ReviewOutcome, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((expires, outcome)) = self.cache().get(&key)
            && Instant::now() < *expires
        {
            return Ok(outcome.clone());
        }
        let outcome = tokio::time::timeout(REVIEW_TIMEOUT, self.inner.review(token))
            .await
            .unwrap_or(Err(ReviewError::Timeout(REVIEW_TIMEOUT)))
            .map_err(|error| AuthError::ReviewUnavailable {
                reason: error.to_string(),
            })?;
        let ttl = match outcome {
            ReviewOutcome::Authenticated(_) => self.positive_ttl,
            ReviewOutcome::Rejected(_) => self.negative_ttl,
        };
        let now = Instant::now();
        let mut cache = self.cache();
        if cache.len() >= self.max_entries && !cache.contains_key(&key) {
            cache.retain(|_, (expires, _)| now < *expires);
            if cache.len() >= self.max_entries
                && let Some(soonest) = cache
                    .iter()
                    .min_by_key(|(_, (expires, _))| *expires)
                    .map(|(k, _)| *k)
            {
                cache.remove(&soonest);
            }
        }
        cache.insert(key, (now + ttl, outcome.clone()));
        Ok(outcome)
    }

    /// How many answers are held.
    pub fn len(&self) -> usize {
        self.cache().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A [`TokenReviewer`] answering from a table, for tests of everything
/// that sits on top of TokenReview.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct StaticReviewer {
    pub answers: std::collections::BTreeMap<String, ReviewOutcome>,
    pub calls: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl TokenReviewer for StaticReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewOutcome, ReviewError>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let outcome = self
            .answers
            .get(token)
            .cloned()
            .unwrap_or_else(|| ReviewOutcome::Rejected("invalid bearer token".into()));
        Box::pin(async move { Ok(outcome) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    fn alice() -> Caller {
        Caller {
            username: "alice".into(),
            groups: vec!["devs".into(), "system:authenticated".into()],
            ..Caller::default()
        }
    }

    fn reviewer() -> Arc<StaticReviewer> {
        let mut answers = BTreeMap::new();
        answers.insert(
            "opaque-alice".into(),
            ReviewOutcome::Authenticated(Box::new(alice())),
        );
        Arc::new(StaticReviewer {
            answers,
            ..StaticReviewer::default()
        })
    }

    #[tokio::test]
    async fn answers_are_reused_until_they_expire() {
        let inner = reviewer();
        let cached = CachedReviewer::new(
            inner.clone(),
            Duration::from_secs(60),
            Duration::from_millis(1),
            16,
        );
        for _ in 0..3 {
            assert_eq!(
                cached.review("opaque-alice").await.unwrap(),
                ReviewOutcome::Authenticated(Box::new(alice()))
            );
        }
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);

        // Refusals expire sooner: the second ask goes to the API server.
        assert!(matches!(
            cached.review("garbage").await.unwrap(),
            ReviewOutcome::Rejected(_)
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
        cached.review("garbage").await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_cache_stays_bounded() {
        let cached = CachedReviewer::new(
            reviewer(),
            Duration::from_secs(60),
            Duration::from_secs(60),
            4,
        );
        for i in 0..50 {
            cached.review(&format!("token-{i}")).await.unwrap();
        }
        assert_eq!(cached.len(), 4);
    }

    struct Down;
    impl TokenReviewer for Down {
        fn review<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<ReviewOutcome, ReviewError>> {
            Box::pin(async { Err(ReviewError::Create("connection refused".into())) })
        }
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_not_a_refusal() {
        let cached = CachedReviewer::new(
            Arc::new(Down),
            Duration::from_secs(1),
            Duration::from_secs(1),
            4,
        );
        let error = cached.review("t").await.unwrap_err();
        assert_eq!(error.to_status().code, 503);
        assert!(cached.is_empty());
    }
}

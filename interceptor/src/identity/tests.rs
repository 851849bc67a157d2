//! The authenticator end to end over injected key sources, fetchers and
//! TokenReview: hostile tokens, key rotation, rate-limited refresh, OIDC,
//! TokenReview and the binding of tokens to kernel-attested pods.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::future::BoxFuture;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::tokenreview::StaticReviewer;
use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "chaperone.dev";
const POD_UID: &str = "0b1c5d2e-1111-4a4a-9c9c-000000000001";
const OTHER_POD_UID: &str = "0b1c5d2e-2222-4a4a-9c9c-000000000002";

const RSA_A: &[u8] = include_bytes!("testdata/rsa-a.pem");
const RSA_A_PUBLIC: &[u8] = include_bytes!("testdata/rsa-a.pub.pem");
const RSA_B: &[u8] = include_bytes!("testdata/rsa-b.pem");

// === test fixtures ===

/// A signing key and the JWK an issuer publishes for it.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
}

impl SigningKey {
    fn rsa(kid: &str, pem: &[u8]) -> Self {
        let key = EncodingKey::from_rsa_pem(pem).unwrap();
        Self::with_jwk(kid, Algorithm::RS256, key)
    }

    /// A fresh P-256 key, generated for this run.
    fn ec(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        Self::with_jwk(kid, Algorithm::ES256, key)
    }

    fn with_jwk(kid: &str, alg: Algorithm, key: EncodingKey) -> Self {
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        Self {
            kid: kid.to_string(),
            alg,
            key,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// The API server's issuer discovery, with keys the test can rotate and a
/// count of fetches.
struct TestKeySource {
    issuer: String,
    published: Mutex<Vec<Jwk>>,
    fetches: AtomicUsize,
    down: AtomicBool,
}

impl TestKeySource {
    fn new(keys: &[&SigningKey]) -> Arc<Self> {
        Arc::new(Self {
            issuer: ISSUER.into(),
            published: Mutex::new(keys.iter().map(|k| k.jwk.clone()).collect()),
            fetches: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        })
    }

    fn publish(&self, keys: &[&SigningKey]) {
        *self.published.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl KeySource for TestKeySource {
    fn describe(&self) -> String {
        "the test issuer".into()
    }

    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, KeyFetchError>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let result = if self.down.load(Ordering::SeqCst) {
            Err(KeyFetchError::ApiServer {
                path: "/openid/v1/jwks",
                reason: "connection refused".into(),
            })
        } else {
            Ok(KeySet {
                issuer: Some(self.issuer.clone()),
                keys: self.published.lock().unwrap().clone(),
            })
        };
        Box::pin(async move { result })
    }
}

/// An external IdP's web server: URL → body.
struct TestWeb(BTreeMap<String, Vec<u8>>);

impl HttpFetcher for TestWeb {
    fn get<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Vec<u8>, FetchError>> {
        let answer = self.0.get(url).cloned().ok_or_else(|| FetchError::Status {
            url: url.into(),
            status: http::StatusCode::NOT_FOUND,
        });
        Box::pin(async move { answer })
    }
}

fn now() -> i64 {
    jwt::now()
}

/// A projected token's claims, as the API server mints them for pod
/// `prod-a/agent-1`.
fn sa_claims() -> Value {
    let now = now();
    json!({
        "aud": [AUDIENCE],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": "3f0c7a4e",
        "kubernetes.io": {
            "namespace": "prod-a",
            "node": {"name": "node-1", "uid": "node-uid-1"},
            "pod": {"name": "agent-1", "uid": POD_UID},
            "serviceaccount": {"name": "agent", "uid": "sa-uid-1"},
            "warnafter": now + 3000
        },
        "sub": "system:serviceaccount:prod-a:agent"
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn pod(namespace: &str, name: &str, uid: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
        service_account: "agent".into(),
        labels: BTreeMap::new(),
    }
}

fn agent_pod() -> PodRef {
    pod("prod-a", "agent-1", POD_UID)
}

fn config() -> IdentityConfig {
    let mut config = IdentityConfig::default();
    config.service_accounts.audiences = vec![AUDIENCE.into()];
    // Refresh on every unknown kid, so tests see the refresh happen.
    config.key_refresh.min_interval_seconds = 0;
    config
}

fn authenticator(
    config: &IdentityConfig,
    keys: Arc<TestKeySource>,
    reviewer: Option<Arc<StaticReviewer>>,
) -> Authenticator {
    Authenticator::new(
        config,
        Backends {
            service_account_keys: keys,
            oidc_fetcher: Some(Arc::new(TestWeb(BTreeMap::new()))),
            token_reviewer: reviewer.map(|r| r as Arc<dyn TokenReviewer>),
        },
    )
    .unwrap()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

// === accepted tokens ===

#[tokio::test]
async fn a_projected_token_from_its_own_pod_is_the_api_servers_user() {
    let key = SigningKey::rsa("a", RSA_A);
    let source = TestKeySource::new(&[&key]);
    let auth = authenticator(&config(), source.clone(), None);
    let process = ProcessInfo {
        pid: 4242,
        command: "kubectl".into(),
        ..ProcessInfo::default()
    };

    let caller = auth
        .authenticate(
            &key.sign(&sa_claims()),
            Some(&agent_pod()),
            Some(process.clone()),
        )
        .await
        .unwrap();

    assert_eq!(caller.username, "system:serviceaccount:prod-a:agent");
    assert_eq!(caller.uid, "sa-uid-1");
    assert_eq!(
        caller.groups,
        [
            "system:serviceaccounts",
            "system:serviceaccounts:prod-a",
            "system:authenticated"
        ]
    );
    assert_eq!(caller.extra[EXTRA_POD_NAME], ["agent-1"]);
    assert_eq!(caller.extra[EXTRA_POD_UID], [POD_UID]);
    assert_eq!(caller.extra[EXTRA_CREDENTIAL_ID], ["JTI=3f0c7a4e"]);
    assert_eq!(caller.pod, Some(agent_pod()));
    assert_eq!(caller.process, Some(process));
    assert_eq!(source.fetches(), 1);
}

#[tokio::test]
async fn es256_tokens_verify_and_keys_are_fetched_once() {
    let key = SigningKey::ec("ec-1");
    let source = TestKeySource::new(&[&key]);
    let auth = authenticator(&config(), source.clone(), None);
    for _ in 0..5 {
        auth.authenticate(&key.sign(&sa_claims()), Some(&agent_pod()), None)
            .await
            .unwrap();
    }
    assert_eq!(source.fetches(), 1);
}

#[tokio::test]
async fn without_configured_audiences_the_issuer_is_the_audience() {
    let key = SigningKey::rsa("a", RSA_A);
    let mut config = config();
    config.service_accounts.audiences.clear();
    let auth = authenticator(&config, TestKeySource::new(&[&key]), None);
    let token = key.sign(&with(sa_claims(), "aud", json!([ISSUER])));
    auth.authenticate(&token, None, None).await.unwrap();
    let chaperone_token = key.sign(&sa_claims());
    let error = auth
        .authenticate(&chaperone_token, None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, AuthError::AudienceMismatch { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn a_pod_token_used_outside_the_redirect_is_not_bound() {
    let key = SigningKey::rsa("a", RSA_A);
    let auth = authenticator(&config(), TestKeySource::new(&[&key]), None);
    let caller = auth
        .authenticate(&key.sign(&sa_claims()), None, None)
        .await
        .unwrap();
    assert_eq!(caller.pod, None);
    assert_eq!(caller.token_pod().unwrap().uid, POD_UID);
}

// === hostile tokens ===

#[tokio::test]
async fn hostile_tokens_are_refused_with_the_reason() {
    let key = SigningKey::rsa("a", RSA_A);
    let other = SigningKey::rsa("b", RSA_B);
    let ec = SigningKey::ec("ec-1");
    let source = TestKeySource::new(&[&key]);
    let auth = authenticator(
        &config(),
        source.clone(),
        Some(Arc::new(StaticReviewer::default())),
    );
    let now = now();
    let valid = key.sign(&sa_claims());

    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "a"})),
        b64(&sa_claims())
    );
    let hmac_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("a".into());
        jsonwebtoken::encode(
            &header,
            &sa_claims(),
            &EncodingKey::from_secret(RSA_A_PUBLIC),
        )
        .unwrap()
    };
    let legacy = key.sign(&json!({
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "prod-a",
        "kubernetes.io/serviceaccount/secret.name": "agent-token-x7k2p",
        "kubernetes.io/serviceaccount/service-account.name": "agent",
        "kubernetes.io/serviceaccount/service-account.uid": "sa-uid-1",
        "sub": "system:serviceaccount:prod-a:agent"
    }));
    let mut flipped = valid.clone().into_bytes();
    let middle = valid.rfind('.').unwrap() + 20;
    flipped[middle] = if flipped[middle] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();

    let cases: Vec<(&str, String, PodRef, String)> = vec![
        (
            "alg none",
            unsigned,
            agent_pod(),
            "chaperone: token rejected: signed with alg none, which is not allowed"
                .to_string(),
        ),
        (
            "HS256 keyed with the RSA public key",
            hmac_with_public_key,
            agent_pod(),
            "signed with HS256, an HMAC algorithm, which is not allowed"
                .to_string(),
        ),
        (
            "expired",
            key.sign(&with(
                with(sa_claims(), "exp", json!(now - 3600)),
                "iat",
                json!(now - 7200),
            )),
            agent_pod(),
            format!("chaperone: token rejected: expired at {}", error::rfc3339(now - 3600)),
        ),
        (
            "not yet valid",
            key.sign(&with(
                with(sa_claims(), "nbf", json!(now + 3600)),
                "exp",
                json!(now + 7200),
            )),
            agent_pod(),
            format!("not valid before {}", error::rfc3339(now + 3600)),
        ),
        (
            "issued in the future",
            key.sign(&with(sa_claims(), "iat", json!(now + 3600))),
            agent_pod(),
            "issued in the future"
                .to_string(),
        ),
        (
            "wrong audience",
            key.sign(&with(sa_claims(), "aud", json!(["https://kubernetes.default.svc"]))),
            agent_pod(),
            "chaperone: token rejected: audience [https://kubernetes.default.svc] does not include any of [chaperone.dev]"
                .to_string(),
        ),
        (
            "wrong issuer",
            key.sign(&with(sa_claims(), "iss", json!("https://evil.example"))),
            agent_pod(),
            "issuer \"https://evil.example\" is not trusted (trusted issuers: [https://kubernetes.default.svc.cluster.local]), \
             and the API server's TokenReview did not authenticate it either: invalid bearer token"
                .to_string(),
        ),
        (
            "unknown kid",
            key.sign_as("ghost", &sa_claims()),
            agent_pod(),
            "signing key id \"ghost\" is not among the current keys of issuer https://kubernetes.default.svc.cluster.local"
                .to_string(),
        ),
        (
            "signed by another key under a known kid",
            other.sign_as("a", &sa_claims()),
            agent_pod(),
            "signature does not verify with the keys of issuer https://kubernetes.default.svc.cluster.local"
                .to_string(),
        ),
        (
            "signature bytes flipped",
            flipped,
            agent_pod(),
            "signature does not verify"
                .to_string(),
        ),
        (
            "ES256 claiming the RSA key",
            ec.sign_as("a", &sa_claims()),
            agent_pod(),
            "key \"a\" of issuer https://kubernetes.default.svc.cluster.local cannot verify alg ES256: it is a Rsa key"
                .to_string(),
        ),
        (
            "truncated",
            valid[..valid.len() / 2].to_string(),
            agent_pod(),
            "chaperone: token rejected: not a well-formed JWT"
                .to_string(),
        ),
        (
            "garbage",
            "not-a-token-at-all".to_string(),
            agent_pod(),
            "chaperone: token rejected: the API server's TokenReview did not authenticate it: invalid bearer token"
                .to_string(),
        ),
        (
            "legacy secret-based token",
            legacy,
            agent_pod(),
            "a legacy secret-based service-account token"
                .to_string(),
        ),
        (
            "valid token replayed from another pod's cgroup",
            valid.clone(),
            pod("dev-a", "agent-2", OTHER_POD_UID),
            format!(
                "chaperone: token rejected: token was issued to pod prod-a/agent-1 (uid {POD_UID}) \
                 but the connection comes from pod dev-a/agent-2 (uid {OTHER_POD_UID})"
            ),
        ),
    ];

    for (name, token, attested, reason) in &cases {
        let error = match auth.authenticate(token, Some(attested), None).await {
            Ok(caller) => panic!("{name}: accepted as {}", caller.username),
            Err(error) => error,
        };
        let status = error.to_status();
        assert_eq!(status.code, 401, "{name}: {error}");
        assert_eq!(status.reason, "Unauthorized", "{name}");
        assert!(
            status.message.contains(reason),
            "{name}: {:?} does not say {reason:?}",
            status.message
        );
        let body: Value = serde_json::from_slice(&status.to_body()).unwrap();
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["message"], status.message.as_str());
    }

    // The same valid token from its own pod is fine: the refusals were the
    // tokens', not the authenticator's.
    auth.authenticate(&valid, Some(&agent_pod()), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn forgeries_and_replays_are_attack_signals_stale_tokens_are_not() {
    let key = SigningKey::rsa("a", RSA_A);
    let auth = authenticator(&config(), TestKeySource::new(&[&key]), None);
    let replay = auth
        .authenticate(
            &key.sign(&sa_claims()),
            Some(&pod("dev-a", "agent-2", OTHER_POD_UID)),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(
        replay.attack_signal(),
        Some(AttackSignal::ReplayedFromAnotherPod)
    );
    let forged = auth
        .authenticate(
            &SigningKey::rsa("b", RSA_B).sign_as("a", &sa_claims()),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(forged.attack_signal(), Some(AttackSignal::ForgedSignature));
    let unsigned = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&sa_claims()));
    let unsigned = auth.authenticate(&unsigned, None, None).await.unwrap_err();
    assert_eq!(unsigned.attack_signal(), Some(AttackSignal::UnsignedToken));
    let expired = auth
        .authenticate(
            &key.sign(&with(sa_claims(), "exp", json!(now() - 3600))),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(expired.attack_signal(), None);
}

#[tokio::test]
async fn no_prefix_of_a_valid_token_is_accepted() {
    let key = SigningKey::ec("ec-1");
    let auth = authenticator(&config(), TestKeySource::new(&[&key]), None);
    let valid = key.sign(&sa_claims());
    for end in (0..valid.len()).step_by(3) {
        let error = auth
            .authenticate(&valid[..end], Some(&agent_pod()), None)
            .await
            .unwrap_err();
        assert_eq!(error.to_status().code, 401, "prefix {end}: {error}");
    }
    auth.authenticate(&valid, Some(&agent_pod()), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn pod_binding_is_required_of_service_account_tokens_by_default() {
    let key = SigningKey::rsa("a", RSA_A);
    let mut unbound = sa_claims();
    unbound["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    let unbound = key.sign(&unbound);

    // The default: a token of any service account minted without a pod
    // (`kubectl create token SA`) does not work from a guarded pod.
    let auth = authenticator(&config(), TestKeySource::new(&[&key]), None);
    let error = auth
        .authenticate(&unbound, Some(&agent_pod()), None)
        .await
        .unwrap_err();
    assert_eq!(error.to_status().code, 401);
    assert_eq!(
        error.to_string(),
        format!(
            "chaperone: token rejected: token of system:serviceaccount:prod-a:agent is not bound \
             to a pod, and connections from pod prod-a/agent-1 (uid {POD_UID}) must carry a token \
             bound to it (a projected service-account token)"
        )
    );
    // Outside the redirect there is no pod to bind to; bound tokens pass.
    auth.authenticate(&unbound, None, None).await.unwrap();
    let bound = auth
        .authenticate(&key.sign(&sa_claims()), Some(&agent_pod()), None)
        .await
        .unwrap();
    assert!(!bound.is_unbound_on_pod());

    // The explicit opt-in: accepted, and the caller says it is unbound
    // (the audit event's chaperone.dev/token-binding).
    let mut config = config();
    config.service_accounts.require_pod_binding = false;
    let auth = authenticator(&config, TestKeySource::new(&[&key]), None);
    let caller = auth
        .authenticate(&unbound, Some(&agent_pod()), None)
        .await
        .unwrap();
    assert!(caller.is_unbound_on_pod());
}

#[tokio::test]
async fn opaque_tokens_without_token_review_are_refused_by_name() {
    let key = SigningKey::rsa("a", RSA_A);
    let mut config = config();
    config.token_review.enabled = false;
    let reviewer = Arc::new(StaticReviewer::default());
    let auth = authenticator(&config, TestKeySource::new(&[&key]), Some(reviewer.clone()));
    let error = auth
        .authenticate("sha256~opaque", None, None)
        .await
        .unwrap_err();
    assert_eq!(error, AuthError::OpaqueTokenWithoutReview);
    assert_eq!(reviewer.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        auth.authenticate("  ", None, None).await.unwrap_err(),
        AuthError::MissingToken
    );
}

// === keys: rotation, rate limit, outages ===

#[tokio::test]
async fn a_token_signed_with_a_rotated_in_key_is_accepted_after_the_refresh() {
    let old = SigningKey::rsa("old", RSA_A);
    let new = SigningKey::ec("new");
    let source = TestKeySource::new(&[&old]);
    let auth = authenticator(&config(), source.clone(), None);
    auth.authenticate(&old.sign(&sa_claims()), Some(&agent_pod()), None)
        .await
        .unwrap();
    assert_eq!(source.fetches(), 1);

    // The API server rotates: the new key is published, the old one kept.
    source.publish(&[&old, &new]);
    let caller = auth
        .authenticate(&new.sign(&sa_claims()), Some(&agent_pod()), None)
        .await
        .unwrap();
    assert_eq!(caller.username, "system:serviceaccount:prod-a:agent");
    assert_eq!(source.fetches(), 2, "the unknown kid triggered one refresh");

    // Both keys now verify without further fetches.
    auth.authenticate(&old.sign(&sa_claims()), None, None)
        .await
        .unwrap();
    auth.authenticate(&new.sign(&sa_claims()), None, None)
        .await
        .unwrap();
    assert_eq!(source.fetches(), 2);

    // The old key is withdrawn: tokens naming it are refused after the
    // next refresh.
    source.publish(&[&new]);
    let stale = old.sign_as("retired", &sa_claims());
    auth.authenticate(&stale, None, None).await.unwrap_err();
    let error = auth
        .authenticate(&old.sign(&sa_claims()), None, None)
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::UnknownKeyId { .. }), "{error}");
}

#[tokio::test]
async fn a_remembered_signature_vouches_for_its_own_token_only() {
    let key = SigningKey::rsa("a", RSA_A);
    let source = TestKeySource::new(&[&key]);
    let auth = authenticator(&config(), source.clone(), None);
    let token = key.sign(&sa_claims());
    // Verified once, then remembered: still the same caller.
    for _ in 0..3 {
        let caller = auth.authenticate(&token, None, None).await.unwrap();
        assert_eq!(caller.username, "system:serviceaccount:prod-a:agent");
    }
    // The remembered signature with other claims is a forgery.
    let other = key.sign(&with(
        sa_claims(),
        "sub",
        json!("system:serviceaccount:prod-a:admin"),
    ));
    let parts: Vec<&str> = token.split('.').collect();
    let other_parts: Vec<&str> = other.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
    auth.authenticate(&forged, None, None).await.unwrap_err();
    // Claims are still checked on every request: the same token, expired.
    let expired = key.sign(&with(sa_claims(), "exp", json!(now() - 3600)));
    auth.authenticate(&expired, None, None).await.unwrap_err();
    auth.authenticate(&expired, None, None).await.unwrap_err();
}

#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_at_most_once_per_interval() {
    let key = SigningKey::rsa("a", RSA_A);
    let source = TestKeySource::new(&[&key]);
    let mut config = config();
    config.key_refresh.min_interval_seconds = 60;
    let auth = Arc::new(authenticator(&config, source.clone(), None));

    let mut tasks = Vec::new();
    for i in 0..64 {
        let auth = auth.clone();
        let token = key.sign_as(&format!("random-{i}"), &sa_claims());
        tasks.push(tokio::spawn(async move {
            auth.authenticate(&token, None, None).await
        }));
    }
    for task in tasks {
        let error = task.await.unwrap().unwrap_err();
        assert!(matches!(error, AuthError::UnknownKeyId { .. }), "{error}");
    }
    assert_eq!(source.fetches(), 1);
    // Known keys keep working meanwhile.
    auth.authenticate(&key.sign(&sa_claims()), None, None)
        .await
        .unwrap();
    assert_eq!(source.fetches(), 1);
}

#[tokio::test]
async fn keys_keep_serving_while_the_api_server_is_unreachable() {
    let key = SigningKey::rsa("a", RSA_A);
    let source = TestKeySource::new(&[&key]);
    let mut config = config();
    config.key_refresh.max_age_seconds = 1;
    let auth = authenticator(&config, source.clone(), None);
    auth.authenticate(&key.sign(&sa_claims()), None, None)
        .await
        .unwrap();
    source.down.store(true, Ordering::SeqCst);
    // The keys grow old; the refetch fails; the old keys still verify.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    auth.authenticate(&key.sign(&sa_claims()), None, None)
        .await
        .unwrap();
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn no_keys_at_all_is_503_naming_the_cause() {
    let key = SigningKey::rsa("a", RSA_A);
    let source = TestKeySource::new(&[&key]);
    source.down.store(true, Ordering::SeqCst);
    let auth = authenticator(&config(), source, None);
    let error = auth
        .authenticate(&key.sign(&sa_claims()), None, None)
        .await
        .unwrap_err();
    let status = error.to_status();
    assert_eq!(status.code, 503);
    assert!(
        status.message.contains("connection refused"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn jwks_symmetric_keys_are_never_trusted() {
    // An issuer (or a man in the middle) publishing an `oct` key under the
    // kid cannot make HMAC tokens verify: they are refused before any key.
    let key = SigningKey::rsa("a", RSA_A);
    let source = TestKeySource::new(&[&key]);
    let oct: Jwk = serde_json::from_value(json!({
        "kty": "oct", "kid": "sym", "k": URL_SAFE_NO_PAD.encode(b"secret")
    }))
    .unwrap();
    source.published.lock().unwrap().push(oct);
    let auth = authenticator(&config(), source, None);
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("sym".into());
    let token =
        jsonwebtoken::encode(&header, &sa_claims(), &EncodingKey::from_secret(b"secret")).unwrap();
    let error = auth.authenticate(&token, None, None).await.unwrap_err();
    assert_eq!(
        error,
        AuthError::SymmetricAlgorithm {
            alg: "HS256".into()
        }
    );
    // And an RS256 token naming the oct key finds no usable key.
    let error = auth
        .authenticate(&key.sign_as("sym", &sa_claims()), None, None)
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::UnknownKeyId { .. }), "{error}");
}

// === TokenReview ===

fn reviewed_caller(pod_uid: &str) -> Caller {
    let mut extra = BTreeMap::new();
    extra.insert(EXTRA_POD_NAME.to_string(), vec!["agent-1".to_string()]);
    extra.insert(EXTRA_POD_UID.to_string(), vec![pod_uid.to_string()]);
    Caller {
        username: "system:serviceaccount:prod-a:agent".into(),
        uid: "sa-uid-1".into(),
        groups: vec![
            "system:serviceaccounts".into(),
            "system:authenticated".into(),
        ],
        extra,
        ..Caller::default()
    }
}

#[tokio::test]
async fn opaque_tokens_go_to_token_review_and_are_bound_too() {
    let key = SigningKey::rsa("a", RSA_A);
    let mut answers = BTreeMap::new();
    answers.insert(
        "opaque-agent".to_string(),
        ReviewOutcome::Authenticated(Box::new(reviewed_caller(POD_UID))),
    );
    let reviewer = Arc::new(StaticReviewer {
        answers,
        ..StaticReviewer::default()
    });
    let auth = authenticator(
        &config(),
        TestKeySource::new(&[&key]),
        Some(reviewer.clone()),
    );

    let caller = auth
        .authenticate("opaque-agent", Some(&agent_pod()), None)
        .await
        .unwrap();
    assert_eq!(caller.username, "system:serviceaccount:prod-a:agent");
    assert_eq!(caller.pod, Some(agent_pod()));

    let error = auth
        .authenticate(
            "opaque-agent",
            Some(&pod("dev-a", "agent-2", OTHER_POD_UID)),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::PodMismatch { .. }), "{error}");
    // Both answers came from one review: the second was cached.
    assert_eq!(reviewer.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn allowed_legacy_tokens_are_checked_by_token_review() {
    let key = SigningKey::rsa("a", RSA_A);
    let legacy = key.sign(&json!({
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "prod-a",
        "kubernetes.io/serviceaccount/service-account.name": "agent",
        "sub": "system:serviceaccount:prod-a:agent"
    }));
    let mut answers = BTreeMap::new();
    let mut user = reviewed_caller(POD_UID);
    user.extra.clear();
    answers.insert(legacy.clone(), ReviewOutcome::Authenticated(Box::new(user)));
    let reviewer = Arc::new(StaticReviewer {
        answers,
        ..StaticReviewer::default()
    });
    let mut config = config();
    config.service_accounts.allow_legacy_tokens = true;
    // A legacy token names no pod: from a guarded pod it needs the opt-in
    // to unbound tokens as well.
    let auth = authenticator(&config, TestKeySource::new(&[&key]), Some(reviewer.clone()));
    let error = auth
        .authenticate(&legacy, Some(&agent_pod()), None)
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::UnboundToken { .. }), "{error}");
    config.service_accounts.require_pod_binding = false;
    let auth = authenticator(&config, TestKeySource::new(&[&key]), Some(reviewer));
    let caller = auth
        .authenticate(&legacy, Some(&agent_pod()), None)
        .await
        .unwrap();
    assert_eq!(caller.username, "system:serviceaccount:prod-a:agent");

    config.token_review.enabled = false;
    let error = Authenticator::new(
        &config,
        Backends {
            service_account_keys: TestKeySource::new(&[&key]),
            oidc_fetcher: None,
            token_reviewer: None,
        },
    )
    .err()
    .unwrap();
    assert_eq!(error, ConfigError::LegacyWithoutTokenReview);
}

// === external OIDC issuers ===

const IDP: &str = "https://idp.example";

fn idp_web(key: &SigningKey, discovery_issuer: &str) -> Arc<TestWeb> {
    let mut pages = BTreeMap::new();
    pages.insert(
        format!("{IDP}/.well-known/openid-configuration"),
        serde_json::to_vec(&json!({
            "issuer": discovery_issuer,
            "jwks_uri": format!("{IDP}/keys"),
        }))
        .unwrap(),
    );
    pages.insert(
        format!("{IDP}/keys"),
        serde_json::to_vec(&json!({"keys": [key.jwk]})).unwrap(),
    );
    Arc::new(TestWeb(pages))
}

fn oidc_config(username_claim: &str) -> IdentityConfig {
    let mut config = config();
    config.oidc_issuers.push(OidcIssuerConfig {
        issuer_url: IDP.into(),
        audiences: vec!["agents".into()],
        username_claim: username_claim.into(),
        username_prefix: None,
        groups_claim: Some("groups".into()),
        groups_prefix: "idp:".into(),
        algorithms: vec!["ES256".into()],
        ca_file: None,
    });
    config
}

fn oidc_authenticator(config: &IdentityConfig, web: Arc<TestWeb>) -> Authenticator {
    Authenticator::new(
        config,
        Backends {
            service_account_keys: TestKeySource::new(&[]),
            oidc_fetcher: Some(web),
            token_reviewer: None,
        },
    )
    .unwrap()
}

fn idp_claims() -> Value {
    let now = now();
    json!({
        "iss": IDP,
        "aud": "agents",
        "sub": "user-7",
        "email": "ops-bot@example.com",
        "email_verified": true,
        "groups": ["oncall", "agents"],
        "exp": now + 600,
        "iat": now
    })
}

#[tokio::test]
async fn oidc_tokens_map_claims_and_prefixes() {
    let key = SigningKey::ec("idp-1");
    let auth = oidc_authenticator(&oidc_config("sub"), idp_web(&key, IDP));
    let caller = auth
        .authenticate(&key.sign(&idp_claims()), Some(&agent_pod()), None)
        .await
        .unwrap();
    assert_eq!(caller.username, "https://idp.example#user-7");
    assert_eq!(
        caller.groups,
        ["idp:oncall", "idp:agents", "system:authenticated"]
    );
    assert_eq!(
        caller.pod,
        Some(agent_pod()),
        "an OIDC token names no pod to bind"
    );

    let auth = oidc_authenticator(&oidc_config("email"), idp_web(&key, IDP));
    let caller = auth
        .authenticate(&key.sign(&idp_claims()), None, None)
        .await
        .unwrap();
    assert_eq!(caller.username, "ops-bot@example.com");
    let unverified = with(idp_claims(), "email_verified", json!(false));
    let error = auth
        .authenticate(&key.sign(&unverified), None, None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("email_verified"), "{error}");
}

#[tokio::test]
async fn oidc_tokens_are_checked_like_any_other() {
    let key = SigningKey::ec("idp-1");
    let auth = oidc_authenticator(&oidc_config("sub"), idp_web(&key, IDP));
    let wrong_audience = with(idp_claims(), "aud", json!("someone-else"));
    let error = auth
        .authenticate(&key.sign(&wrong_audience), None, None)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "chaperone: token rejected: audience [someone-else] does not include any of [agents]"
    );
    // RS256 is outside this issuer's allow-list.
    let rsa = SigningKey::rsa("idp-1", RSA_A);
    let error = auth
        .authenticate(&rsa.sign(&idp_claims()), None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, AuthError::AlgorithmNotAllowed { .. }),
        "{error}"
    );
    // An external issuer cannot mint Kubernetes identities.
    let mut config = oidc_config("sub");
    config.oidc_issuers[0].username_prefix = Some("-".into());
    let auth = oidc_authenticator(&config, idp_web(&key, IDP));
    let spoof = with(
        idp_claims(),
        "sub",
        json!("system:serviceaccount:kube-system:admin"),
    );
    let error = auth
        .authenticate(&key.sign(&spoof), None, None)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("reserved for Kubernetes"),
        "{error}"
    );
}

#[tokio::test]
async fn an_idp_whose_discovery_names_another_issuer_is_not_trusted() {
    let key = SigningKey::ec("idp-1");
    let auth = oidc_authenticator(&oidc_config("sub"), idp_web(&key, "https://evil.example"));
    let error = auth
        .authenticate(&key.sign(&idp_claims()), None, None)
        .await
        .unwrap_err();
    assert_eq!(error.to_status().code, 503);
    assert!(
        error
            .to_string()
            .contains("names issuer \"https://evil.example\""),
        "{error}"
    );
}

#[test]
fn configuration_mistakes_are_named() {
    let backends = || Backends {
        service_account_keys: TestKeySource::new(&[]),
        oidc_fetcher: Some(Arc::new(TestWeb(BTreeMap::new()))),
        token_reviewer: None,
    };
    let mut config = config();
    config.service_accounts.algorithms = vec!["HS256".into()];
    let error = Authenticator::new(&config, backends()).err().unwrap();
    assert!(
        error
            .to_string()
            .contains("only asymmetric signatures are safe")
    );

    let mut config = oidc_config("sub");
    config.oidc_issuers[0].issuer_url = "http://idp.example".into();
    let error = Authenticator::new(&config, backends()).err().unwrap();
    assert_eq!(
        error.to_string(),
        "identity.oidcIssuers[http://idp.example]: issuerUrl must be an https:// URL"
    );

    let mut config = oidc_config("sub");
    config.oidc_issuers[0].audiences.clear();
    let error = Authenticator::new(&config, backends()).err().unwrap();
    assert!(error.to_string().contains("audiences is empty"));
}

// === the production backends, against a local HTTP API server ===

/// What the fake API server answers: `(method, path, body) -> (status, body)`.
type Routes = dyn Fn(&http::Method, &str, &[u8]) -> (u16, String) + Send + Sync;

/// Whether kube-apiserver (v1.20 and later) would answer `accept` for the
/// JWKS: its route produces only `application/jwk-set+json` and answers
/// 406 otherwise, `Accept: application/json` alone included.
fn jwks_acceptable(accept: Option<&str>) -> bool {
    accept.is_none_or(|a| {
        a.split(',').any(|part| {
            let media = part.split(';').next().unwrap_or("").trim();
            matches!(
                media,
                "application/jwk-set+json" | "*/*" | "application/*" | ""
            )
        })
    })
}

#[test]
fn jwks_are_asked_for_in_the_type_the_api_server_produces() {
    assert!(jwks_acceptable(Some(crate::identity::JWKS_ACCEPT)));
    assert!(!jwks_acceptable(Some("application/json")));
}

/// A plain-HTTP server on loopback standing in for the API server, and a
/// `kube::Client` pointed at it. Like kube-apiserver, it answers 406 to a
/// JWKS request that does not accept `application/jwk-set+json`.
async fn fake_api_server(routes: Arc<Routes>) -> kube::Client {
    use http_body_util::BodyExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let routes = routes.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let routes = routes.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await?.to_bytes();
                            let accept = parts
                                .headers
                                .get(http::header::ACCEPT)
                                .and_then(|v| v.to_str().ok());
                            let (status, text) = if parts.uri.path() == "/openid/v1/jwks"
                                && !jwks_acceptable(accept)
                            {
                                (406, "406: Not Acceptable".to_string())
                            } else {
                                routes(&parts.method, parts.uri.path(), &body)
                            };
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn status_body(code: u16, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": "Forbidden", "code": code})
    .to_string()
}

#[tokio::test]
async fn the_kube_backends_fetch_keys_and_review_tokens_from_the_api_server() {
    let key = SigningKey::rsa("a", RSA_A);
    let jwks = json!({"keys": [key.jwk]}).to_string();
    let reviews = Arc::new(Mutex::new(Vec::<Value>::new()));
    let seen = reviews.clone();
    let client = fake_api_server(Arc::new(move |method, path, body| {
        match (method.as_str(), path) {
            ("GET", "/.well-known/openid-configuration") => (
                200,
                json!({"issuer": ISSUER, "jwks_uri": format!("{ISSUER}/openid/v1/jwks")})
                    .to_string(),
            ),
            ("GET", "/openid/v1/jwks") => (200, jwks.clone()),
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
                let review: Value = serde_json::from_slice(body).unwrap();
                seen.lock().unwrap().push(review.clone());
                let status = if review["spec"]["token"] == "opaque-agent" {
                    json!({"authenticated": true, "user": {
                        "username": "system:serviceaccount:prod-a:agent",
                        "uid": "sa-uid-1",
                        "groups": ["system:serviceaccounts", "system:authenticated"],
                        "extra": {
                            "authentication.kubernetes.io/pod-name": ["agent-1"],
                            "authentication.kubernetes.io/pod-uid": [POD_UID]
                        }
                    }})
                } else {
                    json!({"authenticated": false, "error": "invalid bearer token"})
                };
                let mut answer = review;
                answer["status"] = status;
                (201, answer.to_string())
            }
            _ => (404, status_body(404, "not found")),
        }
    }))
    .await;
    let mut config = config();
    config.token_review.audiences = vec![AUDIENCE.into()];
    let auth = Authenticator::from_client(&config, client).unwrap();

    let caller = auth
        .authenticate(&key.sign(&sa_claims()), Some(&agent_pod()), None)
        .await
        .unwrap();
    assert_eq!(caller.username, "system:serviceaccount:prod-a:agent");

    let caller = auth
        .authenticate("opaque-agent", Some(&agent_pod()), None)
        .await
        .unwrap();
    assert_eq!(caller.extra[EXTRA_POD_UID], [POD_UID]);
    let error = auth
        .authenticate(
            "opaque-agent",
            Some(&pod("dev-a", "agent-2", OTHER_POD_UID)),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::PodMismatch { .. }), "{error}");
    let error = auth
        .authenticate("sha256~stolen", None, None)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "chaperone: token rejected: the API server's TokenReview did not authenticate it: invalid bearer token"
    );

    let reviews = reviews.lock().unwrap();
    assert_eq!(
        reviews.len(),
        2,
        "the second opaque-agent answer was cached"
    );
    assert_eq!(reviews[0]["kind"], "TokenReview");
    assert_eq!(reviews[0]["spec"]["audiences"], json!([AUDIENCE]));
}

#[tokio::test]
async fn missing_discovery_rights_are_named() {
    let client = fake_api_server(Arc::new(|_, path, _| {
        (
            403,
            status_body(
                403,
                &format!("forbidden: User \"system:serviceaccount:chaperone:chaperone\" cannot get path \"{path}\""),
            ),
        )
    }))
    .await;
    let auth = Authenticator::from_client(&config(), client).unwrap();
    let key = SigningKey::rsa("a", RSA_A);
    let error = auth
        .authenticate(&key.sign(&sa_claims()), None, None)
        .await
        .unwrap_err();
    let status = error.to_status();
    assert_eq!(status.code, 503, "{}", status.message);
    assert_eq!(
        status.message,
        "chaperone: cannot verify the token right now: no signing keys from the API server's \
         /.well-known/openid-configuration and /openid/v1/jwks: GET /.well-known/openid-configuration from the API server \
         failed: HTTP 403: forbidden: User \"system:serviceaccount:chaperone:chaperone\" cannot get \
         path \"/.well-known/openid-configuration\" (chaperone's service account needs the \
         system:service-account-issuer-discovery ClusterRole)"
    );
    // TokenReview is refused too, and says which right is missing.
    let error = auth.authenticate("opaque", None, None).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("HTTP 403: forbidden: User \"system:serviceaccount:chaperone:chaperone\" cannot get path \"/apis/authentication.k8s.io/v1/tokenreviews\" (chaperone's service account needs create on tokenreviews.authentication.k8s.io)"),
        "{error}"
    );
}

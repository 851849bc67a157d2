//! Each stage alone, and the whole path over one request, without a proxy,
//! a network or root: the guard is built from [`GuardParts`] with a
//! TokenReview that knows one token, and asked about hand-made requests.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use futures::future::BoxFuture;
use http::{HeaderValue, Method, Request, header, request::Parts};
use http_body_util::BodyExt;

use super::*;
use crate::{
    identity::{
        Backends, Caller, IdentityConfig, KeyFetchError, KeySet, KeySource, ReviewError,
        ReviewOutcome, TokenReviewer,
    },
    limits::LimitConfig,
    policy::parse_documents,
    proxy::{ConnectionInfo, Verdict, body},
    redirect::{AttestedConnection, CgroupId, OrigDst},
};

const TOKEN: &str = "agent-token";
const AGENT: &str = "system:serviceaccount:agents:coder";

// === fixtures ===

/// No service-account keys: the tests' token is opaque, for TokenReview.
struct NoKeys;

impl KeySource for NoKeys {
    fn describe(&self) -> String {
        "no issuer".into()
    }
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, KeyFetchError>> {
        Box::pin(async {
            Err(KeyFetchError::ApiServer {
                path: "/openid/v1/jwks",
                reason: "no keys in this test".into(),
            })
        })
    }
}

/// The API server's TokenReview: [`TOKEN`] is the agent's.
struct Review;

impl TokenReviewer for Review {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewOutcome, ReviewError>> {
        let outcome = if token == TOKEN {
            ReviewOutcome::Authenticated(Box::new(Caller {
                username: AGENT.into(),
                uid: "uid-coder".into(),
                groups: vec![
                    "system:serviceaccounts".into(),
                    "system:serviceaccounts:agents".into(),
                    "system:authenticated".into(),
                ],
                ..Caller::default()
            }))
        } else {
            ReviewOutcome::Rejected("invalid bearer token".into())
        };
        Box::pin(async move { Ok(outcome) })
    }
}

fn authenticator() -> Arc<Authenticator> {
    Arc::new(
        Authenticator::new(
            &IdentityConfig::default(),
            Backends {
                service_account_keys: Arc::new(NoKeys),
                oidc_fetcher: None,
                token_reviewer: Some(Arc::new(Review)),
            },
        )
        .unwrap(),
    )
}

/// The agent's policy: `rules` (YAML list items, indented by 4).
fn policy(rules: &str) -> Arc<PolicyStore> {
    let yaml = format!(
        "apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: coder
spec:
  subjects:
    - serviceAccounts: [agents/coder]
  rules:
{rules}
  defaultAction: deny
"
    );
    let store = PolicyStore::new();
    for document in parse_documents(&yaml) {
        store.apply(&document.expect("a valid policy").policy);
    }
    Arc::new(store)
}

const ALLOW_ALL: &str = "    - name: all
      verbs: ['*']
      resources: ['*']
      apiGroups: ['*']
      action: allow";

fn guard(rules: &str, tweak: impl FnOnce(&mut GuardParts)) -> NodeGuard {
    let mut parts = GuardParts::new(authenticator());
    parts.policy = policy(rules);
    tweak(&mut parts);
    NodeGuard::new(parts)
}

fn info(attested: Option<AttestedConnection>) -> Arc<ConnectionInfo> {
    Arc::new(ConnectionInfo {
        id: uuid::Uuid::new_v4(),
        peer: "10.244.1.7:40000".parse().unwrap(),
        local: "10.0.0.1:6443".parse().unwrap(),
        attested,
        sni: None,
        alpn: None,
        accepted_at: SystemTime::now(),
    })
}

fn attested(agent_cgroup: u64) -> AttestedConnection {
    AttestedConnection {
        orig_dst: OrigDst("10.96.0.1:443".parse::<SocketAddr>().unwrap()),
        cgroup_id: CgroupId(agent_cgroup + 1),
        agent_cgroup_id: CgroupId(agent_cgroup),
        pid: u32::MAX,
        uid: 0,
    }
}

/// A request with the agent's token, and `body`.
fn request(method: Method, uri: &str, body: &str) -> (Parts, RequestBody) {
    let (parts, ()) = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(())
        .unwrap()
        .into_parts();
    (parts, RequestBody::new(body::full(body.to_owned())))
}

/// What the guard says about one request on a connection of its own.
async fn check(guard: &NodeGuard, parts: &mut Parts, body: &mut RequestBody) -> Verdict {
    let info = info(None);
    let connection = Arc::new(guard.connect(&info));
    guard.check(&info, &connection, parts, body).await
}

/// The refusal's code and `Status` message; panics on a forward.
async fn refused(verdict: Verdict) -> (u16, String) {
    let Verdict::Respond(response) = verdict else {
        panic!("forwarded, expected a refusal");
    };
    let code = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], code);
    (
        code,
        status["message"].as_str().unwrap_or_default().to_owned(),
    )
}

fn forwarded(verdict: Verdict) -> Forward {
    match verdict {
        Verdict::Forward(forward) => forward,
        Verdict::Respond(response) => panic!("refused with {}", response.status()),
    }
}

// === interpret ===

#[test]
fn interpret_forwards_the_target_it_judged() {
    let (mut parts, _) = request(Method::GET, "/api/v1/namespaces/prod/secrets%2Fdb", "");
    let (request, target) = interpret::interpret(&mut parts);
    assert!(target.is_ok());
    assert_eq!(
        (request.resource.as_str(), request.name.as_str()),
        ("secrets", "db")
    );
    assert_eq!(parts.uri.path(), "/api/v1/namespaces/prod/secrets/db");
}

#[tokio::test]
async fn an_ambiguous_target_is_refused_with_400() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/prod/secrets/a%zz", "");
    let (code, message) = refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(code, 400, "{message}");
}

// === admit ===

#[tokio::test]
async fn per_pod_limits_are_taken_at_accept_and_counted_per_request() {
    let guard = guard(ALLOW_ALL, |parts| {
        parts.limits = LimitConfig {
            connections_per_pod: 1,
            requests_per_pod: 1,
        }
    });
    let first = info(Some(attested(77)));
    let first_connection = Arc::new(guard.connect(&first));
    // The pod's one connection is taken: its second connection is refused
    // on every request, before the token is even looked at.
    let second = info(Some(attested(77)));
    let second_connection = Arc::new(guard.connect(&second));
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    parts.headers.remove(header::AUTHORIZATION);
    let verdict = guard
        .check(&second, &second_connection, &mut parts, &mut body)
        .await;
    let (code, message) = refused(verdict).await;
    assert_eq!(code, 429);
    assert!(message.contains("1 connections"), "{message}");
    assert_eq!(
        guard
            .limits()
            .usage(&crate::limits::LimitKey::Cgroup(CgroupId(77))),
        (1, 0)
    );

    // One request in flight (a watch still streaming) fills the pod's quota.
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    let watch = forwarded(
        guard
            .check(&first, &first_connection, &mut parts, &mut body)
            .await,
    );
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    let (code, message) = refused(
        guard
            .check(&first, &first_connection, &mut parts, &mut body)
            .await,
    )
    .await;
    assert_eq!(code, 429);
    assert!(message.contains("1 requests in flight"), "{message}");
    drop(watch);
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    forwarded(
        guard
            .check(&first, &first_connection, &mut parts, &mut body)
            .await,
    );

    // The connection's state goes with the connection.
    drop((first_connection, second_connection));
    assert_eq!(guard.limits().tracked(), 0);
}

// === authenticate ===

#[tokio::test]
async fn a_request_without_a_valid_token_is_refused_with_401() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    parts.headers.remove(header::AUTHORIZATION);
    assert_eq!(
        refused(check(&guard, &mut parts, &mut body).await).await.0,
        401
    );
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    parts.headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer stolen"),
    );
    assert_eq!(
        refused(check(&guard, &mut parts, &mut body).await).await.0,
        401
    );
}

#[tokio::test]
async fn the_caller_carries_the_cgroup_the_kernel_attested() {
    let guard = guard(ALLOW_ALL, |_| {});
    let info = info(Some(attested(90)));
    let connection = guard.connect(&info);
    let (parts, _) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    let caller = authenticate::caller(&guard.parts.authenticator, &connection, &parts)
        .await
        .unwrap();
    assert_eq!(caller.username, AGENT);
    assert_eq!(caller.cgroup_id, Some(CgroupId(91)));
}

// === protect ===

#[tokio::test]
async fn no_policy_lets_an_agent_decide_approvals() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(
        Method::PATCH,
        "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/approvalrequests/apr-1/status",
        "{}",
    );
    let (code, _) = refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(code, 403);
}

#[test]
fn a_built_in_refusal_is_recorded_as_chaperones_own_rule() {
    let decision = protect::decision(&Status::forbidden("chaperone: no"));
    assert_eq!(&*decision.rule, crate::protect::RULE);
    assert_eq!(decision.enforce, crate::policy::Action::Deny);
    assert_eq!(decision.message.as_deref(), Some("chaperone: no"));
}

#[tokio::test]
async fn a_write_carrying_masks_is_refused_before_it_reaches_the_api_server() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(
        Method::PUT,
        "/api/v1/namespaces/agents/secrets/db",
        r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"db"},"stringData":{"password":"<masked by chaperone: 8 bytes>"}}"#,
    );
    let (code, message) = refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("masked by chaperone"), "{message}");

    // The same write with a real value goes through, its body intact.
    let real = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"db"},"stringData":{"password":"hunter2"}}"#;
    let (mut parts, mut body) = request(Method::PUT, "/api/v1/namespaces/agents/secrets/db", real);
    forwarded(check(&guard, &mut parts, &mut body).await);
    let sent = body.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sent, real.as_bytes());
}

// === authorize and hold ===

#[tokio::test]
async fn what_policy_denies_is_refused_with_its_403() {
    let guard = guard(
        "    - name: read
      verbs: [get, list]
      resources: [pods]
      action: allow",
        |_| {},
    );
    let (mut parts, mut body) = request(Method::DELETE, "/api/v1/namespaces/agents/pods/web", "");
    let (code, _) = refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(code, 403);
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods/web", "");
    forwarded(check(&guard, &mut parts, &mut body).await);
}

#[tokio::test]
async fn approve_without_approvals_is_refused_not_forwarded() {
    let guard = guard(
        "    - name: ask
      verbs: [delete]
      resources: [pods]
      action: approve",
        |_| {},
    );
    let (mut parts, mut body) = request(Method::DELETE, "/api/v1/namespaces/agents/pods/web", "");
    let (code, _) = refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(code, 403);
}

#[test]
fn only_approve_with_approvals_running_escapes_the_refusal() {
    let store = policy(
        "    - name: ask
      verbs: [delete]
      resources: [pods]
      action: approve",
    );
    let set = store.snapshot();
    let request = crate::request::RequestInfo::parse(
        &Method::DELETE,
        "/api/v1/namespaces/agents/pods/web",
        None,
    );
    let caller = Caller {
        username: AGENT.into(),
        ..Caller::default()
    };
    let input = PolicyInput::new(&request, &caller);
    let decision = set.evaluate(&input);
    assert!(authorize::refuse_denied(&set, &input, &decision, true).is_ok());
    assert_eq!(
        authorize::refuse_denied(&set, &input, &decision, false)
            .unwrap_err()
            .code,
        403
    );
}

// === credentials ===

#[tokio::test]
async fn passthrough_forwards_the_agents_token_and_never_its_impersonation() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    parts
        .headers
        .insert("impersonate-user", HeaderValue::from_static("system:admin"));
    let forward = forwarded(check(&guard, &mut parts, &mut body).await);
    assert!(!forward.own_credentials);
    assert_eq!(
        parts.headers[header::AUTHORIZATION],
        format!("Bearer {TOKEN}").as_str()
    );
    assert!(!parts.headers.contains_key("impersonate-user"));
}

#[tokio::test]
async fn impersonate_sends_chaperones_credentials_naming_the_caller() {
    let guard = guard(ALLOW_ALL, |parts| {
        parts.credential_mode = CredentialMode::Impersonate;
        parts.own_credentials.token = Some(Arc::new(|| {
            Some(HeaderValue::from_static("Bearer chaperone"))
        }));
    });
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    let forward = forwarded(check(&guard, &mut parts, &mut body).await);
    assert!(forward.own_credentials);
    assert_eq!(parts.headers[header::AUTHORIZATION], "Bearer chaperone");
    assert_eq!(parts.headers["impersonate-user"], AGENT);
}

#[tokio::test]
async fn impersonate_without_chaperones_credentials_is_a_503() {
    let guard = guard(ALLOW_ALL, |parts| {
        parts.credential_mode = CredentialMode::Impersonate;
    });
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    let (code, message) = refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(code, 503);
    assert!(message.contains("own API credentials"), "{message}");
}

// === plan_response and plan_record ===

#[tokio::test]
async fn a_masked_read_asks_for_json_without_gzip_and_is_masked() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/secrets/db", "");
    parts.headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/vnd.kubernetes.protobuf, application/json"),
    );
    parts
        .headers
        .insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    let forward = forwarded(check(&guard, &mut parts, &mut body).await);
    assert!(!parts.headers.contains_key(header::ACCEPT_ENCODING));
    let accept = parts.headers[header::ACCEPT].to_str().unwrap();
    assert!(!accept.contains("protobuf"), "{accept}");
    let transform = forward.response_transform.expect("a masking transform");
    let mut response = http::HeaderMap::new();
    response.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut mask = transform(&response).unwrap().expect("JSON is masked");
    let mut out = Vec::new();
    mask.push(
        br#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"db"},"data":{"password":"aHVudGVyMg=="}}"#,
        &mut out,
    )
    .unwrap();
    mask.finish(&mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(!out.contains("aHVudGVyMg=="), "{out}");
}

#[tokio::test]
async fn a_watch_of_secrets_over_websocket_is_refused_as_unreadable() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(
        Method::GET,
        "/api/v1/namespaces/agents/secrets?watch=true",
        "",
    );
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let (code, message) = refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(code, 400);
    assert!(message.contains("must be masked"), "{message}");
}

#[tokio::test]
async fn every_forwarded_request_carries_its_audit_id_upstream() {
    let guard = guard(ALLOW_ALL, |_| {});
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    parts
        .headers
        .insert("audit-id", HeaderValue::from_static("chosen-by-the-agent"));
    forwarded(check(&guard, &mut parts, &mut body).await);
    let id = parts.headers["audit-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}

// === the exchange ===

/// `chaperone_requests_total` for `decision` (summed over verbs and resources).
fn requests(metrics: &crate::metrics::Metrics, decision: &str) -> u64 {
    let label = format!("decision=\"{decision}\"");
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("chaperone_requests_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn every_request_is_counted_once_whatever_the_stage_that_answered() {
    let guard = guard(ALLOW_ALL, |_| {});
    let metrics = guard.parts.metrics.clone();
    // A refusal before policy (recorded as chaperone's deny).
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    parts.headers.remove(header::AUTHORIZATION);
    refused(check(&guard, &mut parts, &mut body).await).await;
    assert_eq!(
        (requests(&metrics, "deny"), requests(&metrics, "allow")),
        (1, 0)
    );
    // A forward: counted when its response ends, not before.
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    let forward = forwarded(check(&guard, &mut parts, &mut body).await);
    assert_eq!(requests(&metrics, "allow"), 0);
    let observer = forward.observer.expect("the exchange follows the response");
    let mut end = observer
        .on_response(http::StatusCode::OK, &http::HeaderMap::new())
        .expect("the body is followed");
    end.on_data(b"{}");
    end.on_end(Ok(()));
    drop(end);
    assert_eq!(requests(&metrics, "allow"), 1);
    // A request the agent abandons before any response: still counted.
    let (mut parts, mut body) = request(Method::GET, "/api/v1/namespaces/agents/pods", "");
    drop(forwarded(check(&guard, &mut parts, &mut body).await));
    assert_eq!(
        (requests(&metrics, "deny"), requests(&metrics, "allow")),
        (1, 2)
    );
}

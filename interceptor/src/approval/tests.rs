use std::time::Duration;

use serde_json::json;

use super::*;
use crate::identity::PodRef;
use crate::mask::{MaskRules, Masker, marker};
use crate::policy::{Action, Decision, RecordLevel};
use crate::proxy::body::WholeBody;
use crate::request::RequestInfo;

fn parse(method: http::Method, path: &str) -> RequestInfo {
    RequestInfo::parse(&method, path, None)
}

/// A masked Secret value: the base64 of the sized marker.
fn masked_base64(len: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(marker::sized(len))
}

fn agent() -> Caller {
    Caller {
        username: "system:serviceaccount:agents:coder".into(),
        groups: vec!["system:serviceaccounts".into()],
        pod: Some(PodRef {
            namespace: "agents".into(),
            name: "coder-0".into(),
            uid: "u-1".into(),
            ..PodRef::default()
        }),
        ..Caller::default()
    }
}

fn delete_web() -> RequestInfo {
    RequestInfo::parse(
        &http::Method::DELETE,
        "/apis/apps/v1/namespaces/prod-a/deployments/web",
        None,
    )
}

fn ask<'a>(caller: &'a Caller, request: &RequestInfo) -> Ask<'a> {
    Ask {
        caller,
        request: HeldRequest::from_info(request),
        policy: "agent-guard",
        rule: "prod-deletes",
    }
}

fn local() -> (tempfile::TempDir, LocalStore, Arc<Approvals>) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let approvals = Approvals::start(
        Backend::Local(store.clone()),
        "node-a",
        Duration::from_secs(600),
        None,
    );
    (dir, store, approvals)
}

/// The one approval in the store, once the node wrote it.
async fn only(store: &LocalStore) -> ApprovalRequest {
    for _ in 0..100 {
        if let Ok(list) = store.list()
            && list.len() == 1
        {
            return list.into_iter().next().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no approval: {:?}", store.list());
}

fn decide(store: &LocalStore, id: &str, state: &str, by: &str, extra: serde_json::Value) {
    let mut status = json!({"state": state, "decidedBy": by, "decidedAt": format_time(OffsetDateTime::now_utc())});
    store::merge(&mut status, &extra);
    store.patch_status(id, &status).unwrap();
}

#[tokio::test]
async fn a_held_request_goes_through_once_a_person_approves_it() {
    let (_dir, store, approvals) = local();
    let caller = agent();
    let request = delete_web();
    let hold = tokio::spawn({
        let approvals = approvals.clone();
        let caller = caller.clone();
        let request = request.clone();
        async move {
            approvals
                .hold(ask(&caller, &request), Duration::from_secs(10), async {
                    Some(json!({"kind": "Deployment"}))
                })
                .await
        }
    });
    let pending = only(&store).await;
    assert_eq!(pending.state(), State::Pending);
    assert_eq!(pending.spec.requester.username, caller.username);
    assert_eq!(pending.spec.requester.pod.as_ref().unwrap().name, "coder-0");
    assert_eq!(pending.spec.request.resource, "deployments");
    assert_eq!(pending.spec.preview, Some(json!({"kind": "Deployment"})));
    assert_eq!(pending.spec.hold_seconds, Some(10));
    decide(&store, pending.name(), "Approved", "local:alice", json!({}));
    let outcome = hold.await.unwrap();
    assert_eq!(
        outcome,
        Outcome::Approved(Decided {
            id: pending.name().into(),
            by: "local:alice".into(),
            reason: None,
        })
    );
    // Used once: the same request again asks anew.
    let used = store.read(pending.name()).unwrap();
    assert!(used.is_used(), "{used:?}");
    let again = approvals
        .hold(ask(&caller, &request), Duration::from_millis(300), async {
            None
        })
        .await;
    assert!(
        matches!(&again, Outcome::StillPending { id, created: true } if id != pending.name()),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_retry_finds_the_pending_approval_instead_of_making_another() {
    let (_dir, store, approvals) = local();
    let caller = agent();
    let request = delete_web();
    let first = approvals
        .hold(ask(&caller, &request), Duration::from_millis(200), async {
            None
        })
        .await;
    let Outcome::StillPending { id, created: true } = first else {
        panic!("{first:?}");
    };
    let second = approvals
        .hold(ask(&caller, &request), Duration::from_millis(200), async {
            None
        })
        .await;
    assert_eq!(
        second,
        Outcome::StillPending {
            id: id.clone(),
            created: false
        }
    );
    assert_eq!(store.list().unwrap().len(), 1);
    // Another caller's identical request is another approval.
    let other = Caller {
        username: "system:serviceaccount:agents:other".into(),
        ..agent()
    };
    let third = approvals
        .hold(ask(&other, &request), Duration::from_millis(100), async {
            None
        })
        .await;
    assert!(matches!(third, Outcome::StillPending { created: true, .. }));
    assert_eq!(store.list().unwrap().len(), 2);
}

#[tokio::test]
async fn the_requester_never_decides_its_own_request() {
    let (_dir, store, approvals) = local();
    let caller = agent();
    let request = delete_web();
    let first = approvals
        .hold(ask(&caller, &request), Duration::from_millis(100), async {
            None
        })
        .await;
    let id = first.id().unwrap().to_owned();
    decide(&store, &id, "Approved", &caller.username, json!({}));
    let outcome = approvals
        .hold(ask(&caller, &request), Duration::from_millis(600), async {
            None
        })
        .await;
    assert!(
        matches!(outcome, Outcome::StillPending { .. }),
        "{outcome:?}"
    );
    let object = store.read(&id).unwrap();
    assert_eq!(object.state(), State::Pending);
    let why = object.status.unwrap().refused_decision.unwrap();
    assert!(why.contains("cannot decide it"), "{why}");
}

#[tokio::test]
async fn denials_carry_the_reason_and_expiry_is_reported() {
    let (_dir, store, approvals) = local();
    let caller = agent();
    let request = delete_web();
    let id = approvals
        .hold(ask(&caller, &request), Duration::from_millis(100), async {
            None
        })
        .await
        .id()
        .unwrap()
        .to_owned();
    decide(
        &store,
        &id,
        "Denied",
        "local:alice",
        json!({"reason": "not today"}),
    );
    let outcome = approvals
        .hold(ask(&caller, &request), Duration::from_secs(5), async {
            None
        })
        .await;
    assert_eq!(
        outcome,
        Outcome::Denied(Decided {
            id: id.clone(),
            by: "local:alice".into(),
            reason: Some("not today".into()),
        })
    );

    let (_dir, _store, approvals) = {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let approvals = Approvals::start(
            Backend::Local(store.clone()),
            "node-a",
            Duration::from_secs(1),
            None,
        );
        (dir, store, approvals)
    };
    let outcome = approvals
        .hold(ask(&caller, &request), Duration::from_secs(8), async {
            None
        })
        .await;
    assert!(matches!(outcome, Outcome::Expired { .. }), "{outcome:?}");
}

#[tokio::test]
async fn a_grant_covers_the_same_caller_and_rule_until_revoked() {
    let (_dir, store, approvals) = local();
    let caller = agent();
    let id = approvals
        .hold(
            ask(&caller, &delete_web()),
            Duration::from_millis(100),
            async { None },
        )
        .await
        .id()
        .unwrap()
        .to_owned();
    let until = format_time(OffsetDateTime::now_utc() + time::Duration::hours(1));
    decide(
        &store,
        &id,
        "Approved",
        "local:alice",
        json!({"grant": "1h", "grantExpiresAt": until}),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let api = RequestInfo::parse(
        &http::Method::DELETE,
        "/apis/apps/v1/namespaces/prod-a/deployments/api",
        None,
    );
    let outcome = approvals
        .hold(ask(&caller, &api), Duration::from_millis(100), async {
            None
        })
        .await;
    assert!(
        matches!(&outcome, Outcome::Granted { decided, .. } if decided.id == id),
        "{outcome:?}"
    );
    // Another rule is not covered.
    let other_rule = Ask {
        rule: "other",
        ..ask(&caller, &api)
    };
    let outcome = approvals
        .hold(other_rule, Duration::from_millis(100), async { None })
        .await;
    assert!(
        matches!(outcome, Outcome::StillPending { .. }),
        "{outcome:?}"
    );
    // Revoked: held again.
    store
        .patch_status(&id, &json!({"revokedBy": "local:alice"}))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let outcome = approvals
        .hold(ask(&caller, &api), Duration::from_millis(100), async {
            None
        })
        .await;
    assert!(
        matches!(outcome, Outcome::StillPending { .. }),
        "{outcome:?}"
    );
}

#[test]
fn the_refusal_names_the_approval_and_how_to_approve_it() {
    let decision = Decision {
        action: Action::Approve,
        enforce: Action::Approve,
        record: RecordLevel::Metadata,
        policy: "agent-guard".into(),
        rule: "prod-deletes".into(),
        message: None,
        dry_run: false,
        hold_timeout: Some(Duration::from_secs(60)),
    };
    let status = refusal(
        &Outcome::StillPending {
            id: "apr-12345678".into(),
            created: true,
        },
        "kubectl chaperone approve apr-12345678",
        &decision,
        &delete_web(),
        Duration::from_secs(60),
    );
    assert_eq!(status.code, 403);
    assert!(
        status.message.contains("Approval apr-12345678 is pending")
            && status
                .message
                .contains("`kubectl chaperone approve apr-12345678`")
            && status
                .message
                .contains("retry the same request after it is approved")
            && status
                .message
                .contains("deployments.apps \"web\" in namespace \"prod-a\""),
        "{}",
        status.message
    );
    assert_eq!(
        status.causes,
        vec![(APPROVAL_CAUSE.to_owned(), "apr-12345678".to_owned())]
    );
}

#[test]
fn agents_never_write_approvals() {
    let base = "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/approvalrequests";
    assert!(writes_approvals(&parse(
        http::Method::PATCH,
        &format!("{base}/apr-1/status")
    )));
    assert!(writes_approvals(&parse(
        http::Method::DELETE,
        &format!("{base}/apr-1")
    )));
    assert!(writes_approvals(&parse(http::Method::POST, base)));
    assert!(!writes_approvals(&parse(http::Method::GET, base)));
    assert!(!writes_approvals(&parse(
        http::Method::GET,
        &format!("{base}/apr-1")
    )));
}

#[test]
fn previews_keep_no_secret_values_and_no_managed_fields() {
    let masker = Masker::new(&MaskRules::default()).unwrap();
    let secret = parse(http::Method::DELETE, "/api/v1/namespaces/prod-a/secrets/db");
    let preview = preview_summary(preview::mask_object(
        &masker,
        &secret,
        json!({
            "kind": "Secret", "apiVersion": "v1",
            "metadata": {"name": "db", "managedFields": [{}],
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"p\":\"aHVudGVy\"}}"}},
            "data": {"p": "aHVudGVy"},
        }),
    ));
    let text = preview.to_string();
    assert!(
        !text.contains("aHVudGVy") && !text.contains("managedFields"),
        "{text}"
    );
    assert_eq!(preview["data"]["p"], masked_base64(6));
    let error = preview_summary(
        json!({"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound", "message": "gone", "metadata": {}}),
    );
    assert_eq!(
        error,
        json!({"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound", "message": "gone"})
    );
    let big = preview_summary(
        json!({"kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"x": "y".repeat(100_000)}}),
    );
    assert_eq!(big["metadata"]["name"], "big");
    assert!(big["note"].is_string());
}

#[test]
fn slack_notifications_say_who_wants_what_and_how_to_approve() {
    let caller = agent();
    let mut object = ApprovalRequest::new(
        "apr-0000abcd",
        ApprovalRequestSpec {
            requester: Requester::from_caller(&caller),
            request: HeldRequest::from_info(&delete_web()),
            policy: "agent-guard".into(),
            rule: "prod-deletes".into(),
            preview: None,
            expires_at: "2026-11-23T15:00:00Z".into(),
            hold_seconds: Some(60),
            node: None,
        },
    );
    object.metadata.namespace = Some("chaperone-system".into());
    let slack = notify::payload(notify::Format::Slack, &object);
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.contains("system:serviceaccount:agents:coder"),
        "{text}"
    );
    assert!(
        text.contains("kubectl chaperone approve apr-0000abcd"),
        "{text}"
    );
    let fields = slack["attachments"][0]["fields"].as_array().unwrap();
    assert!(
        fields
            .iter()
            .any(|f| f["title"] == "Pod" && f["value"] == "agents/coder-0")
    );
    let generic = notify::payload(notify::Format::Json, &object);
    assert_eq!(generic["kind"], "ApprovalRequested");
    assert_eq!(generic["approval"]["spec"]["rule"], "prod-deletes");
}

#[tokio::test]
async fn notifications_are_retried_until_the_webhook_answers() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let (got_tx, mut got_rx) = tokio::sync::mpsc::channel::<serde_json::Value>(4);
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            let got = got_tx.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let counter = counter.clone();
                        let got = got.clone();
                        async move {
                            let n = counter.fetch_add(1, Ordering::SeqCst);
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .unwrap()
                                .to_bytes();
                            let code = if n == 0 {
                                503
                            } else {
                                let _ = got.send(serde_json::from_slice(&body).unwrap()).await;
                                200
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(code)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let notifier = notify::Notifier::start(
        format!("http://{addr}/hook").parse().unwrap(),
        notify::Format::Json,
    )
    .unwrap();
    let mut object = ApprovalRequest::new(
        "apr-0000beef",
        ApprovalRequestSpec {
            requester: Requester::default(),
            request: HeldRequest::default(),
            policy: "p".into(),
            rule: "r".into(),
            preview: None,
            expires_at: "2026-11-23T15:00:00Z".into(),
            hold_seconds: None,
            node: None,
        },
    );
    object.metadata.namespace = Some("chaperone-system".into());
    notifier.requested(&object);
    let got = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got["id"], "apr-0000beef");
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the first attempt failed and was retried"
    );
}

#[tokio::test]
async fn the_plugin_decides_and_grants_in_local_mode() {
    use clap::Parser;
    let (dir, store, approvals) = local();
    let caller = agent();
    let id = approvals
        .hold(
            ask(&caller, &delete_web()),
            Duration::from_millis(50),
            async { None },
        )
        .await
        .id()
        .unwrap()
        .to_owned();
    let run = |args: &[&str]| {
        let mut full = vec![
            "kubectl-chaperone",
            "--local-dir",
            dir.path().to_str().unwrap(),
        ];
        full.extend_from_slice(args);
        cli::PluginCli::try_parse_from(full).unwrap()
    };
    let mut out = Vec::new();
    cli::run(run(&["approvals"]), &mut out).await.unwrap();
    let listing = String::from_utf8_lossy(&out).into_owned();
    assert!(
        listing.contains(&id) && listing.contains("Pending"),
        "{listing}"
    );

    let mut out = Vec::new();
    cli::run(
        run(&["approve", &id, "--reason", "ok", "--grant", "15m"]),
        &mut out,
    )
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out).into_owned();
    assert!(
        said.contains(&format!("approved {id}")) && said.contains("for 15m"),
        "{said}"
    );
    let object = store.read(&id).unwrap();
    let status = object.status.clone().unwrap();
    assert_eq!(status.state, State::Approved);
    assert!(status.decided_by.unwrap().starts_with("local:"));
    assert_eq!(status.grant.as_deref(), Some("15m"));
    assert!(object.grant_until().is_some());

    // Deciding twice is refused; grants list and revoke.
    let again = cli::run(run(&["deny", &id]), &mut Vec::new()).await;
    assert!(again.unwrap_err().to_string().contains("already Approved"));
    let mut out = Vec::new();
    cli::run(run(&["grants"]), &mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).contains(&id));
    cli::run(run(&["revoke", &id]), &mut Vec::new())
        .await
        .unwrap();
    let revoked = store.read(&id).unwrap();
    assert!(revoked.grant_until().is_none(), "{revoked:?}");
    assert!(revoked.status.unwrap().revoked_by.is_some());
}

fn body(text: &str) -> WholeBody {
    WholeBody::Complete(bytes::Bytes::copy_from_slice(text.as_bytes()))
}

#[test]
fn a_body_summary_masks_secret_values_and_drops_managed_fields() {
    let masker = Masker::new(&MaskRules::default()).unwrap();
    let create = parse(http::Method::POST, "/api/v1/namespaces/prod-a/secrets");
    let summary = preview::body_summary(
        &masker,
        &create,
        Some("application/json"),
        &body(
            r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"db","managedFields":[{"manager":"x"}]},
                "data":{"password":"aHVudGVyMg=="},"stringData":{"token":"s3cr3t-t0ken"}}"#,
        ),
    )
    .unwrap();
    assert!(summary.contains(r#""name":"db""#), "{summary}");
    assert!(summary.contains(&masked_base64(7)), "{summary}");
    assert!(
        !summary.contains("aHVudGVyMg")
            && !summary.contains("s3cr3t")
            && !summary.contains("managedFields"),
        "{summary}"
    );

    // A server-side apply (YAML) of a Secret: masked the same way.
    let apply = parse(http::Method::PATCH, "/api/v1/namespaces/prod-a/secrets/db");
    let summary = preview::body_summary(
        &masker,
        &apply,
        Some("application/apply-patch+yaml"),
        &body("apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\nstringData:\n  token: s3cr3t-t0ken\n"),
    )
    .unwrap();
    assert!(
        summary.contains(marker::PREFIX) && !summary.contains("s3cr3t"),
        "{summary}"
    );

    // A JSON patch on a Secret: its values are masked whole.
    let summary = preview::body_summary(
        &masker,
        &apply,
        Some("application/json-patch+json"),
        &body(r#"[{"op":"replace","path":"/data/password","value":"aHVudGVyMg=="}]"#),
    )
    .unwrap();
    assert!(summary.contains(r#""path":"/data/password""#), "{summary}");
    assert!(!summary.contains("aHVudGVyMg"), "{summary}");

    // ...and on a kind nothing is masked in, shown as sent.
    let scale = parse(
        http::Method::PATCH,
        "/apis/apps/v1/namespaces/prod-a/deployments/web",
    );
    let summary = preview::body_summary(
        &masker,
        &scale,
        Some("application/strategic-merge-patch+json"),
        &body(r#"{"spec":{"replicas":5}}"#),
    )
    .unwrap();
    assert_eq!(summary, r#"{"spec":{"replicas":5}}"#);
}

#[test]
fn a_body_summary_says_what_it_could_not_read_and_stays_bounded() {
    let masker = Masker::new(&MaskRules::default()).unwrap();
    let create = parse(http::Method::POST, "/api/v1/namespaces/prod-a/secrets");
    let protobuf = preview::body_summary(
        &masker,
        &create,
        Some("application/vnd.kubernetes.protobuf"),
        &WholeBody::Complete(bytes::Bytes::from_static(b"k8s\0\x0a\x02v1secret-bytes")),
    )
    .unwrap();
    assert_eq!(protobuf, "protobuf body, 20 bytes");
    let large = preview::body_summary(
        &masker,
        &create,
        Some("application/json"),
        &WholeBody::TooLarge { read: 0 },
    )
    .unwrap();
    assert!(large.contains("larger than 1048576 bytes"), "{large}");
    let configmap = parse(http::Method::POST, "/api/v1/namespaces/prod-a/configmaps");
    let big = format!(
        r#"{{"kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"x":"{}"}}}}"#,
        "y".repeat(100_000)
    );
    let summary = preview::body_summary(&masker, &configmap, None, &body(&big)).unwrap();
    assert!(summary.len() < 5000, "{}", summary.len());
    assert!(summary.ends_with("bytes)"), "{summary}");
    assert_eq!(
        preview::body_summary(&masker, &configmap, None, &body("")),
        None
    );
}

#[test]
fn a_preview_diff_lists_changed_paths_with_masked_values() {
    let masker = Masker::new(&MaskRules::default()).unwrap();
    let patch = parse(
        http::Method::PATCH,
        "/apis/apps/v1/namespaces/prod-a/deployments/web",
    );
    let before = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "prod-a", "resourceVersion": "7", "generation": 1,
            "labels": {"app": "web"}},
        "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "app", "image": "app:1",
            "env": [{"name": "DB_PASSWORD", "value": "hunter2-old"}]}]}}},
    });
    let mut after = before.clone();
    after["metadata"]["resourceVersion"] = json!("8");
    after["metadata"]["generation"] = json!(2);
    after["metadata"]["labels"]["app.kubernetes.io/name"] = json!("web");
    after["spec"]["replicas"] = json!(5);
    after["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = json!("hunter2-new");
    let preview = preview::changes(&masker, &patch, &before, &after);
    assert_eq!(preview["kind"], "Deployment");
    assert_eq!(preview["metadata"]["name"], "web");
    let changes = preview["changes"].as_array().unwrap();
    let paths: Vec<&str> = changes
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            r#"metadata.labels["app.kubernetes.io/name"]"#,
            "spec.replicas",
            "spec.template.spec.containers[0].env[0].value",
        ]
    );
    assert_eq!(changes[0].get("old"), None);
    assert_eq!(changes[0]["new"], "web");
    assert_eq!(changes[1]["old"], 2);
    assert_eq!(changes[1]["new"], 5);
    // The env value changed; both sides are masked.
    let text = preview.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        changes[2]["new"]
            .as_str()
            .unwrap()
            .starts_with(marker::PREFIX),
        "{text}"
    );

    // A Secret's changed value: the path shows, the values do not.
    let secret = parse(http::Method::PUT, "/api/v1/namespaces/prod-a/secrets/db");
    let before = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
        "data": {"password": "b2xkLXB3"}});
    let after = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
        "data": {"password": "bmV3LXB3"}, "type": "Opaque"});
    let preview = preview::changes(&masker, &secret, &before, &after);
    let text = preview.to_string();
    assert!(
        !text.contains("b2xkLXB3") && !text.contains("bmV3LXB3"),
        "{text}"
    );
    assert_eq!(preview["changes"][0]["path"], "data.password");
    assert_eq!(preview["changes"][0]["new"], masked_base64(6));
    assert_eq!(preview["changes"][1]["path"], "type");
    assert_eq!(preview["changes"][1].get("old"), None);

    // Many changes: listed up to a bound, the rest counted.
    let before = json!({"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}});
    let mut after = before.clone();
    for i in 0..80 {
        after["data"][format!("k{i:02}")] = json!("v");
    }
    let preview = preview::changes(
        &masker,
        &parse(http::Method::PUT, "/api/v1/namespaces/a/configmaps/c"),
        &before,
        &after,
    );
    assert_eq!(preview["changes"].as_array().unwrap().len(), 50);
    assert_eq!(preview["changesOmitted"], 30);
}

async fn next(got: &mut tokio::sync::mpsc::Receiver<serde_json::Value>) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(10), got.recv())
        .await
        .expect("a notification")
        .unwrap()
}

/// A webhook receiver: every JSON payload it gets, in order.
async fn webhook() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<serde_json::Value>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::mpsc::channel::<serde_json::Value>(16);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let got = got_tx.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let got = got.clone();
                        async move {
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .unwrap()
                                .to_bytes();
                            let _ = got.send(serde_json::from_slice(&body).unwrap()).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, got_rx)
}

#[tokio::test]
async fn decisions_and_expiries_are_announced_once_with_who_decided() {
    let (addr, mut got) = webhook().await;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let notifier = notify::Notifier::start(
        format!("http://{addr}/hook").parse().unwrap(),
        notify::Format::Json,
    )
    .unwrap();
    let approvals = Approvals::start(
        Backend::Local(store.clone()),
        "node-a",
        Duration::from_secs(3),
        Some(notifier),
    );
    let caller = agent();
    let denied = approvals
        .hold(
            ask(&caller, &delete_web()),
            Duration::from_millis(50),
            async { None },
        )
        .await;
    let denied = denied.id().unwrap().to_owned();
    let requested = next(&mut got).await;
    assert_eq!(requested["kind"], "ApprovalRequested");
    assert_eq!(requested["id"], denied.as_str());
    store
        .decide(
            &denied,
            &super::Ruling {
                state: State::Denied,
                by: "alice".into(),
                groups: Vec::new(),
                reason: Some("not during the sale".into()),
                grant: None,
                grant_scope: None,
            },
        )
        .unwrap();
    let decided = next(&mut got).await;
    assert_eq!(decided["kind"], "ApprovalDecided", "{decided}");
    assert_eq!(decided["id"], denied.as_str());
    assert_eq!(decided["state"], "Denied");
    assert_eq!(decided["by"], "alice");
    assert_eq!(decided["reason"], "not during the sale");

    // Nobody decides the next one: its expiry is announced.
    let other = parse(
        http::Method::DELETE,
        "/apis/apps/v1/namespaces/prod-a/deployments/db",
    );
    let expiring = approvals
        .hold(ask(&caller, &other), Duration::from_millis(50), async {
            None
        })
        .await;
    let expiring = expiring.id().unwrap().to_owned();
    assert_eq!(next(&mut got).await["kind"], "ApprovalRequested");
    let expired = next(&mut got).await;
    assert_eq!(expired["kind"], "ApprovalDecided");
    assert_eq!(expired["id"], expiring.as_str());
    assert_eq!(expired["state"], "Expired");
    // Each is announced once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(got.try_recv().is_err());
}

#[test]
fn slack_decisions_say_who_decided_and_why() {
    let caller = agent();
    let mut object = ApprovalRequest::new(
        "apr-0000abcd",
        ApprovalRequestSpec {
            requester: Requester::from_caller(&caller),
            request: HeldRequest::from_info(&delete_web()),
            policy: "agent-guard".into(),
            rule: "prod-deletes".into(),
            preview: None,
            expires_at: "2026-11-23T15:00:00Z".into(),
            hold_seconds: Some(60),
            node: None,
        },
    );
    object.status = Some(ApprovalStatus {
        state: State::Approved,
        decided_by: Some("alice".into()),
        reason: Some("planned cleanup".into()),
        grant: Some("15m".into()),
        grant_expires_at: Some("2026-11-23T15:15:00Z".into()),
        ..ApprovalStatus::default()
    });
    let slack = notify::decision_payload(notify::Format::Slack, &object);
    let text = slack["text"].as_str().unwrap();
    assert!(text.contains("alice approved apr-0000abcd"), "{text}");
    assert!(text.contains("delete deployments.apps \"web\""), "{text}");
    let fields: Vec<(String, String)> = slack["attachments"][0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["title"].as_str().unwrap().to_owned(),
                f["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (title, value) in [
        ("Decision", "Approved"),
        ("By", "alice"),
        ("Reason", "planned cleanup"),
        ("Grant", "15m (until 2026-11-23T15:15:00Z)"),
    ] {
        assert!(
            fields.contains(&(title.to_owned(), value.to_owned())),
            "{fields:?}"
        );
    }
}

/// The deployed CRD's schema is written by hand: it must have exactly the
/// fields of `ApprovalRequest`, or a real API server prunes what a node
/// writes (the body hash, the preview) and approvals stop matching.
#[test]
fn the_deployed_crd_has_the_fields_of_the_rust_type() {
    use kube::CustomResourceExt;
    let deployed: serde_json::Value = serde_yaml::from_str(include_str!(
        "../../../deploy/base/crds/approvalrequests.chaperone.dev.yaml"
    ))
    .unwrap();
    let generated = serde_json::to_value(ApprovalRequest::crd()).unwrap();
    assert_eq!(
        crate::crd_schema::of_crd(&deployed),
        crate::crd_schema::of_crd(&generated),
        "deploy/base/crds/approvalrequests.chaperone.dev.yaml and ApprovalRequest disagree"
    );
}

/// Cluster mode with the webhook's key: a decision counts only when the
/// webhook attested it, and even then never the requester's own, nor one
/// by chaperone's own service accounts. (The SubjectAccessReview after
/// these checks needs an API server: the end-to-end tests.)
#[tokio::test]
async fn cluster_mode_accepts_only_attested_decisions_by_someone_else() {
    use attest::{Attestation, Signer, UserInfo, Verifier, attest_write};
    let signer = Signer::generate();
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let approvals = Approvals::start_attested(
        Backend::Cluster {
            client,
            namespace: "chaperone-system".into(),
        },
        "node-a",
        Duration::from_secs(600),
        None,
        Some(Verifier::from_pem(&signer.public_key_pem()).unwrap()),
    );
    let caller = agent();
    let mut pending = approvals.new_object(
        &ask(&caller, &delete_web()),
        "key",
        OffsetDateTime::now_utc(),
        Duration::from_secs(30),
        None,
    );
    pending.metadata.uid = Some("uid-1".into());
    let forged: ApprovalStatus = serde_json::from_value(json!({
        "state": "Approved", "decidedBy": "anyone", "decidedByGroups": ["system:masters"],
    }))
    .unwrap();
    let why = approvals
        .judge(&pending, &forged)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        why.contains("forgery") && why.contains("no attestation"),
        "{why}"
    );

    let mut bad = forged.clone();
    bad.attestation = Some(Attestation {
        key_id: signer.sign(&pending, &forged).key_id,
        signature: "AAAA".into(),
    });
    let why = approvals
        .judge(&pending, &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(why.contains("forgery"), "{why}");

    // Attested, but by the requester (the agent's own identity) or by a
    // chaperone service account.
    let decided_by = |user: UserInfo| {
        let mut written = pending.clone();
        written.status = Some(ApprovalStatus {
            state: State::Approved,
            ..ApprovalStatus::default()
        });
        attest_write(
            &signer,
            Some(&pending),
            &written,
            &user,
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    };
    let own = decided_by(UserInfo {
        username: caller.username.clone(),
        groups: caller.groups.clone(),
    });
    let why = approvals
        .judge(&pending, &own)
        .await
        .unwrap_err()
        .to_string();
    assert!(why.contains("requested this approval"), "{why}");
    let node = decided_by(UserInfo {
        username: "system:serviceaccount:chaperone-system:chaperone-node".into(),
        groups: vec!["system:serviceaccounts:chaperone-system".into()],
    });
    let why = approvals
        .judge(&pending, &node)
        .await
        .unwrap_err()
        .to_string();
    assert!(why.contains("chaperone's own service accounts"), "{why}");
}

/// The request as the pipeline holds it: read, then bound to the
/// canonical target it forwards (query included).
fn held(method: http::Method, path: &str, query: Option<&str>) -> HeldRequest {
    let info = RequestInfo::parse(&method, path, query);
    let mut request = HeldRequest::from_info(&info);
    let uri: http::Uri = match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    }
    .parse()
    .unwrap();
    request.bind(&method, &uri);
    request
}

fn ask_for<'a>(caller: &'a Caller, request: HeldRequest) -> Ask<'a> {
    Ask {
        caller,
        request,
        policy: "agent-guard",
        rule: "prod-deletes",
    }
}

#[tokio::test]
async fn an_approval_of_a_dry_run_does_not_release_the_real_request() {
    let (_dir, store, approvals) = local();
    let caller = agent();
    let path = "/apis/apps/v1/namespaces/prod-a/deployments/web";
    let dry_run = held(http::Method::DELETE, path, Some("dryRun=All"));
    assert_eq!(dry_run.method, "DELETE");
    assert_eq!(dry_run.target, format!("{path}?dryRun=All"));
    assert_eq!(dry_run.query(), "dryRun=All");
    let first = approvals
        .hold(
            ask_for(&caller, dry_run.clone()),
            Duration::from_millis(100),
            async { None },
        )
        .await;
    let Outcome::StillPending { id, created: true } = first else {
        panic!("{first:?}");
    };
    decide(&store, &id, "Approved", "local:alice", json!({}));
    tokio::time::sleep(Duration::from_millis(600)).await;

    // The same delete without dryRun, or with a label selector, is not
    // what alice approved: each asks anew, and alice's approval stays
    // unused for the request she saw.
    for (query, what) in [
        (None, "no dryRun"),
        (Some("labelSelector=app%3Dweb"), "a selector"),
    ] {
        let other = held(http::Method::DELETE, path, query);
        let outcome = approvals
            .hold(ask_for(&caller, other), Duration::from_millis(200), async {
                None
            })
            .await;
        assert!(
            matches!(&outcome, Outcome::StillPending { id: new, created: true } if *new != id),
            "{what}: {outcome:?}"
        );
    }
    assert!(!store.read(&id).unwrap().is_used());
    // The approved request itself goes through.
    let outcome = approvals
        .hold(ask_for(&caller, dry_run), Duration::from_secs(2), async {
            None
        })
        .await;
    assert!(
        matches!(outcome, Outcome::Approved(ref d) if d.id == id),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn an_approval_whose_label_names_another_request_releases_nothing() {
    let (_dir, store, approvals) = local();
    let caller = agent();
    let path = "/apis/apps/v1/namespaces/prod-a/deployments/web";
    let approved = held(http::Method::DELETE, path, Some("dryRun=All"));
    let first = approvals
        .hold(
            ask_for(&caller, approved),
            Duration::from_millis(100),
            async { None },
        )
        .await;
    let Outcome::StillPending { id, .. } = first else {
        panic!("{first:?}");
    };
    // Its request-key label rewritten to the key of the real delete (a
    // collision of the shortened hash, or a hand edit).
    let real = held(http::Method::DELETE, path, None);
    let mut object = store.read(&id).unwrap();
    object.metadata.labels.as_mut().unwrap().insert(
        REQUEST_KEY_LABEL.to_owned(),
        request_key(&caller, &real, "agent-guard", "prod-deletes"),
    );
    store.write(&object).unwrap();
    decide(&store, &id, "Approved", "local:alice", json!({}));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let outcome = approvals
        .hold(ask_for(&caller, real), Duration::from_millis(200), async {
            None
        })
        .await;
    assert!(
        matches!(&outcome, Outcome::StillPending { id: new, created: true } if *new != id),
        "{outcome:?}"
    );
    assert!(!store.read(&id).unwrap().is_used());
}

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::identity::PodRef;
use crate::policy::{Action, Decision, RecordLevel};
use crate::request::RequestInfo;

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
    let parse = |m: http::Method, p: &str| RequestInfo::parse(&m, p, None);
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
    let preview = preview_summary(json!({
        "kind": "Secret", "apiVersion": "v1",
        "metadata": {"name": "db", "managedFields": [{}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"p\":\"aHVudGVy\"}}"}},
        "data": {"p": "aHVudGVy"},
    }));
    let text = preview.to_string();
    assert!(
        !text.contains("aHVudGVy") && !text.contains("managedFields"),
        "{text}"
    );
    assert_eq!(preview["data"]["p"], "<masked by chaperone>");
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

//! The node agent's audit webhook sink, end to end: a real kubectl agent's
//! requests reach a webhook receiver as `audit.k8s.io/v1` `EventList`
//! batches, with chaperone's decision annotations, each `auditID` once.
//! Needs root.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chaperone_tests::{
    e2e::{World, WorldSpec, run_for},
    require_root,
};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: audited
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: no-deletes
      verbs: [delete]
      action: deny
  defaultAction: allow
"#;

type Received = Arc<Mutex<Vec<serde_json::Value>>>;

/// An HTTP audit webhook on 127.0.0.1 that keeps every `EventList` it gets.
fn receiver(runtime: &tokio::runtime::Runtime) -> (u16, Received) {
    let received: Received = Arc::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let store = received.clone();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        store.lock().unwrap().push(list);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, received)
}

#[test]
fn agent_requests_reach_the_audit_webhook_with_chaperones_decisions() {
    require_root!();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (port, received) = receiver(&runtime);
    let world = World::start(WorldSpec {
        policy: POLICY.into(),
        node_args: vec![
            "--audit-webhook".into(),
            format!("http://127.0.0.1:{port}/audit"),
            "--audit-webhook-batch-seconds".into(),
            "1".into(),
        ],
        ..WorldSpec::default()
    })
    .unwrap();
    let get = run_for(
        &mut world.agent_kubectl(&["get", "configmaps", "-n", "default"]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(get.status.success(), "{get:?}");
    let delete = run_for(
        &mut world.agent_kubectl(&["delete", "configmap", "anything", "-n", "default"]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(!delete.status.success());

    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events: Vec<serde_json::Value> = received
            .lock()
            .unwrap()
            .iter()
            .inspect(|list| {
                assert_eq!(list["kind"], "EventList");
                assert_eq!(list["apiVersion"], "audit.k8s.io/v1");
            })
            .flat_map(|list| list["items"].as_array().cloned().unwrap_or_default())
            .collect();
        let has = |verb: &str, decision: &str| {
            events.iter().any(|e| {
                e["verb"] == verb && e["annotations"]["chaperone.dev/decision"] == decision
            })
        };
        if has("list", "allow") && has("delete", "deny") {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook did not get both requests in 30 s: {events:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut seen = HashMap::new();
    for event in &events {
        assert_eq!(event["kind"], "Event");
        assert_eq!(
            event["user"]["username"],
            "system:serviceaccount:default:agent"
        );
        let id = event["auditID"].as_str().expect("auditID").to_owned();
        *seen
            .entry((id, event["stage"].as_str().unwrap_or("").to_owned()))
            .or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "an auditID/stage arrived twice: {seen:?}"
    );
    let denied = events.iter().find(|e| e["verb"] == "delete").unwrap();
    assert_eq!(denied["responseStatus"]["code"], 403);
    assert_eq!(denied["annotations"]["chaperone.dev/rule"], "no-deletes");
    assert_eq!(denied["objectRef"]["name"], "anything");
}

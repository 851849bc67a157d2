use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::*;
use crate::policy::{Action, RecordLevel};
use crate::record::testing::exchange;
use crate::record::{Stage, UserInfo};

// === the audit.k8s.io/v1 schema, from types.go ===

#[derive(Clone, Copy)]
enum Ty {
    Str,
    /// A string the API server omits when empty (`omitempty`).
    NonEmptyStr,
    Int,
    MicroTime,
    Uid,
    Level,
    Stage,
    StrList,
    StrMap,
    ExtraMap,
    User,
    ObjectRef,
    Status,
    /// `runtime.Unknown` rendered as its JSON.
    Object,
}

/// `(field, type, required)` in the order the Go structs declare them.
const EVENT: &[(&str, Ty, bool)] = &[
    ("kind", Ty::Str, true),
    ("apiVersion", Ty::Str, true),
    ("level", Ty::Level, true),
    ("auditID", Ty::Uid, true),
    ("stage", Ty::Stage, true),
    ("requestURI", Ty::Str, true),
    ("verb", Ty::Str, true),
    ("user", Ty::User, true),
    ("impersonatedUser", Ty::User, false),
    ("sourceIPs", Ty::StrList, false),
    ("userAgent", Ty::NonEmptyStr, false),
    ("objectRef", Ty::ObjectRef, false),
    ("responseStatus", Ty::Status, false),
    ("requestObject", Ty::Object, false),
    ("responseObject", Ty::Object, false),
    ("requestReceivedTimestamp", Ty::MicroTime, true),
    ("stageTimestamp", Ty::MicroTime, true),
    ("annotations", Ty::StrMap, false),
];

const USER: &[(&str, Ty, bool)] = &[
    ("username", Ty::NonEmptyStr, false),
    ("uid", Ty::NonEmptyStr, false),
    ("groups", Ty::StrList, false),
    ("extra", Ty::ExtraMap, false),
];

const OBJECT_REF: &[(&str, Ty, bool)] = &[
    ("resource", Ty::NonEmptyStr, false),
    ("namespace", Ty::NonEmptyStr, false),
    ("name", Ty::NonEmptyStr, false),
    ("uid", Ty::NonEmptyStr, false),
    ("apiGroup", Ty::NonEmptyStr, false),
    ("apiVersion", Ty::NonEmptyStr, false),
    ("resourceVersion", Ty::NonEmptyStr, false),
    ("subresource", Ty::NonEmptyStr, false),
];

/// metav1.Status: TypeMeta (omitempty), ListMeta (a struct: always there),
/// status, message, reason, details (omitempty), code (omitempty).
const STATUS: &[(&str, Ty, bool)] = &[
    ("kind", Ty::NonEmptyStr, false),
    ("apiVersion", Ty::NonEmptyStr, false),
    ("metadata", Ty::Object, true),
    ("status", Ty::NonEmptyStr, false),
    ("message", Ty::NonEmptyStr, false),
    ("reason", Ty::NonEmptyStr, false),
    ("details", Ty::Object, false),
    ("code", Ty::Int, false),
];

fn check_struct(value: &Value, fields: &[(&str, Ty, bool)], at: &str) -> Result<(), String> {
    let object = value
        .as_object()
        .ok_or_else(|| format!("{at}: not an object"))?;
    let mut last_index = None;
    for (key, v) in object {
        let index = fields
            .iter()
            .position(|(name, _, _)| name == key)
            .ok_or_else(|| format!("{at}.{key}: no such field in audit.k8s.io/v1"))?;
        if last_index.is_some_and(|last| index < last) {
            return Err(format!("{at}.{key}: out of the API server's field order"));
        }
        last_index = Some(index);
        check_type(v, fields[index].1, &format!("{at}.{key}"))?;
    }
    for (name, _, required) in fields {
        if *required && !object.contains_key(*name) {
            return Err(format!("{at}.{name}: required"));
        }
    }
    Ok(())
}

fn check_type(v: &Value, ty: Ty, at: &str) -> Result<(), String> {
    let bad = |what: &str| Err(format!("{at}: {what}: {v}"));
    match ty {
        Ty::Str => v
            .as_str()
            .map(|_| ())
            .ok_or(())
            .or_else(|()| bad("not a string")),
        Ty::NonEmptyStr => match v.as_str() {
            Some("") => bad("empty strings are omitted (omitempty)"),
            Some(_) => Ok(()),
            None => bad("not a string"),
        },
        Ty::Int => match v.as_i64() {
            Some(0) => bad("zero is omitted (omitempty)"),
            Some(n) if i32::try_from(n).is_ok() => Ok(()),
            _ => bad("not an int32"),
        },
        Ty::MicroTime => {
            let s = v.as_str().unwrap_or("");
            let b = s.as_bytes();
            let digits = |r: std::ops::Range<usize>| {
                r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit))
            };
            let ok = b.len() == 27
                && digits(0..4)
                && b[4] == b'-'
                && digits(5..7)
                && b[7] == b'-'
                && digits(8..10)
                && b[10] == b'T'
                && digits(11..13)
                && b[13] == b':'
                && digits(14..16)
                && b[16] == b':'
                && digits(17..19)
                && b[19] == b'.'
                && digits(20..26)
                && b[26] == b'Z';
            if ok {
                Ok(())
            } else {
                bad("not a MicroTime (2006-01-02T15:04:05.000000Z)")
            }
        }
        Ty::Uid => match v.as_str().map(uuid::Uuid::parse_str) {
            Some(Ok(_)) => Ok(()),
            _ => bad("not a UID"),
        },
        Ty::Level => match v.as_str() {
            Some("Metadata" | "Request" | "RequestResponse") => Ok(()),
            _ => bad("not an audit level an event can have"),
        },
        Ty::Stage => match v.as_str() {
            Some("RequestReceived" | "ResponseStarted" | "ResponseComplete" | "Panic") => Ok(()),
            _ => bad("not a stage"),
        },
        Ty::StrList => match v.as_array() {
            Some(items) if items.is_empty() => bad("empty lists are omitted"),
            Some(items) if items.iter().all(Value::is_string) => Ok(()),
            _ => bad("not a list of strings"),
        },
        Ty::StrMap => match v.as_object() {
            Some(map) if map.is_empty() => bad("empty maps are omitted"),
            Some(map) if map.values().all(Value::is_string) => Ok(()),
            _ => bad("not a map of strings"),
        },
        Ty::ExtraMap => match v.as_object() {
            Some(map) if map.is_empty() => bad("empty maps are omitted"),
            Some(map)
                if map
                    .values()
                    .all(|l| l.as_array().is_some_and(|l| l.iter().all(Value::is_string))) =>
            {
                Ok(())
            }
            _ => bad("not a map of string lists"),
        },
        Ty::User => check_struct(v, USER, at),
        Ty::ObjectRef => check_struct(v, OBJECT_REF, at),
        Ty::Status => check_struct(v, STATUS, at),
        Ty::Object => v
            .as_object()
            .map(|_| ())
            .ok_or(())
            .or_else(|()| bad("not an object")),
    }
}

fn check_event(v: &Value) -> Result<(), String> {
    check_struct(v, EVENT, "Event")?;
    if v["kind"] != "Event" || v["apiVersion"] != "audit.k8s.io/v1" {
        return Err("kind/apiVersion".into());
    }
    Ok(())
}

fn event_json(e: &Exchange) -> Value {
    serde_json::from_slice(&Event::from_exchange(e).unwrap().to_line()).unwrap()
}

#[test]
fn events_have_the_api_servers_schema_and_decision_annotations() {
    let mut cases = Vec::new();
    cases.push(exchange(
        "list",
        "pods",
        "",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    ));
    let mut secret = exchange(
        "get",
        "secrets",
        "db",
        Action::Mask,
        RecordLevel::RequestResponse,
        200,
    );
    secret.impersonated_user = Some(UserInfo {
        username: "system:serviceaccount:agents:coder".into(),
        groups: vec!["system:serviceaccounts".into()],
        ..Default::default()
    });
    cases.push(secret);
    cases.push(exchange(
        "delete",
        "pods",
        "web-0",
        Action::Deny,
        RecordLevel::Metadata,
        403,
    ));
    cases.push(exchange(
        "delete",
        "deployments",
        "web",
        Action::Approve,
        RecordLevel::Request,
        403,
    ));
    let mut create = exchange(
        "create",
        "configmaps",
        "",
        Action::Allow,
        RecordLevel::Request,
        201,
    );
    create.request_body =
        Some(json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "x"}}));
    create.response_body = Some(json!({"kind": "ConfigMap"}));
    cases.push(create);
    let mut version = exchange(
        "get",
        "",
        "",
        Action::Allow,
        RecordLevel::RequestResponse,
        200,
    );
    version.request.is_resource_request = false;
    version.request_uri = "/version".into();
    version.user_agent = None;
    version.response_body = Some(json!({"major": "1"}));
    cases.push(version);
    let mut watch = exchange(
        "watch",
        "pods",
        "",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    );
    watch.stage = Stage::ResponseStarted;
    watch.request.subresource = String::new();
    cases.push(watch);

    for case in &cases {
        let v = event_json(case);
        check_event(&v).unwrap_or_else(|e| panic!("{e}\n{v:#}"));
        let notes = &v["annotations"];
        assert_eq!(notes["chaperone.dev/decision"], case.decision.verdict());
        assert_eq!(notes["chaperone.dev/rule"], &*case.decision.rule);
        assert_eq!(notes["chaperone.dev/policy"], &*case.decision.policy);
        assert_eq!(notes["chaperone.dev/pod"], "agents/coder-7f9c");
        assert_eq!(notes["chaperone.dev/node"], "node-a");
        assert_eq!(
            notes["chaperone.dev/masked"],
            case.masked_fields.to_string()
        );
        assert_eq!(v["auditID"], case.audit_id.to_string());
        assert!(
            notes.get("chaperone.dev/token-binding").is_none(),
            "a token bound to the pod is not annotated: {notes}"
        );
    }
    let [list, secret, deny, held, create, version, watch] = cases
        .iter()
        .map(event_json)
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    assert_eq!(
        list["objectRef"],
        json!({"resource": "pods", "namespace": "agents", "apiVersion": "v1"})
    );
    assert_eq!(list["responseStatus"], json!({"metadata": {}, "code": 200}));
    assert!(list.get("responseObject").is_none());
    assert_eq!(secret["level"], "RequestResponse");
    assert_eq!(secret["responseObject"]["data"]["password"], "KioqKio=");
    assert_eq!(
        secret["impersonatedUser"]["username"],
        "system:serviceaccount:agents:coder"
    );
    assert_eq!(secret["annotations"]["chaperone.dev/masked"], "2");
    assert_eq!(
        deny["responseStatus"],
        json!({"metadata": {}, "status": "Failure",
               "message": "pods \"web-0\" is forbidden: delete is not allowed for agents",
               "reason": "Forbidden", "code": 403})
    );
    assert_eq!(held["annotations"]["chaperone.dev/approval"], "apr-0001");
    assert_eq!(held["annotations"]["chaperone.dev/decision"], "approve");
    assert_eq!(create["requestObject"]["kind"], "ConfigMap");
    assert!(
        create.get("responseObject").is_none(),
        "Request level has no response"
    );
    assert!(version.get("objectRef").is_none());
    assert!(
        version.get("responseObject").is_none(),
        "non-resource: no bodies"
    );
    assert!(version.get("userAgent").is_none());
    assert_eq!(watch["stage"], "ResponseStarted");
    assert_ne!(watch["stageTimestamp"], watch["requestReceivedTimestamp"]);

    // Level None is not audited, as with the API server.
    let none = exchange("get", "pods", "p", Action::Allow, RecordLevel::None, 200);
    assert!(Event::from_exchange(&none).is_none());
}

#[test]
fn an_event_is_byte_for_byte_what_the_api_server_writes() {
    let mut e = exchange(
        "get",
        "secrets",
        "db",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    );
    e.audit_id = uuid::Uuid::parse_str("1d3a5f1e-7b7e-4a55-9c67-0b7a1f0e8c11").unwrap();
    e.received = time::macros::datetime!(2026-11-23 11:17:02.123456 UTC);
    e.completed = time::macros::datetime!(2026-11-23 11:17:02.127891 UTC);
    e.caller = Arc::new(crate::identity::Caller {
        username: "system:serviceaccount:agents:coder".into(),
        uid: "b7d5c3a1-0000-4000-8000-000000000002".into(),
        groups: vec![
            "system:serviceaccounts".into(),
            "system:authenticated".into(),
        ],
        extra: Default::default(),
        ..(*e.caller).clone()
    });
    let line = String::from_utf8(Event::from_exchange(&e).unwrap().to_line()).unwrap();
    let expected = concat!(
        r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"1d3a5f1e-7b7e-4a55-9c67-0b7a1f0e8c11","#,
        r#""stage":"ResponseComplete","requestURI":"/api/v1/namespaces/agents/secrets/db","verb":"get","#,
        r#""user":{"username":"system:serviceaccount:agents:coder","uid":"b7d5c3a1-0000-4000-8000-000000000002","groups":["system:serviceaccounts","system:authenticated"]},"#,
        r#""sourceIPs":["10.244.1.7"],"userAgent":"kubectl/v1.31.0 (linux/amd64) kubernetes/abcdef","#,
        r#""objectRef":{"resource":"secrets","namespace":"agents","name":"db","apiVersion":"v1"},"#,
        r#""responseStatus":{"metadata":{},"code":200},"#,
        r#""requestReceivedTimestamp":"2026-11-23T11:17:02.123456Z","stageTimestamp":"2026-11-23T11:17:02.127891Z","#,
        r#""annotations":{"chaperone.dev/decision":"allow","chaperone.dev/masked":"0","chaperone.dev/node":"node-a","#,
        r#""chaperone.dev/pod":"agents/coder-7f9c","chaperone.dev/policy":"agents/coder-policy","chaperone.dev/rule":"get-secrets","#,
        // No pod in the token's extra: accepted only with requirePodBinding: false.
        r#""chaperone.dev/token-binding":"unbound"}}"#
    );
    assert_eq!(line, expected);
}

// === delivery ===

/// A webhook receiver on 127.0.0.1 that we control.
#[derive(Default)]
struct Receiver {
    /// Every item of every EventList received, in order.
    items: Mutex<Vec<Value>>,
    posts: AtomicUsize,
    /// Answer 500 (after reading the batch) this many times: forces
    /// redelivery of batches the receiver has seen.
    fail_next: AtomicUsize,
    /// The last `Authorization` header.
    authorization: Mutex<Option<String>>,
}

impl Receiver {
    fn unique(&self) -> HashMap<String, Value> {
        let mut by_id: HashMap<String, Value> = HashMap::new();
        for item in self.items.lock().unwrap().iter() {
            let id = item["auditID"].as_str().unwrap().to_owned();
            if let Some(seen) = by_id.get(&id) {
                assert_eq!(seen, item, "a redelivered event is identical");
            }
            by_id.insert(id, item.clone());
        }
        by_id
    }
}

async fn serve_webhook(listener: tokio::net::TcpListener, receiver: Arc<Receiver>) {
    serve_webhook_tls(listener, receiver, None).await
}

async fn serve_webhook_tls(
    listener: tokio::net::TcpListener,
    receiver: Arc<Receiver>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let receiver = receiver.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream: Box<dyn super::sink::Io> = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => Box::new(stream),
                    Err(_) => return,
                },
                None => Box::new(tcp),
            };
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let receiver = receiver.clone();
                    async move {
                        assert_eq!(request.method(), hyper::Method::POST);
                        assert_eq!(request.uri().path(), "/audit");
                        *receiver.authorization.lock().unwrap() = request
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let list: Value = serde_json::from_slice(&body).unwrap();
                        assert_eq!(list["kind"], "EventList");
                        assert_eq!(list["apiVersion"], "audit.k8s.io/v1");
                        for item in list["items"].as_array().unwrap() {
                            check_event(item).unwrap();
                            receiver.items.lock().unwrap().push(item.clone());
                        }
                        receiver.posts.fetch_add(1, Ordering::Relaxed);
                        let fail = receiver
                            .fail_next
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok();
                        let status = if fail { 500 } else { 200 };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"{}")))
                                .unwrap(),
                        )
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A loopback port with nothing listening (yet).
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn webhook_spec(addr: SocketAddr, spool_max_bytes: u64) -> SinkSpec {
    let mut webhook =
        WebhookConfig::new(Endpoint::from_url(&format!("http://{addr}/audit")).unwrap());
    webhook.batch_max_size = 50;
    webhook.batch_max_wait = Duration::from_millis(20);
    webhook.initial_backoff = Duration::from_millis(100);
    webhook.max_backoff = Duration::from_millis(800);
    webhook.timeout = Duration::from_secs(5);
    SinkSpec {
        name: "webhook".into(),
        config: SinkConfig::Webhook(webhook),
        spool_max_bytes,
    }
}

fn submit(gate: &AuditGate, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let admission = gate.admit().expect("admitted");
            let e = Arc::new(exchange(
                "get",
                "configmaps",
                &format!("cm-{i}"),
                Action::Allow,
                RecordLevel::Metadata,
                200,
            ));
            admission.submit(e.clone());
            e.audit_id.to_string()
        })
        .collect()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_for_30s_under_load_then_back_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port();
    let metrics = Metrics::new();
    let auditor = Auditor::start(
        AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 1 << 30)]),
        metrics.clone(),
    )
    .unwrap();
    let gate = auditor.gate();

    // 30 s of load while nothing listens: 100 events every 250 ms.
    let load = {
        let gate = gate.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                let started = Instant::now();
                ids.extend(submit(&gate, 100));
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "the data path never waits"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            ids
        })
    };
    let mut sent: Vec<String> = load.await.unwrap();
    assert!(sent.len() >= 6000, "{}", sent.len());

    // The sink comes back, drops the answers of its first batches (so they
    // are delivered again), and load goes on.
    let receiver = Arc::new(Receiver {
        fail_next: AtomicUsize::new(3),
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(serve_webhook(listener, receiver.clone()));
    sent.extend(submit(&gate, 500));

    wait_for("every event to arrive", Duration::from_secs(90), || {
        receiver.unique().len() >= sent.len()
    })
    .await;
    let unique = receiver.unique();
    let sent_set: HashSet<&String> = sent.iter().collect();
    assert_eq!(unique.len(), sent.len(), "no event missing, none invented");
    assert!(unique.keys().all(|id| sent_set.contains(id)));
    let total = receiver.items.lock().unwrap().len();
    assert!(
        total > sent.len(),
        "redelivered batches arrive again, with the same auditID"
    );
    assert_eq!(metrics.audit_dropped_count("webhook"), 0);
    wait_for("the spool to drain", Duration::from_secs(10), || {
        metrics
            .encode()
            .contains("chaperone_audit_spool_events{sink=\"webhook\"} 0")
    })
    .await;
    auditor.shutdown();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_delivers_what_was_spooled() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port();
    let auditor = Auditor::start(
        AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 1 << 30)]),
        Metrics::new(),
    )
    .unwrap();
    let sent = submit(&auditor.gate(), 700);
    auditor.shutdown();
    let segments = std::fs::read_dir(tmp.path().join("webhook"))
        .unwrap()
        .count();
    assert!(segments >= 1);

    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(serve_webhook(listener, receiver.clone()));
    let metrics = Metrics::new();
    let auditor = Auditor::start(
        AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 1 << 30)]),
        metrics.clone(),
    )
    .unwrap();
    assert!(
        metrics
            .encode()
            .contains("chaperone_audit_spool_events{sink=\"webhook\"} 700")
    );
    wait_for("the spooled events", Duration::from_secs(30), || {
        receiver.unique().len() >= sent.len()
    })
    .await;
    let unique = receiver.unique();
    assert!(sent.iter().all(|id| unique.contains_key(id)));
    assert_eq!(unique.len(), 700);
    auditor.shutdown();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_in_block_mode_fails_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port();
    let metrics = Metrics::new();
    let auditor = Auditor::start(
        AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 20_000)]),
        metrics.clone(),
    )
    .unwrap();
    let gate = auditor.gate();
    let mut admitted = Vec::new();
    let mut refusal = None;
    for i in 0..2000 {
        match gate.admit() {
            Ok(admission) => {
                let e = Arc::new(exchange(
                    "get",
                    "pods",
                    &format!("p{i}"),
                    Action::Allow,
                    RecordLevel::Metadata,
                    200,
                ));
                admission.submit(e.clone());
                admitted.push(e.audit_id.to_string());
            }
            Err(full) => {
                refusal = Some(full);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let refusal = refusal.expect("admit() fails once the spool is full");
    let status = refusal.status();
    assert_eq!(status.code, 503);
    assert_eq!(status.reason, "ServiceUnavailable");
    assert!(
        status.message.contains("spool of sink webhook is full"),
        "{}",
        status.message
    );
    assert!(gate.admit().is_err(), "stays closed while the sink is down");
    assert_eq!(
        metrics.audit_dropped_count("webhook"),
        0,
        "block mode drops nothing"
    );
    assert!(metrics.encode().contains("chaperone_audit_refused_total 2"));
    auditor.shutdown();

    // Every admitted event is delivered once the sink is back, and the gate
    // opens again.
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(serve_webhook(listener, receiver.clone()));
    let auditor = Auditor::start(
        AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 20_000)]),
        Metrics::new(),
    )
    .unwrap();
    wait_for("the admitted events", Duration::from_secs(30), || {
        receiver.unique().len() >= admitted.len()
    })
    .await;
    assert!(admitted.iter().all(|id| receiver.unique().contains_key(id)));
    wait_for("the gate to open", Duration::from_secs(10), || {
        auditor.gate().admit().is_ok()
    })
    .await;
    auditor.shutdown();
    server.abort();
}

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_full_spool_in_drop_mode_drops_counts_and_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port();
    let metrics = Metrics::new();
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let mut config = AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 20_000)]);
    config.full = FullMode::Drop;
    let auditor = tracing::subscriber::with_default(subscriber, || {
        Auditor::start(config, metrics.clone()).unwrap()
    });
    let gate = auditor.gate();
    for i in 0..400 {
        let admission = gate.admit().expect("drop mode always admits");
        admission.submit(Arc::new(exchange(
            "get",
            "pods",
            &format!("p{i}"),
            Action::Allow,
            RecordLevel::Metadata,
            200,
        )));
        std::thread::sleep(Duration::from_millis(2));
    }
    let start = Instant::now();
    while metrics.audit_dropped_count("webhook") == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
    auditor.shutdown();
    let dropped = metrics.audit_dropped_count("webhook");
    assert!(dropped > 0 && dropped < 400, "{dropped}");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("audit events dropped: the spool is full (mode drop)"),
        "{text}"
    );
    assert!(text.contains("sink=webhook"), "{text}");
    assert!(metrics.encode().contains(&format!(
        "chaperone_audit_dropped_total{{sink=\"webhook\"}} {dropped}"
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_sink_writes_json_lines_and_rotates_like_the_log_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("logs/audit.log");
    let spec = SinkSpec {
        name: "file".into(),
        config: SinkConfig::File(FileSinkConfig {
            path: path.clone(),
            max_size_mb: 1,
            max_backups: 2,
            max_age_days: 0,
        }),
        spool_max_bytes: 1 << 30,
    };
    let auditor = Auditor::start(
        AuditConfig::new(tmp.path().join("spool"), vec![spec]),
        Metrics::new(),
    )
    .unwrap();
    let gate = auditor.gate();
    // ~1.1 KB per event: 4000 events make about four 1 MB files.
    let mut sent = Vec::new();
    for chunk in 0..8 {
        sent.extend(submit(&gate, 500));
        let _ = chunk;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs_dir = tmp.path().join("logs");
    let count_lines = || -> usize {
        std::fs::read_dir(&logs_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        std::fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .lines()
                            .count()
                    })
                    .sum()
            })
            .unwrap_or(0)
    };
    let start = Instant::now();
    while std::fs::read_to_string(&path)
        .map(|t| !t.contains(sent.last().unwrap()))
        .unwrap_or(true)
    {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    auditor.shutdown();
    let mut names: Vec<String> = std::fs::read_dir(&logs_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "the live file and two backups: {names:?}");
    for backup in names.iter().filter(|n| *n != "audit.log") {
        // audit-2026-11-23T11-17-02.123.log
        assert!(
            backup.starts_with("audit-") && backup.ends_with(".log"),
            "{backup}"
        );
        assert_eq!(
            backup.len(),
            "audit-2026-11-23T11-17-02.123.log".len(),
            "{backup}"
        );
        let size = std::fs::metadata(logs_dir.join(backup)).unwrap().len();
        assert!(size <= 1 << 20, "{backup}: {size}");
    }
    let lines = count_lines();
    assert!(lines < sent.len(), "old backups were removed");
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        check_event(&serde_json::from_str(line).unwrap()).unwrap();
    }
}

#[test]
fn webhook_endpoints_come_from_a_url_or_a_kubeconfig() {
    assert!(Endpoint::from_url("ftp://x/").is_err());
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("webhook.kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: audit\n  cluster:\n    server: https://audit.example:8443/events\n    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==\nusers:\n- name: chaperone\n  user:\n    token: s3cret\ncontexts:\n- name: default\n  context:\n    cluster: audit\n    user: chaperone\ncurrent-context: default\n",
    )
    .unwrap();
    let endpoint = Endpoint::from_kubeconfig(&kubeconfig).unwrap();
    assert_eq!(
        endpoint.url.to_string(),
        "https://audit.example:8443/events"
    );
    assert_eq!(endpoint.token.as_deref(), Some("s3cret"));
    assert!(
        endpoint
            .ca_pem
            .unwrap()
            .starts_with(b"-----BEGIN CERTIFICATE-----")
    );
    let https = WebhookConfig::new(Endpoint::from_url("https://audit.example/").unwrap());
    let error = sink::WebhookSink::new(https).err().unwrap().to_string();
    assert!(error.contains("no CA is configured"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_from_a_kubeconfig_gets_batches_with_the_token() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certified.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Arc::new(Receiver::default());
    let server = tokio::spawn(serve_webhook_tls(
        listener,
        receiver.clone(),
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config))),
    ));
    let kubeconfig = tmp.path().join("audit-webhook.kubeconfig");
    let ca = base64::engine::general_purpose::STANDARD.encode(certified.cert.pem());
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: audit\n  cluster:\n    server: https://{addr}/audit\n    certificate-authority-data: {ca}\nusers:\n- name: chaperone\n  user:\n    token: t0ken\ncontexts:\n- name: default\n  context:\n    cluster: audit\n    user: chaperone\ncurrent-context: default\n"
        ),
    )
    .unwrap();
    let mut spec = webhook_spec(addr, 1 << 30);
    let SinkConfig::Webhook(webhook) = &mut spec.config else {
        unreachable!()
    };
    webhook.endpoint = Endpoint::from_kubeconfig(&kubeconfig).unwrap();
    let auditor = Auditor::start(
        AuditConfig::new(tmp.path().join("spool"), vec![spec]),
        Metrics::new(),
    )
    .unwrap();
    let sent = submit(&auditor.gate(), 120);
    wait_for("the events over TLS", Duration::from_secs(20), || {
        receiver.unique().len() >= sent.len()
    })
    .await;
    assert_eq!(
        receiver.authorization.lock().unwrap().as_deref(),
        Some("Bearer t0ken")
    );
    assert!(
        receiver.posts.load(Ordering::Relaxed) >= 3,
        "batches of at most 50"
    );
    auditor.shutdown();
    server.abort();
}

/// In block mode the gate bounds requests waiting to be audited. Open
/// watches gave their slot back once their start event was queued, so a
/// node holding many idle watches still admits its next request; requests
/// still in flight keep theirs and do fill the gate.
#[test]
fn open_watches_do_not_fill_the_gate_but_requests_in_flight_do() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port();
    let mut config = AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 1 << 20)]);
    config.queue = 3;
    let auditor = Auditor::start(config, Metrics::new()).unwrap();
    let gate = auditor.gate();

    let in_flight: Vec<_> = (0..3).map(|_| gate.admit().expect("room for 3")).collect();
    let Err(full) = gate.admit() else {
        panic!("a fourth request in flight is refused");
    };
    let message = full.status().message;
    assert!(message.contains("audit queue is full"), "{message}");
    drop(in_flight);

    let mut watches = Vec::new();
    for i in 0..10 {
        let Ok(mut watch) = gate.admit() else {
            panic!("watch {i} refused");
        };
        watch.release_slot();
        watch.release_slot();
        watches.push(watch);
    }
    assert!(gate.admit().is_ok(), "ten open watches leave the gate open");
    // A watch's end is still audited after it gave its slot back.
    watches.pop().unwrap().submit(Arc::new(exchange(
        "watch",
        "pods",
        "",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    )));
    assert!(auditor.gate().queue_depth() <= 1);
}

fn sink_spool(auditor: &Auditor) -> Arc<Spool> {
    auditor.gate.shared.sinks[0].spool.clone()
}

/// A rolling update: the new node agent starts beside the old one on the
/// same spool directory, both audit, the old one exits with events its sink
/// has not taken yet; the new one delivers them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_agent_spools_apart_and_delivers_what_the_old_one_left() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port();
    let config = || {
        let mut config = AuditConfig::new(tmp.path(), vec![webhook_spec(addr, 1 << 30)]);
        config.segment_bytes = 4096;
        config.adopt_every = Duration::from_millis(200);
        config
    };
    let old = Auditor::start(config(), Metrics::new()).unwrap();
    let metrics = Metrics::new();
    let new = Auditor::start(config(), metrics.clone()).unwrap();
    assert_eq!(sink_spool(&old).dir(), tmp.path().join("webhook"));
    assert_eq!(
        sink_spool(&new).dir(),
        tmp.path().join("webhook/surge-1"),
        "the held directory is not shared"
    );
    let mut sent = Vec::new();
    for _ in 0..5 {
        sent.extend(submit(&old.gate(), 60));
        sent.extend(submit(&new.gate(), 40));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    old.shutdown();

    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(serve_webhook(listener, receiver.clone()));
    wait_for(
        "every event of both agents",
        Duration::from_secs(30),
        || receiver.unique().len() >= sent.len(),
    )
    .await;
    let unique = receiver.unique();
    assert_eq!(unique.len(), 500);
    assert!(sent.iter().all(|id| unique.contains_key(id)));
    wait_for("the spool to drain", Duration::from_secs(10), || {
        metrics
            .encode()
            .contains("chaperone_audit_spool_events{sink=\"webhook\"} 0")
    })
    .await;
    new.shutdown();
    server.abort();
}

/// A segment removed under a running agent (by an operator, or an agent of
/// a version without the spool lock): the events after it are delivered,
/// and the delivery loop then waits instead of re-reading the gap forever
/// (the file sink has no batch wait: it used to spin at 100% CPU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_segment_neither_stalls_nor_spins_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let logs_dir = tmp.path().join("logs");
    // The sink fails (its directory cannot be made) until this file goes.
    std::fs::write(&logs_dir, "").unwrap();
    let spec = SinkSpec {
        name: "file".into(),
        config: SinkConfig::File(FileSinkConfig {
            path: logs_dir.join("audit.log"),
            max_size_mb: 0,
            max_backups: 0,
            max_age_days: 0,
        }),
        spool_max_bytes: 1 << 30,
    };
    let metrics = Metrics::new();
    let mut config = AuditConfig::new(tmp.path().join("spool"), vec![spec]);
    config.segment_bytes = 4096;
    let auditor = Auditor::start(config, metrics.clone()).unwrap();
    let spool = sink_spool(&auditor);
    // Ten events (about 6 KB) per ingest batch: a segment each.
    let mut sent = Vec::new();
    for _ in 0..6 {
        sent.extend(submit(&auditor.gate(), 10));
        wait_for("the events to be spooled", Duration::from_secs(10), || {
            spool.events() == sent.len() as u64
        })
        .await;
    }
    let mut segments: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("spool/file"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    let id = |line: &str| -> String {
        serde_json::from_str::<Value>(line).unwrap()["auditID"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let middle = &segments[segments.len() / 2];
    let lost: HashSet<String> = std::fs::read_to_string(middle)
        .unwrap()
        .lines()
        .map(id)
        .collect();
    std::fs::remove_file(middle).unwrap();
    assert!(!lost.is_empty());

    std::fs::remove_file(&logs_dir).unwrap();
    let expected: HashSet<String> = sent.into_iter().filter(|i| !lost.contains(i)).collect();
    let delivered = || -> HashSet<String> {
        std::fs::read_to_string(logs_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(id)
            .collect()
    };
    wait_for("the events after the gap", Duration::from_secs(30), || {
        delivered().len() >= expected.len()
    })
    .await;
    assert_eq!(delivered(), expected);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = spool.reads.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reads = spool.reads.load(Ordering::Relaxed) - before;
    assert!(reads <= 5, "{reads} reads of an empty spool in one second");
    assert!(
        metrics
            .encode()
            .contains("chaperone_audit_spool_events{sink=\"file\"} 0"),
        "the lost events are not counted as waiting"
    );
    auditor.shutdown();
}

// === durability ===

fn received(name: &str) -> Arc<Exchange> {
    let mut e = exchange(
        "delete",
        "configmaps",
        name,
        Action::Allow,
        RecordLevel::Metadata,
        0,
    );
    e.stage = crate::record::Stage::RequestReceived;
    e.status = crate::record::ResponseStatus::ok(0);
    Arc::new(e)
}

/// `--audit-durability spooled`: when `write_ahead` returns, the
/// request's `RequestReceived` event is in the spool on disk (a crash from
/// here on cannot lose it), and it reads as the API server's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_ahead_returns_once_the_event_is_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens: the spool keeps whatever was written.
    let mut config = AuditConfig::new(tmp.path(), vec![webhook_spec(free_port(), 1 << 30)]);
    config.durability = Durability::Spooled;
    let auditor = Auditor::start(config, Metrics::new()).unwrap();
    let gate = auditor.gate();
    assert_eq!(gate.durability(), Durability::Spooled);
    let spool = sink_spool(&auditor);
    let start = std::time::Instant::now();
    for i in 0..5 {
        let e = received(&format!("cm-{i}"));
        gate.write_ahead(e.clone()).await.unwrap();
        assert_eq!(spool.events(), i + 1, "spooled before write_ahead returned");
    }
    // Group commit without the 50 ms gathering of the default mode.
    assert!(
        start.elapsed() < Duration::from_millis(5 * 50),
        "five write-aheads took {:?}",
        start.elapsed()
    );
    let batch = spool.read(10).unwrap();
    let first: Value = serde_json::from_slice(&batch.events[0]).unwrap();
    check_event(&first).unwrap();
    assert_eq!(first["stage"], "RequestReceived");
    assert_eq!(first["verb"], "delete");
    assert!(first.get("responseStatus").is_none(), "{first}");
    assert_eq!(first["stageTimestamp"], first["requestReceivedTimestamp"]);
    auditor.shutdown();

    // Once the pipeline is gone, a write-ahead fails: the proxy refuses.
    let error = gate.write_ahead(received("late")).await.unwrap_err();
    assert!(error.status().message.contains("audit"), "{error}");
}

/// The cost of `spooled` on this machine's disk: sequential write-aheads
/// (one request at a time) and 16 at once (group commit). Run with
/// `cargo test -p chaperone --lib audit::tests::write_ahead_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn write_ahead_cost() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut config = AuditConfig::new(tmp.path(), vec![webhook_spec(free_port(), 1 << 30)]);
    config.durability = Durability::Spooled;
    let auditor = Auditor::start(config, Metrics::new()).unwrap();
    let gate = auditor.gate();
    let mut waits = Vec::new();
    for i in 0..300 {
        let start = std::time::Instant::now();
        gate.write_ahead(received(&format!("cm-{i}")))
            .await
            .unwrap();
        waits.push(start.elapsed());
    }
    waits.sort();
    println!(
        "sequential: p50 {:?} p99 {:?} per request",
        waits[150], waits[297]
    );
    let start = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..16 {
        let gate = gate.clone();
        tasks.spawn(async move {
            let mut waits = Vec::new();
            for i in 0..50 {
                let start = std::time::Instant::now();
                gate.write_ahead(received(&format!("c{task}-{i}")))
                    .await
                    .unwrap();
                waits.push(start.elapsed());
            }
            waits
        });
    }
    let mut waits: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
    waits.sort();
    println!(
        "16 concurrent: {:.0} events/s, p50 {:?} p99 {:?} per request",
        800.0 / start.elapsed().as_secs_f64(),
        waits[400],
        waits[792]
    );
    auditor.shutdown();
}

/// The process behind the agent's connection, in the event's annotations.
#[test]
fn events_name_the_calling_process_and_its_parents() {
    let mut e = exchange(
        "get",
        "secrets",
        "db",
        Action::Mask,
        RecordLevel::Metadata,
        200,
    );
    let plain = event_json(&e);
    assert!(
        plain["annotations"]
            .get("chaperone.dev/executable")
            .is_none()
    );
    let mut caller = (*e.caller).clone();
    caller.process = Some(crate::identity::ProcessInfo {
        pid: 4242,
        uid: 1000,
        command: "kubectl".into(),
        executable: "/usr/local/bin/kubectl".into(),
        parents: vec![(4200, "sh".into()), (4100, "agent".into())],
    });
    e.caller = Arc::new(caller.clone());
    let v = event_json(&e);
    check_event(&v).unwrap();
    let notes = &v["annotations"];
    assert_eq!(notes["chaperone.dev/executable"], "/usr/local/bin/kubectl");
    assert_eq!(notes["chaperone.dev/process"], "kubectl pid 4242 uid 1000");
    assert_eq!(notes["chaperone.dev/parents"], "sh(4200) < agent(4100)");
    // An executable that could not be read: the command, as ps shows it.
    caller.process.as_mut().unwrap().executable.clear();
    e.caller = Arc::new(caller);
    assert_eq!(
        event_json(&e)["annotations"]["chaperone.dev/executable"],
        "[kubectl]"
    );
}

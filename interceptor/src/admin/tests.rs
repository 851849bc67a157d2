use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};

use super::*;

/// One sample of an exposition.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser of the OpenMetrics / Prometheus text format: every sample
/// belongs to a family declared by `# TYPE`, names and labels are valid,
/// label values are properly escaped, values are numbers, the exposition ends
/// with `# EOF`, histograms have cumulative buckets ending in `+Inf` that
/// equal `_count`.
fn parse_exposition(text: &str) -> Result<(HashMap<String, String>, Vec<Sample>), String> {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.last() != Some(&"") || lines.len() < 2 || lines[lines.len() - 2] != "# EOF" {
        return Err("the exposition must end with '# EOF\\n'".into());
    }
    for (n, line) in lines[..lines.len() - 2].iter().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            let name = parts.next().ok_or_else(|| err("comment without a name"))?;
            if !valid_name(name) {
                return Err(err("invalid metric name"));
            }
            match keyword {
                "TYPE" => {
                    let kind = parts.next().ok_or_else(|| err("TYPE without a type"))?;
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "unknown",
                    ]
                    .contains(&kind)
                    {
                        return Err(err("unknown type"));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(err("family declared twice"));
                    }
                }
                "HELP" | "UNIT" => {}
                _ => return Err(err("unknown comment keyword")),
            }
            continue;
        }
        if line.is_empty() {
            return Err(err("empty line"));
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(err("sample without a value")),
        };
        if !valid_name(name) {
            return Err(err("invalid sample name"));
        }
        let mut labels = BTreeMap::new();
        let rest = if let Some(mut body) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = body.strip_prefix('}') {
                    body = after;
                    break;
                }
                let eq = body.find('=').ok_or_else(|| err("label without '='"))?;
                let key = &body[..eq];
                if !valid_name(key) || key.contains(':') {
                    return Err(err("invalid label name"));
                }
                let mut chars = body[eq + 1..].char_indices();
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(err("label value not quoted"));
                }
                let mut value = String::new();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            _ => return Err(err("bad escape in label value")),
                        },
                        '"' => {
                            end = Some(eq + 1 + i + 1);
                            break;
                        }
                        '\n' => return Err(err("newline in label value")),
                        c => value.push(c),
                    }
                }
                let end = end.ok_or_else(|| err("unterminated label value"))?;
                if labels.insert(key.to_owned(), value).is_some() {
                    return Err(err("duplicate label"));
                }
                body = &body[end..];
                if let Some(after) = body.strip_prefix(',') {
                    body = after;
                }
            }
            body
        } else {
            rest
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value"))?
            .split(' ');
        let value = fields.next().unwrap_or("");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| err("value is not a number"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<f64>().map_err(|_| err("bad timestamp"))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields"));
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| types.contains_key(*base))
            })
            .unwrap_or(name);
        let kind = types
            .get(family)
            .ok_or_else(|| err("sample of an undeclared family"))?;
        let suffix_ok = match kind.as_str() {
            "counter" => name.ends_with("_total") || name.ends_with("_created"),
            "histogram" => ["_bucket", "_count", "_sum", "_created"]
                .iter()
                .any(|s| name == format!("{family}{s}")),
            "gauge" => name == family,
            _ => true,
        };
        if !suffix_ok {
            return Err(err("sample name does not fit its family's type"));
        }
        if kind == "histogram" && name.ends_with("_bucket") && !labels.contains_key("le") {
            return Err(err("bucket without le"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets ending with +Inf == _count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut key = s.labels.clone();
            let le = key.remove("le").unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().map_err(|_| format!("bad le {le}"))?
            };
            series
                .entry(format!("{key:?}"))
                .or_default()
                .push((le, s.value));
        }
        for (key, buckets) in series {
            if !buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
            {
                return Err(format!("{family}{key}: buckets not cumulative"));
            }
            let last = buckets.last().unwrap();
            let count = samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && format!("{:?}", s.labels) == key)
                .ok_or_else(|| format!("{family}{key}: no _count"))?;
            if last.0 != f64::INFINITY || last.1 != count.value {
                return Err(format!("{family}{key}: +Inf bucket must equal _count"));
            }
        }
    }
    Ok((types, samples))
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn metrics_parse_and_match_the_updates_made() {
    let metrics = Metrics::new();
    let health = Health::new();
    let server = AdminServer::start("127.0.0.1:0".parse().unwrap(), metrics.clone(), health)
        .expect("admin listener starts");

    for _ in 0..3 {
        metrics.request("get", "secrets", "mask", Duration::from_millis(4));
    }
    metrics.request("delete", "pods", "deny", Duration::from_millis(1));
    metrics.request("get", "pods", "allow", Duration::from_millis(300));
    let mut exchange = crate::record::testing::exchange(
        "get",
        "secrets",
        "db",
        crate::policy::Action::Mask,
        crate::policy::RecordLevel::Metadata,
        200,
    );
    exchange.masked_fields = 5;
    metrics.exchange(&exchange);
    metrics.masked(2);
    metrics.held_approvals(1);
    metrics.held_approvals(1);
    metrics.held_approvals(-1);
    metrics.redirect_map_entries("AGENT_CGROUPS", 12);
    metrics.redirect_map_entries("TARGETS", 3);
    metrics.unresolved_pods(2);
    metrics.audit_queue_depth(7);
    metrics.audit_spool("webhook", 40, 4096);
    metrics.audit_dropped("webhook");
    metrics.audit_dropped("webhook");
    metrics.record_dropped();

    let (status, content_type, body) = get(server.local_addr(), "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, CONTENT_TYPE);
    let (types, samples) = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(types["chaperone_requests"], "counter");
    assert_eq!(types["chaperone_request_duration_seconds"], "histogram");
    let requests = |verb, resource, decision| {
        value(
            &samples,
            "chaperone_requests_total",
            &[
                ("verb", verb),
                ("resource", resource),
                ("decision", decision),
            ],
        )
    };
    assert_eq!(requests("get", "secrets", "mask"), Some(4.0));
    assert_eq!(requests("delete", "pods", "deny"), Some(1.0));
    assert_eq!(requests("get", "pods", "allow"), Some(1.0));
    assert_eq!(
        value(
            &samples,
            "chaperone_request_duration_seconds_count",
            &[("decision", "mask")]
        ),
        Some(4.0)
    );
    // 300 ms falls in the 0.512 s bucket, not below 0.256 s.
    let bucket = |le| {
        value(
            &samples,
            "chaperone_request_duration_seconds_bucket",
            &[("decision", "allow"), ("le", le)],
        )
    };
    assert_eq!(bucket("0.256"), Some(0.0));
    assert_eq!(bucket("0.512"), Some(1.0));
    assert_eq!(
        value(&samples, "chaperone_masked_fields_total", &[]),
        Some(7.0)
    );
    assert_eq!(value(&samples, "chaperone_approvals_held", &[]), Some(1.0));
    assert_eq!(
        value(
            &samples,
            "chaperone_redirect_map_entries",
            &[("map", "AGENT_CGROUPS")]
        ),
        Some(12.0)
    );
    assert_eq!(value(&samples, "chaperone_unresolved_pods", &[]), Some(2.0));
    assert_eq!(
        value(&samples, "chaperone_audit_queue_depth", &[]),
        Some(7.0)
    );
    assert_eq!(
        value(
            &samples,
            "chaperone_audit_spool_bytes",
            &[("sink", "webhook")]
        ),
        Some(4096.0)
    );
    assert_eq!(
        value(
            &samples,
            "chaperone_audit_dropped_total",
            &[("sink", "webhook")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&samples, "chaperone_record_dropped_total", &[]),
        Some(1.0)
    );
    server.shutdown();
}

#[test]
fn the_parser_rejects_what_prometheus_rejects() {
    assert!(parse_exposition("# TYPE a counter\na_total 1\n# EOF\n").is_ok());
    assert!(
        parse_exposition("# TYPE a counter\na_total 1\n").is_err(),
        "no EOF"
    );
    assert!(
        parse_exposition("a_total 1\n# EOF\n").is_err(),
        "undeclared"
    );
    assert!(parse_exposition("# TYPE a gauge\na{x=\"1} 1\n# EOF\n").is_err());
    assert!(parse_exposition("# TYPE a gauge\na{x=\"\\q\"} 1\n# EOF\n").is_err());
    assert!(parse_exposition("# TYPE a gauge\na one\n# EOF\n").is_err());
    assert!(
        parse_exposition("# TYPE a counter\na 1\n# EOF\n").is_err(),
        "counter without _total"
    );
    let bad_histogram = "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n# EOF\n";
    assert!(parse_exposition(bad_histogram).is_err());
}

#[tokio::test]
async fn healthz_and_readyz_reflect_registered_checks() {
    let health = Health::new();
    let ebpf = health.readiness("ebpf-attached");
    let ca = health.readiness("ca-loaded");
    let upstream = health.readiness("upstream-reachable");
    let runtime = health.liveness("proxy-runtime");
    let server = AdminServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Metrics::new(),
        health.clone(),
    )
    .unwrap();
    let addr = server.local_addr();

    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("[-]ebpf-attached failed: not checked yet"),
        "{body}"
    );
    let (status, _, body) = get(addr, "/healthz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[+]proxy-runtime ok"), "{body}");
    assert!(
        !body.contains("ebpf"),
        "readiness checks are not liveness: {body}"
    );

    ebpf.set_ok();
    ca.set_ok();
    upstream.set_failed("dial 10.96.0.1:443: connection refused; check the API server address");
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("[+]ebpf-attached ok"), "{body}");
    assert!(body.contains("[+]ca-loaded ok"), "{body}");
    assert!(
        body.contains("[-]upstream-reachable failed: dial 10.96.0.1:443"),
        "{body}"
    );
    assert!(body.ends_with("readyz check failed\n"), "{body}");

    upstream.set_ok();
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.ends_with("readyz check passed\n"), "{body}");

    runtime.set_failed("the proxy runtime stopped answering");
    let (status, _, _) = get(addr, "/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = get(addr, "/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not live is not ready"
    );

    let (status, _, body) = get(addr, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("/metrics"));
    server.shutdown();
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn the_approvals_api_lists_and_decides_local_approvals_with_the_plugins_rules() {
    use crate::approval::{Approvals, Ask, Backend, HeldRequest, LocalStore, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let approvals = Approvals::start(
        Backend::Local(store.clone()),
        "node-a",
        Duration::from_secs(600),
        None,
    );
    let server = AdminServer::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Metrics::new(),
        Health::new(),
        Some(store.clone()),
    )
    .unwrap();
    let addr = server.local_addr();
    let caller = crate::identity::Caller {
        username: "system:serviceaccount:agents:coder".into(),
        ..Default::default()
    };
    let request = crate::request::RequestInfo::parse(
        &http::Method::DELETE,
        "/apis/apps/v1/namespaces/prod-a/deployments/web",
        None,
    );
    let hold = |wait: Duration| {
        let approvals = approvals.clone();
        let caller = caller.clone();
        let request = request.clone();
        async move {
            let ask = Ask {
                caller: &caller,
                request: HeldRequest::from_info(&request),
                policy: "agent-guard",
                rule: "prod-deletes",
            };
            approvals.hold(ask, wait, async { None }).await
        }
    };
    let first = hold(Duration::from_millis(50)).await;
    let id = first.id().unwrap().to_owned();

    let (status, list) = send(addr, Method::GET, "/approvals", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["kind"], "ApprovalRequestList");
    assert_eq!(list["items"][0]["metadata"]["name"], id.as_str());
    assert_eq!(list["items"][0]["status"]["state"], "Pending");

    let approve = format!("/approvals/local/{id}/approve");
    // The requester may not approve its own request.
    let (status, refused) = send(
        addr,
        Method::POST,
        &approve,
        r#"{"by": "system:serviceaccount:agents:coder"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("cannot approve it yourself"),
        "{refused}"
    );
    // A decision says who makes it.
    let (status, _) = send(addr, Method::POST, &approve, r#"{"reason": "x"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = send(
        addr,
        Method::POST,
        "/approvals/local/apr-nothere/approve",
        r#"{"by": "alice"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(
        addr,
        Method::POST,
        &format!("/approvals/prod/{id}/approve"),
        r#"{"by": "alice"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A grant without a unit (`15`: seconds? minutes?) is refused, not
    // guessed.
    let (status, refused) = send(
        addr,
        Method::POST,
        &approve,
        r#"{"by": "alice", "grant": "15"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused.to_string().contains("no unit"), "{refused}");

    // alice approves with a grant: the held retry goes through.
    let retry = tokio::spawn(hold(Duration::from_secs(20)));
    let (status, decided) = send(
        addr,
        Method::POST,
        &approve,
        r#"{"by": "alice", "reason": "planned", "grant": "15m"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(decided["status"]["state"], "Approved");
    assert_eq!(decided["status"]["decidedBy"], "alice");
    assert_eq!(decided["status"]["grant"], "15m");
    assert!(matches!(retry.await.unwrap(), Outcome::Approved(d) if d.by == "alice"));

    // Decided once: the API and the plugin both refuse a second decision.
    let (status, again) = send(
        addr,
        Method::POST,
        &format!("/approvals/local/{id}/deny"),
        r#"{"by": "bob"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        again["message"]
            .as_str()
            .unwrap()
            .contains("already Approved (by alice)"),
        "{again}"
    );

    // Only the node itself is answered.
    let request = Request::get("/approvals")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response =
        approvals::handle(request, "10.0.0.7:40000".parse().unwrap(), Some(&store)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    drop(dir);
}

/// An agent names any resource it likes, authenticated or not: thousands of
/// made-up names must not make thousands of series (issue 24: 20,000
/// token-less requests grew /metrics from 3 KB to 21 MB).
#[test]
fn made_up_resources_and_verbs_add_no_series() {
    let metrics = Metrics::new();
    metrics.request("get", "pods", "allow", Duration::from_millis(1));
    let baseline = metrics.encode().len();
    for i in 0..5000 {
        let resource = format!("widgets-{i}");
        metrics.request("get", &resource, "deny", Duration::from_millis(1));
        metrics.request(
            &format!("verb{i}"),
            "pods",
            "deny",
            Duration::from_millis(1),
        );
        metrics.request(
            "get",
            &format!("pods/sub{i}"),
            "allow",
            Duration::from_millis(1),
        );
    }
    let body = metrics.encode();
    let series = body
        .lines()
        .filter(|l| l.starts_with("chaperone_requests_total"))
        .count();
    assert!(series <= 5, "{series} series:\n{body}");
    assert!(
        body.len() < baseline + 4096,
        "/metrics grew from {baseline} to {} bytes",
        body.len()
    );
    assert!(body.contains(r#"resource="other""#), "{body}");
    assert!(body.contains(r#"resource="pods/other""#), "{body}");
    assert!(body.contains(r#"verb="other""#), "{body}");
}

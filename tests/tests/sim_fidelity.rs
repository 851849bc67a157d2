//! The simulator answers as the real kube-apiserver v1.20.2 does, proven by
//! difference (issue 22): the same requests go to the simulator (claiming
//! 1.20, its default) and to the real server that `cargo xtask kube`
//! builds, and their answers are compared by status code, content type,
//! content encoding and body shape (keys, kinds, reasons; not values).
//!
//! Where they differ on purpose, [`KNOWN_DIFFERENCES`] says why; anything
//! else is a simulator bug. Needs the real server (skips without it, fails
//! under CI).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use chaperone_tests::{
    real_api::RealApiServer,
    require_real_api,
    sim::{SimConfig, SimHandle, Simulator, client::Client, client::Reply},
};
use serde_json::{Value, json};

/// One server under comparison.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    ca_pem: String,
    admin_token: String,
    /// A service-account token without any rights.
    agent_token: String,
    _sim: Option<SimHandle>,
}

impl Target {
    async fn sim(namespace: &str) -> Target {
        let sim = Simulator::start(SimConfig::default())
            .await
            .expect("simulator starts");
        let agent_token = sim
            .mint_service_account_token(namespace, "agent", None, None, Duration::from_secs(3600))
            .unwrap();
        Target {
            name: "kube-sim",
            addr: sim.addr(),
            ca_pem: sim.ca_pem(),
            admin_token: sim.admin_token(),
            agent_token,
            _sim: Some(sim),
        }
    }

    fn real(server: &RealApiServer, namespace: &str) -> Target {
        let agent_token = server
            .mint_token(namespace, "agent", None, None, Duration::from_secs(3600))
            .expect("a service-account token from the real server");
        Target {
            name: "kube-apiserver",
            addr: server.addr(),
            ca_pem: server.ca_pem(),
            admin_token: server.admin_token(),
            agent_token,
            _sim: None,
        }
    }

    async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut client = Client::connect(self.addr, &self.ca_pem, true)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e:#}", self.name));
        if !token.is_empty() {
            client = client.with_token(token);
        }
        client
            .call(method, path, headers, body.to_vec())
            .await
            .unwrap_or_else(|e| panic!("{method} {path} to {}: {e:#}", self.name))
    }

    async fn admin(&self, method: &str, path: &str, body: Value) -> Reply {
        let r = self
            .call(
                &self.admin_token,
                method,
                path,
                &[("content-type", "application/json")],
                &serde_json::to_vec(&body).unwrap(),
            )
            .await;
        assert!(
            r.status < 300 || r.status == 409,
            "setting up {} ({method} {path}): HTTP {} {}",
            self.name,
            r.status,
            r.text()
        );
        r
    }

    /// The same objects in both servers: a namespace, a Secret, ConfigMaps.
    async fn seed(&self, namespace: &str, configmaps: usize) {
        self.admin(
            "POST",
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        )
        .await;
        self.admin(
            "POST",
            &format!("/api/v1/namespaces/{namespace}/secrets"),
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "db", "labels": {"app": "web"}},
                "stringData": {"password": "hunter2"}, "type": "Opaque"
            }),
        )
        .await;
        for i in 0..configmaps {
            self.admin(
                "POST",
                &format!("/api/v1/namespaces/{namespace}/configmaps"),
                json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("bulk-{i:03}")},
                    "data": {"payload": "x".repeat(4096)}
                }),
            )
            .await;
        }
    }
}

/// Which credentials a probe uses.
#[derive(Clone, Copy)]
enum Who {
    Admin,
    Agent,
    BadToken,
}

/// One request sent to both servers.
struct Probe {
    name: &'static str,
    who: Who,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
}

fn probe(name: &'static str, method: &'static str, path: impl Into<String>) -> Probe {
    Probe {
        name,
        who: Who::Admin,
        method,
        path: path.into(),
        headers: Vec::new(),
        body: Vec::new(),
    }
}

impl Probe {
    fn accept(mut self, accept: &'static str) -> Self {
        self.headers.push(("accept", accept));
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
    fn json(mut self, body: Value) -> Self {
        self.headers.push(("content-type", "application/json"));
        self.body = serde_json::to_vec(&body).unwrap();
        self
    }
    fn who(mut self, who: Who) -> Self {
        self.who = who;
        self
    }
}

/// Differences that are known and explained: the probe's name, the part
/// of the shape left out of the comparison (`""`: the whole answer), why.
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[
    (
        "get protobuf",
        "",
        "the simulator writes no protobuf (it reads the request bodies kubectl \
         sends): it answers 406 where kube-apiserver encodes the Secret",
    ),
    (
        "get protobuf or JSON",
        "",
        "the simulator writes no protobuf: it answers JSON, which the client \
         accepts too, where kube-apiserver prefers protobuf",
    ),
];

/// What is compared of an answer.
fn shape(reply: &Reply) -> Value {
    let content_type = reply.header("content-type").unwrap_or("").to_string();
    let mut body = reply.body.to_vec();
    let encoding = reply.header("content-encoding").unwrap_or("").to_string();
    if encoding == "gzip" {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .expect("a gzip body");
        body = out;
    }
    let body_shape = if content_type.starts_with("application/vnd.kubernetes.protobuf") {
        json!({"protobuf-envelope": body.starts_with(b"k8s\x00")})
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => value_shape(&v, 4),
            Err(_) if body.is_empty() => json!("empty"),
            Err(_) => json!("text"),
        }
    };
    json!({
        "status": reply.status,
        "content-type": content_type,
        "content-encoding": encoding,
        "body": body_shape,
    })
}

/// The shape of a JSON value: objects as their keys (sorted) with the
/// shapes of their values; arrays as the shape of their first item;
/// scalars as their type, except the values that name things (`kind`,
/// `apiVersion`, `reason`, `code`, `status` of a Status, `type`).
fn value_shape(v: &Value, depth: usize) -> Value {
    match v {
        Value::Object(m) => {
            if depth == 0 {
                return json!("object");
            }
            let mut out = serde_json::Map::new();
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                let child = &m[k];
                let named = matches!(k.as_str(), "kind" | "apiVersion" | "reason" | "code")
                    || (k == "status" && m.get("kind") == Some(&json!("Status")));
                out.insert(
                    k.clone(),
                    if named && !child.is_object() {
                        child.clone()
                    } else {
                        value_shape(child, depth - 1)
                    },
                );
            }
            Value::Object(out)
        }
        // Items by the union of their shapes (lists and discovery
        // documents list different things on each side).
        Value::Array(a) if a.is_empty() => json!([]),
        Value::Array(a) => {
            let mut merged = Value::Null;
            for item in a {
                merged = merge(merged, value_shape(item, depth));
            }
            json!([merged])
        }
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

fn merge(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Object(mut a), Value::Object(b)) => {
            for (k, v) in b {
                let merged = match a.remove(&k) {
                    Some(old) => merge(old, v),
                    None => v,
                };
                a.insert(k, merged);
            }
            let mut keys: Vec<String> = a.keys().cloned().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| {
                        let v = a[&k].clone();
                        (k, v)
                    })
                    .collect(),
            )
        }
        (Value::Null, b) => b,
        (Value::String(a), Value::String(b)) if a != b => json!("string"),
        (a, _) => a,
    }
}

fn without(mut shape: Value, pointer: &str) -> Value {
    if pointer.is_empty() {
        return json!("not compared");
    }
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    if let Some(Value::Object(m)) = shape.pointer_mut(if parent.is_empty() { "" } else { parent }) {
        m.remove(key);
    }
    shape
}

/// Sends every probe to both and returns the differences (empty: faithful).
async fn compare(sim: &Target, real: &Target, probes: Vec<Probe>) -> Vec<String> {
    let mut differences = Vec::new();
    let mut table = Vec::new();
    for p in probes {
        let mut shapes = BTreeMap::new();
        for target in [sim, real] {
            let token = match p.who {
                Who::Admin => target.admin_token.as_str(),
                Who::Agent => target.agent_token.as_str(),
                Who::BadToken => "not-a-token",
            };
            let reply = target
                .call(token, p.method, &p.path, &p.headers, &p.body)
                .await;
            let mut s = shape(&reply);
            for (name, pointer, _why) in KNOWN_DIFFERENCES {
                if *name == p.name {
                    s = without(s, pointer);
                }
            }
            shapes.insert(target.name, (s, reply));
        }
        let (sim_shape, sim_reply) = &shapes[sim.name];
        let (real_shape, real_reply) = &shapes[real.name];
        let known = KNOWN_DIFFERENCES
            .iter()
            .find(|(name, _, _)| *name == p.name)
            .map(|(_, _, why)| format!(" (known difference: {why})"))
            .unwrap_or_default();
        table.push(format!(
            "{:<36} sim {} {:<28} real {} {}{known}",
            p.name,
            sim_reply.status,
            sim_reply.header("content-type").unwrap_or("-"),
            real_reply.status,
            real_reply.header("content-type").unwrap_or("-"),
        ));
        if sim_shape != real_shape {
            differences.push(format!(
                "{} ({} {}):\n  kube-sim:       {}\n  kube-apiserver: {}\n  kube-sim body:       {}\n  kube-apiserver body: {}",
                p.name,
                p.method,
                p.path,
                sim_shape,
                real_shape,
                String::from_utf8_lossy(&sim_reply.body).chars().take(400).collect::<String>(),
                String::from_utf8_lossy(&real_reply.body).chars().take(400).collect::<String>(),
            ));
        }
    }
    eprintln!("{}", table.join("\n"));
    differences
}

async fn targets(namespace: &str, configmaps: usize) -> Option<(Target, Target)> {
    let real = RealApiServer::shared().expect("the real API server starts");
    let sim = Target::sim(namespace).await;
    let real = Target::real(real, namespace);
    for t in [&sim, &real] {
        t.seed(namespace, configmaps).await;
    }
    Some((sim, real))
}

fn assert_faithful(differences: Vec<String>) {
    assert!(
        differences.is_empty(),
        "the simulator answers unlike kube-apiserver v1.20.2:\n\n{}",
        differences.join("\n\n")
    );
}

const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_issuer_documents_answer_alike() {
    require_real_api!();
    let Some((sim, real)) = targets("fidelity-oidc", 0).await else {
        return;
    };
    let jwks = "/openid/v1/jwks";
    let probes = vec![
        probe("jwks Accept: application/json", "GET", jwks).accept("application/json"),
        probe("jwks Accept: application/jwk-set+json", "GET", jwks)
            .accept("application/jwk-set+json"),
        probe("jwks without Accept", "GET", jwks),
        probe("jwks Accept: */*", "GET", jwks).accept("*/*"),
        probe("jwks as chaperone asks", "GET", jwks).accept(chaperone::identity::JWKS_ACCEPT),
        probe("oidc discovery", "GET", "/.well-known/openid-configuration")
            .accept("application/json"),
        probe(
            "oidc discovery without Accept",
            "GET",
            "/.well-known/openid-configuration",
        ),
    ];
    assert_faithful(compare(&sim, &real, probes).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reviews_and_errors_answer_alike() {
    require_real_api!();
    let ns = "fidelity-api";
    let Some((sim, real)) = targets(ns, 0).await else {
        return;
    };
    let cm = |name: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}});
    let probes = vec![
        probe("version", "GET", "/version"),
        probe("discovery /api", "GET", "/api"),
        probe("discovery /apis", "GET", "/apis"),
        probe("discovery /api/v1", "GET", "/api/v1"),
        probe("discovery /apis/apps/v1", "GET", "/apis/apps/v1"),
        probe("discovery discovery.k8s.io", "GET", "/apis/discovery.k8s.io"),
        probe(
            "discovery discovery.k8s.io/v1beta1",
            "GET",
            "/apis/discovery.k8s.io/v1beta1",
        ),
        probe(
            "discovery.k8s.io/v1 (1.21+)",
            "GET",
            "/apis/discovery.k8s.io/v1",
        ),
        probe(
            "discovery authentication.k8s.io/v1",
            "GET",
            "/apis/authentication.k8s.io/v1",
        ),
        probe(
            "SelfSubjectReview (1.28+)",
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        )
        .json(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})),
        probe(
            "SelfSubjectReview v1beta1 (1.27+)",
            "POST",
            "/apis/authentication.k8s.io/v1beta1/selfsubjectreviews",
        )
        .json(json!({"apiVersion": "authentication.k8s.io/v1beta1", "kind": "SelfSubjectReview"})),
        probe("401 bad token", "GET", format!("/api/v1/namespaces/{ns}/secrets"))
            .who(Who::BadToken),
        probe("403 no rights", "GET", format!("/api/v1/namespaces/{ns}/secrets"))
            .who(Who::Agent),
        probe("404 missing", "GET", format!("/api/v1/namespaces/{ns}/secrets/missing")),
        probe("404 no such path", "GET", "/apis/nope.example.com/v1/things"),
        probe("409 exists", "POST", format!("/api/v1/namespaces/{ns}/secrets")).json(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}
        })),
        probe("422 invalid name", "POST", format!("/api/v1/namespaces/{ns}/configmaps"))
            .json(cm("Bad_Name")),
        probe(
            "dry-run create",
            "POST",
            format!("/api/v1/namespaces/{ns}/configmaps?dryRun=All"),
        )
        .json(cm("dry")),
        probe(
            "dry-run delete",
            "DELETE",
            format!("/api/v1/namespaces/{ns}/secrets/db?dryRun=All"),
        ),
        probe(
            "SubjectAccessReview",
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        )
        .json(json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "someone", "resourceAttributes": {"verb": "delete", "group": "apps", "resource": "deployments", "namespace": ns}}
        })),
        probe(
            "SelfSubjectAccessReview",
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        )
        .who(Who::Agent)
        .json(json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": "list", "resource": "secrets", "namespace": ns}}
        })),
    ];
    let mut differences = compare(&sim, &real, probes).await;

    // TokenReview of each server's own agent token.
    let mut reviews = Vec::new();
    for target in [&sim, &real] {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": target.agent_token}
        });
        let r = target
            .call(
                &target.admin_token,
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                &[("content-type", "application/json")],
                &serde_json::to_vec(&body).unwrap(),
            )
            .await;
        reviews.push((shape(&r), r));
    }
    if reviews[0].0 != reviews[1].0 {
        differences.push(format!(
            "TokenReview:\n  kube-sim:       {}\n  kube-apiserver: {}",
            reviews[0].0, reviews[1].0
        ));
    }
    assert_faithful(differences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encodings_answer_alike() {
    require_real_api!();
    let ns = "fidelity-wire";
    // 40 ConfigMaps of 4 KiB: a list over the real server's gzip threshold.
    let Some((sim, real)) = targets(ns, 40).await else {
        return;
    };
    let secret = format!("/api/v1/namespaces/{ns}/secrets/db");
    let probes = vec![
        probe("get JSON", "GET", secret.clone()).accept("application/json"),
        probe("get protobuf", "GET", secret.clone()).accept("application/vnd.kubernetes.protobuf"),
        probe("get protobuf or JSON", "GET", secret.clone())
            .accept("application/vnd.kubernetes.protobuf, application/json"),
        probe(
            "list as Table",
            "GET",
            format!("/api/v1/namespaces/{ns}/secrets"),
        )
        .accept(TABLE_ACCEPT),
        probe("get as Table", "GET", secret.clone()).accept(TABLE_ACCEPT),
        probe(
            "small list, gzip accepted",
            "GET",
            format!("/api/v1/namespaces/{ns}/secrets"),
        )
        .header("accept-encoding", "gzip"),
        probe(
            "large list, gzip accepted",
            "GET",
            format!("/api/v1/namespaces/{ns}/configmaps"),
        )
        .header("accept-encoding", "gzip"),
        probe(
            "large list, no gzip",
            "GET",
            format!("/api/v1/namespaces/{ns}/configmaps"),
        ),
        probe("get YAML", "GET", secret.clone()).accept("application/yaml"),
        probe("get text/html", "GET", secret).accept("text/html"),
    ];
    assert_faithful(compare(&sim, &real, probes).await);
}

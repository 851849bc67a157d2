//! The simulator answers like the real kube-apiserver v1.20.2 whose responses
//! are captured in tests/fixtures/kube-apiserver-v1.20.2: same bytes where
//! nothing varies (Status errors, discovery, version), same keys in the same
//! order elsewhere (objects, lists, tables, watch events, OIDC, reviews).

use std::time::Duration;

use chaperone_tests::sim::{SimConfig, SimHandle, Simulator, client::Client, client::Lines, wire};
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/fixtures/kube-apiserver-v1.20.2/{name}.body",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).expect("fixture is JSON")
}

/// The keys of every object in a document, in order, recursively (array
/// items by position).
fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = format!("{prefix}.{k}");
                out.push(p.clone());
                key_paths(child, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                key_paths(child, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    key_paths(v, "", &mut out);
    out
}

async fn sim() -> (SimHandle, Client, Client) {
    let sim = Simulator::start(SimConfig::default())
        .await
        .expect("simulator starts");
    let admin = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&sim.admin_token());
    let curl = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&sim.admin_token())
        .with_user_agent("curl/8.5.0");
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod-a"}}))
        .unwrap();
    (sim, admin, curl)
}

/// Replaces the server-generated metadata of `ours` with the fixture's.
fn adopt_metadata(ours: &mut Value, theirs: &Value) {
    for f in ["uid", "resourceVersion", "creationTimestamp"] {
        if let (Some(m), Some(v)) = (
            ours.get_mut("metadata").and_then(Value::as_object_mut),
            theirs.pointer(&format!("/metadata/{f}")),
        ) && m.contains_key(f)
        {
            m.insert(f.into(), v.clone());
        }
    }
    if let (Some(Value::Array(ours_mf)), Some(Value::Array(their_mf))) = (
        ours.pointer_mut("/metadata/managedFields"),
        theirs.pointer("/metadata/managedFields"),
    ) {
        for (o, t) in ours_mf.iter_mut().zip(their_mf) {
            o["time"] = t["time"].clone();
        }
    }
}

/// The server wrote the pretty encoding (what it sends curl) and, after
/// adopting the fixture's generated values, the same bytes as the fixture.
fn assert_same_bytes(raw: &[u8], name: &str, adjust: impl FnOnce(&mut Value)) {
    let mut ours: Value = serde_json::from_slice(raw).unwrap();
    assert_eq!(
        String::from_utf8_lossy(raw),
        String::from_utf8(wire::encode(&ours, true)).unwrap(),
        "the simulator pretty-prints for curl like the API server"
    );
    adjust(&mut ours);
    assert_eq!(
        String::from_utf8(wire::encode(&ours, true)).unwrap(),
        fixture(name),
        "fixture {name}"
    );
}

const APPLIED_SECRET: &str = "{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{\"annotations\":{},\"labels\":{\"app\":\"web\"},\"name\":\"db\",\"namespace\":\"prod-a\"},\"stringData\":{\"password\":\"hunter2-s3cr3t\",\"url\":\"postgres://app:hunter2-s3cr3t@db:5432/app\"},\"type\":\"Opaque\"}\n";

/// Creates the Secret the fixtures show, as `kubectl apply` does.
async fn create_db_secret(admin: &Client) {
    let body = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": APPLIED_SECRET},
            "labels": {"app": "web"}, "name": "db", "namespace": "prod-a"
        },
        "stringData": {"password": "hunter2-s3cr3t", "url": "postgres://app:hunter2-s3cr3t@db:5432/app"},
        "type": "Opaque"
    });
    let r = admin
        .send_json(
            "POST",
            "/api/v1/namespaces/prod-a/secrets?fieldManager=kubectl-client-side-apply&fieldValidation=Strict",
            "application/json",
            &body,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
}

#[tokio::test]
async fn status_errors_are_byte_identical() {
    let (sim, admin, curl) = sim().await;

    // 401: a bad token.
    let bad = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token("not-a-token")
        .with_user_agent("curl/8.5.0");
    let r = bad.get("/api/v1/namespaces/prod-a/secrets").await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), fixture("status-401"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-cache, private"));

    // 403: a service account without rights.
    let token = sim
        .mint_service_account_token("prod-a", "agent", None, None, Duration::from_secs(600))
        .unwrap();
    let agent = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&token)
        .with_user_agent("curl/8.5.0");
    let r = agent
        .get("/api/v1/namespaces/prod-a/secrets")
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), fixture("status-403"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));

    // 404: a missing Secret.
    let r = curl
        .get("/api/v1/namespaces/prod-a/secrets/missing")
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), fixture("status-404"));

    // 409: a ConfigMap that exists.
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config"}, "data": {"k": "v"}});
    let r = admin
        .send_json(
            "POST",
            "/api/v1/namespaces/prod-a/configmaps",
            "application/json",
            &cm,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let r = curl
        .send_json(
            "POST",
            "/api/v1/namespaces/prod-a/configmaps",
            "application/json",
            &cm,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(r.text(), fixture("status-409"));

    // 422: an invalid name.
    let bad_cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}});
    let r = curl
        .send_json(
            "POST",
            "/api/v1/namespaces/prod-a/configmaps",
            "application/json",
            &bad_cm,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 422);
    assert_eq!(r.text(), fixture("status-422"));

    // delete with dryRun=All: a Success Status, nothing deleted.
    let r = curl
        .call(
            "DELETE",
            "/api/v1/namespaces/prod-a/configmaps/app-config?dryRun=All",
            &[],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_same_bytes(&r.body, "delete-dryrun", |v| {
        v["details"]["uid"] = fixture_json("delete-dryrun")["details"]["uid"].clone();
    });
    assert!(
        sim.store()
            .get("configmaps", Some("prod-a"), "app-config")
            .is_some()
    );

    // 410: a watch from a compacted resourceVersion is an ERROR event over 200.
    let r = admin
        .get("/api/v1/namespaces/prod-a/secrets?watch=true&resourceVersion=1")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let expected = fixture("status-410-watch")
        .replace("(202)", &format!("({})", sim.store().resource_version()));
    assert_eq!(r.text(), expected);
}

#[tokio::test]
async fn secret_get_list_and_table_match_the_fixtures() {
    let (_sim, admin, curl) = sim().await;
    create_db_secret(&admin).await;

    let r = curl
        .get("/api/v1/namespaces/prod-a/secrets/db")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let theirs = fixture_json("secret-get");
    assert_same_bytes(&r.body, "secret-get", |v| adopt_metadata(v, &theirs));

    let r = curl.get("/api/v1/namespaces/prod-a/secrets").await.unwrap();
    let theirs = fixture_json("secret-list");
    assert_same_bytes(&r.body, "secret-list", |v| {
        v["metadata"]["resourceVersion"] = theirs["metadata"]["resourceVersion"].clone();
        adopt_metadata(&mut v["items"][0], &theirs["items"][0]);
    });

    let r = curl
        .call(
            "GET",
            "/api/v1/namespaces/prod-a/secrets?limit=500",
            &[("accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json")],
            "",
        )
        .await
        .unwrap();
    let theirs = fixture_json("secret-list-table");
    assert_same_bytes(&r.body, "secret-list-table", |v| {
        v["metadata"]["resourceVersion"] = theirs["metadata"]["resourceVersion"].clone();
        v["rows"][0]["cells"][3] = theirs["rows"][0]["cells"][3].clone();
        adopt_metadata(&mut v["rows"][0]["object"], &theirs["rows"][0]["object"]);
    });
}

#[tokio::test]
async fn watch_events_are_framed_like_the_fixture() {
    let (_sim, admin, _curl) = sim().await;
    let list = admin
        .get("/api/v1/namespaces/prod-a/secrets")
        .await
        .unwrap()
        .json();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = admin
        .send(
            http::Request::get(format!(
                "/api/v1/namespaces/prod-a/secrets?allowWatchBookmarks=true&resourceVersion={rv}&watch=true"
            ))
            .body(Default::default())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let mut lines = Lines::new(resp);

    let w1 = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "w1", "namespace": "prod-a"}, "data": {"token": "YWJj"}, "type": "Opaque"});
    let r = admin
        .send_json(
            "POST",
            "/api/v1/namespaces/prod-a/secrets?fieldManager=kubectl-create",
            "application/json",
            &w1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let r = admin
        .send_json(
            "PATCH",
            "/api/v1/namespaces/prod-a/secrets/w1?fieldManager=kubectl-label",
            "application/strategic-merge-patch+json",
            &json!({"metadata": {"labels": {"x": "y"}}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin
        .call("DELETE", "/api/v1/namespaces/prod-a/secrets/w1", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let expected: Vec<String> = fixture("secret-watch").lines().map(String::from).collect();
    for want in expected {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next())
            .await
            .expect("event arrives")
            .unwrap()
            .expect("stream open");
        let mut ours: Value = serde_json::from_str(&line).unwrap();
        let theirs: Value = serde_json::from_str(&want).unwrap();
        adopt_metadata(&mut ours["object"], &theirs["object"]);
        assert_eq!(serde_json::to_string(&ours).unwrap(), want);
    }
}

#[tokio::test]
async fn discovery_and_version_match_the_fixtures() {
    let (sim, _admin, curl) = sim().await;

    let r = curl.get("/version").await.unwrap();
    assert_eq!(r.text(), fixture("version"));

    let r = curl.get("/apis/apps/v1").await.unwrap();
    assert_eq!(r.text(), fixture("discovery-apps-v1"));
    assert_eq!(r.header("content-type"), Some("application/json"));

    let r = curl.get("/api").await.unwrap();
    assert_eq!(
        r.text(),
        fixture("discovery-api").replace("127.0.0.1:6443", &sim.addr().to_string())
    );

    // Every core resource served is described exactly as the real server does.
    let ours = curl.get("/api/v1").await.unwrap().json();
    let theirs = fixture_json("discovery-api-v1");
    assert_eq!(
        keys(&json!({"k": ours["kind"], "g": ours["groupVersion"]})),
        keys(&json!({"k": theirs["kind"], "g": theirs["groupVersion"]}))
    );
    assert_eq!(
        ours.as_object().unwrap().keys().collect::<Vec<_>>(),
        theirs.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    let mut compared = 0;
    for r in ours["resources"].as_array().unwrap() {
        let real = theirs["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == r["name"])
            .unwrap_or_else(|| panic!("{} is not a real v1.20 resource", r["name"]));
        assert_eq!(r, real);
        assert_eq!(keys(r), keys(real));
        compared += 1;
    }
    for needed in [
        "namespaces",
        "pods",
        "pods/log",
        "pods/exec",
        "pods/attach",
        "pods/portforward",
        "secrets",
        "configmaps",
        "services",
        "serviceaccounts",
        "events",
    ] {
        assert!(
            ours["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == needed),
            "{needed}"
        );
    }
    assert!(compared >= 11);

    // Group entries have the fixture's shape.
    let ours = curl.get("/apis").await.unwrap().json();
    let theirs = fixture_json("discovery-apis");
    let apps = |v: &Value| {
        v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == "apps")
            .cloned()
            .unwrap()
    };
    assert_eq!(apps(&ours), apps(&theirs));
    assert_eq!(
        ours.as_object().unwrap().keys().collect::<Vec<_>>(),
        theirs.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    for g in [
        "authentication.k8s.io",
        "authorization.k8s.io",
        "apiextensions.k8s.io",
    ] {
        assert!(
            ours["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["name"] == g),
            "{g}"
        );
    }
}

#[tokio::test]
async fn oidc_documents_and_reviews_have_the_fixture_shapes() {
    let (sim, admin, curl) = sim().await;

    let r = curl.get("/.well-known/openid-configuration").await.unwrap();
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=3600"));
    let ours = r.json();
    let theirs = fixture_json("oidc-discovery");
    assert_eq!(keys(&ours), keys(&theirs));
    assert_eq!(ours["issuer"], theirs["issuer"]);
    assert_eq!(
        ours["jwks_uri"],
        format!("https://{}/openid/v1/jwks", sim.addr())
    );

    let r = curl.get("/openid/v1/jwks").await.unwrap();
    assert_eq!(r.header("content-type"), Some("application/jwk-set+json"));
    let ours = r.json();
    assert_eq!(keys(&ours), keys(&fixture_json("oidc-jwks")));
    assert_eq!(ours["keys"][0]["kid"], sim.signing_key_id());

    // TokenReview of a projected token (audience = issuer).
    let token = sim
        .mint_service_account_token("prod-a", "agent", None, None, Duration::from_secs(600))
        .unwrap();
    let review = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
    let r = admin
        .send_json(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            "application/json",
            &review,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let mut ours = r.json();
    let theirs = fixture_json("tokenreview");
    ours["metadata"] = theirs["metadata"].clone();
    assert_eq!(keys(&ours), keys(&theirs));
    assert_eq!(
        ours["status"]["user"]["username"],
        theirs["status"]["user"]["username"]
    );
    assert_eq!(
        ours["status"]["user"]["groups"],
        theirs["status"]["user"]["groups"]
    );
    assert_eq!(ours["status"]["audiences"], theirs["status"]["audiences"]);

    // SubjectAccessReview: may the agent delete deployments? No.
    let sar = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "resourceAttributes": {"namespace": "prod-a", "verb": "delete", "group": "apps", "resource": "deployments"},
        "user": "system:serviceaccount:prod-a:agent"}});
    let r = admin
        .send_json(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            "application/json",
            &sar,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let mut ours = r.json();
    let theirs = fixture_json("subjectaccessreview");
    ours["metadata"] = theirs["metadata"].clone();
    assert_eq!(ours, theirs);
    assert_eq!(keys(&ours), keys(&theirs));

    // Server-side apply creating an object (201).
    let r = curl
        .call(
            "PATCH",
            "/api/v1/namespaces/prod-a/configmaps/ssa-demo?fieldManager=kubectl&force=true",
            &[("content-type", "application/apply-patch+yaml")],
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa-demo\n  namespace: prod-a\ndata:\n  k: v\n",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let theirs = fixture_json("ssa-patch");
    assert_same_bytes(&r.body, "ssa-patch", |v| adopt_metadata(v, &theirs));
}

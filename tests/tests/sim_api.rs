//! The simulator's API behaviour that clients and chaperone rely on:
//! restarts, many watches, impersonation, token keys, content negotiation,
//! watch options, optimistic concurrency, dry runs, CRDs, streams.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use chaperone_tests::{
    sim::{
        Rule, SimConfig, SimHandle, Simulator, Subject,
        client::{Client, Lines},
    },
    wait,
};
use serde_json::{Value, json};

async fn start(config: SimConfig) -> (SimHandle, Client) {
    let sim = Simulator::start(config).await.expect("simulator starts");
    let admin = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&sim.admin_token());
    (sim, admin)
}

fn watch_request(path: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::get(path).body(Default::default()).unwrap()
}

#[tokio::test]
async fn restart_on_the_same_address_serves_new_clients() {
    let (sim, admin) = start(SimConfig::default()).await;
    let addr = sim.addr();
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kept", "namespace": "default"}}))
        .unwrap();
    let watch = admin
        .send(watch_request(
            "/api/v1/namespaces/default/configmaps?watch=1",
        ))
        .await
        .unwrap();
    let mut lines = Lines::new(watch);
    assert_eq!(lines.next_json().await.unwrap().unwrap()["type"], "ADDED");

    sim.restart().await.unwrap();
    assert_eq!(sim.addr(), addr);
    // The open watch ended with the old server.
    let end = tokio::time::timeout(Duration::from_secs(10), lines.next())
        .await
        .expect("stream ends");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");

    // New clients work and see the same state.
    for http2 in [true, false] {
        let c = Client::connect(addr, &sim.ca_pem(), http2)
            .await
            .unwrap()
            .with_token(&sim.admin_token());
        let r = c
            .get("/api/v1/namespaces/default/configmaps/kept")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    sim.shutdown().await;
    assert!(!sim.is_running());
    assert!(
        Client::connect(addr, &sim.ca_pem(), true).await.is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test]
async fn a_thousand_concurrent_watches_all_receive_an_event() {
    let (sim, _admin) = start(SimConfig::default()).await;
    const WATCHES: usize = 1000;
    const CONNECTIONS: usize = 4;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(
            Client::connect(sim.addr(), &sim.ca_pem(), true)
                .await
                .unwrap()
                .with_token(&sim.admin_token()),
        );
    }
    let started = Instant::now();
    let rv = sim.store().resource_version();
    let path = format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}");
    let opening = (0..WATCHES).map(|i| clients[i % CONNECTIONS].send(watch_request(&path)));
    let mut streams = Vec::with_capacity(WATCHES);
    for resp in futures::future::join_all(opening).await {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(Lines::new(resp));
    }
    let opened = started.elapsed();
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fanout", "namespace": "default"}}))
        .unwrap();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| tokio::spawn(async move { s.next_json().await.unwrap().unwrap() }))
        .collect();
    let mut received = 0;
    for t in tasks {
        let ev = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("event arrives")
            .unwrap();
        assert_eq!(ev["type"], "ADDED");
        assert_eq!(ev["object"]["metadata"]["name"], "fanout");
        received += 1;
    }
    assert_eq!(received, WATCHES);
    println!(
        "{WATCHES} watches over {CONNECTIONS} HTTP/2 connections: opened in {opened:?}, all received the event after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn impersonation_is_enforced_and_recorded() {
    let (sim, admin) = start(SimConfig::default()).await;
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod-a"}}))
        .unwrap();
    sim.grant(
        Subject::ServiceAccount {
            namespace: "prod-a".into(),
            name: "agent".into(),
        },
        vec![Rule::new(&["list"], &[""], &["pods"]).in_namespaces(&["prod-a"])],
    );
    let as_agent = |path: &'static str| {
        http::Request::get(path)
            .header("impersonate-user", "system:serviceaccount:prod-a:agent")
            .header("impersonate-group", "chaperone:agents")
            .header("impersonate-uid", "u-1")
            .header(
                "impersonate-extra-authentication.kubernetes.io%2fpod-name",
                "agent-0",
            )
            .body(Default::default())
            .unwrap()
    };
    let r = admin
        .send(as_agent("/api/v1/namespaces/prod-a/pods"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = admin
        .send(as_agent("/api/v1/namespaces/prod-a/secrets"))
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the impersonated user's rights apply");

    let rec = sim
        .requests()
        .into_iter()
        .find(|r| r.uri == "/api/v1/namespaces/prod-a/pods")
        .unwrap();
    assert_eq!(
        rec.header("Impersonate-User"),
        Some("system:serviceaccount:prod-a:agent")
    );
    assert_eq!(rec.token.as_deref(), Some(sim.admin_token().as_str()));
    assert_eq!(
        rec.authenticated.as_ref().unwrap().username,
        "kubernetes-admin"
    );
    let imp = rec.impersonated.unwrap();
    assert_eq!(imp.username, "system:serviceaccount:prod-a:agent");
    assert_eq!(imp.uid, "u-1");
    assert_eq!(
        imp.groups,
        [
            "chaperone:agents",
            "system:serviceaccounts",
            "system:serviceaccounts:prod-a",
            "system:authenticated"
        ]
    );
    assert_eq!(
        imp.extra["authentication.kubernetes.io/pod-name"],
        ["agent-0"]
    );

    // Someone without the impersonate verb may not.
    let token = sim
        .mint_service_account_token("prod-a", "agent", None, None, Duration::from_secs(60))
        .unwrap();
    let agent = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&token);
    let r = agent
        .send(
            http::Request::get("/api/v1/namespaces/prod-a/pods")
                .header("impersonate-user", "kubernetes-admin")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn service_account_tokens_verify_rotate_and_expire() {
    let config = SimConfig {
        key_retention: Duration::from_secs(4),
        ..SimConfig::default().permissive()
    };
    let (sim, admin) = start(config).await;
    let old = sim
        .mint_service_account_token(
            "default",
            "agent",
            Some(("agent-0", "pod-uid-1")),
            None,
            Duration::from_secs(600),
        )
        .unwrap();
    let old_kid = sim.signing_key_id();
    let new_kid = sim.rotate_signing_key().unwrap();
    assert_ne!(old_kid, new_kid);
    let new = sim
        .mint_service_account_token("default", "agent", None, None, Duration::from_secs(600))
        .unwrap();
    let jwks = admin.get("/openid/v1/jwks").await.unwrap().json();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(
        kids,
        [new_kid.as_str(), old_kid.as_str()],
        "the old key stays published"
    );

    let review = |token: &str, audiences: Value| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": audiences}});
    for token in [&old, &new] {
        let c = Client::connect(sim.addr(), &sim.ca_pem(), false)
            .await
            .unwrap()
            .with_token(token);
        assert_eq!(
            c.get("/api/v1/namespaces/default/pods")
                .await
                .unwrap()
                .status,
            200
        );
    }
    let r = admin
        .send_json(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            "application/json",
            &review(&old, json!([])),
        )
        .await
        .unwrap()
        .json();
    assert_eq!(r["status"]["authenticated"], true);
    assert_eq!(
        r["status"]["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!(["pod-uid-1"])
    );

    // A token for another audience is not valid for the API server.
    let other = sim
        .mint_service_account_token(
            "default",
            "agent",
            None,
            Some(&["chaperone"]),
            Duration::from_secs(600),
        )
        .unwrap();
    let c = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&other);
    assert_eq!(
        c.get("/api/v1/namespaces/default/pods")
            .await
            .unwrap()
            .status,
        401
    );
    let r = admin
        .send_json(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            "application/json",
            &review(&other, json!(["chaperone"])),
        )
        .await
        .unwrap()
        .json();
    assert_eq!(r["status"]["audiences"], json!(["chaperone"]));

    // Expired tokens are refused.
    let expired = sim
        .mint_service_account_token("default", "agent", None, None, Duration::from_secs(1))
        .unwrap();
    // Expired once the clock is past its `exp` claim (whole seconds).
    let exp = claims(&expired)["exp"].as_u64().expect("an exp claim");
    wait::until(
        "the clock to pass the token's exp claim",
        Duration::from_secs(5),
        || async {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            (now > exp).then_some(())
        },
    )
    .await;
    let c = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&expired);
    assert_eq!(
        c.get("/api/v1/namespaces/default/pods")
            .await
            .unwrap()
            .status,
        401
    );

    // After the retention period the rotated-out key is gone from the JWKS,
    // and its tokens fail.
    wait::until(
        &format!("the rotated-out key {old_kid} to leave the JWKS (4 s retention)"),
        Duration::from_secs(10),
        || async {
            let jwks = admin.get("/openid/v1/jwks").await.unwrap().json();
            let listed = jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kid"] == old_kid);
            (!listed).then_some(())
        },
    )
    .await;
    let c = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&old);
    assert_eq!(
        c.get("/api/v1/namespaces/default/pods")
            .await
            .unwrap()
            .status,
        401
    );
    let jwks = admin.get("/openid/v1/jwks").await.unwrap().json();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert_eq!(jwks["keys"][0]["kid"], new_kid.as_str());
}

#[tokio::test]
async fn protobuf_is_negotiated_like_the_api_server() {
    let (sim, admin) = start(SimConfig::default()).await;
    let r = admin
        .call(
            "GET",
            "/api/v1/namespaces/default/configmaps",
            &[("accept", "application/vnd.kubernetes.protobuf")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 406);
    assert_eq!(r.json()["reason"], "NotAcceptable");
    let r = admin
        .call(
            "GET",
            "/api/v1/namespaces/default/configmaps",
            &[(
                "accept",
                "application/vnd.kubernetes.protobuf,application/json",
            )],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["kind"], "ConfigMapList");
    let asked: Vec<bool> = sim.requests().iter().map(|r| r.wanted_protobuf).collect();
    assert_eq!(asked, [true, true]);

    // Metadata-only clients get PartialObjectMetadata.
    let r = admin
        .call(
            "GET",
            "/api/v1/namespaces",
            &[(
                "accept",
                "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json",
            )],
            "",
        )
        .await
        .unwrap()
        .json();
    assert_eq!(r["kind"], "PartialObjectMetadataList");
    assert_eq!(r["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(r["items"][0]["metadata"]["name"], "default");
    assert!(r["items"][0].get("spec").is_none());
}

#[tokio::test]
async fn watch_options_selectors_bookmarks_and_timeout() {
    let config = SimConfig {
        bookmark_interval: Duration::from_millis(200),
        ..SimConfig::default()
    };
    let (sim, admin) = start(config).await;
    let rv = sim.store().resource_version();
    let resp = admin
        .send(watch_request(&format!(
            "/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&labelSelector=app%20in%20(web)&fieldSelector=spec.nodeName%3Dnode-1&timeoutSeconds=3"
        )))
        .await
        .unwrap();
    let mut lines = Lines::new(resp);
    let pod = |name: &str, app: &str, node: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}})
    };
    sim.store()
        .create(pod("other-app", "db", "node-1"))
        .unwrap();
    sim.store()
        .create(pod("other-node", "web", "node-2"))
        .unwrap();
    sim.store().create(pod("match", "web", "node-1")).unwrap();
    let mut saw_bookmark = false;
    let mut saw_match = false;
    let started = Instant::now();
    while let Some(ev) = lines.next_json().await.unwrap() {
        match ev["type"].as_str().unwrap() {
            "ADDED" => {
                assert_eq!(ev["object"]["metadata"]["name"], "match");
                assert_eq!(ev["object"]["status"]["phase"], "Running");
                saw_match = true;
            }
            "BOOKMARK" => {
                assert_eq!(ev["object"]["kind"], "Pod");
                assert!(
                    ev["object"]["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                        > rv
                );
                saw_bookmark = true;
            }
            other => panic!("unexpected {other} event: {ev}"),
        }
    }
    assert!(saw_match && saw_bookmark);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "timeoutSeconds ends the watch ({took:?})"
    );

    // A change that moves an object into or out of the selectors is ADDED / DELETED.
    let resp = admin
        .send(watch_request(
            "/api/v1/namespaces/default/pods?watch=true&labelSelector=agent%3Dyes",
        ))
        .await
        .unwrap();
    let mut lines = Lines::new(resp);
    let label = |value: Value| {
        sim.store()
            .patch_in(
                &sim.store().registry().lookup("pods").unwrap().clone(),
                "default",
                "match",
                chaperone_tests::sim::patch::PatchType::Merge,
                &json!({"metadata": {"labels": {"agent": value}}}),
                &Default::default(),
            )
            .unwrap();
    };
    label(json!("yes"));
    label(json!(null));
    for want in ["ADDED", "DELETED"] {
        let ev = tokio::time::timeout(Duration::from_secs(10), lines.next_json())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ev["type"], want);
        assert_eq!(ev["object"]["metadata"]["name"], "match");
    }

    // After a compaction, resuming from an old resourceVersion is 410 Gone.
    sim.store().compact();
    let r = admin
        .get(&format!("/api/v1/pods?watch=true&resourceVersion={rv}"))
        .await
        .unwrap();
    let ev: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
}

#[tokio::test]
async fn updates_conflict_on_stale_versions_and_dry_run_persists_nothing() {
    let (sim, admin) = start(SimConfig::default()).await;
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}, "data": {"a": "1"}});
    let r = admin
        .send_json(
            "POST",
            "/api/v1/namespaces/default/configmaps?dryRun=All",
            "application/json",
            &cm,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["metadata"]["name"], "c");
    assert!(
        sim.store()
            .get("configmaps", Some("default"), "c")
            .is_none(),
        "dry run persisted nothing"
    );

    let created = sim.store().create(cm.clone()).unwrap();
    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh["data"]["a"] = json!("2");
    let r = admin
        .send_json(
            "PUT",
            "/api/v1/namespaces/default/configmaps/c",
            "application/json",
            &fresh,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_ne!(
        r.json()["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
    stale["data"]["a"] = json!("3");
    let r = admin
        .send_json(
            "PUT",
            "/api/v1/namespaces/default/configmaps/c",
            "application/json",
            &stale,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["message"],
        "Operation cannot be fulfilled on configmaps \"c\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // Server-side apply conflicts with another manager's field unless forced.
    let apply = |force: bool| {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "9"}});
        let path =
            format!("/api/v1/namespaces/default/configmaps/c?fieldManager=other&force={force}");
        let admin = &admin;
        async move {
            admin
                .call(
                    "PATCH",
                    &path,
                    &[("content-type", "application/apply-patch+yaml")],
                    serde_json::to_vec(&cm).unwrap(),
                )
                .await
                .unwrap()
        }
    };
    let r = apply(false).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("Apply failed with 1 conflict: conflict with"),
        "{}",
        r.text()
    );
    let r = apply(true).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["a"], "9");

    // Deleting with the wrong uid precondition conflicts; deletecollection by label.
    let r = admin
        .call(
            "DELETE",
            "/api/v1/namespaces/default/configmaps/c",
            &[("content-type", "application/json")],
            r#"{"preconditions":{"uid":"nope"}}"#,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409);
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "l", "namespace": "default", "labels": {"x": "y"}}}))
        .unwrap();
    let r = admin
        .call(
            "DELETE",
            "/api/v1/namespaces/default/configmaps?labelSelector=x%3Dy",
            &[],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 1);
    assert!(
        sim.store()
            .get("configmaps", Some("default"), "l")
            .is_none()
    );
    assert!(
        sim.store()
            .get("configmaps", Some("default"), "c")
            .is_some()
    );
}

#[tokio::test]
async fn custom_resources_appear_in_discovery_when_their_crd_is_created() {
    let (sim, admin) = start(SimConfig::default()).await;
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "agentpolicies.chaperone.dev"},
        "spec": {"group": "chaperone.dev", "scope": "Namespaced",
            "names": {"plural": "agentpolicies", "singular": "agentpolicy", "kind": "AgentPolicy", "shortNames": ["ap"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "additionalPrinterColumns": [{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}]}]}
    });
    let r = admin
        .send_json(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            "application/json",
            &crd,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let groups = admin.get("/apis").await.unwrap().json();
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "chaperone.dev")
    );
    let list = admin
        .get("/apis/chaperone.dev/v1alpha1")
        .await
        .unwrap()
        .json();
    assert_eq!(list["resources"][0]["name"], "agentpolicies");
    assert_eq!(list["resources"][0]["kind"], "AgentPolicy");

    let policy = json!({"apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "p"}, "spec": {"mode": "enforce"}});
    let r = admin
        .send_json(
            "POST",
            "/apis/chaperone.dev/v1alpha1/namespaces/default/agentpolicies",
            "application/json",
            &policy,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["metadata"]["generation"], 1);
    let r = admin
        .call(
            "GET",
            "/apis/chaperone.dev/v1alpha1/namespaces/default/agentpolicies",
            &[("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")],
            "",
        )
        .await
        .unwrap()
        .json();
    let cols: Vec<&str> = r["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Name", "Mode", "Age"]);
    assert_eq!(r["rows"][0]["cells"][1], "enforce");
    let list = admin
        .get("/apis/chaperone.dev/v1alpha1/agentpolicies")
        .await
        .unwrap()
        .json();
    assert_eq!(
        list["items"][0]["kind"], "AgentPolicy",
        "custom resource list items keep kind"
    );

    // Deleting the CRD removes its resources.
    let r = admin
        .call(
            "DELETE",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/agentpolicies.chaperone.dev",
            &[],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        admin
            .get("/apis/chaperone.dev/v1alpha1")
            .await
            .unwrap()
            .status,
        404
    );
    assert!(sim.store().list("configmaps", None).is_empty());
}

#[tokio::test]
async fn pod_streams_reach_the_stream_seam() {
    let (sim, admin) = start(SimConfig::default()).await;
    let r = admin
        .call(
            "POST",
            "/api/v1/namespaces/default/pods/missing/exec?command=echo",
            &[],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["message"], "pods \"missing\" not found");
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "main", "image": "i"}]}}))
        .unwrap();
    let r = admin
        .call(
            "POST",
            "/api/v1/namespaces/default/pods/p/exec?command=echo&container=nope",
            &[],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["message"], "container nope is not valid for pod p");
    for sub in ["exec?command=echo", "attach", "portforward?ports=80"] {
        let r = admin
            .call(
                "POST",
                &format!("/api/v1/namespaces/default/pods/p/{sub}"),
                &[],
                "",
            )
            .await
            .unwrap();
        assert_ne!(r.status, 404, "{sub} is routed: {}", r.text());
        assert_ne!(r.status, 403, "{sub}");
    }
}

#[tokio::test]
async fn serves_ipv6_loopback_with_a_certificate_for_it() {
    let config = SimConfig {
        listen: "[::1]:0".parse().unwrap(),
        ..SimConfig::default()
    };
    let sim = match Simulator::start(config).await {
        Ok(s) => s,
        Err(e) => {
            chaperone_tests::skip!("no IPv6 loopback here ({e})");
        }
    };
    assert!(sim.url().starts_with("https://[::1]:"));
    assert!(
        sim.kubeconfig("t")
            .contains(&format!("server: {}", sim.url()))
    );
    let c = Client::connect(sim.addr(), &sim.ca_pem(), true)
        .await
        .unwrap()
        .with_token(&sim.admin_token());
    let r = c.get("/version").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["gitVersion"], "v1.20.2");
}

#[tokio::test]
async fn status_subresource_and_log_options() {
    let (sim, admin) = start(SimConfig::default()).await;
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default",
            "annotations": {"sim.chaperone.dev/log": "a\nb\nc"}},
            "spec": {"containers": [{"name": "main", "image": "i"}, {"name": "side", "image": "j"}]}}))
        .unwrap();
    // Writes to the pod leave status alone; writes to /status change only status.
    let r = admin
        .send_json(
            "PATCH",
            "/api/v1/namespaces/default/pods/p",
            "application/merge-patch+json",
            &json!({"metadata": {"labels": {"x": "1"}}, "status": {"phase": "Failed"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"]["phase"], "Running");
    assert_eq!(r.json()["metadata"]["labels"]["x"], "1");
    let r = admin
        .send_json(
            "PATCH",
            "/api/v1/namespaces/default/pods/p/status",
            "application/merge-patch+json",
            &json!({"metadata": {"labels": {"x": "2"}}, "status": {"phase": "Succeeded"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"]["phase"], "Succeeded");
    assert_eq!(r.json()["metadata"]["labels"]["x"], "1");

    // Logs: the container must be named when there are several; tailLines; timestamps.
    let r = admin
        .get("/api/v1/namespaces/default/pods/p/log")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "a container name must be specified for pod p, choose one of: [main side]"
    );
    let r = admin
        .get("/api/v1/namespaces/default/pods/p/log?container=main&tailLines=2")
        .await
        .unwrap();
    assert_eq!(r.text(), "b\nc\n");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    sim.store()
        .append_log("default", "p", Some("side"), "s1")
        .unwrap();
    let r = admin
        .get("/api/v1/namespaces/default/pods/p/log?container=side&timestamps=true")
        .await
        .unwrap();
    let line = r.text();
    let (ts, text) = line.trim_end().split_once(' ').unwrap();
    assert_eq!(text, "s1");
    assert!(
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
        "{ts}"
    );
}

#[tokio::test]
async fn lists_paginate_with_limit_and_continue() {
    let (sim, admin) = start(SimConfig::default()).await;
    for i in 0..5 {
        sim.store()
            .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("cm-{i}"), "namespace": "default"}}))
            .unwrap();
    }
    let mut names = Vec::new();
    let mut path = "/api/v1/namespaces/default/configmaps?limit=2".to_string();
    let mut rvs = Vec::new();
    loop {
        let page = admin.get(&path).await.unwrap().json();
        assert!(page["items"].as_array().unwrap().len() <= 2);
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
        );
        rvs.push(page["metadata"]["resourceVersion"].clone());
        match page["metadata"]["continue"].as_str() {
            Some(c) => {
                assert!(page["metadata"]["remainingItemCount"].as_u64().unwrap() > 0);
                path = format!("/api/v1/namespaces/default/configmaps?limit=2&continue={c}");
            }
            None => break,
        }
    }
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);
    assert_eq!(rvs.len(), 3);
    assert!(
        rvs.iter().all(|rv| *rv == rvs[0]),
        "every page carries the first page's resourceVersion"
    );
    let r = admin
        .get("/api/v1/namespaces/default/configmaps?limit=2&continue=garbage")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
}

/// Deletion as the API server's registry does it: finalizers (the
/// propagation policy's own, `foregroundDeletion` or `orphan`, included)
/// keep the object, marked with a `deletionTimestamp` that updates cannot
/// change, until the last one is removed; then it is gone (404, DELETED).
/// A deletion without finalizers answers the `Status` the fixtures show.
#[tokio::test]
async fn finalizers_keep_a_deleted_object_until_they_are_removed() {
    let (sim, admin) = start(SimConfig::default()).await;
    let ds = |name: &str| {
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
               "metadata": {"name": name, "namespace": "default",
                            "deletionTimestamp": "2020-01-01T00:00:00Z"},
               "spec": {"selector": {"matchLabels": {"a": "b"}},
                        "template": {"metadata": {"labels": {"a": "b"}},
                                     "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    };
    let path = "/apis/apps/v1/namespaces/default/daemonsets";
    let r = admin
        .send_json("POST", path, "application/json", &ds("fg"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    assert!(
        created["metadata"]["deletionTimestamp"].is_null(),
        "a create cannot set a deletionTimestamp"
    );
    let watch = admin
        .send(watch_request(&format!(
            "{path}?watch=1&fieldSelector=metadata.name%3Dfg&resourceVersion={}",
            created["metadata"]["resourceVersion"].as_str().unwrap()
        )))
        .await
        .unwrap();
    let mut events = Lines::new(watch);

    let r = admin
        .send_json(
            "DELETE",
            &format!("{path}/fg"),
            "application/json",
            &json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let marked = r.json();
    assert_eq!(marked["kind"], "DaemonSet", "the object, not a Status");
    assert_eq!(
        marked["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 0);
    let since = marked["metadata"]["deletionTimestamp"].clone();
    assert!(since.is_string(), "{marked}");
    let event = events.next_json().await.unwrap().unwrap();
    assert_eq!(event["type"], "MODIFIED");
    assert_eq!(event["object"]["metadata"]["deletionTimestamp"], since);
    let r = admin.get(&format!("{path}/fg")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["metadata"]["deletionTimestamp"], since);

    // An update keeps the mark; removing the last finalizer deletes.
    let mut update = r.json();
    update["metadata"]["deletionTimestamp"] = json!(null);
    update["metadata"]["labels"] = json!({"touched": "yes"});
    let r = admin
        .send_json("PUT", &format!("{path}/fg"), "application/json", &update)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["deletionTimestamp"], since);
    assert_eq!(
        events.next_json().await.unwrap().unwrap()["type"],
        "MODIFIED"
    );
    let r = admin
        .send_json(
            "PATCH",
            &format!("{path}/fg"),
            "application/merge-patch+json",
            &json!({"metadata": {"finalizers": null}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        events.next_json().await.unwrap().unwrap()["type"],
        "DELETED"
    );
    let r = admin.get(&format!("{path}/fg")).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["reason"], "NotFound");
    assert_eq!(r.json()["details"]["kind"], "daemonsets");
    assert_eq!(r.json()["details"]["group"], "apps");

    // Background (kubectl's default) without finalizers: gone at once.
    admin
        .send_json("POST", path, "application/json", &ds("bg"))
        .await
        .unwrap();
    let r = admin
        .send_json(
            "DELETE",
            &format!("{path}/bg"),
            "application/json",
            &json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kind"], "Status");
    assert_eq!(r.json()["status"], "Success");
    assert!(
        sim.store()
            .get("daemonsets", Some("default"), "bg")
            .is_none()
    );
}

/// A JWT's claims (its payload, not verified).
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("the payload is base64url");
    serde_json::from_slice(&bytes).expect("the payload is JSON")
}

//! `RealApiServer` does what the end-to-end tests rely on, against the real
//! kube-apiserver v1.20.2 of `cargo xtask kube`: pods as objects whose
//! status tests write, bound service-account tokens, people with groups
//! chosen at run time, the audit log, and chaperone's own key fetch.
//!
//! Needs the real server (skips without it, fails under CI).

use std::time::Duration;

use chaperone_tests::{real_api::RealApiServer, require_real_api};
use serde_json::{Value, json};

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn pods_are_objects_and_tokens_are_bound_to_them() {
    require_real_api!();
    let server = RealApiServer::shared().unwrap();
    let ns = "real-api-pods";
    // No controller-manager: the ServiceAccount is made by hand (mint_token
    // would too), and the pod mounts no token (the ServiceAccount admission
    // plugin refuses one that would, while the account has no token Secret).
    server
        .ensure(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .unwrap();
    server
        .ensure(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "agent", "namespace": ns}}))
        .unwrap();
    let pod = server
        .create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent-0", "namespace": ns, "labels": {"chaperone.dev/intercept": "true"}},
            "spec": {
                "nodeName": "node-a",
                "serviceAccountName": "agent",
                "automountServiceAccountToken": false,
                "containers": [{"name": "agent", "image": "agent:latest"}],
            },
        }))
        .unwrap();
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    assert_eq!(pod["spec"]["nodeName"], "node-a");

    let status = server
        .patch_status(
            &format!("/api/v1/namespaces/{ns}/pods/agent-0"),
            json!({"status": {
                "phase": "Running",
                "podIP": "10.244.0.7",
                "containerStatuses": [{
                    "name": "agent", "image": "agent:latest", "imageID": "", "ready": true,
                    "restartCount": 0, "state": {"running": {}},
                    "containerID": "containerd://0123456789abcdef",
                }],
            }}),
        )
        .unwrap();
    assert_eq!(status["status"]["podIP"], "10.244.0.7");
    assert_eq!(
        status["status"]["containerStatuses"][0]["containerID"],
        "containerd://0123456789abcdef"
    );

    let token = server
        .mint_token(
            ns,
            "agent",
            Some(("agent-0", &uid)),
            None,
            Duration::from_secs(3600),
        )
        .unwrap();
    let c = claims(&token);
    assert_eq!(c["iss"], chaperone_tests::real_api::ISSUER);
    assert_eq!(c["aud"], json!([chaperone_tests::real_api::ISSUER]));
    assert_eq!(c["kubernetes.io"]["pod"]["uid"], uid.as_str());
    assert_eq!(c["sub"], format!("system:serviceaccount:{ns}:agent"));

    let other = server
        .mint_token(
            ns,
            "agent",
            None,
            Some(&["chaperone"]),
            Duration::from_secs(600),
        )
        .unwrap();
    assert_eq!(claims(&other)["aud"], json!(["chaperone"]));

    // The server refuses what a real one refuses: a token shorter than 10
    // minutes, a pod whose uid is not the one given.
    assert!(
        server
            .mint_token(ns, "agent", None, None, Duration::from_secs(60))
            .is_err()
    );
    assert!(
        server
            .mint_token(
                ns,
                "agent",
                Some(("agent-0", "00000000-0000-0000-0000-000000000000")),
                None,
                Duration::from_secs(3600)
            )
            .is_err()
    );

    // kubectl with the minted token: authenticated as the service account,
    // which RBAC lets do nothing.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("agent.kubeconfig");
    server.write_kubeconfig(&kubeconfig, &token).unwrap();
    let out = server
        .kubectl()
        .env("KUBECONFIG", &kubeconfig)
        .args(["get", "secrets", "-n", ns])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("system:serviceaccount:{ns}:agent"))
            && stderr.contains("forbidden"),
        "{stderr}"
    );
}

#[test]
fn people_have_the_groups_their_certificate_names() {
    require_real_api!();
    let server = RealApiServer::shared().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let admin = dir.path().join("root.kubeconfig");
    server
        .write_person_kubeconfig(&admin, "root-person", &["system:masters", "ops"])
        .unwrap();
    let out = server
        .kubectl()
        .env("KUBECONFIG", &admin)
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("namespace/default"));

    let alice = dir.path().join("alice.kubeconfig");
    server
        .write_person_kubeconfig(&alice, "alice", &["approvers"])
        .unwrap();
    let out = server
        .kubectl()
        .env("KUBECONFIG", &alice)
        .args(["get", "secrets"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("User \"alice\""), "{stderr}");

    // A ClusterRoleBinding to her group takes effect. (Not to `view`: the
    // aggregated roles are empty without the controller-manager.)
    server
        .ensure(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        }))
        .unwrap();
    server
        .ensure(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "approvers-pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pod-reader"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "approvers"}],
        }))
        .unwrap();
    let can = server
        .kubectl()
        .env("KUBECONFIG", &alice)
        .args(["auth", "can-i", "list", "pods", "-n", "default"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&can.stdout).trim(), "yes");

    // Metadata-level audit events name who did what.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = server.audit_events().unwrap();
        let found = events.iter().any(|e| {
            e["kind"] == "Event"
                && e["level"] == "Metadata"
                && e["user"]["username"] == "alice"
                && e["objectRef"]["resource"] == "secrets"
                && e["responseStatus"]["code"] == 403
        });
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit event of alice's refused list of secrets in {} events",
            events.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 22: chaperone asked the JWKS for `application/json`, which the
/// real server answers with 406, so it never had keys. Against the real
/// server, chaperone's own key source fetches them.
#[test]
fn chaperone_fetches_the_service_account_keys_from_the_real_server() {
    require_real_api!();
    use chaperone::identity::{ApiServerKeySource, KeySource};
    let server = RealApiServer::shared().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(server.admin_kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        ApiServerKeySource::new(client).fetch().await
    });
    let keys = keys.expect("keys from the real server's JWKS");
    assert_eq!(
        keys.issuer.as_deref(),
        Some(chaperone_tests::real_api::ISSUER)
    );
    assert!(!keys.keys.is_empty(), "the JWKS has the signing key");
}

#[test]
fn a_server_of_ones_own_stops_on_drop() {
    require_real_api!();
    let server = RealApiServer::start().unwrap();
    let addr = server.addr();
    assert_eq!(server.version(), "v1.20.2");
    let version = server.request("GET", "/version", &[], Vec::new()).unwrap();
    assert_eq!(version.json()["gitVersion"], "v1.20.2");
    drop(server);
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "kube-apiserver still listens on {addr} after drop"
    );
}

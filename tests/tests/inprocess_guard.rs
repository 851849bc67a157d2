//! chaperone's decisions on one request, without root: allow, deny by
//! policy, mask (Secrets in get, list, table, watch; env values; logs;
//! exec output),
//! the requests it refuses before policy (ambiguous targets, unread
//! upgrades, tokens of another pod or of none, unredirected connections),
//! the masked write-back, per-pod limits, and impersonation. The guard, the
//! proxy and kube-sim run in this process (`chaperone_tests::inprocess`);
//! the root suite (`e2e_guard.rs`, `e2e_identity.rs`) proves the same
//! through the kernel redirect.

use std::time::{Duration, Instant};

use base64::Engine;
use chaperone::{identity::CredentialMode, limits::LimitConfig};
use chaperone_tests::{
    in_process,
    inprocess::{AgentRequest, Harness, HarnessSpec},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};

in_process!(
    allowed_requests_reach_the_api_server_with_the_agents_own_token,
    a_policy_denial_is_kubectls_forbidden_line_and_is_audited,
    secret_values_never_reach_the_agent,
    exec_output_is_masked_over_websocket_and_spdy,
    a_secret_watch_delivers_later_changes_masked,
    encoded_secret_paths_are_masked_or_refused_over_http1_and_http2,
    watches_and_logs_over_websocket_are_refused_before_the_api_server,
    a_token_of_another_pod_or_of_no_pod_is_refused,
    a_connection_the_kernel_did_not_redirect_is_refused,
    a_read_secret_written_back_is_refused_and_the_stored_one_kept,
    a_pod_over_its_in_flight_limit_gets_429_with_retry_after,
    a_pod_over_its_connection_limit_gets_429,
    impersonate_mode_reoriginates_with_chaperones_credentials,
    a_policy_can_ask_for_impersonation_on_a_passthrough_node,
);

const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agent-guard
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: no-deployment-deletes
      verbs: [delete]
      apiGroups: [apps]
      resources: [deployments]
      action: deny
      message: deleting deployments needs a human
    - name: no-exec-in-prod
      resources: [pods/exec]
      namespaces: ["prod-*"]
      action: deny
      message: production pods are not for agents; read their logs instead
    - name: secrets-masked
      resources: [secrets]
      action: mask
      record: RequestResponse
  defaultAction: allow
"#;

const PASSWORD: &str = "s3cr3t-Pa55w0rd-do-not-leak";
const TOKEN_VALUE: &str = "tok_9f8e7d6c5b4a3210fedcba";
const PRIVATE_KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAsecretkeymaterialdonotleak0123456789\n-----END RSA PRIVATE KEY-----";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The harness with [`POLICY`] (or `spec`'s own) and the objects of
/// `e2e_guard.rs`: a Secret, a production Deployment, pods with a token in
/// their env, a log with a private key.
fn harness(spec: HarnessSpec) -> Harness {
    let h = Harness::start(spec).unwrap();
    let store = h.sim.store();
    for ns in ["prod-a", "dev-a"] {
        store
            .create(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":ns}}))
            .unwrap();
    }
    store
        .create(json!({
            "apiVersion":"v1","kind":"Secret",
            "metadata":{"name":"db","namespace":"default",
                "annotations":{"kubectl.kubernetes.io/last-applied-configuration":
                    format!("{{\"apiVersion\":\"v1\",\"data\":{{\"password\":\"{}\"}},\"kind\":\"Secret\"}}", b64(PASSWORD))}},
            "type":"Opaque",
            "data":{"password": b64(PASSWORD), "token": b64(TOKEN_VALUE)},
        }))
        .unwrap();
    store
        .create(json!({
            "apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":"web","namespace":"prod-a"},
            "spec":{"replicas":1,"selector":{"matchLabels":{"app":"web"}},
                "template":{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"web","image":"web:1"}]}}},
        }))
        .unwrap();
    for (ns, name) in [("prod-a", "web-0"), ("default", "worker")] {
        store
            .create(json!({
                "apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":ns},
                "spec":{"containers":[{"name":"app","image":"app:1",
                    "env":[{"name":"API_TOKEN","value":TOKEN_VALUE}]}]},
            }))
            .unwrap();
    }
    store
        .append_log("default", "worker", None, "booting")
        .unwrap();
    for line in PRIVATE_KEY.lines() {
        store.append_log("default", "worker", None, line).unwrap();
    }
    store
        .append_log("default", "worker", None, "ready")
        .unwrap();
    h
}

fn guarded() -> Harness {
    harness(HarnessSpec {
        policy: POLICY.into(),
        ..HarnessSpec::default()
    })
}

fn all_bytes(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_secret(what: &str, bytes: &str) {
    for secret in [PASSWORD, TOKEN_VALUE, "secretkeymaterialdonotleak"] {
        assert!(!bytes.contains(secret), "{what} leaked {secret}:\n{bytes}");
        assert!(
            !bytes.contains(&b64(secret)),
            "{what} leaked base64 of {secret}:\n{bytes}"
        );
    }
}

/// `value` (a Secret, or a list of them) carries the Secret `db` with its
/// password masked: valid base64 of chaperone's marker.
fn assert_masked_secret(what: &str, value: &Value) {
    let secrets = match value["items"].as_array() {
        Some(items) => items.clone(),
        None => vec![value.clone()],
    };
    let db = secrets
        .iter()
        .find(|s| s["metadata"]["name"] == "db")
        .unwrap_or_else(|| panic!("{what}: no Secret db in {value}"));
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(db["data"]["password"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{what}: the masked password is not base64 ({e}): {db}"));
    assert!(
        String::from_utf8_lossy(&decoded).contains("masked by chaperone"),
        "{what}: {db}"
    );
}

/// Paths (and queries) kube-sim received from the agent, oldest first.
fn agent_paths(h: &Harness) -> Vec<String> {
    h.agent_requests_seen().into_iter().map(|r| r.uri).collect()
}

fn allowed_requests_reach_the_api_server_with_the_agents_own_token() {
    let h = guarded();
    let out = h.kubectl(&["get", "deployment", "web", "-n", "prod-a", "-o", "name"]);
    assert!(out.status.success(), "{}", all_bytes(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deployment.apps/web"
    );
    let seen = h
        .sim
        .requests()
        .into_iter()
        .rfind(|r| {
            r.uri
                .starts_with("/apis/apps/v1/namespaces/prod-a/deployments/web")
        })
        .expect("the get reached kube-sim");
    assert_eq!(seen.status, 200);
    assert_eq!(
        seen.token.as_deref(),
        Some(h.token.as_str()),
        "passthrough forwards the agent's own token"
    );
    assert!(seen.impersonated.is_none());

    // The body is the API server's, byte for byte.
    let through = h.get("/api/v1/namespaces/prod-a/pods/web-0");
    assert_eq!(through.status, 200, "{}", through.body);
    let stored = h.sim.store().get("pods", Some("prod-a"), "web-0").unwrap();
    assert_eq!(through.json()["metadata"]["uid"], stored["metadata"]["uid"]);
}

fn a_policy_denial_is_kubectls_forbidden_line_and_is_audited() {
    let h = guarded();
    let out = h.kubectl(&["delete", "deployment", "web", "-n", "prod-a"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("Error from server (Forbidden): "),
        "{stderr}"
    );
    assert!(
        stderr.contains("deleting deployments needs a human"),
        "{stderr}"
    );
    assert!(
        h.sim
            .store()
            .get("deployments.apps", Some("prod-a"), "web")
            .is_some(),
        "the deployment must survive"
    );
    assert!(
        h.sim.requests().iter().all(|r| r.method != "DELETE"),
        "a denied request never reaches the API server"
    );

    // A denied exec: refused before any upgrade.
    let exec = h.send(AgentRequest::new(
        http::Method::POST,
        "/api/v1/namespaces/prod-a/pods/web-0/exec?command=echo&command=hi&stdout=true",
    ));
    assert_eq!(exec.status, 403, "{}", exec.body);
    assert!(
        exec.message()
            .contains("production pods are not for agents"),
        "{}",
        exec.body
    );

    let denied = h.wait_for_audit("the denied delete", |e| {
        e["verb"] == "delete" && e["objectRef"]["resource"] == "deployments"
    });
    assert_eq!(denied["kind"], "Event");
    assert_eq!(denied["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(denied["responseStatus"]["code"], 403);
    assert_eq!(denied["annotations"]["chaperone.dev/decision"], "deny");
    assert_eq!(
        denied["annotations"]["chaperone.dev/rule"],
        "no-deployment-deletes"
    );
    assert_eq!(denied["user"]["username"], h.agent_user());
    // The session of the attested pod has it too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h
        .session_records()
        .iter()
        .any(|r| r.to_string().contains("no-deployment-deletes"))
    {
        assert!(
            Instant::now() < deadline,
            "no session record of the denial under {}",
            h.sessions_dir().display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn secret_values_never_reach_the_agent() {
    let h = guarded();
    for args in [
        &["get", "secret", "db", "-o", "yaml"][..],
        &["get", "secrets", "-o", "json"],
        &["get", "secrets"],
        &["describe", "secret", "db"],
        &["get", "pod", "worker", "-o", "yaml"],
        &["logs", "worker"],
    ] {
        let out = h.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            all_bytes(&out)
        );
        assert_no_secret(&format!("kubectl {args:?}"), &all_bytes(&out));
    }
    // Masked values stay valid base64 with a marker.
    assert_masked_secret(
        "a get",
        &h.get("/api/v1/namespaces/default/secrets/db").json(),
    );
    // Logs keep their other lines.
    let logs = String::from_utf8_lossy(&h.kubectl(&["logs", "worker"]).stdout).into_owned();
    assert!(
        logs.starts_with("booting\n") && logs.ends_with("ready\n"),
        "{logs}"
    );
    // Over HTTP/2 as well.
    let list = h.send(AgentRequest::get("/api/v1/secrets").http2());
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains("\"db\""), "{}", list.body);
    assert_no_secret("an HTTP/2 list", &list.body);
}

/// `kubectl exec` output is read frame by frame and masked, over
/// WebSocket (kubectl's default) and SPDY/3.1 (older clients); exit codes
/// survive.
fn exec_output_is_masked_over_websocket_and_spdy() {
    let h = guarded();
    for spdy in [false, true] {
        let mut cmd = h.kubectl_command(&["exec", "worker", "--", "env"]);
        if spdy {
            cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
        }
        let out = h.run_kubectl(&mut cmd);
        assert!(out.status.success(), "spdy={spdy}: {}", all_bytes(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains("API_TOKEN="), "spdy={spdy}: {stdout}");
        assert!(
            stdout.contains("masked by chaperone"),
            "spdy={spdy}: {stdout}"
        );
        assert_no_secret(&format!("kubectl exec env (spdy={spdy})"), &all_bytes(&out));

        let mut cmd = h.kubectl_command(&["exec", "worker", "--", "sh", "-c", "env >&2; exit 3"]);
        if spdy {
            cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
        }
        let out = h.run_kubectl(&mut cmd);
        assert_eq!(
            out.status.code(),
            Some(3),
            "spdy={spdy}: {}",
            all_bytes(&out)
        );
        assert_no_secret(
            &format!("kubectl exec stderr (spdy={spdy})"),
            &all_bytes(&out),
        );
    }
}

/// A watch delivers a Secret created after it started, masked.
fn a_secret_watch_delivers_later_changes_masked() {
    let h = guarded();
    let watched = h.runtime.block_on(async {
        let mut conn = h.connect(false, false).await.unwrap();
        let response = conn
            .start(
                &AgentRequest::get("/api/v1/namespaces/default/secrets?watch=true"),
                &h.token,
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut seen = String::new();
        let mut created = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !seen.contains("\"late\"") {
            let frame = tokio::time::timeout_at(deadline, body.frame())
                .await
                .unwrap_or_else(|_| panic!("the watch did not deliver \"late\": {seen}"));
            if let Some(Ok(frame)) = frame
                && let Some(data) = frame.data_ref()
            {
                seen.push_str(&String::from_utf8_lossy(data));
            }
            // Once the watch has delivered the existing Secret, it is open.
            if !created && seen.contains("\"db\"") {
                h.sim
                    .store()
                    .create(json!({"apiVersion":"v1","kind":"Secret",
                        "metadata":{"name":"late","namespace":"default"},
                        "data":{"password": b64(PASSWORD)}}))
                    .unwrap();
                created = true;
            }
        }
        seen
    });
    assert_no_secret("a watch of secrets", &watched);
}

/// The API server percent-decodes the path (`%2F` included) before it reads
/// resource, namespace and name: an encoded Secret path is read, masked and
/// forwarded as the API server reads it, or refused; never plaintext.
fn encoded_secret_paths_are_masked_or_refused_over_http1_and_http2() {
    let h = guarded();
    for http2 in [false, true] {
        let send = |path: &str| {
            let request = AgentRequest::get(path);
            h.send(if http2 { request.http2() } else { request })
        };
        for path in [
            "/api/v1/namespaces/default/secr%65ts/db",
            "/api/v1/namespaces/default/secrets%2Fdb",
            "/api/v1/namespaces/default/secrets%2fdb",
            "/api/v1/namespaces%2Fdefault%2Fsecrets",
            "/api/v1/n%61mespaces/default/secrets?fieldSelector=metadata.name%3Ddb",
            "/%61pi/v1/namespaces/default/secr%65ts/db",
        ] {
            let before = agent_paths(&h).len();
            let reply = send(path);
            assert_no_secret(&format!("h2={http2} {path}"), &reply.body);
            assert_eq!(reply.status, 200, "h2={http2} {path}: {}", reply.body);
            assert_masked_secret(&format!("h2={http2} {path}"), &reply.json());
            let sent = agent_paths(&h)[before..].to_vec();
            assert!(!sent.is_empty(), "h2={http2} {path}: nothing forwarded");
            assert!(
                sent.iter()
                    .all(|uri| uri.starts_with("/api/v1/namespaces/default/secrets")
                        && !uri.split('?').next().unwrap().contains('%')),
                "h2={http2} {path}: forwarded {sent:?}"
            );
        }
        // Dot segments, invalid escapes and empty segments have no single
        // reading: refused with a Status before the API server.
        for path in [
            "/api/v1/namespaces/default/pods/../secrets/db",
            "/api/v1/namespaces/default/pods/%2e%2e/secrets/db",
            "/api/v1/namespaces/default/secr%zzets/db",
            "/api/v1/namespaces//secrets",
        ] {
            let before = agent_paths(&h).len();
            let reply = send(path);
            assert_no_secret(&format!("h2={http2} {path}"), &reply.body);
            assert_eq!(reply.status, 400, "h2={http2} {path}: {}", reply.body);
            assert_eq!(reply.json()["kind"], "Status", "{}", reply.body);
            let sent = agent_paths(&h)[before..].to_vec();
            assert!(sent.is_empty(), "h2={http2} {path}: forwarded {sent:?}");
        }
    }
    let refused = h.wait_for_audit("an ambiguous target", |e| {
        e["requestURI"].as_str().is_some_and(|u| u.contains("%zz"))
    });
    assert_eq!(refused["responseStatus"]["code"], 400);
}

/// A watch or a log over WebSocket would be a tunnel chaperone does not
/// read: refused with a Status before the API server, never a 101.
fn watches_and_logs_over_websocket_are_refused_before_the_api_server() {
    let h = guarded();
    for (path, protocol) in [
        (
            "/api/v1/namespaces/default/secrets?watch=true",
            "base64.channel.k8s.io",
        ),
        (
            "/api/v1/watch/namespaces/default/secrets",
            "v4.channel.k8s.io",
        ),
        (
            "/api/v1/namespaces/default/secr%65ts?w%61tch=1",
            "base64.channel.k8s.io",
        ),
        (
            "/api/v1/namespaces/default/pods/worker/log?follow=true",
            "base64.binary.k8s.io",
        ),
        (
            "/api/v1/namespaces/default/pods/worker/log",
            "binary.k8s.io",
        ),
    ] {
        let before = agent_paths(&h).len();
        let reply = h.send(
            AgentRequest::get(path)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .header("sec-websocket-protocol", protocol),
        );
        assert_no_secret(&format!("websocket {path}"), &reply.body);
        assert_eq!(
            reply.status, 400,
            "websocket {path} ({protocol}): {}",
            reply.body
        );
        assert!(reply.body.contains("plain HTTP"), "{path}: {}", reply.body);
        let sent = agent_paths(&h)[before..].to_vec();
        assert!(sent.is_empty(), "websocket {path}: forwarded {sent:?}");
    }
}

/// A valid token minted for another pod than the one the kernel attests,
/// and a valid token bound to no pod (`kubectl create token`): both 401,
/// neither ever reaches the API server, and the refusal says why.
fn a_token_of_another_pod_or_of_no_pod_is_refused() {
    let h = guarded();
    let other = h
        .sim
        .store()
        .create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "other-pod", "namespace": "default"},
            "spec": {"serviceAccountName": "agent", "containers": [{"name": "app", "image": "app:1"}]},
        }))
        .unwrap();
    let stolen = h
        .sim
        .mint_service_account_token(
            "default",
            "agent",
            Some(("other-pod", other["metadata"]["uid"].as_str().unwrap())),
            None,
            Duration::from_secs(600),
        )
        .unwrap();
    let unbound = h
        .sim
        .mint_service_account_token("default", "agent", None, None, Duration::from_secs(600))
        .unwrap();

    // kubectl's wording for a 401.
    let kubeconfig = h.work.path().join("stolen.kubeconfig");
    h.write_agent_kubeconfig(&kubeconfig, &stolen).unwrap();
    let out = h.run_kubectl(
        h.kubectl_command(&["get", "pods"])
            .env("KUBECONFIG", &kubeconfig),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("provide credentials"),
        "{}",
        all_bytes(&out)
    );

    for (token, why) in [
        (stolen.as_str(), "other-pod"),
        (unbound.as_str(), "is not bound to a pod"),
    ] {
        let reply = h.send(AgentRequest::get("/api/v1/namespaces/default/pods").token(token));
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert!(
            h.sim
                .requests()
                .iter()
                .all(|r| r.token.as_deref() != Some(token)),
            "a refused token never reaches the API server"
        );
        h.wait_for_audit(why, |e| {
            e["responseStatus"]["code"] == 401 && e.to_string().contains(why)
        });
    }
    // No token at all.
    let reply = h.send(AgentRequest::get("/api/v1/namespaces/default/pods").token(""));
    assert_eq!(reply.status, 401, "{}", reply.body);
}

/// Agents reach chaperone only through the redirect: a connection the
/// kernel did not attest gets no TLS and no answer.
fn a_connection_the_kernel_did_not_redirect_is_refused() {
    let h = guarded();
    let refused = h.runtime.block_on(async {
        match h.connect(false, true).await {
            Err(error) => format!("{error:#}"),
            Ok(mut conn) => match conn
                .send(&AgentRequest::get("/api/v1/namespaces"), &h.token)
                .await
            {
                Err(error) => format!("{error:#}"),
                Ok(reply) => panic!("an unattested connection was answered: {reply:?}"),
            },
        }
    });
    assert!(!refused.is_empty());
    assert!(
        h.sim
            .requests()
            .iter()
            .all(|r| r.token.as_deref() != Some(h.token.as_str()))
    );
}

/// `kubectl get secret -o yaml > f`, then `kubectl replace -f f` or a
/// PUT of the masked object: refused with chaperone's 422, and the stored
/// Secret keeps its values. A patch of just a changed key still goes through.
fn a_read_secret_written_back_is_refused_and_the_stored_one_kept() {
    let h = guarded();
    let stored = || {
        let secret = h.sim.store().get("secrets", Some("default"), "db").unwrap();
        (
            secret["data"].clone(),
            secret["metadata"]["annotations"].clone(),
        )
    };
    let before = stored();
    assert_eq!(before.0["password"], b64(PASSWORD));

    let read = h.kubectl(&["get", "secret", "db", "-o", "yaml"]);
    assert!(read.status.success(), "{}", all_bytes(&read));
    let file = h.work.path().join("db.yaml");
    let yaml = String::from_utf8(read.stdout)
        .unwrap()
        .replace("name: db\n", "name: db\n  labels:\n    edited: \"yes\"\n");
    assert!(yaml.contains("edited"), "{yaml}");
    std::fs::write(&file, yaml).unwrap();
    let out = h.kubectl(&["replace", "-f", file.to_str().unwrap()]);
    let text = all_bytes(&out);
    assert!(
        !out.status.success(),
        "kubectl replace went through:\n{text}"
    );
    assert!(
        text.contains("carries values masked by chaperone") && text.contains("kubectl patch"),
        "{text}"
    );
    assert_eq!(
        stored(),
        before,
        "kubectl replace changed the stored Secret"
    );

    let mut masked: Value = h.get("/api/v1/namespaces/default/secrets/db").json();
    masked["metadata"]["labels"] = json!({"edited": "yes"});
    let put = h.send(AgentRequest::put(
        "/api/v1/namespaces/default/secrets/db",
        &masked,
    ));
    assert_eq!(put.status, 422, "{}", put.body);
    assert_eq!(stored(), before, "the PUT changed the stored Secret");

    let patch = h.send(AgentRequest::patch(
        "/api/v1/namespaces/default/secrets/db",
        "application/merge-patch+json",
        &json!({"stringData": {"extra": "v"}}),
    ));
    assert_eq!(patch.status, 200, "{}", patch.body);
    let after = stored();
    assert_eq!(after.0["password"], before.0["password"]);
    assert_eq!(after.0["token"], before.0["token"]);
}

/// `--max-requests-per-pod 1`: while a watch is open, the pod's next
/// request gets a 429 `Status` with `Retry-After`; once the watch ends,
/// requests pass again.
fn a_pod_over_its_in_flight_limit_gets_429_with_retry_after() {
    let h = harness(HarnessSpec {
        limits: LimitConfig {
            requests_per_pod: 1,
            ..LimitConfig::default()
        },
        ..HarnessSpec::default()
    });
    h.runtime.block_on(async {
        let mut watching = h.connect(true, false).await.unwrap();
        let watch = watching
            .start(
                &AgentRequest::get("/api/v1/namespaces/default/configmaps?watch=true"),
                &h.token,
            )
            .await
            .unwrap();
        assert_eq!(watch.status(), 200);
        let mut other = h.connect(true, false).await.unwrap();
        let reply = other
            .send(
                &AgentRequest::get("/api/v1/namespaces/default/configmaps"),
                &h.token,
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 429, "{}", reply.body);
        assert_eq!(reply.headers["retry-after"], "1");
        assert_eq!(reply.json()["reason"], "TooManyRequests", "{}", reply.body);
        assert!(
            reply.json()["details"]["retryAfterSeconds"].is_number(),
            "{}",
            reply.body
        );
        drop(watch);
        drop(watching);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let reply = other
                .send(
                    &AgentRequest::get("/api/v1/namespaces/default/configmaps"),
                    &h.token,
                )
                .await
                .unwrap();
            if reply.status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the ended watch's slot was not released: {}",
                reply.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// `--max-connections-per-pod 1`: the pod's second connection gets 429 on
/// every request while the first is open.
fn a_pod_over_its_connection_limit_gets_429() {
    let h = harness(HarnessSpec {
        limits: LimitConfig {
            connections_per_pod: 1,
            ..LimitConfig::default()
        },
        ..HarnessSpec::default()
    });
    h.runtime.block_on(async {
        let request = AgentRequest::get("/api/v1/namespaces/default/configmaps");
        let mut first = h.connect(false, false).await.unwrap();
        assert_eq!(first.send(&request, &h.token).await.unwrap().status, 200);
        let mut second = h.connect(false, false).await.unwrap();
        let reply = second.send(&request, &h.token).await.unwrap();
        assert_eq!(reply.status, 429, "{}", reply.body);
        assert_eq!(reply.json()["reason"], "TooManyRequests", "{}", reply.body);
        // The first connection is still served.
        assert_eq!(first.send(&request, &h.token).await.unwrap().status, 200);
    });
}

/// `--credential-mode impersonate --audience chaperone`: the API server
/// sees chaperone's credentials acting as the agent (its pod named in
/// `Impersonate-Extra`); an agent's own `Impersonate-User` never passes
/// (it is dropped: the request acts as the agent).
fn impersonate_mode_reoriginates_with_chaperones_credentials() {
    let mut spec = HarnessSpec {
        credential_mode: CredentialMode::Impersonate,
        token_audience: Some(vec!["chaperone".into()]),
        ..HarnessSpec::default()
    };
    spec.identity.service_accounts.audiences = vec!["chaperone".into()];
    let h = harness(spec);
    let out = h.kubectl(&["get", "configmaps", "-n", "default"]);
    assert!(out.status.success(), "{}", all_bytes(&out));
    let seen = h
        .sim
        .requests()
        .into_iter()
        .rfind(|r| r.uri.starts_with("/api/v1/namespaces/default/configmaps"))
        .expect("the list reached the API server");
    assert_eq!(
        seen.authenticated.map(|u| u.username).as_deref(),
        Some("kubernetes-admin"),
        "upstream must carry chaperone's credentials, not the agent's token"
    );
    let acted_as = seen.impersonated.expect("impersonation headers");
    assert_eq!(acted_as.username, h.agent_user());
    assert!(
        acted_as
            .extra
            .get("authentication.kubernetes.io/pod-uid")
            .is_some_and(|v| v == std::slice::from_ref(&h.pod_uid)),
        "the pod is named in Impersonate-Extra: {:?}",
        acted_as.extra
    );
    assert!(
        h.sim
            .requests()
            .iter()
            .all(|r| r.token.as_deref() != Some(h.token.as_str())),
        "the agent's token never reaches the API server"
    );

    let reply =
        h.send(AgentRequest::get("/api/v1/secrets").header("impersonate-user", "system:admin"));
    // Stripped: the request acts as the agent, whatever it asked for.
    let seen = h
        .sim
        .requests()
        .into_iter()
        .rfind(|r| r.uri.starts_with("/api/v1/secrets"))
        .unwrap_or_else(|| panic!("the list did not reach the API server: {}", reply.body));
    assert_eq!(seen.impersonated.map(|u| u.username), Some(h.agent_user()));
    assert!(
        h.sim.requests().iter().all(|r| r
            .impersonated
            .as_ref()
            .is_none_or(|u| u.username != "system:admin")),
        "an agent-supplied Impersonate-User reached the API server"
    );
}

fn a_policy_can_ask_for_impersonation_on_a_passthrough_node() {
    let h = harness(HarnessSpec {
        policy: "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: impersonated\n\
                 spec:\n  subjects:\n    - serviceAccounts: [\"default/agent\"]\n  credentialMode: impersonate\n  \
                 defaultAction: allow\n"
            .into(),
        ..HarnessSpec::default()
    });
    let reply = h.get("/api/v1/namespaces/default/configmaps");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = h
        .sim
        .requests()
        .into_iter()
        .rfind(|r| r.uri.starts_with("/api/v1/namespaces/default/configmaps"))
        .unwrap();
    assert_eq!(
        seen.authenticated.map(|u| u.username).as_deref(),
        Some("kubernetes-admin")
    );
    assert_eq!(seen.impersonated.map(|u| u.username), Some(h.agent_user()));
}

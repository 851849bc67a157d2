//! Chaperone's decisions seen by a real kubectl agent through the kernel
//! redirect: policy denials print kubectl's Forbidden line with chaperone's
//! message, secrets never reach the agent, a token replayed from another pod
//! is refused, and the session is recorded and audited. Needs root.

use std::time::Duration;

use base64::Engine;
use chaperone_tests::{
    e2e::{Backend, World, WorldSpec, run_for, workspace_binary},
    on_both_servers, require_root,
    wait::{Followed, wait_for},
};

on_both_servers!(
    denials_print_kubectls_forbidden_line_with_chaperones_message,
    secret_values_never_reach_the_agent,
    a_token_replayed_from_another_pod_is_refused,
    the_session_is_recorded_and_audited,
    encoded_secret_paths_are_masked_or_refused_over_http1_and_http2,
    watches_and_logs_over_websocket_are_refused_before_the_api_server,
    a_token_bound_to_no_pod_is_refused,
    an_agent_cannot_unlabel_itself,
    a_read_secret_written_back_is_refused_and_the_stored_one_kept,
);

const LIMIT: Duration = Duration::from_secs(60);

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

/// The world of these scenarios; on the simulator the worker pod also has
/// a log (a real server needs a kubelet for logs).
fn world(backend: Backend) -> World {
    let world = World::start(WorldSpec {
        backend,
        policy: POLICY.into(),
        ..WorldSpec::default()
    })
    .unwrap();
    let store = &world.api;
    for ns in ["prod-a", "dev-a"] {
        store
            .create(
                serde_json::json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":ns}}),
            )
            .unwrap();
    }
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    store
        .create(serde_json::json!({
            "apiVersion":"v1","kind":"Secret",
            "metadata":{"name":"db","namespace":"default",
                "annotations":{"kubectl.kubernetes.io/last-applied-configuration":
                    format!("{{\"apiVersion\":\"v1\",\"data\":{{\"password\":\"{}\"}},\"kind\":\"Secret\"}}", b64(PASSWORD))}},
            "type":"Opaque",
            "data":{"password": b64(PASSWORD), "token": b64(TOKEN_VALUE)},
        }))
        .unwrap();
    store
        .create(serde_json::json!({
            "apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":"web","namespace":"prod-a"},
            "spec":{"replicas":1,"selector":{"matchLabels":{"app":"web"}},
                "template":{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"web","image":"web:1"}]}}},
        }))
        .unwrap();
    for (ns, name) in [("prod-a", "web-0"), ("default", "worker")] {
        store
            .create(serde_json::json!({
                "apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":ns},
                "spec":{"containers":[{"name":"app","image":"app:1",
                    "env":[{"name":"API_TOKEN","value":TOKEN_VALUE}]}]},
            }))
            .unwrap();
    }
    if backend == Backend::Real {
        return world;
    }
    let store = world.sim().store();
    store
        .append_log("default", "worker", None, "booting")
        .unwrap();
    for line in PRIVATE_KEY.lines() {
        store.append_log("default", "worker", None, line).unwrap();
    }
    store
        .append_log("default", "worker", None, "ready")
        .unwrap();
    world
}

fn kubectl(world: &World, args: &[&str]) -> std::process::Output {
    run_for(&mut world.agent_kubectl(args), LIMIT).unwrap()
}

fn all_bytes(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_secret(what: &str, bytes: &str) {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for secret in [PASSWORD, TOKEN_VALUE, "secretkeymaterialdonotleak"] {
        assert!(!bytes.contains(secret), "{what} leaked {secret}:\n{bytes}");
        assert!(
            !bytes.contains(&b64(secret)),
            "{what} leaked base64 of {secret}:\n{bytes}"
        );
    }
}

fn denials_print_kubectls_forbidden_line_with_chaperones_message(backend: Backend) {
    require_root!();
    let world = world(backend);
    let out = kubectl(&world, &["delete", "deployment", "web", "-n", "prod-a"]);
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
        world
            .api
            .get("deployments.apps", Some("prod-a"), "web")
            .is_some(),
        "the deployment must survive"
    );

    let out = kubectl(
        &world,
        &["exec", "web-0", "-n", "prod-a", "--", "echo", "hi"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Forbidden"), "{stderr}");
    assert!(
        stderr.contains("production pods are not for agents"),
        "{stderr}"
    );
    // Other verbs still work.
    let ok = kubectl(
        &world,
        &["get", "deployment", "web", "-n", "prod-a", "-o", "name"],
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "deployment.apps/web"
    );
}

fn secret_values_never_reach_the_agent(backend: Backend) {
    require_root!();
    let world = world(backend);
    let mut reads = vec![
        &["get", "secret", "db", "-o", "yaml"][..],
        &["get", "secrets", "-o", "json"],
        &["get", "secrets"],
        &["describe", "secret", "db"],
        &["get", "pod", "worker", "-o", "yaml"],
    ];
    if backend == Backend::Sim {
        reads.push(&["logs", "worker"]);
    }
    for args in reads {
        let out = kubectl(&world, args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            all_bytes(&out)
        );
        assert_no_secret(&format!("kubectl {args:?}"), &all_bytes(&out));
    }
    // Masked values stay valid base64 with a marker.
    let json: serde_json::Value =
        serde_json::from_slice(&kubectl(&world, &["get", "secret", "db", "-o", "json"]).stdout)
            .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(json["data"]["password"].as_str().unwrap())
        .unwrap();
    assert!(String::from_utf8_lossy(&decoded).contains("masked by chaperone"));
    if backend == Backend::Sim {
        // Logs keep their non-secret lines.
        let logs =
            String::from_utf8_lossy(&kubectl(&world, &["logs", "worker"]).stdout).into_owned();
        assert!(
            logs.starts_with("booting\n") && logs.ends_with("ready\n"),
            "{logs}"
        );
    }

    // A watch delivers a change made meanwhile, masked.
    let mut watch = world.agent_kubectl(&["get", "secrets", "-w", "-o", "json"]);
    watch
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let watch = Followed::new(watch.spawn().unwrap());
    // kubectl prints the list it watches from; a change made after that
    // list is delivered by the watch (it starts at the list's version).
    watch.wait_for("\"db\"", LIMIT);
    let b64 = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
    world
        .api
        .create(serde_json::json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"late","namespace":"default"},"data":{"password":b64}}))
        .unwrap();
    watch.wait_for("\"late\"", LIMIT);
    let watched = watch.kill();
    assert_no_secret("kubectl get secrets -w", &watched);
}

/// `curl` inside the agent pod, at the API server's service address, with
/// the pod's own token: the path is sent byte for byte (`--path-as-is`).
/// Returns (HTTP code, body).
fn agent_curl(world: &World, http: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!(
        "https://{}:{}{path}",
        world.credentials.service_host, world.credentials.service_port
    );
    let auth = format!("Authorization: Bearer {}", world.token);
    let mut cmd = world.agent().in_cluster_command(&world.credentials, "curl");
    cmd.args([
        "-sS",
        "--path-as-is",
        http,
        "--max-time",
        "5",
        "--cacert",
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "-H",
        &auth,
        "-w",
        "\n%{http_code}",
    ])
    .args(extra)
    .arg(&url);
    let out = run_for(&mut cmd, LIMIT).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or(0);
    (
        code,
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// What reached the API server as the agent (not chaperone's own
/// control-plane requests): path and query as received, oldest first. On
/// a real server, its own audit log says what it received.
fn agent_requests(world: &World) -> Vec<String> {
    world
        .api
        .seen("/")
        .into_iter()
        .filter(|r| r.user == "system:serviceaccount:default:agent")
        .map(|r| r.uri)
        .collect()
}

/// The API server percent-decodes the path (`%2F` included) before it reads
/// resource, namespace and name: an encoded Secret path is read, masked and
/// forwarded as the API server reads it, or refused; never plaintext.
fn encoded_secret_paths_are_masked_or_refused_over_http1_and_http2(backend: Backend) {
    require_root!();
    let world = world(backend);
    for http in ["--http1.1", "--http2"] {
        for path in [
            "/api/v1/namespaces/default/secr%65ts/db",
            "/api/v1/namespaces/default/SECR%45TS/db",
            "/api/v1/namespaces/default/secrets%2Fdb",
            "/api/v1/namespaces/default/secrets%2fdb",
            "/api/v1/namespaces%2Fdefault%2Fsecrets",
            "/api/v1/n%61mespaces/default/secrets?fieldSelector=metadata.name%3Ddb",
            "/%61pi/v1/namespaces/default/secr%65ts/db",
        ] {
            let before = agent_requests(&world).len();
            let (code, body) = agent_curl(&world, http, path, &[]);
            assert_no_secret(&format!("{http} {path}"), &body);
            let sent = agent_requests(&world)[before..].to_vec();
            if path.contains("SECR") {
                // Not a resource the API server serves: its 404, nothing to mask.
                assert_eq!(code, 404, "{http} {path}: {body}");
                continue;
            }
            assert_eq!(code, 200, "{http} {path}: {body}");
            assert!(
                body.contains("masked by chaperone") || body.contains("password"),
                "{http} {path}: {body}"
            );
            // What the API server received reads the same in every layer.
            assert!(!sent.is_empty(), "{http} {path}: nothing forwarded");
            assert!(
                sent.iter()
                    .all(|uri| uri.starts_with("/api/v1/namespaces/default/secrets")
                        && !uri.split('?').next().unwrap().contains('%')),
                "{http} {path}: forwarded {sent:?}"
            );
        }
        // An encoded watch of secrets (`w%61tch` is `watch` to the API
        // server): masked events only.
        let (_, body) = agent_curl(
            &world,
            http,
            "/api/v1/namespaces/default/secr%65ts?w%61tch=true",
            &[],
        );
        assert_no_secret(&format!("{http} encoded watch"), &body);
        assert!(body.contains("ADDED"), "{http} encoded watch: {body}");
        // Dot segments and invalid escapes have no single reading: refused
        // before the API server.
        for path in [
            "/api/v1/namespaces/default/pods/../secrets/db",
            "/api/v1/namespaces/default/pods/%2e%2e/secrets/db",
            "/api/v1/namespaces/default/secr%zzets/db",
            "/api/v1/namespaces//secrets",
        ] {
            let before = agent_requests(&world).len();
            let (code, body) = agent_curl(&world, http, path, &[]);
            assert_no_secret(&format!("{http} {path}"), &body);
            assert_eq!(code, 400, "{http} {path}: {body}");
            assert!(
                body.contains("\"kind\":\"Status\""),
                "{http} {path}: {body}"
            );
            let sent = agent_requests(&world)[before..].to_vec();
            assert!(sent.is_empty(), "{http} {path}: forwarded {sent:?}");
        }
    }
}

/// A watch or a log over WebSocket would be a tunnel chaperone does not
/// read: refused with a Status before the API server, never a 101 with
/// unmasked frames.
fn watches_and_logs_over_websocket_are_refused_before_the_api_server(backend: Backend) {
    require_root!();
    let world = world(backend);
    for (path, protocol) in [
        (
            "/api/v1/namespaces/default/secrets?watch=true",
            "base64.channel.k8s.io",
        ),
        (
            "/api/v1/namespaces/default/secrets?watch=true",
            "channel.k8s.io",
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
        let before = agent_requests(&world).len();
        let (code, body) = agent_curl(
            &world,
            "--http1.1",
            path,
            &[
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket",
                "-H",
                "Sec-WebSocket-Version: 13",
                "-H",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "-H",
                &format!("Sec-WebSocket-Protocol: {protocol}"),
            ],
        );
        assert_no_secret(&format!("websocket {path}"), &body);
        assert_eq!(code, 400, "websocket {path} ({protocol}): {body}");
        assert!(body.contains("plain HTTP"), "websocket {path}: {body}");
        let sent = agent_requests(&world)[before..].to_vec();
        assert!(sent.is_empty(), "websocket {path}: forwarded {sent:?}");
    }
}

fn a_token_replayed_from_another_pod_is_refused(backend: Backend) {
    require_root!();
    let world = world(backend);
    // A valid token, but minted for a different pod than the one the kernel
    // attests for this connection (a real server binds tokens only to pods
    // that exist).
    let other = world
        .api
        .create(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "other-pod", "namespace": "default"},
            "spec": {"serviceAccountName": "agent", "containers": [{"name": "app", "image": "app:1"}]},
        }))
        .unwrap();
    let stolen = world
        .api
        .mint_token(
            "default",
            "agent",
            Some(("other-pod", other["metadata"]["uid"].as_str().unwrap())),
            None,
            Duration::from_secs(600),
        )
        .unwrap();
    std::fs::write(world.credentials.dir.join("token"), &stolen).unwrap();
    let out = kubectl(&world, &["get", "pods"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // kubectl's wording for a 401.
    assert!(stderr.contains("provide credentials"), "{stderr}");
    if backend == Backend::Sim {
        assert!(
            world
                .sim()
                .requests()
                .iter()
                .all(|r| r.token.as_deref() != Some(stolen.as_str())),
            "a refused token never reaches the API server"
        );
    }
    assert!(
        world.node.log_text().contains("other-pod"),
        "the refusal names the pod the token was issued to:\n{}",
        world.node.log_text()
    );
}

/// `kubectl create token agent`: a valid token of the agent's own service
/// account, bound to no pod. It would work from any guarded pod, so it is
/// refused unless the node's config opts in (`requirePodBinding: false`).
fn a_token_bound_to_no_pod_is_refused(backend: Backend) {
    require_root!();
    let world = world(backend);
    let unbound = world
        .api
        .mint_token("default", "agent", None, None, Duration::from_secs(600))
        .unwrap();
    std::fs::write(world.credentials.dir.join("token"), &unbound).unwrap();
    let out = kubectl(&world, &["get", "pods"]);
    assert!(!out.status.success(), "{}", all_bytes(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("provide credentials"), "{stderr}");
    if backend == Backend::Sim {
        assert!(
            world
                .sim()
                .requests()
                .iter()
                .all(|r| r.token.as_deref() != Some(unbound.as_str())),
            "a refused token never reaches the API server"
        );
    }
    // The refusal says why, in the audit log (written shortly after).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let audit =
            std::fs::read_to_string(world.work.path().join("audit.log")).unwrap_or_default();
        if audit.contains("is not bound to a pod") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audited refusal naming the missing binding:\n{audit}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's RBAC (here: a permissive simulator) lets it patch pods, and
/// policy allows everything by default: still, it may not take the label
/// off itself (or its namespace) that makes chaperone guard it.
fn an_agent_cannot_unlabel_itself(backend: Backend) {
    require_root!();
    let world = world(backend);
    let attempts: &[&[&str]] = &[
        &[
            "label",
            "pod",
            "agent-0",
            "chaperone.dev/intercept=false",
            "--overwrite",
        ],
        &["label", "pod", "agent-0", "chaperone.dev/intercept-"],
        &[
            "patch",
            "pod",
            "agent-0",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/labels"}]"#,
        ],
        &[
            "patch",
            "pod",
            "agent-0",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":null}}"#,
        ],
        &[
            "annotate",
            "namespace",
            "default",
            "chaperone.dev/intercept=false",
        ],
        &[
            "label",
            "namespace",
            "default",
            "chaperone.dev/intercept=false",
        ],
    ];
    for args in attempts {
        let out = kubectl(&world, args);
        let said = all_bytes(&out);
        assert!(!out.status.success(), "kubectl {args:?} succeeded: {said}");
        assert!(
            said.contains("Forbidden") && said.contains("chaperone.dev/intercept"),
            "kubectl {args:?}: {said}"
        );
    }
    let pod = world.api.get("pods", Some("default"), "agent-0").unwrap();
    assert_eq!(pod["metadata"]["labels"]["chaperone.dev/intercept"], "true");
    // Other labels are the agent's business.
    let out = kubectl(&world, &["label", "pod", "agent-0", "stage=review"]);
    assert!(out.status.success(), "{}", all_bytes(&out));
    // chaperone's own namespace is off limits.
    let out = kubectl(&world, &["get", "secrets", "-n", "chaperone-system"]);
    assert!(!out.status.success(), "{}", all_bytes(&out));
    assert!(
        all_bytes(&out).contains("chaperone's own"),
        "{}",
        all_bytes(&out)
    );
}

fn the_session_is_recorded_and_audited(backend: Backend) {
    require_root!();
    let world = world(backend);
    assert!(
        kubectl(&world, &["get", "secret", "db", "-o", "yaml"])
            .status
            .success()
    );
    assert!(
        !kubectl(&world, &["delete", "deployment", "web", "-n", "prod-a"])
            .status
            .success()
    );

    // Recording and audit are written off the data path: wait until the
    // session is on disk and the denied delete's event is flushed.
    let sessions_dir = world.work.path().join("sessions");
    wait_for("chaperone sessions to list the attested pod", LIMIT, || {
        let sessions = run_for(
            std::process::Command::new(workspace_binary("chaperone"))
                .args(["sessions", "--dir"])
                .arg(&sessions_dir),
            LIMIT,
        )
        .unwrap();
        String::from_utf8_lossy(&sessions.stdout)
            .contains("default/agent-0")
            .then_some(())
    });
    let audit_log = world.work.path().join("audit.log");
    let audit = wait_for("the denied delete's audit event", LIMIT, || {
        let audit = std::fs::read_to_string(&audit_log).unwrap_or_default();
        audit
            .lines()
            .any(|l| l.contains("\"delete\"") && l.contains("\"deployments\""))
            .then_some(audit)
    });
    let events: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let denied = events
        .iter()
        .find(|e| e["verb"] == "delete" && e["objectRef"]["resource"] == "deployments")
        .unwrap_or_else(|| panic!("no audit event for the denied delete:\n{audit}"));
    assert_eq!(denied["kind"], "Event");
    assert_eq!(denied["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(denied["responseStatus"]["code"], 403);
    assert_eq!(denied["annotations"]["chaperone.dev/decision"], "deny");
    assert_eq!(
        denied["annotations"]["chaperone.dev/rule"],
        "no-deployment-deletes"
    );
    assert_eq!(
        denied["user"]["username"],
        "system:serviceaccount:default:agent"
    );
    assert_no_secret("the audit log", &audit);
}

/// `kubectl get secret -o yaml > f`, then `kubectl replace -f f`, a
/// server-side apply of `f`, and a client-side apply (whose last-applied
/// annotation would repeat the masks): each refused with chaperone's 422,
/// and the stored Secret keeps its values. A patch of just a changed key
/// still goes through.
fn a_read_secret_written_back_is_refused_and_the_stored_one_kept(backend: Backend) {
    require_root!();
    let world = world(backend);
    let stored = || {
        let secret = world.api.get("secrets", Some("default"), "db").unwrap();
        (
            secret["data"].clone(),
            secret["metadata"]["annotations"].clone(),
        )
    };
    let before = stored();
    assert_eq!(
        before.0["password"],
        base64::engine::general_purpose::STANDARD.encode(PASSWORD)
    );
    let read = kubectl(&world, &["get", "secret", "db", "-o", "yaml"]);
    assert!(read.status.success(), "{}", all_bytes(&read));
    let file = world.work.path().join("db.yaml");
    // An edit of something else, as an agent would make.
    let yaml = String::from_utf8(read.stdout)
        .unwrap()
        .replace("name: db\n", "name: db\n  labels:\n    edited: \"yes\"\n");
    assert!(yaml.contains("edited"), "{yaml}");
    std::fs::write(&file, yaml).unwrap();
    let file = file.to_str().unwrap();
    for args in [
        &["replace", "-f", file][..],
        &["apply", "--server-side", "--force-conflicts", "-f", file],
        &["apply", "-f", file],
    ] {
        let out = kubectl(&world, args);
        let text = all_bytes(&out);
        assert!(
            !out.status.success(),
            "kubectl {args:?} went through:\n{text}"
        );
        assert!(
            text.contains("carries values masked by chaperone") && text.contains("kubectl patch"),
            "kubectl {args:?}:\n{text}"
        );
        assert_eq!(
            stored(),
            before,
            "kubectl {args:?} changed the stored Secret"
        );
    }
    let out = kubectl(
        &world,
        &[
            "patch",
            "secret",
            "db",
            "-p",
            r#"{"stringData":{"extra":"v"}}"#,
        ],
    );
    assert!(out.status.success(), "{}", all_bytes(&out));
    let after = stored();
    assert_eq!(after.0["password"], before.0["password"]);
    assert_eq!(after.0["token"], before.0["token"]);
}

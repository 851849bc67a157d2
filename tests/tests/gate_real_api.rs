//! The chaperone-gate init container, as the real kube-apiserver v1.20.2
//! stores it: `chaperone webhook` registered with the shipped namespace
//! webhook (called by URL), a pod applied with kubectl into a labeled
//! namespace comes out with the gate first and its CA volume; applying and
//! replacing the same manifest again succeeds (init containers and volumes
//! are immutable) and never adds a second gate.
//!
//! Needs `kubectl` and the real server (skips without it, fails under CI).

use std::{
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use chaperone_tests::{e2e::workspace_binary, real_api::RealApiServer, require_real_api};
use serde_json::{Value, json};

const NS: &str = "gated";
const IMAGE: &str = "registry.example/chaperone:gate-test";

struct Webhook(Child);
impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn kubectl(server: &RealApiServer, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = server.kubectl();
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("kubectl is needed");
    if let Some(text) = stdin {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stored(server: &RealApiServer, name: &str) -> Value {
    let out = kubectl(server, &["get", "pod", name, "-n", NS, "-o", "json"], None);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn manifest(name: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "serviceAccountName": "default",
            "automountServiceAccountToken": false,
            "nodeName": "node-a",
            "initContainers": [{"name": "setup", "image": "busybox", "command": ["true"]}],
            "containers": [{"name": "agent", "image": "agent", "command": ["sleep", "3600"]}],
            "volumes": [{"name": "work", "emptyDir": {}}],
        }
    })
    .to_string()
}

#[test]
fn the_real_api_server_stores_agent_pods_with_the_gate_once() {
    require_real_api!();
    let server = RealApiServer::shared().expect("the real API server starts");
    let dir = tempfile::tempdir().unwrap();

    // `chaperone webhook` on loopback, with a certificate the server trusts.
    let (cert, key) = server.loopback_serving_cert().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("webhook.log");
    let _webhook = Webhook(
        Command::new(workspace_binary("chaperone"))
            .args(["webhook", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .args(["--gate-image", IMAGE])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chaperone webhook never listened: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The shipped namespace webhook, called by URL.
    let manifest_yaml: Value = serde_yaml::from_str(include_str!(
        "../../deploy/base/webhook/mutatingwebhookconfiguration.yaml"
    ))
    .unwrap();
    let mut hook = manifest_yaml["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "namespace.pods.chaperone.dev")
        .expect("the shipped manifest has the namespace webhook")
        .clone();
    let path = hook["clientConfig"]["service"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    {
        use base64::Engine as _;
        hook["clientConfig"] = json!({
            "url": format!("https://127.0.0.1:{port}{path}"),
            "caBundle": base64::engine::general_purpose::STANDARD.encode(server.ca_pem()),
        });
    }
    server
        .ensure(json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": NS, "labels": {"chaperone.dev/intercept": "true"}}}))
        .unwrap();
    server
        .ensure(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": "default", "namespace": NS}}))
        .unwrap();
    server
        .ensure(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "chaperone-gate-test"},
            "webhooks": [hook],
        }))
        .unwrap();

    // The server picks the configuration up from a watch: create until the
    // stored pod shows the webhook was called.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pod = loop {
        let out = kubectl(server, &["apply", "-f", "-"], Some(&manifest("agent-0")));
        assert!(out.status.success(), "{}", describe(&out));
        let pod = stored(server, "agent-0");
        if pod["metadata"]["annotations"]["chaperone.dev/injected"].is_string() {
            break pod;
        }
        let out = kubectl(
            server,
            &["delete", "pod", "agent-0", "-n", NS, "--wait=false"],
            None,
        );
        assert!(out.status.success(), "{}", describe(&out));
        assert!(
            Instant::now() < deadline,
            "the API server never called the webhook: {pod:#}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(init_names(&pod), ["chaperone-gate", "setup"], "{pod:#}");
    let gate = &pod["spec"]["initContainers"][0];
    assert_eq!(gate["image"], IMAGE);
    assert_eq!(gate["args"], json!(["gate"]));
    assert_eq!(gate["securityContext"]["readOnlyRootFilesystem"], true);
    let volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, ["work", "chaperone-gate-ca"], "{pod:#}");

    // The same manifest again: apply (three-way merge) and replace (the
    // whole manifest, without the gate) both succeed, one gate stays.
    for verb in [["apply", "-f", "-"], ["replace", "-f", "-"]] {
        let out = kubectl(server, &verb, Some(&manifest("agent-0")));
        assert!(out.status.success(), "kubectl {verb:?}: {}", describe(&out));
        let again = stored(server, "agent-0");
        assert_eq!(init_names(&again), ["chaperone-gate", "setup"], "{verb:?}");
        assert_eq!(
            again["spec"], pod["spec"],
            "kubectl {verb:?} changed the spec"
        );
    }

    // An agent creating a pod from its own stored spec (gate included, and
    // a look-alike gate that would skip the check) gets the real gate once.
    let mut copy = pod.clone();
    copy["metadata"] = json!({"name": "agent-copy", "namespace": NS});
    copy.as_object_mut().unwrap().remove("status");
    copy["spec"]["initContainers"][0]["command"] = json!(["true"]);
    let out = kubectl(server, &["create", "-f", "-"], Some(&copy.to_string()));
    assert!(out.status.success(), "{}", describe(&out));
    let copied = stored(server, "agent-copy");
    assert_eq!(
        init_names(&copied),
        ["chaperone-gate", "setup"],
        "{copied:#}"
    );
    assert!(
        copied["spec"]["initContainers"][0].get("command").is_none(),
        "{copied:#}"
    );

    // A Guaranteed pod stays Guaranteed with the gate (the CPU manager's
    // pinning and the kubelet's eviction order depend on it), and a
    // namespace whose quota demands limits still admits it: the gate sets
    // requests equal to limits for both resources.
    let mut guaranteed: Value = serde_json::from_str(&manifest("agent-guaranteed")).unwrap();
    let fixed = json!({"requests": {"cpu": "100m", "memory": "64Mi"},
                       "limits": {"cpu": "100m", "memory": "64Mi"}});
    guaranteed["spec"]["initContainers"][0]["resources"] = fixed.clone();
    guaranteed["spec"]["containers"][0]["resources"] = fixed;
    let out = kubectl(
        server,
        &["create", "-f", "-"],
        Some(&guaranteed.to_string()),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stored_guaranteed = stored(server, "agent-guaranteed");
    assert_eq!(
        init_names(&stored_guaranteed),
        ["chaperone-gate", "setup"],
        "{stored_guaranteed:#}"
    );
    assert_eq!(
        stored_guaranteed["status"]["qosClass"], "Guaranteed",
        "the gate changed the pod's QoS class: {:#}",
        stored_guaranteed["spec"]["initContainers"][0]["resources"]
    );
}

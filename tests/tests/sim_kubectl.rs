//! Real kubectl (v1.32, /usr/bin/kubectl) against the simulator over TLS
//! with a kubeconfig (CA + token): the everyday commands work and print
//! what they print against a real cluster.

use std::{path::PathBuf, process::Stdio, time::Duration};

use chaperone_tests::sim::{Rule, SimConfig, SimHandle, Simulator, Subject};
use serde_json::json;
use tokio::{io::AsyncBufReadExt, process::Command};

const KUBECTL: &str = "/usr/bin/kubectl";

/// Skips (returns early) with a clear line when kubectl is not installed.
macro_rules! require_kubectl {
    () => {
        if !std::path::Path::new(KUBECTL).exists() {
            chaperone_tests::skip!(
                ci_fails,
                "{KUBECTL} is not installed (CI installs kubectl 1.32)"
            );
        }
    };
}

struct Kubectl {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn new(sim: &SimHandle, token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig, token).unwrap();
        Self { dir, kubeconfig }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KUBECTL);
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Out {
        use tokio::io::AsyncWriteExt;
        let mut child = self.command(args).spawn().expect("kubectl starts");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).await.unwrap();
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish in 30s"))
            .unwrap();
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Out {
        self.run_with_stdin(args, "").await
    }

    /// Runs and asserts success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        assert!(
            !out.stderr.contains("warning") && !out.stderr.contains("Warning"),
            "kubectl {args:?} warned: {}",
            out.stderr
        );
        out.stdout
    }

    async fn ok_stdin(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run_with_stdin(args, stdin).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        out.stdout
    }
}

const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        image: nginx:1.25
        env: [{name: A, value: "1"}]
        ports: [{containerPort: 80}]
"#;

const CONFIGMAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-config\n  labels: {app: web}\ndata:\n  k: v\n";

async fn start() -> SimHandle {
    Simulator::start(SimConfig::default())
        .await
        .expect("simulator starts")
}

#[tokio::test]
async fn everyday_commands_work() {
    require_kubectl!();
    let sim = start().await;
    let k = Kubectl::new(&sim, &sim.admin_token());

    // create -f and get.
    assert_eq!(
        k.ok_stdin(&["create", "-f", "-"], CONFIGMAP).await,
        "configmap/app-config created\n"
    );
    let out = k.ok(&["get", "configmaps"]).await;
    assert!(
        out.starts_with("NAME         DATA   AGE\napp-config   1      "),
        "{out}"
    );
    let yaml = k
        .ok(&["get", "configmap", "app-config", "-o", "yaml"])
        .await;
    assert!(
        yaml.contains("kind: ConfigMap") && yaml.contains("  k: v") && yaml.contains("uid: "),
        "{yaml}"
    );

    // apply (client-side) twice: created, then unchanged; a change is "configured".
    assert_eq!(
        k.ok_stdin(&["apply", "-f", "-"], DEPLOYMENT).await,
        "deployment.apps/web created\n"
    );
    assert_eq!(
        k.ok_stdin(&["apply", "-f", "-"], DEPLOYMENT).await,
        "deployment.apps/web unchanged\n"
    );
    let changed = DEPLOYMENT.replace("nginx:1.25", "nginx:1.26");
    assert_eq!(
        k.ok_stdin(&["apply", "-f", "-"], &changed).await,
        "deployment.apps/web configured\n"
    );
    let dep = sim
        .store()
        .get("deployments.apps", Some("default"), "web")
        .unwrap();
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.26"
    );
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["env"],
        json!([{"name": "A", "value": "1"}])
    );
    assert_eq!(dep["metadata"]["generation"], 2);

    // apply --server-side.
    let ssa = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa-demo\ndata:\n  k: v\n";
    assert_eq!(
        k.ok_stdin(&["apply", "--server-side", "-f", "-"], ssa)
            .await,
        "configmap/ssa-demo serverside-applied\n"
    );
    let before = sim
        .store()
        .get("configmaps", Some("default"), "ssa-demo")
        .unwrap();
    k.ok_stdin(&["apply", "--server-side", "-f", "-"], ssa)
        .await;
    let after = sim
        .store()
        .get("configmaps", Some("default"), "ssa-demo")
        .unwrap();
    assert_eq!(
        before["metadata"]["resourceVersion"], after["metadata"]["resourceVersion"],
        "a no-op apply writes nothing"
    );
    let ssa2 = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa-demo\ndata:\n  j: w\n";
    k.ok_stdin(&["apply", "--server-side", "-f", "-"], ssa2)
        .await;
    let cm = sim
        .store()
        .get("configmaps", Some("default"), "ssa-demo")
        .unwrap();
    assert_eq!(
        cm["data"],
        json!({"j": "w"}),
        "fields no longer applied are removed"
    );

    // patch: merge, json, strategic (merge by container name).
    k.ok(&[
        "patch",
        "configmap",
        "app-config",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"m":"1"}}"#,
    ])
    .await;
    k.ok(&[
        "patch",
        "configmap",
        "app-config",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/data/j","value":"2"}]"#,
    ])
    .await;
    let out = k
        .ok(&[
            "patch",
            "deployment",
            "web",
            "-p",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"app","image":"nginx:2"}]}}}}"#,
        ])
        .await;
    assert_eq!(out, "deployment.apps/web patched\n");
    let dep = sim
        .store()
        .get("deployments.apps", Some("default"), "web")
        .unwrap();
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:2"
    );
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["ports"],
        json!([{"containerPort": 80}])
    );

    // label.
    assert_eq!(
        k.ok(&["label", "configmap", "app-config", "tier=front"])
            .await,
        "configmap/app-config labeled\n"
    );
    let cm = sim
        .store()
        .get("configmaps", Some("default"), "app-config")
        .unwrap();
    assert_eq!(
        cm["metadata"]["labels"],
        json!({"app": "web", "tier": "front"})
    );
    assert_eq!(cm["data"], json!({"k": "v", "m": "1", "j": "2"}));
    let out = k
        .ok(&["get", "configmaps", "-l", "tier=front", "-o", "name"])
        .await;
    assert_eq!(out, "configmap/app-config\n");

    // typed commands send protobuf bodies.
    assert_eq!(
        k.ok(&[
            "create",
            "secret",
            "generic",
            "db",
            "--from-literal=password=hunter2"
        ])
        .await,
        "secret/db created\n"
    );
    let out = k.ok(&["get", "secrets"]).await;
    assert!(
        out.starts_with("NAME   TYPE     DATA   AGE\ndb     Opaque   1      "),
        "{out}"
    );

    // api-resources and auth can-i.
    let out = k.ok(&["api-resources"]).await;
    assert!(
        out.contains("deployments")
            && out.contains("apps/v1")
            && out.contains("customresourcedefinitions"),
        "{out}"
    );
    assert_eq!(k.ok(&["auth", "can-i", "delete", "pods"]).await, "yes\n");

    // delete (kubectl waits for the object to be gone).
    assert_eq!(
        k.ok(&["delete", "configmap", "app-config"]).await,
        "configmap \"app-config\" deleted\n"
    );
    assert!(
        sim.store()
            .get("configmaps", Some("default"), "app-config")
            .is_none()
    );
    let out = k.run(&["get", "configmap", "app-config"]).await;
    assert!(!out.ok);
    assert_eq!(
        out.stderr,
        "Error from server (NotFound): configmaps \"app-config\" not found\n"
    );
}

#[tokio::test]
async fn get_watch_receives_a_change_made_meanwhile() {
    require_kubectl!();
    let sim = start().await;
    let k = Kubectl::new(&sim, &sim.admin_token());
    let mut child = k
        .command(&["get", "configmaps", "--watch", "--request-timeout=20s"])
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Wait until the watch is open (kubectl lists, then watches).
    tokio::time::timeout(Duration::from_secs(20), async {
        while !sim.requests().iter().any(|r| r.uri.contains("watch=true")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("kubectl opens a watch");
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late", "namespace": "default"}, "data": {"a": "b"}}))
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let l = out
                .next_line()
                .await
                .unwrap()
                .expect("kubectl still running");
            if l.starts_with("late") {
                return l;
            }
        }
    })
    .await
    .expect("kubectl get -w prints the new ConfigMap");
    assert!(line.starts_with("late   1      "), "{line}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn logs_and_follow() {
    require_kubectl!();
    let sim = start().await;
    let k = Kubectl::new(&sim, &sim.admin_token());
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent", "namespace": "default", "annotations": {"sim.chaperone.dev/log": "one\ntwo"}},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}))
        .unwrap();
    assert_eq!(k.ok(&["logs", "agent"]).await, "one\ntwo\n");
    assert_eq!(k.ok(&["logs", "agent", "--tail=1"]).await, "two\n");
    let out = k.ok(&["get", "pods"]).await;
    assert!(
        out.starts_with(
            "NAME    READY   STATUS    RESTARTS   AGE\nagent   1/1     Running   0          "
        ),
        "{out}"
    );

    let mut child = k.command(&["logs", "-f", "agent"]).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for want in ["one", "two"] {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.as_deref(), Some(want));
    }
    sim.store()
        .append_log("default", "agent", None, "three")
        .unwrap();
    let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.as_deref(), Some("three"));
    // Deleting the pod ends the stream.
    sim.store()
        .delete("pods", Some("default"), "agent")
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn service_account_tokens_and_tampering() {
    require_kubectl!();
    // `kubectl auth whoami` asks SelfSubjectReview: Kubernetes 1.28+.
    let sim = Simulator::start(SimConfig::default().with_minor_version(28))
        .await
        .expect("simulator starts");
    sim.store()
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod-a"}}))
        .unwrap();
    let token = sim
        .mint_service_account_token(
            "prod-a",
            "agent",
            Some(("agent-0", "1111-2222")),
            None,
            Duration::from_secs(600),
        )
        .unwrap();
    let k = Kubectl::new(&sim, &token);
    assert_eq!(
        k.run(&["auth", "can-i", "list", "pods", "-n", "prod-a"])
            .await
            .stdout,
        "no\n"
    );
    let out = k.run(&["get", "secrets", "-n", "prod-a"]).await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("Error from server (Forbidden): secrets is forbidden: User \"system:serviceaccount:prod-a:agent\" cannot list resource \"secrets\" in API group \"\" in the namespace \"prod-a\""),
        "{}",
        out.stderr
    );

    // kubectl auth whoami (SelfSubjectReview) names the service account.
    let out = k
        .ok(&[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .await;
    assert_eq!(out, "system:serviceaccount:prod-a:agent");
    let pod_name = k
        .ok(&[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.extra.authentication\\.kubernetes\\.io/pod-name[0]}",
        ])
        .await;
    assert_eq!(pod_name, "agent-0");

    // kubectl create token (TokenRequest) mints a token the simulator accepts.
    let admin = Kubectl::new(&sim, &sim.admin_token());
    let minted = admin
        .ok(&[
            "create",
            "token",
            "agent",
            "-n",
            "prod-a",
            "--audience",
            "https://kubernetes.default.svc.cluster.local",
        ])
        .await;
    let minted_kubectl = Kubectl::new(&sim, minted.trim());
    assert_eq!(
        minted_kubectl
            .run(&["auth", "can-i", "list", "pods", "-n", "prod-a"])
            .await
            .stdout,
        "no\n"
    );
    let who = sim
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.token.as_deref() == Some(minted.trim()))
        .unwrap();
    assert_eq!(
        who.authenticated.unwrap().username,
        "system:serviceaccount:prod-a:agent"
    );

    sim.grant(
        Subject::ServiceAccount {
            namespace: "prod-a".into(),
            name: "agent".into(),
        },
        vec![Rule::new(&["get", "list", "watch"], &[""], &["pods"]).in_namespaces(&["prod-a"])],
    );
    assert_eq!(
        k.ok(&["auth", "can-i", "list", "pods", "-n", "prod-a"])
            .await,
        "yes\n"
    );
    assert_eq!(
        k.run(&["get", "pods", "-n", "prod-a"]).await.stderr,
        "No resources found in prod-a namespace.\n"
    );
    let seen = sim
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.uri.starts_with("/api/v1/namespaces/prod-a/pods"))
        .unwrap();
    assert_eq!(seen.token.as_deref(), Some(token.as_str()));
    assert_eq!(
        seen.authenticated.unwrap().username,
        "system:serviceaccount:prod-a:agent"
    );

    // Flip one character of the signature: 401.
    let mut tampered = token.into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let k = Kubectl::new(&sim, std::str::from_utf8(&tampered).unwrap());
    let out = k.run(&["get", "pods", "-n", "prod-a"]).await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("error: You must be logged in to the server"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn the_kube_sim_binary_serves_with_the_files_it_writes() {
    require_kubectl!();
    let dir = tempfile::tempdir().unwrap();
    let (kubeconfig, ca, seed) = (
        dir.path().join("kc"),
        dir.path().join("ca.pem"),
        dir.path().join("seed.yaml"),
    );
    std::fs::write(
        &seed,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod-a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: seeded, namespace: prod-a}\ndata: {a: b}\n",
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-sim"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--permissive"])
        .arg("--kubeconfig-out")
        .arg(&kubeconfig)
        .arg("--ca-out")
        .arg(&ca)
        .arg("--seed")
        .arg(&seed)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), out.next_line())
        .await
        .expect("kube-sim starts")
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        format!("kube-sim listening on https://127.0.0.1:{port}")
    );
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let cache = dir.path().join("cache");
    let got = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args([
            "get",
            "configmap",
            "seeded",
            "-n",
            "prod-a",
            "-o",
            "jsonpath={.data.a}",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "b",
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    child.kill().await.unwrap();
}

const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: agentpolicies.chaperone.dev
spec:
  group: chaperone.dev
  scope: Namespaced
  names: {plural: agentpolicies, singular: agentpolicy, kind: AgentPolicy, shortNames: [ap]}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
    additionalPrinterColumns:
    - {name: Mode, type: string, jsonPath: .spec.mode}
"#;

#[tokio::test]
async fn custom_resources_work_with_kubectl() {
    require_kubectl!();
    let sim = start().await;
    let k = Kubectl::new(&sim, &sim.admin_token());
    assert_eq!(
        k.ok_stdin(&["apply", "-f", "-"], CRD).await,
        "customresourcedefinition.apiextensions.k8s.io/agentpolicies.chaperone.dev created\n"
    );
    let policy = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: default-deny\nspec:\n  mode: enforce\n  rules: [{verbs: [get]}]\n";
    assert_eq!(
        k.ok_stdin(&["apply", "-f", "-"], policy).await,
        "agentpolicy.chaperone.dev/default-deny created\n"
    );
    assert_eq!(
        k.ok_stdin(&["apply", "-f", "-"], policy).await,
        "agentpolicy.chaperone.dev/default-deny unchanged\n"
    );
    let changed = policy.replace("enforce", "dry-run");
    assert_eq!(
        k.ok_stdin(&["apply", "-f", "-"], &changed).await,
        "agentpolicy.chaperone.dev/default-deny configured\n"
    );
    let out = k.ok(&["get", "ap"]).await;
    assert!(
        out.starts_with("NAME           MODE      AGE\ndefault-deny   dry-run   "),
        "{out}"
    );
    let stored = sim
        .store()
        .get(
            "agentpolicies.chaperone.dev",
            Some("default"),
            "default-deny",
        )
        .unwrap();
    assert_eq!(stored["spec"]["rules"], json!([{"verbs": ["get"]}]));
    assert_eq!(stored["metadata"]["generation"], 2);
    assert!(
        k.ok(&["api-resources", "--api-group=chaperone.dev"])
            .await
            .contains("agentpolicies")
    );
}

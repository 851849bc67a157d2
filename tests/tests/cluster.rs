//! The real-cluster tier: chaperone deployed with `kubectl apply -k` on a
//! real one-node cluster (kubelet, kube-proxy, containerd), an agent pod
//! from a Deployment in the labeled namespace running kubectl with its
//! in-cluster configuration, unchanged.
//!
//! Opt-in, so `#[ignore]`d in the ordinary suite (cargo reports them as
//! ignored, never as passed): `cargo xtask cluster test` brings the cluster
//! up, deploys chaperone, runs them with `CHAPERONE_CLUSTER=1
//! --include-ignored`, then brings the cluster down. Run without a cluster,
//! they fail saying so.
//!
//! Each test asks what a user would: what the agent's kubectl prints, what
//! the API server holds afterwards, what came back through the kubelet.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

const NAMESPACE: &str = "agents";
/// The node's address (the bridge's), where the kubelet listens.
const NODE_IP: &str = "10.244.0.1";
const AGENT: &str = "reader";

macro_rules! require_cluster {
    () => {
        assert!(
            std::env::var("CHAPERONE_CLUSTER").as_deref() == Ok("1"),
            "the real-cluster tier runs with CHAPERONE_CLUSTER=1 on a running cluster \
             (`cargo xtask cluster test` brings it up, runs the tier and brings it down)"
        );
    };
}

fn kubeconfig() -> PathBuf {
    let dir = std::env::var_os("CHAPERONE_CLUSTER_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/chaperone-cluster"));
    dir.join("admin.kubeconfig")
}

/// kubectl as the cluster's admin.
fn admin(args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .arg("--request-timeout=30s")
        .args(args)
        .output()
        .expect("kubectl runs")
}

fn admin_ok(args: &[&str]) -> String {
    let out = admin(args);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The running agent pod of the Deployment.
fn agent_pod() -> String {
    let name = admin_ok(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        &format!("app={AGENT}"),
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    assert!(
        !name.trim().is_empty(),
        "no running agent pod: run `cargo xtask cluster deploy`"
    );
    name.trim().to_string()
}

/// The agent's own kubectl, inside its pod (in-cluster configuration): the
/// exec itself goes API server → kubelet → containerd.
fn agent_kubectl(args: &[&str]) -> Output {
    let pod = agent_pod();
    let mut full = vec!["exec", "-n", NAMESPACE, &pod, "--", "kubectl"];
    full.extend_from_slice(args);
    admin(&full)
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn the_real_webhook_gave_the_agent_pod_chaperones_ca() {
    require_cluster!();
    let pod = agent_pod();
    let sources = admin_ok(&[
        "get",
        "pod",
        "-n",
        NAMESPACE,
        &pod,
        "-o",
        "jsonpath={.spec.volumes[*].projected.sources[*].configMap.name}",
    ]);
    assert!(
        sources
            .split_whitespace()
            .any(|s| s == "chaperone-ca-bundle"),
        "the agent pod's projected token volume should take ca.crt from chaperone-ca-bundle \
         (the webhook's injection); its config maps: {sources:?}"
    );
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn a_secret_reaches_the_agents_kubectl_masked() {
    require_cluster!();
    let name = unique("masked");
    let value = format!("real-value-{name}");
    admin_ok(&[
        "create",
        "secret",
        "generic",
        &name,
        "-n",
        NAMESPACE,
        &format!("--from-literal=password={value}"),
    ]);
    let out = agent_kubectl(&["get", "secret", &name, "-o", "jsonpath={.data.password}"]);
    admin_ok(&["delete", "secret", &name, "-n", NAMESPACE, "--wait=false"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the agent's kubectl get secret failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin
                .take()
                .unwrap()
                .write_all(stdout.trim().as_bytes())?;
            c.wait_with_output()
        })
        .expect("base64 runs");
    let decoded = String::from_utf8_lossy(&decoded.stdout);
    assert!(
        !decoded.contains(&value),
        "the agent read the Secret's value in clear: {decoded:?}"
    );
    assert!(
        decoded.contains("masked by chaperone"),
        "the agent should see chaperone's mask, got {decoded:?}"
    );
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn a_write_is_denied_and_never_reaches_the_api_server() {
    require_cluster!();
    let name = unique("denied");
    let out = agent_kubectl(&["create", "configmap", &name, "--from-literal=a=b"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent's write succeeded");
    assert!(
        stderr.contains("read-only-agent"),
        "the denial should name the policy that decided: {stderr}"
    );
    let after = admin(&["get", "configmap", &name, "-n", NAMESPACE]);
    assert!(
        !after.status.success(),
        "the denied ConfigMap exists on the API server"
    );
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn logs_and_exec_go_through_the_real_kubelet() {
    require_cluster!();
    // The agent reads a pod's logs: chaperone → API server → kubelet.
    let logger = unique("logger");
    let line = format!("a line from {logger}");
    admin_ok(&[
        "run",
        &logger,
        "-n",
        NAMESPACE,
        "--image=chaperone.local/agent:1",
        "--restart=Never",
        "--labels=chaperone.dev/intercept=false",
        "--command",
        "--",
        "sh",
        "-c",
        &format!("echo '{line}'; sleep 600"),
    ]);
    admin_ok(&[
        "wait",
        "-n",
        NAMESPACE,
        "--for=condition=Ready",
        &format!("pod/{logger}"),
        "--timeout=60s",
    ]);
    let out = agent_kubectl(&["logs", &logger]);
    admin_ok(&[
        "delete",
        "pod",
        &logger,
        "-n",
        NAMESPACE,
        "--wait=false",
        "--grace-period=0",
    ]);
    assert!(
        out.status.success(),
        "the agent's kubectl logs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        line,
        "the agent should read the pod's log through chaperone and the kubelet"
    );
    // chaperone's own namespace stays closed to agents, even for reading.
    let out = agent_kubectl(&["logs", "-n", "chaperone-system", "daemonset/chaperone-node"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("chaperone's own"),
        "an agent read the node agent's log: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The read-only agent may not exec (create pods/exec): denied by chaperone.
    let pod = agent_pod();
    let out = agent_kubectl(&["exec", "-n", NAMESPACE, &pod, "--", "true"]);
    assert!(
        !out.status.success(),
        "the read-only agent's exec succeeded"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read-only-agent"),
        "the exec should be denied by the read-only policy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An exec by the admin (not guarded) runs in the agent's container
    // through the kubelet and containerd, in the pod's own cgroup v2.
    let cgroup = admin_ok(&[
        "exec",
        "-n",
        NAMESPACE,
        &pod,
        "--",
        "cat",
        "/proc/self/cgroup",
    ]);
    assert!(
        cgroup.lines().any(|l| l.starts_with("0::/kubepods/")),
        "the container's cgroup v2 should be under /kubepods (what chaperone's pod tracker \
         reads): {cgroup}"
    );
}

/// `kubectl apply` with a manifest on stdin.
fn admin_apply(manifest: &str) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn a_pod_manifest_naming_kube_root_ca_can_be_applied_again() {
    require_cluster!();
    let name = unique("reapply");
    let manifest = |note: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    note: "{note}"
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  containers:
  - name: agent
    image: chaperone.local/agent:1
    command: ["sleep", "600"]
    volumeMounts:
    - name: token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  volumes:
  - name: token
    projected:
      sources:
      - serviceAccountToken:
          path: token
      - configMap:
          name: kube-root-ca.crt
          items:
          - key: ca.crt
            path: ca.crt
"#
        )
    };
    let first = admin_apply(&manifest("first"));
    let second = admin_apply(&manifest("second"));
    let volume = admin(&[
        "get",
        "pod",
        &name,
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.volumes[0].projected.sources[1].configMap.name} {.metadata.labels.note}",
    ]);
    admin(&[
        "delete",
        "pod",
        &name,
        "-n",
        NAMESPACE,
        "--wait=false",
        "--grace-period=0",
    ]);
    assert!(
        first.status.success(),
        "the first apply failed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        second.status.success(),
        "applying the same manifest again (one label changed) was refused: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&volume.stdout).trim(),
        "chaperone-ca-bundle second",
        "the pod should keep chaperone's CA bundle and take the new label"
    );
}

// === the README's quickstart, as written ===

/// The commands of the README's fenced block marked `<!-- quickstart:NAME`
/// (each line's `# comment` dropped). `cargo xtask cluster deploy` runs the
/// install block; this tier runs the verify block.
fn readme_block(name: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let marker = format!("<!-- quickstart:{name}");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no block marked {marker}"));
    readme[at..]
        .lines()
        .skip_while(|l| !l.starts_with("```"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(" #").next().unwrap_or(l).trim().to_string())
        .collect()
}

/// A README line run as a reader runs it: `sh` in the checkout, the
/// cluster's kubeconfig, the `kubectl-chaperone` plugin on `PATH`.
fn run_readme_line(command: &str) -> Output {
    let plugin = chaperone_tests::e2e::workspace_binary("kubectl-chaperone");
    let path = format!(
        "{}:{}",
        plugin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("sh")
        .args(["-c", command])
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env("KUBECONFIG", kubeconfig())
        .env("PATH", path)
        .output()
        .expect("sh runs")
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The values under every `data:` of `kubectl get secrets -o yaml`.
fn secret_values(yaml: &str) -> Vec<(String, String)> {
    let mut values = Vec::new();
    let mut in_data = false;
    for line in yaml.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed == "data:" {
            in_data = true;
            continue;
        }
        if in_data {
            if indent <= 2 || trimmed.starts_with('-') {
                in_data = false;
            } else if let Some((key, value)) = trimmed.split_once(": ") {
                values.push((key.to_string(), value.trim().to_string()));
            }
        }
    }
    values
}

fn base64_decode(text: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("base64 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

/// Issue 28's "done means": a newcomer who follows the README on a real
/// cluster reaches a guarded, verified agent with `kubectl chaperone
/// status` all green. `cargo xtask cluster deploy` installed chaperone and
/// the agent with the README's install block; this runs its verify block,
/// line by line, and checks what each line prints. The README's lines and
/// this test's checks must be the same list, so neither can drift.
#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn the_readme_quickstart_verifies_as_written() {
    require_cluster!();
    let expected = [
        "kubectl chaperone status",
        "kubectl -n chaperone-system get pods",
        "kubectl -n agents exec deploy/reader -- kubectl get secrets -o yaml",
        "kubectl -n agents exec deploy/reader -- kubectl create configmap probe",
        "kubectl -n chaperone-system logs daemonset/chaperone-node | grep -i agents/reader",
    ];
    assert_eq!(
        readme_block("verify"),
        expected,
        "the README's verify block changed: make this test check what the new lines print"
    );
    // A Secret of the agents' own, so the listing has a value to mask.
    let secret = unique("readme");
    let value = format!("clear-{secret}");
    admin_ok(&[
        "create",
        "secret",
        "generic",
        &secret,
        "-n",
        NAMESPACE,
        &format!("--from-literal=token={value}"),
    ]);

    // 1. All green: every check √, no warning, exit status 0. The install
    //    block waited for the rollouts; the status may take a few seconds
    //    more to see every node agent's readiness.
    let mut status = run_readme_line(expected[0]);
    for _ in 0..30 {
        if status.status.success()
            && String::from_utf8_lossy(&status.stdout).contains("√ (0 warning(s))")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        status = run_readme_line(expected[0]);
    }
    let report = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success()
            && report.contains("Status check results are √ (0 warning(s))")
            && !report
                .lines()
                .any(|l| l.starts_with('×') || l.starts_with('‼')),
        "`kubectl chaperone status` is not all green: {}",
        text(&status)
    );
    let guarded = report
        .lines()
        .find_map(|l| l.strip_prefix("√ ")?.strip_suffix(" labeled pods guarded"))
        .and_then(|l| l.split_once(" of "))
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()));
    assert!(
        guarded.as_ref().is_some_and(|(a, b)| a == b && a != "0"),
        "the status should count the agent pod among the guarded ones: {report}"
    );

    // 2. The node agents and the webhook are Ready.
    let pods = run_readme_line(expected[1]);
    let listing = String::from_utf8_lossy(&pods.stdout);
    let rows: Vec<&str> = listing.lines().skip(1).collect();
    assert!(pods.status.success() && !rows.is_empty(), "{}", text(&pods));
    for component in ["chaperone-node-", "chaperone-webhook-"] {
        assert!(
            rows.iter().any(|r| {
                let cols: Vec<&str> = r.split_whitespace().collect();
                cols[0].starts_with(component)
                    && cols[2] == "Running"
                    && cols[1].split_once('/').is_some_and(|(a, b)| a == b)
            }),
            "no Ready {component}* pod: {listing}"
        );
    }

    // 3. The agent's kubectl lists Secrets: every value is chaperone's mask.
    let secrets = run_readme_line(expected[2]);
    admin_ok(&["delete", "secret", &secret, "-n", NAMESPACE, "--wait=false"]);
    assert!(secrets.status.success(), "{}", text(&secrets));
    let yaml = String::from_utf8_lossy(&secrets.stdout);
    assert!(
        yaml.contains(&format!("name: {secret}")),
        "the agent's listing lacks the Secret {secret}: {yaml}"
    );
    let values = secret_values(&yaml);
    assert!(
        !values.is_empty(),
        "no Secret values in the listing: {yaml}"
    );
    for (key, encoded) in &values {
        let decoded = base64_decode(encoded);
        assert!(
            decoded.starts_with("<masked by chaperone: ") && !decoded.contains(&value),
            "the Secret value {key} reached the agent unmasked: {decoded:?}"
        );
    }

    // 4. A write: Forbidden by the read-only policy, never made.
    let write = run_readme_line(expected[3]);
    let stderr = String::from_utf8_lossy(&write.stderr);
    assert!(
        !write.status.success()
            && stderr.contains("chaperone: policy \"read-only-agent\"")
            && stderr.contains("denies create on configmaps"),
        "{}",
        text(&write)
    );
    assert!(
        !admin(&["get", "configmap", "probe", "-n", NAMESPACE])
            .status
            .success(),
        "the denied ConfigMap exists"
    );

    // 5. The node agent's log says it guards the agent's pod.
    let log = run_readme_line(expected[4]);
    assert!(
        log.status.success()
            && String::from_utf8_lossy(&log.stdout)
                .lines()
                .any(|l| l.contains("guarding pod")),
        "the node agent's log does not say it guards agents/reader-*: {}",
        text(&log)
    );
}

// === exec, attach, logs -f and port-forward through the real kubelet ===

/// A database URL with a password: what chaperone's `password-in-url`
/// rule masks in logs and exec output. The workload prints it.
const DB_PASSWORD: &str = "pg-Pa55-wrd-do-not-leak";
const OPERATOR: &str = "operator";
const WORKLOAD: &str = "workload";

/// An agent allowed to exec, attach, follow logs and port-forward, whose
/// exec, attach and log output chaperone masks and records; and a workload
/// pod (not an agent) that prints a database URL with its password every
/// second and answers HTTP on 8080. Created once per test run; returns the
/// operator agent's pod.
fn operator() -> String {
    static POD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POD.get_or_init(|| {
        let manifest = format!(
            r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: cluster-tier-operator
spec:
  subjects:
    - serviceAccounts: ["{NAMESPACE}/{OPERATOR}"]
  rules:
    - name: streams-masked
      resources: [pods/exec, pods/attach, pods/log]
      action: mask
      record: RequestResponse
  defaultAction: allow
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {OPERATOR}
  namespace: {NAMESPACE}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {OPERATOR}
  namespace: {NAMESPACE}
rules:
  - apiGroups: [""]
    resources: [pods, pods/log]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [pods/exec, pods/attach, pods/portforward]
    verbs: [create, get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {OPERATOR}
  namespace: {NAMESPACE}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {OPERATOR}
subjects:
  - kind: ServiceAccount
    name: {OPERATOR}
    namespace: {NAMESPACE}
---
apiVersion: v1
kind: Pod
metadata:
  name: {WORKLOAD}
  namespace: {NAMESPACE}
  labels:
    chaperone.dev/intercept: "false"
spec:
  terminationGracePeriodSeconds: 0
  automountServiceAccountToken: false
  containers:
    - name: {WORKLOAD}
      image: chaperone.local/agent:1
      command:
        - sh
        - -c
        - |
          # Reads the whole request before it answers: closing with unread
          # bytes would reset the connection, which ends kubectl port-forward.
          nc -ll -p 8080 -e sh -c 'while read l && [ "${{#l}}" -gt 1 ]; do :; done; printf "HTTP/1.0 200 OK\r\n\r\nport-forward-reply\n"' &
          i=0
          while true; do
            i=$((i+1))
            echo "tick $i postgres://app:{DB_PASSWORD}@db:5432/app"
            sleep 1
          done
---
apiVersion: v1
kind: Pod
metadata:
  name: {OPERATOR}
  namespace: {NAMESPACE}
spec:
  serviceAccountName: {OPERATOR}
  terminationGracePeriodSeconds: 0
  containers:
    - name: agent
      image: chaperone.local/agent:1
      command: ["sleep", "infinity"]
"#
        );
        let out = admin_apply(&manifest);
        assert!(out.status.success(), "{}", text(&out));
        for pod in [WORKLOAD, OPERATOR] {
            admin_ok(&[
                "wait",
                "-n",
                NAMESPACE,
                "--for=condition=Ready",
                &format!("pod/{pod}"),
                "--timeout=90s",
            ]);
        }
        // The node agent has accepted the policy once the operator's first
        // request is decided by it (not refused as undecided).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = operator_kubectl(&["get", "pod", WORKLOAD, "-o", "name"]);
            if out.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the operator agent cannot read pods through chaperone: {}",
                text(&out)
            );
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        OPERATOR.to_string()
    })
    .clone()
}

/// A shell command in the operator agent's pod (its kubectl, in-cluster).
fn operator_sh(script: &str) -> Output {
    admin(&["exec", "-n", NAMESPACE, OPERATOR, "--", "sh", "-c", script])
}

fn operator_kubectl(args: &[&str]) -> Output {
    let mut full = vec!["exec", "-n", NAMESPACE, OPERATOR, "--", "kubectl"];
    full.extend_from_slice(args);
    admin(&full)
}

fn assert_no_password(what: &str, out: &Output) {
    assert!(
        !text(out).contains(DB_PASSWORD),
        "{what}: the password reached the agent: {}",
        text(out)
    );
}

/// The recordings of the operator agent's pod on the node (the
/// DaemonSet's hostPath), as `chaperone replay --json` reads them.
fn operator_sessions() -> Vec<serde_json::Value> {
    let dir = PathBuf::from("/var/lib/chaperone/sessions")
        .join(NAMESPACE)
        .join(OPERATOR);
    let mut ids: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no recordings in {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl") && !n.contains(".p"))
        .map(|n| n.trim_end_matches(".jsonl").to_owned())
        .collect();
    ids.sort();
    let chaperone = chaperone_tests::e2e::workspace_binary("chaperone");
    ids.iter()
        .map(|id| {
            let out = Command::new(&chaperone)
                .args([
                    "replay",
                    "--json",
                    "--record-dir",
                    "/var/lib/chaperone/sessions",
                    id,
                ])
                .output()
                .expect("chaperone runs");
            assert!(
                out.status.success(),
                "chaperone replay {id}: {}",
                text(&out)
            );
            serde_json::from_slice(&out.stdout).expect("replay --json prints JSON")
        })
        .collect()
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn an_agents_exec_through_the_real_kubelet_is_masked_and_recorded_as_a_cast() {
    require_cluster!();
    operator();
    let marker = unique("exec-marker");
    let out = operator_kubectl(&[
        "exec",
        WORKLOAD,
        "--",
        "sh",
        "-c",
        // The password is put together by the shell: an exec's command
        // line is recorded as the agent sent it (the cast's title); what
        // chaperone masks is what comes back.
        &format!(
            "p={}; echo {marker}; echo postgres://app:$p{}@db:5432/app",
            &DB_PASSWORD[..7],
            &DB_PASSWORD[7..]
        ),
    ]);
    assert!(
        out.status.success(),
        "the agent's exec failed: {}",
        text(&out)
    );
    assert_no_password("kubectl exec", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&marker) && stdout.contains("postgres://app:") && stdout.contains("@db"),
        "the exec's output should arrive, its password masked: {stdout}"
    );
    // The exec's cast, once the stream is sealed (its connection closed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let cast = loop {
        let found = operator_sessions().into_iter().find_map(|s| {
            let dir = PathBuf::from(s["dir"].as_str()?);
            s["events"].as_array()?.iter().find_map(|e| {
                let path = dir.join(e["cast"].as_str()?);
                let cast = std::fs::read_to_string(&path).ok()?;
                (e["type"] == "stream" && cast.contains(&marker)).then_some(cast)
            })
        });
        if let Some(cast) = found {
            break cast;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recorded cast holds the exec's output {marker}"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    assert!(
        cast.starts_with("{") && cast.contains("\"version\":2"),
        "the cast should be asciicast v2: {cast}"
    );
    assert!(
        !cast.contains(DB_PASSWORD),
        "the recorded cast holds the password: {cast}"
    );
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn an_agents_logs_follow_streams_masked_through_the_real_kubelet() {
    require_cluster!();
    operator();
    // Followed for 6 s: lines the workload prints after the follow began
    // arrive, each masked as it streams.
    let out = operator_sh(&format!(
        "timeout 6 kubectl logs -f {WORKLOAD} --tail=1; true"
    ));
    assert_no_password("kubectl logs -f", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ticks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("tick ")).collect();
    assert!(
        ticks.len() >= 3,
        "kubectl logs -f should have followed the workload's lines for seconds: {}",
        text(&out)
    );
    assert!(
        ticks
            .iter()
            .all(|l| l.contains("postgres://app:") && l.ends_with("@db:5432/app")),
        "each line arrives, only its password masked: {ticks:?}"
    );
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn an_agents_attach_streams_masked_through_the_real_kubelet() {
    require_cluster!();
    operator();
    let out = operator_sh(&format!("timeout 5 kubectl attach {WORKLOAD}; true"));
    assert_no_password("kubectl attach", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().filter(|l| l.starts_with("tick ")).count() >= 2,
        "kubectl attach should stream the workload's output: {}",
        text(&out)
    );
}

#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn an_agents_port_forward_reaches_the_pod_through_the_real_kubelet() {
    require_cluster!();
    operator();
    let out = operator_sh(&format!(
        "kubectl port-forward pod/{WORKLOAD} 18080:8080 2>&1 & pf=$!; \
         for i in 1 2 3 4 5 6 7 8 9 10; do \
           wget -qO- http://127.0.0.1:18080/ 2>/dev/null | grep -q port-forward-reply && break; \
           sleep 1; done; \
         wget -qO- http://127.0.0.1:18080/ 2>/dev/null; kill $pf"
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("port-forward-reply"),
        "the agent's port-forward should reach the workload's port 8080: {}",
        text(&out)
    );
    assert!(
        stdout.contains("Forwarding from 127.0.0.1:18080 -> 8080"),
        "kubectl port-forward should say it forwards: {}",
        text(&out)
    );
    // It went through chaperone: the agent's recordings hold it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !operator_sessions().iter().any(|s| {
        s["events"].as_array().is_some_and(|events| {
            events
                .iter()
                .any(|e| e["type"] == "exchange" && e["subresource"] == "portforward")
        })
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the operator agent's recordings hold no pods/portforward exchange"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

// === while no node agent runs ===

/// Puts the node agents' DaemonSet back on every node when dropped, and
/// waits for its rollout: the DaemonSet was narrowed to no node, as a
/// drain or an upgrade gap leaves a node without its agent.
struct NodeAgentBack;

impl Drop for NodeAgentBack {
    fn drop(&mut self) {
        admin(&[
            "-n",
            "chaperone-system",
            "patch",
            "daemonset",
            "chaperone-node",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/template/spec/nodeSelector/chaperone.dev~1tier-no-node"}]"#,
        ]);
        admin(&[
            "-n",
            "chaperone-system",
            "rollout",
            "status",
            "daemonset/chaperone-node",
            "--timeout=120s",
        ]);
    }
}

/// The pod tracker that adds a new pod's cgroup to the programs' agent map
/// runs in the node agent, so a pod created while none runs (a drain, an
/// upgrade's gap, a crash loop) is in no agent map. This tier found such a
/// pod reading a Secret in clear. Now the webhook's `chaperone-gate` init
/// container holds it in `Init` until a TLS handshake to the API server's
/// address is answered by chaperone's proxy: none of its containers runs
/// unguarded, and once the node agent is back it starts guarded.
#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn an_agent_pod_created_while_no_node_agent_runs_is_never_unguarded() {
    require_cluster!();
    let secret = unique("late");
    let value = format!("clear-{secret}");
    admin_ok(&[
        "create",
        "secret",
        "generic",
        &secret,
        "-n",
        NAMESPACE,
        &format!("--from-literal=password={value}"),
    ]);
    // The node agent goes (its DaemonSet stays: the programs stay pinned).
    admin_ok(&[
        "-n",
        "chaperone-system",
        "patch",
        "daemonset",
        "chaperone-node",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"chaperone.dev/tier-no-node":"true"}}}}}"#,
    ]);
    let back = NodeAgentBack;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !admin_ok(&[
        "-n",
        "chaperone-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=chaperone-node",
        "-o",
        "name",
    ])
    .trim()
    .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the node agent did not go"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // An agent pod is created now.
    let pod = unique("late-agent");
    let created = admin_apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {NAMESPACE}
spec:
  serviceAccountName: {AGENT}
  terminationGracePeriodSeconds: 0
  containers:
    - name: agent
      image: chaperone.local/agent:1
      command: ["sleep", "infinity"]
"#
    ));
    let cleanup = |pod: &str| {
        admin(&[
            "delete",
            "pod",
            pod,
            "-n",
            NAMESPACE,
            "--wait=false",
            "--grace-period=0",
        ]);
        admin(&["delete", "secret", &secret, "-n", NAMESPACE, "--wait=false"]);
    };
    assert!(created.status.success(), "{}", text(&created));

    // The gate runs, says why it waits, and the agent container never
    // starts while no node agent is there.
    let gate_log = || {
        String::from_utf8_lossy(
            &admin(&["logs", "-n", NAMESPACE, &pod, "-c", "chaperone-gate"]).stdout,
        )
        .into_owned()
    };
    let agent_started = || {
        !admin_ok(&[
            "get",
            "pod",
            "-n",
            NAMESPACE,
            &pod,
            "-o",
            "jsonpath={.status.containerStatuses[?(@.name==\"agent\")].state.running}",
        ])
        .trim()
        .is_empty()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !gate_log().contains("not guarded yet") {
        assert!(!agent_started(), "the agent container ran unguarded");
        if std::time::Instant::now() > deadline {
            cleanup(&pod);
            panic!("the gate never said it waits: {}", gate_log());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(!agent_started(), "the agent container ran unguarded");

    // The node agent comes back: the gate passes and the pod starts guarded.
    drop(back);
    admin_ok(&[
        "wait",
        "-n",
        NAMESPACE,
        "--for=condition=Ready",
        &format!("pod/{pod}"),
        "--timeout=120s",
    ]);
    let read = admin(&[
        "exec",
        "-n",
        NAMESPACE,
        &pod,
        "--",
        // No --request-timeout: kubectl takes any such flag as a
        // configuration of its own and leaves its in-cluster one.
        "timeout",
        "20",
        "kubectl",
        "get",
        "secret",
        &secret,
        "-o",
        "jsonpath={.data.password}",
    ]);
    cleanup(&pod);
    let got = base64_decode(String::from_utf8_lossy(&read.stdout).trim());
    assert!(
        read.status.success() && got.starts_with("<masked by chaperone"),
        "the gated agent pod, once started, reads Secrets masked ({got:?}): {}",
        text(&read)
    );
}

// === the DaemonSet's rolling update ===

/// The node agents' pod names.
fn node_agents() -> Vec<String> {
    admin_ok(&[
        "-n",
        "chaperone-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=chaperone-node",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// A child process whose output goes to a file, killed when dropped:
/// `kubectl logs -f` of a node agent, whose log goes with its pod.
struct Follower {
    child: std::process::Child,
    file: PathBuf,
}

impl Follower {
    fn logs(pod: &str) -> Follower {
        let file = std::env::temp_dir().join(unique("chaperone-tier-log"));
        let child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .args(["-n", "chaperone-system", "logs", "-f", "--timestamps", pod])
            .stdout(std::fs::File::create(&file).expect("a log file in the temp directory"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kubectl runs");
        Follower { child, file }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.file).unwrap_or_default()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// An agent reading a Secret twice a second in its pod until the test
/// creates its stop file (or 4 minutes passed), one line per attempt: `read
/// <decoded value>` or `refused <kubectl's last error line>`, each taken
/// with the time it arrived.
struct Dialer {
    pod: String,
    stop: String,
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Dialer {
    fn start(pod: &str, secret: &str) -> Dialer {
        let stop = format!("/tmp/{secret}.stop");
        let script = format!(
            "end=$(( $(date +%s) + 240 )); \
             while [ ! -e {stop} ] && [ $(date +%s) -lt $end ]; do \
               if v=$(kubectl get secret {secret} -o 'jsonpath={{.data.password}}' 2>/tmp/{secret}.err); \
               then echo \"read $(echo $v | base64 -d)\"; \
               else echo \"refused $(tail -n 1 /tmp/{secret}.err | head -c 300)\"; fi; \
               sleep 0.5; \
             done; rm -f {stop} /tmp/{secret}.err"
        );
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .args([
                "exec", "-n", NAMESPACE, pod, "-c", "agent", "--", "sh", "-c", &script,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kubectl runs");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                    let Ok(line) = line else { break };
                    lines
                        .lock()
                        .unwrap()
                        .push((std::time::Instant::now(), line));
                }
            })
        };
        Dialer {
            pod: pod.to_owned(),
            stop,
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn lines(&self) -> Vec<(std::time::Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a masked read arrived after `since`.
    fn masked_read_after(&self, since: std::time::Instant, deadline: std::time::Instant) -> bool {
        loop {
            if self
                .lines()
                .iter()
                .any(|(at, l)| *at > since && l.starts_with("read <masked by chaperone"))
            {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Creates the stop file and waits for the dialer to end (10 s, then
    /// it is killed): every line it printed.
    fn stop(mut self) -> Vec<(std::time::Instant, String)> {
        self.ask_to_stop();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.lines()
    }

    fn ask_to_stop(&self) {
        admin(&[
            "exec",
            "-n",
            NAMESPACE,
            &self.pod,
            "-c",
            "agent",
            "--",
            "sh",
            "-c",
            &format!("echo > {}", self.stop),
        ]);
    }
}

impl Drop for Dialer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.ask_to_stop();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kubectl rollout restart` of the node agents while an agent reads a
/// Secret twice a second, until the rollout is complete and the agent is
/// answered again: on 1.20 (`overlays/k8s-1.20`: no surge) the node has no
/// agent for some seconds (the old pod's termination, the new one's
/// start), and the pinned programs refuse the agent's connections then.
/// None ever goes direct (a clear value), every answer is masked, refusals
/// come only between the restart and the new agent's first answer, and the
/// new agent guards the same pod afterwards. The gap is printed; on failure
/// so are both node agents' logs and the events.
#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn the_daemonsets_rolling_update_never_lets_an_agent_go_direct() {
    use std::time::{Duration, Instant};
    require_cluster!();
    let secret = unique("rolling");
    let value = format!("clear-{secret}");
    admin_ok(&[
        "create",
        "secret",
        "generic",
        &secret,
        "-n",
        NAMESPACE,
        &format!("--from-literal=password={value}"),
    ]);
    let before = node_agents();
    assert_eq!(before.len(), 1, "one node agent should run: {before:?}");
    let old_log = Follower::logs(&before[0]);
    let pod = agent_pod();
    let dialer = Dialer::start(&pod, &secret);
    let started = Instant::now();
    let diagnose = |lines: &[(Instant, String)], restart: Option<Instant>| {
        let zero = restart.unwrap_or(started);
        let timeline: Vec<String> = lines
            .iter()
            .map(|(at, l)| {
                let s = at.saturating_duration_since(zero).as_secs_f64()
                    - zero.saturating_duration_since(*at).as_secs_f64();
                format!("{s:+7.1} s {l}")
            })
            .collect();
        let new_logs: Vec<String> = node_agents()
            .iter()
            .filter(|p| !before.contains(p))
            .map(|p| {
                let out = admin(&["-n", "chaperone-system", "logs", "--timestamps", p]);
                format!("--- new node agent {p}:\n{}", text(&out))
            })
            .collect();
        let events = admin(&[
            "-n",
            "chaperone-system",
            "get",
            "events",
            "--sort-by=.lastTimestamp",
        ]);
        let pods = admin(&["-n", "chaperone-system", "get", "pods", "-o", "wide"]);
        format!(
            "the agent's attempts (seconds since the restart):\n{}\n--- old node agent {}:\n{}\n{}\n--- events in chaperone-system:\n{}\n--- pods:\n{}",
            timeline.join("\n"),
            before[0],
            old_log.text(),
            new_logs.join("\n"),
            text(&events),
            text(&pods)
        )
    };
    let cleanup = || {
        admin(&["delete", "secret", &secret, "-n", NAMESPACE, "--wait=false"]);
    };

    // Guarded before: masked reads.
    if !dialer.masked_read_after(started, started + Duration::from_secs(60)) {
        let lines = dialer.stop();
        cleanup();
        panic!(
            "the agent read no masked Secret before the rolling update\n{}",
            diagnose(&lines, None)
        );
    }
    std::thread::sleep(Duration::from_secs(2));

    let restart = Instant::now();
    admin_ok(&[
        "-n",
        "chaperone-system",
        "rollout",
        "restart",
        "daemonset/chaperone-node",
    ]);
    let rollout = admin(&[
        "-n",
        "chaperone-system",
        "rollout",
        "status",
        "daemonset/chaperone-node",
        "--timeout=180s",
    ]);
    let rolled = Instant::now();
    // Answered again, by the new agent, after the rollout completed.
    let resumed = rollout.status.success()
        && dialer.masked_read_after(rolled, restart + Duration::from_secs(180));
    let lines = dialer.stop();
    cleanup();
    let report = || diagnose(&lines, Some(restart));
    assert!(
        rollout.status.success(),
        "the rollout did not complete in 180 s: {}\n{}",
        text(&rollout),
        report()
    );
    assert!(
        resumed,
        "the new node agent never answered the agent (masked) within 180 s of the restart\n{}",
        report()
    );
    let after = node_agents();
    assert!(
        !after.iter().any(|p| before.contains(p)),
        "the node agent was not replaced: before {before:?}, after {after:?}"
    );

    assert!(
        !lines.iter().any(|(_, l)| l.contains(&value)),
        "during the rolling update the agent read the Secret in clear (direct)\n{}",
        report()
    );
    assert!(
        lines
            .iter()
            .filter(|(_, l)| l.starts_with("read "))
            .all(|(_, l)| l.starts_with("read <masked by chaperone")),
        "every answer should be chaperone's mask\n{}",
        report()
    );
    // Refused only in the gap: after the restart, before the new agent's
    // first answer; masked before and after it.
    let refused: Vec<Instant> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("refused"))
        .map(|(at, _)| *at)
        .collect();
    let masked_at: Vec<Instant> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("read "))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        refused.iter().all(|at| *at > restart),
        "the agent was refused before the rolling update began\n{}",
        report()
    );
    let back = masked_at
        .iter()
        .find(|at| refused.last().is_none_or(|last| *at > last))
        .copied();
    assert!(
        back.is_some_and(|back| back < rolled + Duration::from_secs(180))
            && masked_at.iter().any(|at| *at < restart),
        "masked reads should come before the restart and after the last refusal\n{}",
        report()
    );
    let gap_from = masked_at
        .iter()
        .rfind(|at| refused.first().is_some_and(|first| *at < first))
        .copied()
        .unwrap_or(restart);
    // Where the gap went: the old agent's end, the new one's start.
    let old_end: Vec<String> = old_log
        .text()
        .lines()
        .skip_while(|l| !l.contains("SIGTERM"))
        .map(str::to_owned)
        .collect();
    let new_start: Vec<String> = after
        .iter()
        .flat_map(|p| {
            let log = admin_ok(&["-n", "chaperone-system", "logs", "--timestamps", p]);
            let mut head: Vec<String> = Vec::new();
            for l in log.lines() {
                head.push(l.to_owned());
                if l.contains("guarding pod") && l.contains(&pod) {
                    break;
                }
            }
            head
        })
        .collect();
    // The DaemonSet controller's own account: when it deleted the old
    // pod, when it created the new one (only once the old one was gone).
    let controller = admin(&[
        "-n",
        "chaperone-system",
        "get",
        "events",
        "--field-selector=involvedObject.kind=DaemonSet,involvedObject.name=chaperone-node",
        "--sort-by=.lastTimestamp",
        "-o",
        "custom-columns=TIME:.lastTimestamp,REASON:.reason,MESSAGE:.message",
    ]);
    let controller: Vec<String> = String::from_utf8_lossy(&controller.stdout)
        .lines()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::to_owned)
        .collect();
    eprintln!(
        "rolling update: {} reads masked, {} refused, of {} attempts; the agent went unanswered \
         for {:.1} s (from its last answer by the old node agent to its first by the new one); \
         the rollout took {:.1} s\n--- the DaemonSet controller:\n{}\n--- the old node agent's end:\n{}\n--- the new node agent's \
         start:\n{}",
        masked_at.len(),
        refused.len(),
        lines.len(),
        back.map_or(0.0, |back| back.duration_since(gap_from).as_secs_f64()),
        rolled.duration_since(restart).as_secs_f64(),
        controller.join("\n"),
        old_end.join("\n"),
        new_start.join("\n")
    );
}

// === removal ===

/// `kubectl delete -k deploy/`, as the README removes chaperone: each node
/// agent sees its DaemonSet go, detaches its programs and removes its pins,
/// and agents reach the API server directly afterwards. It removes
/// chaperone, so `cargo xtask cluster test` runs it by itself after the
/// rest of the tier (`removal_` tests are skipped in the first run).
#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn removal_kubectl_delete_k_detaches_the_programs_and_agents_go_direct() {
    require_cluster!();
    let secret = unique("removal");
    let value = format!("clear-{secret}");
    admin_ok(&[
        "create",
        "secret",
        "generic",
        &secret,
        "-n",
        NAMESPACE,
        &format!("--from-literal=password={value}"),
    ]);
    let pod = agent_pod();
    let read = || {
        admin(&[
            "exec",
            "-n",
            NAMESPACE,
            &pod,
            "--",
            "kubectl",
            "get",
            "secret",
            &secret,
            "-o",
            "jsonpath={.data.password}",
        ])
    };
    // Guarded first: masked.
    let before = read();
    assert!(
        base64_decode(String::from_utf8_lossy(&before.stdout).trim())
            .starts_with("<masked by chaperone"),
        "{}",
        text(&before)
    );
    let pins = PathBuf::from("/sys/fs/bpf/chaperone");
    assert!(
        pins.exists(),
        "the node agent pinned nothing at {}",
        pins.display()
    );
    // As the README says (deploy/ is the 1.20 overlay here).
    let removed =
        run_readme_line("kubectl delete -k deploy/overlays/k8s-1.20 --wait=true --timeout=120s");
    assert!(removed.status.success(), "{}", text(&removed));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pins.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the node agent left its pins at {} after its DaemonSet was deleted",
            pins.display()
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // Direct now: the agent's kubectl reads what its RBAC allows, unmasked
    // (its CA bundle still holds the cluster's CA).
    let after = read();
    admin(&["delete", "secret", &secret, "-n", NAMESPACE, "--wait=false"]);
    assert!(after.status.success(), "{}", text(&after));
    assert_eq!(
        base64_decode(String::from_utf8_lossy(&after.stdout).trim()),
        value,
        "after removal the agent should reach the API server directly"
    );
}

// === what an agent may never dial ===

/// The real kubelet listens on the node's :10250 (this test, on the host,
/// connects): an agent pod's connection to it is refused by chaperone's
/// programs (`EPERM`), so exec and logs cannot go around the API server
/// and chaperone.
#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn an_agent_cannot_dial_the_real_kubelet() {
    require_cluster!();
    operator();
    let kubelet: std::net::SocketAddr = format!("{NODE_IP}:10250").parse().unwrap();
    std::net::TcpStream::connect_timeout(&kubelet, std::time::Duration::from_secs(3))
        .expect("the kubelet listens on the node's :10250");
    let from_agent = operator_sh(&format!("nc -w 3 {NODE_IP} 10250 </dev/null; echo rc=$?"));
    assert!(
        String::from_utf8_lossy(&from_agent.stdout).contains("rc=1")
            && String::from_utf8_lossy(&from_agent.stderr).contains("Operation not permitted"),
        "an agent's connection to the kubelet should be refused with EPERM: {}",
        text(&from_agent)
    );
}

/// A pod in a labeled namespace opts out with the label
/// `chaperone.dev/intercept: "false"`, for the webhook, `kubectl chaperone
/// status` and the node agent alike. Found here: the node agent's pod
/// tracker used to guard every pod of a labeled namespace, so the
/// opted-out pod's connections were redirected (to a CA it was never
/// given) and it could not dial the kubelet. Agents cannot make such a pod
/// themselves (tests/tests/e2e_optout.rs): the protect stage refuses the
/// opt-out on pods and in workloads' pod templates.
#[test]
#[ignore = "the real-cluster tier: cargo xtask cluster test"]
fn a_pod_that_opts_out_of_a_labeled_namespace_is_not_intercepted() {
    require_cluster!();
    operator();
    let dial = format!("nc -w 3 {NODE_IP} 10250 </dev/null; echo rc=$?");
    let from_workload = admin(&["exec", "-n", NAMESPACE, WORKLOAD, "--", "sh", "-c", &dial]);
    assert!(
        String::from_utf8_lossy(&from_workload.stdout).contains("rc=0"),
        "the opted-out workload pod is intercepted as an agent: {}",
        text(&from_workload)
    );
}

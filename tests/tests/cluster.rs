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

//! `kubectl chaperone` behaves like kubectl, against kube-sim and the real
//! kube-apiserver v1.20.2: `-o json|yaml|name` print what `kubectl get
//! approvalrequests` prints (a `List`, byte for byte), and that output
//! feeds `kubectl replace -f -`; `-n`, `-A`, `--kubeconfig`, `--context`
//! mean what they mean to kubectl; errors name the server and the fix.
//! `kubectl chaperone status` finds each broken part of an install (the
//! deploy manifests on the real server, no kubelet: readiness is written
//! by the test as a kubelet would) and says what to do.
//! The plugin runs as kubectl runs it (`kubectl chaperone ...`, from PATH).
//! Needs neither root nor a node agent.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
    time::Duration,
};

use chaperone_tests::{
    e2e::{ApiServer, Backend, install_approvals, run_for, workspace_binary},
    on_both_servers,
    real_api::RealApiServer,
    sim::{SimConfig, Simulator},
};
use serde_json::{Value, json};

on_both_servers!(
    lists_print_what_kubectl_get_prints_and_round_trip,
    namespaces_and_contexts_mean_what_they_mean_to_kubectl,
    a_missing_crd_and_a_missing_approval_say_what_to_do,
    status_names_what_is_missing_before_the_install,
);

const LIMIT: Duration = Duration::from_secs(60);

/// An API server of the test's own, with a kubeconfig of two contexts:
/// `admin` (current) and `nobody` (a user without any right).
struct Cluster {
    api: ApiServer,
    home: tempfile::TempDir,
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Cluster {
    fn start(backend: Backend, with_crds: bool) -> Cluster {
        let (api, runtime) = match backend {
            Backend::Sim => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                let sim = runtime
                    .block_on(Simulator::start(SimConfig::default()))
                    .unwrap();
                (ApiServer::Sim(Arc::new(sim)), Some(runtime))
            }
            Backend::Real => (
                ApiServer::Real(Arc::new(RealApiServer::start().unwrap())),
                None,
            ),
        };
        if with_crds {
            install_approvals(&api).unwrap();
        }
        let home = tempfile::tempdir().unwrap();
        let cluster = Cluster {
            api,
            home,
            _runtime: runtime,
        };
        // Two users in one kubeconfig, as a person has them.
        let admin = cluster.home.path().join("admin");
        cluster
            .api
            .write_person_kubeconfig(&admin, "root-person", &["system:masters"])
            .unwrap();
        let nobody = cluster.home.path().join("nobody");
        cluster
            .api
            .write_person_kubeconfig(&nobody, "nobody", &[])
            .unwrap();
        let mut config: Value = serde_yaml::from_slice(&std::fs::read(&admin).unwrap()).unwrap();
        let other: Value = serde_yaml::from_slice(&std::fs::read(&nobody).unwrap()).unwrap();
        config["users"][0]["name"] = json!("admin");
        let mut user = other["users"][0].clone();
        user["name"] = json!("nobody");
        config["users"].as_array_mut().unwrap().push(user);
        let cluster_name = config["clusters"][0]["name"].clone();
        config["contexts"] = json!([
            {"name": "admin", "context": {"cluster": cluster_name, "user": "admin"}},
            {"name": "nobody", "context": {"cluster": cluster_name, "user": "nobody"}},
        ]);
        config["current-context"] = json!("admin");
        std::fs::write(
            cluster.kubeconfig(),
            serde_yaml::to_string(&config).unwrap(),
        )
        .unwrap();
        cluster
    }

    fn kubeconfig(&self) -> PathBuf {
        self.home.path().join("config")
    }

    /// `kubectl ARGS` with the kubeconfig, the plugin on PATH.
    fn kubectl(&self, args: &[&str]) -> Output {
        let mut cmd = kubectl_with_plugin(self.home.path());
        cmd.args(args).env("KUBECONFIG", self.kubeconfig());
        run_for(&mut cmd, LIMIT).unwrap()
    }

    fn approval(&self, namespace: &str, name: &str, expires_in: i64) {
        let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(expires_in);
        let expires = expires
            .replace_nanosecond(0)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        self.api
            .create(json!({
                "apiVersion": "chaperone.dev/v1alpha1",
                "kind": "ApprovalRequest",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "requester": {"username": "system:serviceaccount:agents:coder"},
                    "request": {"verb": "delete", "apiGroup": "apps", "resource": "deployments", "namespace": "prod-a", "name": name},
                    "policy": "agent-guard",
                    "rule": "prod-deletes-need-approval",
                    "expiresAt": expires,
                },
            }))
            .unwrap();
    }

    fn namespace(&self, name: &str) {
        self.api
            .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
            .unwrap();
    }
}

fn kubectl_with_plugin(home: &Path) -> Command {
    let plugin_dir = workspace_binary("kubectl-chaperone")
        .parent()
        .unwrap()
        .to_path_buf();
    let mut paths = vec![plugin_dir];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let mut cmd = Command::new("kubectl");
    cmd.env("HOME", home)
        .env("PATH", std::env::join_paths(paths).unwrap())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("CHAPERONE_APPROVAL_NAMESPACE")
        .env_remove("CHAPERONE_APPROVAL_DIR");
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn lists_print_what_kubectl_get_prints_and_round_trip(backend: Backend) {
    let cluster = Cluster::start(backend, true);
    cluster.namespace("guard");
    cluster.approval("guard", "apr-00000001", 3600);
    cluster.approval("guard", "apr-00000002", 600);
    cluster.approval("guard", "apr-00000003", -60);

    // Everything, in each of kubectl's machine formats: JSON and names
    // byte for byte as kubectl prints them, YAML the same document (Go's
    // YAML quotes differently), and it feeds kubectl back (below).
    for format in ["json", "name"] {
        let ours = ok(cluster.kubectl(&[
            "chaperone",
            "list",
            "-n",
            "guard",
            "--state",
            "all",
            "-o",
            format,
        ]));
        let theirs = ok(cluster.kubectl(&["get", "approvalrequests", "-n", "guard", "-o", format]));
        assert_eq!(
            ours, theirs,
            "-o {format}: kubectl chaperone list vs kubectl get"
        );
    }
    let yaml = ok(cluster.kubectl(&[
        "chaperone",
        "list",
        "-n",
        "guard",
        "--state",
        "all",
        "-o",
        "yaml",
    ]));
    let theirs = ok(cluster.kubectl(&["get", "approvalrequests", "-n", "guard", "-o", "yaml"]));
    assert_eq!(
        serde_yaml::from_str::<Value>(&yaml).unwrap(),
        serde_yaml::from_str::<Value>(&theirs).unwrap(),
        "-o yaml: kubectl chaperone list vs kubectl get"
    );
    let list: Value = serde_json::from_str(&ok(cluster.kubectl(&[
        "chaperone",
        "list",
        "-n",
        "guard",
        "-o",
        "json",
    ])))
    .unwrap();
    assert_eq!(list["kind"], "List");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["apr-00000001", "apr-00000002"],
        "pending by default: the expired one is left out"
    );
    let one = ok(cluster.kubectl(&[
        "chaperone",
        "show",
        "apr-00000001",
        "-n",
        "guard",
        "-o",
        "json",
    ]));
    let theirs = ok(cluster.kubectl(&[
        "get",
        "approvalrequests",
        "apr-00000001",
        "-n",
        "guard",
        "-o",
        "json",
    ]));
    assert_eq!(one, theirs, "show -o json vs kubectl get NAME -o json");

    // The JSON and the YAML feed kubectl as kubectl's own do.
    let json = ok(cluster.kubectl(&[
        "chaperone",
        "list",
        "-n",
        "guard",
        "--state",
        "all",
        "-o",
        "json",
    ]));
    for document in [json, yaml] {
        let mut replace = kubectl_with_plugin(cluster.home.path());
        replace.args(["replace", "--dry-run=server", "-f", "-"]);
        if backend == Backend::Sim {
            // kube-sim serves no OpenAPI for kubectl's client-side check.
            replace.arg("--validate=false");
        }
        replace
            .env("KUBECONFIG", cluster.kubeconfig())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = replace.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), document.as_bytes()).unwrap();
        let replaced = ok(child.wait_with_output().unwrap());
        assert!(
            replaced.contains("approvalrequest.chaperone.dev/apr-00000001 replaced")
                && replaced.contains("apr-00000003"),
            "{replaced}"
        );
    }

    // The table: soonest expiry first, ages and times as kubectl prints them.
    let table = ok(cluster.kubectl(&["chaperone", "list", "-n", "guard"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME ") && lines[0].contains("EXPIRES"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("apr-00000002") && lines[1].contains("in 9m"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("apr-00000001") && lines[2].contains("in 59m"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    let wide = ok(cluster.kubectl(&["chaperone", "list", "-n", "guard", "-o", "wide"]));
    assert!(
        wide.contains("agent-guard/prod-deletes-need-approval"),
        "{wide}"
    );
    let expired = ok(cluster.kubectl(&["chaperone", "list", "-n", "guard", "--state", "expired"]));
    assert!(
        expired.contains("apr-00000003") && expired.contains("Expired"),
        "{expired}"
    );
}

fn namespaces_and_contexts_mean_what_they_mean_to_kubectl(backend: Backend) {
    let cluster = Cluster::start(backend, true);
    cluster.namespace("team-a");
    cluster.namespace("team-b");
    cluster.approval("team-a", "apr-0000000a", 3600);
    cluster.approval("team-b", "apr-0000000b", 3600);

    let a = ok(cluster.kubectl(&["chaperone", "list", "-n", "team-a", "-o", "name"]));
    assert_eq!(a, "approvalrequest.chaperone.dev/apr-0000000a\n");
    let long = ok(cluster.kubectl(&["chaperone", "list", "--namespace=team-b", "-o", "name"]));
    assert_eq!(long, "approvalrequest.chaperone.dev/apr-0000000b\n");
    // The default is the node agents' namespace, empty here.
    let default = ok(cluster.kubectl(&["chaperone", "list"]));
    assert!(
        default.contains("No pending approvals in namespace \"chaperone-system\""),
        "{default}"
    );

    // -A: every namespace, with a NAMESPACE column; -o json as kubectl get -A.
    let all = ok(cluster.kubectl(&["chaperone", "list", "-A"]));
    let lines: Vec<&str> = all.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE "), "{all}");
    assert!(all.contains("team-a") && all.contains("team-b"), "{all}");
    let ours = ok(cluster.kubectl(&["chaperone", "list", "-A", "-o", "json"]));
    let theirs = ok(cluster.kubectl(&["get", "approvalrequests", "-A", "-o", "json"]));
    assert_eq!(ours, theirs);

    // --kubeconfig instead of $KUBECONFIG, --context for another user.
    let mut cmd = kubectl_with_plugin(cluster.home.path());
    cmd.args(["chaperone", "list", "-A", "-o", "name", "--kubeconfig"])
        .arg(cluster.kubeconfig())
        .env_remove("KUBECONFIG");
    let out = ok(run_for(&mut cmd, LIMIT).unwrap());
    assert_eq!(out.lines().count(), 2, "{out}");
    let refused = cluster.kubectl(&["chaperone", "--context", "nobody", "list", "-A"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("Forbidden")
            && said.contains(&cluster.api.url())
            && said.contains("nobody")
            && said.contains("--context"),
        "{}",
        text(&refused)
    );
    let unknown = cluster.kubectl(&["chaperone", "--context", "nope", "list"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("kubectl config get-contexts"),
        "{}",
        text(&unknown)
    );
}

fn a_missing_crd_and_a_missing_approval_say_what_to_do(backend: Backend) {
    let cluster = Cluster::start(backend, false);
    for args in [
        &["chaperone", "list"][..],
        &["chaperone", "list", "-A", "-o", "json"][..],
        &["chaperone", "show", "apr-12345678"][..],
    ] {
        let out = cluster.kubectl(args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.starts_with("error: the server ")
                && said.contains(&cluster.api.url())
                && said.contains("does not serve")
                && said.contains("kubectl apply -k deploy/"),
            "{args:?}: {}",
            text(&out)
        );
        assert!(
            !said.contains("ErrorResponse") && !said.contains("Status {"),
            "{said}"
        );
    }

    install_approvals(&cluster.api).unwrap();
    let out = cluster.kubectl(&["chaperone", "show", "apr-12345678"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("approval apr-12345678 not found in namespace \"chaperone-system\"")
            && said.contains("kubectl chaperone list -A"),
        "{}",
        text(&out)
    );
}

/// An unreachable server is named with its URL, whatever the backend.
#[test]
fn an_unreachable_server_is_named_with_its_url() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config");
    std::fs::write(
        &config,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:9\"}\n\
         users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
         current-context: x\n",
    )
    .unwrap();
    let mut cmd = kubectl_with_plugin(home.path());
    cmd.args(["chaperone", "list"]).env("KUBECONFIG", &config);
    let out = run_for(&mut cmd, LIMIT).unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("Unable to connect to the server https://127.0.0.1:9")
            && said.contains("refused")
            && !said.contains("client error (Connect)"),
        "{said}"
    );
}

fn status_names_what_is_missing_before_the_install(backend: Backend) {
    let cluster = Cluster::start(backend, false);
    let out = cluster.kubectl(&["chaperone", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    for line in [
        "× agentpolicies.chaperone.dev is not installed",
        "× approvalrequests.chaperone.dev is not installed",
        "fix: kubectl apply -k deploy/",
        "× the DaemonSet chaperone-system/chaperone-node is missing",
        "Status check results are ×",
    ] {
        assert!(said.contains(line), "{line:?} in:\n{said}");
    }
    install_approvals(&cluster.api).unwrap();
    let out = cluster.kubectl(&["chaperone", "status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["server"], cluster.api.url());
    let crd = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["message"]
                .as_str()
                .unwrap()
                .starts_with("approvalrequests")
        })
        .unwrap();
    assert_eq!(crd["outcome"], "ok", "{report:#}");
    assert_eq!(
        crd["message"],
        "approvalrequests.chaperone.dev installed, serving v1alpha1"
    );
}

fn status(cluster: &Cluster) -> (Option<i32>, String, Value) {
    let out = cluster.kubectl(&["chaperone", "status"]);
    let checklist = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = cluster.kubectl(&["chaperone", "status", "-o", "json"]);
    assert_eq!(out.status.code(), json.status.code(), "{}", text(&json));
    (
        out.status.code(),
        checklist,
        serde_json::from_slice(&json.stdout).unwrap(),
    )
}

fn has(checklist: &str, lines: &[&str]) {
    for line in lines {
        assert!(checklist.contains(line), "{line:?} in:\n{checklist}");
    }
}

/// The deploy manifests on the real 1.20 server, as a newcomer applies
/// them; then each failure fixed the way its `fix:` says (or the way the
/// missing kubelet and controllers would), until everything is green.
#[test]
fn status_follows_an_install_of_the_deploy_manifests_to_green() {
    chaperone_tests::require_real_api!();
    let cluster = Cluster::start(Backend::Real, false);
    let ApiServer::Real(real) = &cluster.api else {
        unreachable!()
    };
    // Agent pods made before the webhook exists (and so without it).
    cluster.namespace("agents");
    let pod = |name: &str, node: &str, injected: bool| {
        let mut metadata = json!({"name": name, "namespace": "agents", "labels": {"chaperone.dev/intercept": "true"}});
        if injected {
            metadata["annotations"] = json!({"chaperone.dev/injected": "passthrough"});
        }
        cluster
            .api
            .create(json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "agent:1"}]},
            }))
            .unwrap();
    };
    pod("early", "node-a", false);
    pod("coder-0", "node-a", true);
    pod("coder-1", "node-b", true);

    let overlay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/overlays/k8s-1.20");
    let applied = cluster.kubectl(&["apply", "-k", overlay.to_str().unwrap()]);
    ok(applied);

    let (code, checklist, report) = status(&cluster);
    assert_eq!(code, Some(1), "{checklist}");
    has(
        &checklist,
        &[
            "√ agentpolicies.chaperone.dev installed, serving v1alpha1",
            "√ MutatingWebhookConfiguration chaperone present",
            "× namespace.pods.chaperone.dev: the CA bundle is empty",
            "fix: run deploy/bootstrap-certs.sh",
            "× no ready webhook pod behind the Service chaperone-system/chaperone-webhook",
            "× the DaemonSet chaperone-system/chaperone-node schedules no pod on any node",
            "‼ no AgentPolicy",
            "0 of 3 labeled pods guarded",
            "× pod agents/early is not guarded: created without the webhook",
            "fix: recreate it: kubectl -n agents delete pod early",
            "× pod agents/coder-0 is not guarded: on node node-a, where no node agent is ready",
            "× namespace agents has no ConfigMap chaperone-ca-bundle: its agent pods wait in ContainerCreating",
            "fix: deploy/bootstrap-certs.sh agents",
        ],
    );
    assert_eq!(report["pods"]["agents/coder-1"]["guarded"], false);

    // The bundle as an older bootstrap-certs.sh made it: no chaperone-ca.crt.
    let ca_pem = real.ca_pem();
    cluster
        .api
        .create(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "chaperone-ca-bundle", "namespace": "agents"},
            "data": {"ca.crt": ca_pem},
        }))
        .unwrap();
    let (_, checklist, _) = status(&cluster);
    has(
        &checklist,
        &[
            "× agents/chaperone-ca-bundle: no key chaperone-ca.crt (made by a bootstrap-certs.sh older than the gate)",
        ],
    );

    // What bootstrap-certs.sh, the controllers and the kubelet would do.
    let bundle = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(real.ca_pem())
    };
    let config = cluster.kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "chaperone",
        "-o",
        "json",
    ]);
    let mut config: Value = serde_json::from_str(&ok(config)).unwrap();
    for hook in config["webhooks"].as_array_mut().unwrap() {
        hook["clientConfig"]["caBundle"] = json!(bundle);
    }
    cluster.api.update(config).unwrap();
    cluster
        .api
        .update(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "chaperone-ca-bundle", "namespace": "agents"},
            "data": {"ca.crt": ca_pem, "chaperone-ca.crt": ca_pem},
        }))
        .unwrap();
    cluster
        .api
        .create(json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "chaperone-webhook", "namespace": "chaperone-system"},
            "subsets": [{"addresses": [{"ip": "10.0.0.9"}], "ports": [{"name": "https", "port": 8443}]}],
        }))
        .unwrap();
    real.patch_status(
        "/apis/apps/v1/namespaces/chaperone-system/daemonsets/chaperone-node",
        json!({"status": {"desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberReady": 1, "numberMisscheduled": 0}}),
    )
    .unwrap();
    let agent = cluster
        .api
        .create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "chaperone-node-a1b2c", "namespace": "chaperone-system", "labels": {"app.kubernetes.io/name": "chaperone-node"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "chaperone", "image": "chaperone:1"}]},
        }))
        .unwrap();
    assert_eq!(agent["metadata"]["name"], "chaperone-node-a1b2c");
    let (_, checklist, _) = status(&cluster);
    has(
        &checklist,
        &["× chaperone-node-a1b2c on node node-a is not ready: agent pods there are not guarded"],
    );
    real.patch_status(
        "/api/v1/namespaces/chaperone-system/pods/chaperone-node-a1b2c",
        json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
    )
    .unwrap();
    let policy =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies/read-only-agent.yaml");
    ok(cluster.kubectl(&["apply", "-f", policy.to_str().unwrap()]));
    real.patch_status(
        "/apis/chaperone.dev/v1alpha1/agentpolicies/read-only-agent",
        json!({"status": {"conditions": [{"type": "Accepted", "status": "False", "reason": "Invalid", "message": "rules[2]: unknown verb"}]}}),
    )
    .unwrap();
    ok(cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        "agents",
        "early",
        "--force",
        "--grace-period=0",
    ]));

    let (code, checklist, report) = status(&cluster);
    assert_eq!(code, Some(1), "{checklist}");
    has(
        &checklist,
        &[
            "√ namespace.pods.chaperone.dev: CA bundle injected",
            "√ Service chaperone-system/chaperone-webhook has 1 ready webhook pod(s)",
            "√ chaperone-node-a1b2c on node node-a is ready",
            "√ agents/chaperone-ca-bundle holds chaperone's CA",
            "× AgentPolicy read-only-agent is not accepted: rules[2]: unknown verb",
            "1 of 2 labeled pods guarded",
            "× pod agents/coder-1 is not guarded: on node node-b, where no node agent is ready",
        ],
    );
    assert_eq!(
        report["pods"]["agents/coder-0"]["guarded"], true,
        "{report:#}"
    );
    assert_eq!(report["pods"]["agents/coder-0"]["node"], "node-a");

    real.patch_status(
        "/apis/chaperone.dev/v1alpha1/agentpolicies/read-only-agent",
        json!({"status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Valid", "message": ""}]}}),
    )
    .unwrap();
    ok(cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        "agents",
        "coder-1",
        "--force",
        "--grace-period=0",
    ]));
    let (code, checklist, report) = status(&cluster);
    assert_eq!(code, Some(0), "{checklist}");
    has(
        &checklist,
        &[
            "√ AgentPolicy read-only-agent accepted",
            "Status check results are √",
        ],
    );
    assert_eq!(report["ok"], true);
}

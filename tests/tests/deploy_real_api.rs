//! The manifests under `deploy/` against the oldest Kubernetes chaperone
//! supports, the real kube-apiserver v1.20.2 (`cargo xtask kube`): the
//! 1.20 overlay applies (`kubectl apply -k --dry-run=server`), the default
//! install is refused there for exactly the reasons the overlay removes, and
//! the server accepts the example policies, `apiGroups: [""]` included; and
//! the node agent's RBAC lets it watch every source of API-server addresses.
//! Newer versions are checked by deploy/validate.sh's schemas
//! (tests/tests/deploy_manifests.rs).
//!
//! Needs `kubectl` and the real server (skips without it, fails under CI).

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use chaperone_tests::{real_api::RealApiServer, require_real_api};
use serde_json::json;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .join("deploy")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The shared server with the namespace the install puts everything in
/// (a server-side dry run creates nothing, so objects in a namespace that
/// the same apply would create are refused otherwise).
fn server() -> &'static RealApiServer {
    let server = RealApiServer::shared().expect("the real API server starts");
    server
        .ensure(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "chaperone-system"}}))
        .expect("create chaperone-system");
    server
}

fn apply_dry_run(server: &RealApiServer, args: &[&str]) -> Output {
    server
        .kubectl()
        .args(["apply", "--dry-run=server"])
        .args(args)
        .output()
        .expect("kubectl is needed")
}

#[test]
fn the_1_20_overlay_applies_on_kubernetes_1_20() {
    require_real_api!();
    let server = server();
    let overlay = deploy_dir().join("overlays/k8s-1.20");
    let out = apply_dry_run(server, &["-k", overlay.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "kubectl apply -k deploy/overlays/k8s-1.20 --dry-run=server on {}: {}",
        server.version(),
        describe(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for object in [
        "daemonset.apps/chaperone-node",
        "poddisruptionbudget.policy/chaperone-webhook",
        "customresourcedefinition.apiextensions.k8s.io/agentpolicies.chaperone.dev",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/chaperone ",
    ] {
        assert!(
            stdout.contains(object) && stdout.contains("(server dry run)"),
            "{object} was not applied:\n{stdout}"
        );
    }
}

#[test]
fn the_default_install_needs_the_overlay_on_kubernetes_1_20() {
    require_real_api!();
    let server = server();
    let out = apply_dry_run(server, &["-k", deploy_dir().to_str().unwrap()]);
    let text = describe(&out);
    assert!(
        !out.status.success(),
        "the default install applied on 1.20: drop the k8s-1.20 overlay? {text}"
    );
    // What the overlay replaces: the PodDisruptionBudget's policy/v1 and
    // the DaemonSet's maxSurge (unknown; maxUnavailable 0 is invalid then).
    assert!(
        text.contains("PodDisruptionBudget") && text.contains("policy/v1"),
        "{text}"
    );
    assert!(
        text.contains("maxSurge") || text.contains("maxUnavailable"),
        "{text}"
    );
}

#[test]
fn kubernetes_1_20_accepts_the_example_policies_and_the_core_group() {
    require_real_api!();
    let server = server();
    let crd =
        std::fs::read_to_string(deploy_dir().join("base/crds/agentpolicies.chaperone.dev.yaml"))
            .unwrap();
    server.install_crds(&crd).expect("the AgentPolicy CRD");

    // `apiGroups: [""]` (the core group) is an empty string, which the CRD
    // schema must accept: a kube-apiserver built with Go 1.21 without the
    // go-openapi/validate patch of `cargo xtask kube` refuses it.
    let policy = server
        .create(json!({
            "apiVersion": "chaperone.dev/v1alpha1",
            "kind": "AgentPolicy",
            "metadata": {"name": "core-group"},
            "spec": {
                "subjects": [{"groups": ["system:serviceaccounts"]}],
                "rules": [{
                    "verbs": ["get", "list"],
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "action": "allow",
                }],
                "defaultAction": "deny",
            },
        }))
        .expect("an AgentPolicy with apiGroups: [\"\"] is accepted");
    assert_eq!(policy["spec"]["rules"][0]["apiGroups"], json!([""]));

    // The schema is enforced (the acceptance above is not a server that
    // accepts anything).
    let refused = server.create(json!({
        "apiVersion": "chaperone.dev/v1alpha1",
        "kind": "AgentPolicy",
        "metadata": {"name": "bad-action"},
        "spec": {
            "subjects": [{"groups": ["system:serviceaccounts"]}],
            "rules": [{"verbs": ["get"], "action": "explode"}],
        },
    }));
    let why = format!("{:#}", refused.expect_err("an unknown action is refused"));
    assert!(why.contains("HTTP 422") && why.contains("explode"), "{why}");

    for dir in ["examples", "policies"] {
        for entry in std::fs::read_dir(deploy_dir().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            if !text.contains("kind: AgentPolicy") {
                continue;
            }
            let out = apply_dry_run(server, &["-f", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{} on {}: {}",
                path.display(),
                server.version(),
                describe(&out)
            );
        }
    }
}

/// The node agent's ClusterRole, as the 1.20 overlay installs it, lets it
/// list and watch every source of API-server addresses it watches
/// (`targets.rs`): the `kubernetes` Service, its Endpoints and its
/// EndpointSlices (`discovery.k8s.io/v1beta1` on 1.20). Without one of
/// them the node would miss addresses agents can dial. Asked of the real
/// server's RBAC with `kubectl auth can-i --as` the node's ServiceAccount.
#[test]
fn the_node_agents_role_lets_it_watch_every_api_server_address() {
    require_real_api!();
    use serde::Deserialize as _;
    let server = RealApiServer::start().expect("the real API server starts");
    let overlay = deploy_dir().join("overlays/k8s-1.20");
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .expect("kubectl is needed");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        describe(&out)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 manifests");
    let mut installed = 0;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object = serde_json::Value::deserialize(document).expect("a YAML document");
        let rbac = object["kind"] == "ClusterRole" || object["kind"] == "ClusterRoleBinding";
        if rbac && object["metadata"]["name"] == "chaperone-node" {
            server
                .create(object)
                .expect("install the node agent's RBAC");
            installed += 1;
        }
    }
    assert_eq!(
        installed, 2,
        "the overlay has no ClusterRole and binding chaperone-node"
    );
    let node = "system:serviceaccount:chaperone-system:chaperone-node";
    for resource in ["services", "endpoints", "endpointslices.discovery.k8s.io"] {
        for verb in ["get", "list", "watch"] {
            let out = server
                .kubectl()
                .args([
                    "auth", "can-i", verb, resource, "-n", "default", "--as", node,
                ])
                .output()
                .expect("kubectl is needed");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "yes",
                "may the node agent {verb} {resource} in default? {}",
                describe(&out)
            );
        }
    }
}

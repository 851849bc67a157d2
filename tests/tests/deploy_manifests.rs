//! The manifests under `deploy/`, checked the way a platform engineer meets
//! them: `kubectl kustomize deploy/` renders, every object validates against
//! the Kubernetes schemas (kubernetes-validate, strict, several versions),
//! the CRD schemas accept the example policies and reject malformed ones,
//! and the install has the properties deploy/README.md promises.
//!
//! Needs `kubectl` and `python3` (with venv); `deploy/validate.sh` installs
//! the validators into `target/py` on first use (from PyPI).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use chaperone::webhook::{ATTEST_PATH, DEFAULT_AUDIENCE, MUTATE_NAMESPACE_PATH, MUTATE_PATH};
use serde_yaml::Value;

const IMAGE: &str = "ghcr.io/chaperone-dev/chaperone";

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

/// `deploy/validate.sh ARGS`, after installing the validators exactly once
/// per test run (tests run in parallel; pip must not).
fn validate(args: &[&str]) -> Output {
    static SETUP: OnceLock<()> = OnceLock::new();
    let script = deploy_dir().join("validate.sh");
    SETUP.get_or_init(|| {
        let output = Command::new("sh")
            .arg(&script)
            .arg("setup")
            .output()
            .expect("run deploy/validate.sh setup");
        assert!(
            output.status.success(),
            "installing the validators failed: {}",
            describe(&output)
        );
    });
    Command::new("sh")
        .arg(&script)
        .args(args)
        .output()
        .expect("run deploy/validate.sh")
}

fn kustomize(dir: &str) -> Vec<Value> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join(dir))
        .output()
        .expect("kubectl is needed to render deploy/ (it carries kustomize)");
    assert!(
        output.status.success(),
        "kubectl kustomize deploy/{dir}: {}",
        describe(&output)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == name)
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    env(container, name)?["value"].as_str().map(str::to_owned)
}

fn all_verbs(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .flat_map(|role| role["rules"].as_sequence().cloned().unwrap_or_default())
        .flat_map(|rule| strings(&rule["verbs"]))
        .collect()
}

// === validation with real validators ===

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let output = validate(&["manifests"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", describe(&output));
    for expected in [
        "kustomize .: DaemonSet/chaperone-node",
        "kustomize overlays/impersonate: ClusterRole/chaperone-node-impersonate",
        "base/crds/agentpolicies.chaperone.dev.yaml: CustomResourceDefinition/agentpolicies.chaperone.dev",
        "examples/deploy-dev-approve-prod.yaml: AgentPolicy/deployer",
    ] {
        assert!(
            stdout.contains(&format!("ok   {expected}")),
            "{expected} was not validated:\n{stdout}"
        );
    }
    assert!(stdout.contains(": 0 failed"), "{stdout}");
}

#[test]
fn the_validator_fails_on_an_invalid_manifest() {
    // A copy of deploy/ with one mistake a person could make: the check must
    // catch it (a validator that passes everything proves nothing).
    let copy = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(deploy_dir())
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let root = copy.path().join("deploy");
    let daemonset = root.join("base/node/daemonset.yaml");
    let text = std::fs::read_to_string(&daemonset).unwrap();
    std::fs::write(
        &daemonset,
        text.replace("maxUnavailable: 0", "maxUnavailable: 0\n      maxSurges: 1"),
    )
    .unwrap();
    validate(&["setup"]);
    let output = Command::new("sh")
        .arg(root.join("validate.sh"))
        .arg("manifests")
        .env(
            "CHAPERONE_PY_VENV",
            deploy_dir().parent().unwrap().join("target/py"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        stdout.contains("FAIL base/node/daemonset.yaml: DaemonSet/chaperone-node")
            && stdout.contains("'maxSurges' was unexpected"),
        "{}",
        describe(&output)
    );
}

#[test]
fn the_crd_schemas_accept_the_example_policies() {
    let examples: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(examples.len() >= 3, "{examples:?}");
    let mut args = vec!["files"];
    args.extend(examples.iter().map(|p| p.to_str().unwrap()));
    let output = validate(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", describe(&output));
    let accepted = stdout
        .lines()
        .filter(|l| l.starts_with("accepted "))
        .count();
    assert!(accepted >= 4, "{stdout}");
    assert!(stdout.contains("AgentPolicy/read-only-agents"), "{stdout}");
}

#[test]
fn the_crd_schemas_reject_malformed_objects_and_say_why() {
    let policy = |name: &str, spec: &str| {
        format!(
            "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\n\
             spec:\n  subjects: [{{users: [alice]}}]\n{spec}"
        )
    };
    let cases = [
        (
            "wrong-action",
            policy("wrong-action", "  rules: [{verbs: [get], action: allwo}]\n"),
            "spec.rules[0].action: 'allwo' is not one of ['allow', 'deny', 'mask', 'approve']",
        ),
        (
            "rules-not-a-list",
            policy("rules-not-a-list", "  rules: {action: allow}\n"),
            "spec.rules: {'action': 'allow'} is not of type 'array'",
        ),
        (
            "rule-without-action",
            policy("rule-without-action", "  rules: [{verbs: [get]}]\n"),
            "spec.rules[0]: 'action' is a required property",
        ),
        (
            "misspelled-field",
            policy(
                "misspelled-field",
                "  rules: [{verbs: [get], action: allow, recrod: Request}]\n",
            ),
            "'recrod' was unexpected",
        ),
        (
            "wrong-record-level",
            policy(
                "wrong-record-level",
                "  rules: [{verbs: [get], action: allow, record: Everything}]\n",
            ),
            "'Everything' is not one of ['None', 'Metadata', 'Request', 'RequestResponse']",
        ),
        (
            "wrong-credential-mode",
            policy("wrong-credential-mode", "  credentialMode: sudo\n"),
            "spec.credentialMode: 'sudo' is not one of ['passthrough', 'impersonate']",
        ),
        (
            "no-subjects",
            "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: x}\n\
             spec: {rules: []}\n"
                .to_owned(),
            "spec: 'subjects' is a required property",
        ),
        (
            "bad-selector-operator",
            policy("bad-selector-operator", "  rules: []\n".to_owned().as_str()).replace(
                "[{users: [alice]}]",
                "[{podLabels: {matchExpressions: [{key: a, operator: Equals}]}}]",
            ),
            "'Equals' is not one of ['In', 'NotIn', 'Exists', 'DoesNotExist']",
        ),
        (
            "approval-bad-state",
            "apiVersion: chaperone.dev/v1alpha1\nkind: ApprovalRequest\n\
             metadata: {name: a, namespace: chaperone-system}\n\
             spec: {requester: {username: u}, request: {verb: delete}, policy: p, rule: r,\n\
             \x20      expiresAt: tomorrow}\nstatus: {state: Maybe}\n"
                .to_owned(),
            "spec.expiresAt: 'tomorrow' is not a 'date-time'; status.state: 'Maybe' is not one of",
        ),
        (
            "wrong-version",
            "apiVersion: chaperone.dev/v1\nkind: AgentPolicy\nmetadata: {name: x}\n\
             spec: {subjects: []}\n"
                .to_owned(),
            "no CRD serves apiVersion chaperone.dev/v1 kind AgentPolicy",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, yaml, expected) in cases {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &yaml).unwrap();
        let output = validate(&["files", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !output.status.success(),
            "{name} was accepted:\n{yaml}\n{}",
            describe(&output)
        );
        assert!(
            stdout.starts_with("rejected ") && stdout.contains(expected),
            "{name}: expected {expected:?} in:\n{stdout}"
        );
    }
}

// === what the rendered install promises ===

#[test]
fn kubectl_kustomize_deploy_renders_the_default_install() {
    let objects = kustomize(".");
    let kinds: BTreeSet<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for expected in [
        "Namespace/chaperone-system",
        "CustomResourceDefinition/agentpolicies.chaperone.dev",
        "CustomResourceDefinition/approvalrequests.chaperone.dev",
        "ServiceAccount/chaperone-node",
        "ClusterRole/chaperone-node",
        "ClusterRoleBinding/chaperone-node",
        "Role/chaperone-node",
        "RoleBinding/chaperone-node",
        "Role/chaperone-webhook",
        "RoleBinding/chaperone-webhook",
        "ClusterRole/chaperone-approver",
        "DaemonSet/chaperone-node",
        "Deployment/chaperone-webhook",
        "Service/chaperone-webhook",
        "PodDisruptionBudget/chaperone-webhook",
        "MutatingWebhookConfiguration/chaperone",
    ] {
        assert!(
            kinds.contains(expected),
            "{expected} missing from {kinds:?}"
        );
    }
    let cluster_scoped = [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    ];
    for object in &objects {
        let kind = object["kind"].as_str().unwrap();
        let namespace = object["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(&kind) {
            assert_eq!(namespace, None, "{kind} is cluster-scoped");
        } else {
            assert_eq!(namespace, Some("chaperone-system"), "{kind}");
        }
    }
    // Passthrough by default: nobody may impersonate.
    assert!(
        !all_verbs(&objects).contains("impersonate"),
        "the default install must not grant impersonation"
    );
    let daemonset = find(&objects, "DaemonSet", "chaperone-node");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_value(container, "CHAPERONE_CREDENTIAL_MODE").as_deref(),
        Some("passthrough")
    );
    assert_eq!(
        env_value(container, "CHAPERONE_FAIL_OPEN").as_deref(),
        Some("false"),
        "failOpen defaults to closed"
    );
}

#[test]
fn the_image_is_named_in_one_place() {
    let mut mentions = Vec::new();
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && std::fs::read_to_string(&path).unwrap().contains(IMAGE)
            {
                mentions.push(path.strip_prefix(deploy_dir()).unwrap().to_owned());
            }
        }
    }
    assert_eq!(mentions, [PathBuf::from("base/kustomization.yaml")]);
    for overlay in [".", "overlays/passthrough", "overlays/impersonate"] {
        let objects = kustomize(overlay);
        for (kind, name) in [
            ("DaemonSet", "chaperone-node"),
            ("Deployment", "chaperone-webhook"),
        ] {
            let image =
                find(&objects, kind, name)["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()
                    .to_owned();
            assert!(
                image.starts_with(&format!("{IMAGE}:")),
                "{overlay} {kind}: {image}"
            );
        }
    }
}

#[test]
fn the_daemonset_never_leaves_a_nodes_agents_unguarded() {
    let objects = kustomize(".");
    let daemonset = find(&objects, "DaemonSet", "chaperone-node");
    let spec = &daemonset["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 60);
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    let container = &pod["containers"][0];
    // A declared port on hostNetwork is a hostPort: the surge pod could not
    // be scheduled beside the old one.
    assert!(container["ports"].is_null(), "no ports on the node agent");

    let security = &container["securityContext"];
    assert_ne!(security["privileged"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&security["capabilities"]["add"]),
        ["BPF", "PERFMON", "NET_ADMIN"]
    );

    let host_paths: BTreeSet<String> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
        .collect();
    assert!(host_paths.contains("/sys/fs/cgroup") && host_paths.contains("/sys/fs/bpf"));
    assert_eq!(
        env(container, "CHAPERONE_NODE_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(
        env(container, "CHAPERONE_HOST_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    let admin_port: u64 = env_value(container, "CHAPERONE_ADMIN_PORT")
        .unwrap()
        .parse()
        .unwrap();
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], admin_port, "{probe}");
    }
    let resources = &container["resources"];
    assert!(
        resources["requests"]["cpu"].is_string() && resources["requests"]["memory"].is_string()
    );
    assert!(resources["limits"]["memory"].is_string());
    assert!(
        resources["limits"]["cpu"].is_null(),
        "no CPU limit on the data path"
    );
}

/// Removal: the node agent knows its own pod (downward API) and may read
/// only its own DaemonSet, only in chaperone-system, and nothing else of
/// any workload.
#[test]
fn the_node_agent_may_read_only_its_own_daemonset() {
    let objects = kustomize(".");
    let daemonset = find(&objects, "DaemonSet", "chaperone-node");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    for (name, field) in [
        ("CHAPERONE_POD_NAME", "metadata.name"),
        ("CHAPERONE_POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            env(container, name).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            field,
            "{name}"
        );
    }
    let role = find(&objects, "Role", "chaperone-node");
    assert_eq!(role["metadata"]["namespace"], "chaperone-system");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), ["apps"]);
    assert_eq!(strings(&rules[0]["resources"]), ["daemonsets"]);
    assert_eq!(strings(&rules[0]["resourceNames"]), ["chaperone-node"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get", "list", "watch"]);
    let binding = find(&objects, "RoleBinding", "chaperone-node");
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], "chaperone-node");
    assert_eq!(binding["subjects"][0]["name"], "chaperone-node");
    assert_eq!(binding["subjects"][0]["namespace"], "chaperone-system");
    for role in objects.iter().filter(|o| o["kind"] == "ClusterRole") {
        for rule in role["rules"].as_sequence().unwrap() {
            assert!(
                !strings(&rule["resources"]).contains(&"daemonsets".to_owned()),
                "{} grants daemonsets cluster-wide",
                role["metadata"]["name"].as_str().unwrap()
            );
        }
    }
}

/// The webhook gives agent pods its own image as the chaperone-gate init
/// container: it reads its Pod (downward API name and namespace, a Role
/// that may only get pods in chaperone's namespace).
#[test]
fn the_webhook_may_read_only_pods_in_its_namespace_for_the_gate_image() {
    let objects = kustomize(".");
    let deployment = find(&objects, "Deployment", "chaperone-webhook");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], true);
    let container = &pod["containers"][0];
    for (name, field) in [
        ("CHAPERONE_POD_NAME", "metadata.name"),
        ("CHAPERONE_POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            env(container, name).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            field,
            "{name}"
        );
    }
    let role = find(&objects, "Role", "chaperone-webhook");
    assert_eq!(role["metadata"]["namespace"], "chaperone-system");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["pods"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get"]);
    let binding = find(&objects, "RoleBinding", "chaperone-webhook");
    assert_eq!(binding["roleRef"]["name"], "chaperone-webhook");
    assert_eq!(binding["subjects"][0]["name"], "chaperone-webhook");
    assert_eq!(binding["subjects"][0]["namespace"], "chaperone-system");
}

#[test]
fn the_webhook_fails_closed_and_never_gates_the_control_plane() {
    let objects = kustomize(".");
    let config = find(&objects, "MutatingWebhookConfiguration", "chaperone");
    let webhooks = config["webhooks"].as_sequence().unwrap();
    let paths: BTreeSet<&str> = webhooks
        .iter()
        .map(|w| w["clientConfig"]["service"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        BTreeSet::from([MUTATE_PATH, MUTATE_NAMESPACE_PATH, ATTEST_PATH]),
        "the paths `chaperone webhook` serves"
    );
    let pod_hooks = webhooks
        .iter()
        .filter(|w| w["clientConfig"]["service"]["path"] != ATTEST_PATH);
    for webhook in pod_hooks {
        let name = webhook["name"].as_str().unwrap();
        assert_eq!(webhook["failurePolicy"], "Fail", "{name}");
        assert_eq!(webhook["sideEffects"], "None", "{name}");
        assert_eq!(strings(&webhook["admissionReviewVersions"]), ["v1"]);
        assert_eq!(strings(&webhook["rules"][0]["resources"]), ["pods"]);
        assert_eq!(
            strings(&webhook["rules"][0]["operations"]),
            ["CREATE", "UPDATE"]
        );
        let service = &webhook["clientConfig"]["service"];
        assert_eq!(service["name"], "chaperone-webhook");
        assert_eq!(service["namespace"], "chaperone-system");
        let excluded = webhook["namespaceSelector"]["matchExpressions"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["key"] == "kubernetes.io/metadata.name")
            .unwrap_or_else(|| panic!("{name} must exclude system namespaces"));
        assert_eq!(excluded["operator"], "NotIn");
        assert_eq!(
            strings(&excluded["values"]),
            ["chaperone-system", "kube-system"]
        );
    }
    let by_path = |path: &str| {
        webhooks
            .iter()
            .find(|w| w["clientConfig"]["service"]["path"] == path)
            .unwrap()
    };
    assert_eq!(
        by_path(MUTATE_PATH)["objectSelector"]["matchLabels"]["chaperone.dev/intercept"],
        "true"
    );
    let namespace_hook = by_path(MUTATE_NAMESPACE_PATH);
    let selects_labeled = namespace_hook["namespaceSelector"]["matchExpressions"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| {
            e["key"] == "chaperone.dev/intercept"
                && e["operator"] == "In"
                && strings(&e["values"]) == ["true"]
        });
    assert!(selects_labeled, "{namespace_hook:?}");

    // Every write of an approval goes through the attesting webhook, which
    // fails closed and is not re-invoked after another webhook's change.
    let attest = by_path(ATTEST_PATH);
    assert_eq!(attest["failurePolicy"], "Fail");
    assert_eq!(attest["sideEffects"], "None");
    assert_eq!(attest["reinvocationPolicy"], "Never");
    assert_eq!(strings(&attest["admissionReviewVersions"]), ["v1"]);
    assert_eq!(strings(&attest["rules"][0]["apiGroups"]), ["chaperone.dev"]);
    assert_eq!(
        strings(&attest["rules"][0]["resources"]),
        ["approvalrequests", "approvalrequests/status"]
    );
    assert_eq!(
        strings(&attest["rules"][0]["operations"]),
        ["CREATE", "UPDATE"]
    );
    assert!(attest.get("namespaceSelector").is_none() && attest.get("objectSelector").is_none());
    // The signing key is mounted into the webhook only; the nodes get the
    // public key.
    let mounts_secret = |object: &Value, secret: &str| {
        object["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == secret)
    };
    for object in &objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if matches!(kind, "Deployment" | "DaemonSet") {
            assert_eq!(
                mounts_secret(object, "chaperone-attestation-key"),
                name == "chaperone-webhook",
                "{kind} {name}"
            );
        }
    }
    let daemonset = find(&objects, "DaemonSet", "chaperone-node");
    let node = &daemonset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_value(node, "CHAPERONE_APPROVAL_VERIFY_KEY").as_deref(),
        Some("/etc/chaperone/attestation/ed25519.pub")
    );

    // The Service reaches the container's port, and the serving certificate
    // comes from a Secret.
    let service = find(&objects, "Service", "chaperone-webhook");
    let deployment = find(&objects, "Deployment", "chaperone-webhook");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        container["ports"][0]["name"]
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "chaperone-webhook-tls"
    );
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
}

#[test]
fn the_webhook_deployment_only_sets_flags_chaperone_webhook_has() {
    use clap::CommandFactory;
    let cli = chaperone::cli::Cli::command();
    let webhook = cli
        .get_subcommands()
        .find(|c| c.get_name() == "webhook")
        .expect("`chaperone webhook` exists");
    let known: BTreeSet<String> = webhook
        .get_arguments()
        .chain(cli.get_arguments())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for overlay in [".", "overlays/impersonate"] {
        let objects = kustomize(overlay);
        let container = &find(&objects, "Deployment", "chaperone-webhook")["spec"]["template"]["spec"]
            ["containers"][0];
        assert_eq!(strings(&container["args"]), ["webhook"]);
        for variable in container["env"].as_sequence().unwrap() {
            let name = variable["name"].as_str().unwrap();
            assert!(
                known.contains(name),
                "{overlay}: {name} is not read by `chaperone webhook` (it reads {known:?})"
            );
        }
    }
}

#[test]
fn impersonation_is_granted_only_by_the_impersonate_overlay() {
    let objects = kustomize("overlays/impersonate");
    assert!(all_verbs(&objects).contains("impersonate"));
    let binding = find(&objects, "ClusterRoleBinding", "chaperone-node-impersonate");
    assert_eq!(binding["subjects"][0]["name"], "chaperone-node");
    assert_eq!(binding["subjects"][0]["namespace"], "chaperone-system");
    for (kind, name) in [
        ("DaemonSet", "chaperone-node"),
        ("Deployment", "chaperone-webhook"),
    ] {
        let container = &find(&objects, kind, name)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            env_value(container, "CHAPERONE_CREDENTIAL_MODE").as_deref(),
            Some("impersonate"),
            "{kind}"
        );
        assert_eq!(
            env_value(container, "CHAPERONE_AUDIENCE").as_deref(),
            Some(DEFAULT_AUDIENCE),
            "{kind}"
        );
    }
    // The passthrough overlay is the default install.
    assert_eq!(kustomize("overlays/passthrough"), kustomize("."));
}

// === certificates: deploy/bootstrap-certs.sh ===

fn run_ok(command: &mut Command) -> String {
    let output = command.output().expect("run a tool the test needs");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `../..` from `from` up to `/`, then `to`: kustomize takes no absolute paths.
fn relative_to(from: &Path, to: &Path) -> PathBuf {
    let mut path = PathBuf::new();
    for _ in from.components().skip(1) {
        path.push("..");
    }
    path.join(to.strip_prefix("/").unwrap())
}

#[test]
fn bootstrap_certs_issues_a_ca_a_webhook_certificate_and_namespace_bundles() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cluster_ca = dir.path().join("cluster-ca.crt");
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-new", "-nodes", "-newkey", "ec"])
            .args([
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-days",
                "1",
                "-subj",
                "/CN=kubernetes",
                "-keyout",
                dir.path().join("cluster-ca.key").to_str().unwrap(),
                "-out",
                cluster_ca.to_str().unwrap(),
            ]),
    );
    let bootstrap = || {
        run_ok(
            Command::new("sh")
                .arg(deploy_dir().join("bootstrap-certs.sh"))
                .arg("--out")
                .arg(&out)
                .arg("--cluster-ca")
                .arg(&cluster_ca)
                .args(["agents", "ci"]),
        )
    };
    bootstrap();
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let ca = read("ca.crt");

    // The serving certificate chains to the CA, names the Service, and is
    // one `chaperone webhook` can serve.
    let verified = run_ok(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(out.join("ca.crt"))
            .arg(out.join("tls.crt")),
    );
    assert!(verified.trim_end().ends_with("OK"), "{verified}");
    let sans = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(out.join("tls.crt")),
    );
    assert!(
        sans.contains("DNS:chaperone-webhook.chaperone-system.svc,"),
        "{sans}"
    );
    chaperone::webhook::tls_config(&out.join("tls.crt"), &out.join("tls.key"))
        .expect("the webhook serves the bootstrap certificate");

    // The objects are valid, in the right namespaces, and each bundle holds
    // the cluster CA and the chaperone CA.
    let manifests = out.join("manifests.yaml");
    let output = validate(&["files", manifests.to_str().unwrap()]);
    assert!(output.status.success(), "{}", describe(&output));
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&read("manifests.yaml"))
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect();
    let placed: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{} {}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["namespace"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        placed,
        [
            "Secret chaperone-system/chaperone-ca",
            "Secret chaperone-system/chaperone-webhook-tls",
            "Secret chaperone-system/chaperone-attestation-key",
            "ConfigMap chaperone-system/chaperone-attestation-public",
            "ConfigMap agents/chaperone-ca-bundle",
            "ConfigMap ci/chaperone-ca-bundle",
        ]
    );
    // The attestation key pair: one `chaperone webhook` signs with, and its
    // public half, which the node agents load.
    let signer = chaperone::approval::attest::Signer::from_pem(&read("attestation.key"))
        .expect("the webhook loads the attestation key");
    assert_eq!(
        objects[3]["data"]["ed25519.pub"].as_str().unwrap(),
        signer.public_key_pem()
    );
    chaperone::approval::attest::Verifier::from_pem(&read("attestation.pub"))
        .expect("the nodes load the public key");
    let cluster_pem = std::fs::read_to_string(&cluster_ca).unwrap();
    for bundle in &objects[4..] {
        let text = bundle["data"]["ca.crt"].as_str().unwrap();
        assert!(text.contains(cluster_pem.trim()) && text.contains(ca.trim()));
        assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 2);
        // The gate trusts chaperone's CA alone: with the cluster CA it
        // would pass on reaching the API server itself.
        assert_eq!(
            bundle["data"][chaperone::gate::GATE_CA_FILE]
                .as_str()
                .unwrap()
                .trim(),
            ca.trim(),
            "the bundle's {} must be the chaperone CA alone",
            chaperone::gate::GATE_CA_FILE
        );
    }

    // Run again: the CA is kept, the serving certificate re-issued.
    let first_leaf = read("tls.crt");
    bootstrap();
    assert_eq!(read("ca.crt"), ca, "the CA must never be replaced");
    assert_eq!(
        chaperone::approval::attest::Signer::from_pem(&read("attestation.key"))
            .unwrap()
            .public_key_pem(),
        signer.public_key_pem(),
        "the attestation key must never be replaced"
    );
    assert_ne!(read("tls.crt"), first_leaf);

    // The caBundle patch, used in an overlay over deploy/, fills in both
    // webhooks with the CA.
    let overlay = dir.path().join("overlay");
    std::fs::create_dir(&overlay).unwrap();
    std::fs::copy(
        out.join("cabundle-patch.yaml"),
        overlay.join("cabundle-patch.yaml"),
    )
    .unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "resources: [{}]\npatches:\n  - path: cabundle-patch.yaml\n    \
             target: {{kind: MutatingWebhookConfiguration, name: chaperone}}\n",
            relative_to(&overlay, &deploy_dir()).display()
        ),
    )
    .unwrap();
    let rendered = kustomize(overlay.to_str().unwrap());
    let config = find(&rendered, "MutatingWebhookConfiguration", "chaperone");
    let expected = base64::engine::general_purpose::STANDARD.encode(read("ca.crt"));
    for webhook in config["webhooks"].as_sequence().unwrap() {
        assert_eq!(webhook["clientConfig"]["caBundle"], expected.as_str());
    }
}

#[test]
fn the_workloads_run_the_images_chaperone_entrypoint() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "multi-stage: builder and runtime");
    assert!(stages[1].contains("gcr.io/distroless/cc"), "{}", stages[1]);
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/chaperone\"]"));
    assert!(dockerfile.contains("cargo build --release --locked -p chaperone"));
    let objects = kustomize(".");
    for (kind, name, subcommand) in [
        ("DaemonSet", "chaperone-node", "node"),
        ("Deployment", "chaperone-webhook", "webhook"),
    ] {
        let container = &find(&objects, kind, name)["spec"]["template"]["spec"]["containers"][0];
        assert!(
            container["command"].is_null(),
            "{kind} keeps the entrypoint"
        );
        assert_eq!(strings(&container["args"]), [subcommand]);
    }
}

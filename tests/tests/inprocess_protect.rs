//! The protect stage without root: the built-in refusals no policy lifts.
//! Policy here allows everything and kube-sim's RBAC lets the agent do
//! anything, so each refusal below is chaperone's alone: an agent may not
//! unlabel itself or its namespace, nor touch chaperone's namespace,
//! DaemonSet, webhooks, CRDs, RBAC, approvals or policies. Each refused
//! object is in kube-sim and stays as it was; nor may it start pods that opt
//! out, directly or through a workload's pod template. Each refused (kube-sim serves no webhook
//! configurations or RBAC: those refusals are judged by what reaches it); nothing
//! reaches the API server.

use chaperone_tests::{
    e2e::NODE_NAMESPACE,
    in_process,
    inprocess::{AgentRequest, Harness, HarnessSpec, Reply},
};
use serde_json::{Value, json};

in_process!(
    an_agent_cannot_unlabel_itself_or_its_namespace,
    an_agent_cannot_start_pods_that_opt_out,
    chaperones_namespace_is_off_limits,
    chaperones_cluster_objects_are_off_limits,
    agents_may_not_write_approval_requests,
    agent_policies_need_a_rule_that_names_them,
);

fn all_bytes(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `reply` is chaperone's 403 saying `says`, recorded under its own rule,
/// and the agent's request never reached kube-sim.
fn assert_protect_refusal(h: &Harness, what: &str, reply: &Reply, says: &str, before: usize) {
    assert_eq!(reply.status, 403, "{what}: {}", reply.body);
    assert_eq!(reply.json()["kind"], "Status", "{what}: {}", reply.body);
    assert!(
        reply.message().contains(says),
        "{what}: {} does not say {says:?}",
        reply.body
    );
    let sent: Vec<String> = h.agent_requests_seen()[before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect();
    assert!(sent.is_empty(), "{what}: forwarded {sent:?}");
}

fn an_agent_cannot_unlabel_itself_or_its_namespace() {
    let h = Harness::start(HarnessSpec::default()).unwrap();
    // The agent's namespace carries the label too.
    let mut ns = h.sim.store().get("namespaces", None, "default").unwrap();
    ns["metadata"]["labels"]["chaperone.dev/intercept"] = "true".into();
    h.sim.store().update(ns).unwrap();

    // Real kubectl, the ways an agent would try.
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
            "--overwrite",
        ],
        &["label", "namespace", "default", "chaperone.dev/intercept-"],
    ];
    for args in attempts {
        let out = h.kubectl(args);
        let said = all_bytes(&out);
        assert!(!out.status.success(), "kubectl {args:?} succeeded: {said}");
        assert!(
            said.contains("Forbidden") && said.contains("chaperone.dev/intercept"),
            "kubectl {args:?}: {said}"
        );
    }
    // A whole-object replace that drops the label, and a strategic merge
    // patch that sets the annotation.
    let before = h.agent_requests_seen().len();
    let mut pod: Value = h.get("/api/v1/namespaces/default/pods/agent-0").json();
    pod["metadata"]["labels"] = json!({"app": "agent"});
    let reply = h.send(AgentRequest::put(
        "/api/v1/namespaces/default/pods/agent-0",
        &pod,
    ));
    assert_protect_refusal(
        &h,
        "a PUT without the label",
        &reply,
        "chaperone.dev/intercept",
        before + 1,
    );
    let before = h.agent_requests_seen().len();
    let reply = h.send(AgentRequest::patch(
        "/api/v1/namespaces/default/pods/agent-0",
        "application/strategic-merge-patch+json",
        &json!({"metadata": {"annotations": {"chaperone.dev/intercept": "false"}}}),
    ));
    assert_protect_refusal(
        &h,
        "an annotation patch",
        &reply,
        "chaperone.dev/intercept",
        before,
    );

    let pod = h
        .sim
        .store()
        .get("pods", Some("default"), "agent-0")
        .unwrap();
    assert_eq!(pod["metadata"]["labels"]["chaperone.dev/intercept"], "true");
    assert!(pod["metadata"]["annotations"]["chaperone.dev/intercept"].is_null());
    let ns = h.sim.store().get("namespaces", None, "default").unwrap();
    assert_eq!(ns["metadata"]["labels"]["chaperone.dev/intercept"], "true");
    assert!(ns["metadata"]["annotations"]["chaperone.dev/intercept"].is_null());

    // Other labels are the agent's business.
    let out = h.kubectl(&["label", "pod", "agent-0", "stage=review"]);
    assert!(out.status.success(), "{}", all_bytes(&out));

    let refused = h.wait_for_audit("a refused relabel", |e| {
        e["verb"] == "patch" && e["objectRef"]["resource"] == "pods"
    });
    assert_eq!(refused["responseStatus"]["code"], 403);
    assert_eq!(
        refused["annotations"]["chaperone.dev/rule"],
        "chaperone-protect"
    );
}

/// A Deployment whose pod template carries `labels` as the agent would
/// write it.
fn deployment(name: &str, labels: Value) -> Value {
    let mut selector = json!({"app": name});
    if let Some(extra) = labels.as_object() {
        for (k, v) in extra {
            selector[k] = v.clone();
        }
    }
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": selector},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})
}

/// In a labeled namespace a pod labeled `chaperone.dev/intercept: "false"`
/// is left alone by the webhook and the node agent: an agent may not make
/// one, neither directly nor through any workload whose controller would
/// (its pod template), nor a custom resource carrying the key. Ordinary
/// workload writes keep working.
fn an_agent_cannot_start_pods_that_opt_out() {
    let h = Harness::start(HarnessSpec::default()).unwrap();
    let store = h.sim.store();
    let mut ns = store.get("namespaces", None, "default").unwrap();
    ns["metadata"]["labels"]["chaperone.dev/intercept"] = "true".into();
    store.update(ns).unwrap();
    store.create(deployment("web", json!({}))).unwrap();
    let files = tempfile::tempdir().unwrap();
    let file = |name: &str, object: &Value| {
        let path = files.path().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(object).unwrap()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let off = deployment("off", json!({"chaperone.dev/intercept": "false"}));
    let off_file = file("off.json", &off);
    let mut web_off = deployment("web", json!({"chaperone.dev/intercept": "false"}));
    web_off["spec"]["selector"] = json!({"matchLabels": {"app": "web"}});
    let web_off_file = file("web-off.json", &web_off);
    let pod = file(
        "pod.json",
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "tool-", "labels": {"chaperone.dev/intercept": "false"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
    );
    let template =
        r#"{"spec":{"template":{"metadata":{"labels":{"chaperone.dev/intercept":"false"}}}}}"#;

    // Real kubectl, the ways an agent would try.
    let attempts: &[&[&str]] = &[
        &["create", "-f", &off_file],
        &["apply", "-f", &off_file],
        &["apply", "--server-side", "-f", &off_file],
        &["apply", "--dry-run=server", "-f", &off_file],
        &["replace", "-f", &web_off_file],
        &["patch", "deployment", "web", "-p", template],
        &["patch", "deployment", "web", "--type=merge", "-p", template],
        &[
            "patch",
            "deployment",
            "web",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/spec/template/metadata/labels/chaperone.dev~1intercept","value":"false"}]"#,
        ],
        &[
            "run",
            "tool",
            "--image=busybox",
            "--labels=chaperone.dev/intercept=false",
        ],
        &["create", "-f", &pod],
    ];
    for args in attempts {
        let out = h.kubectl(args);
        let said = all_bytes(&out);
        assert!(!out.status.success(), "kubectl {args:?} succeeded: {said}");
        assert!(
            said.contains("Forbidden")
                && said.contains("chaperone.dev/intercept")
                && !said.contains("cannot read")
                && said.contains("ask a cluster admin"),
            "kubectl {args:?}: {said}"
        );
    }

    // Every other kind with a pod template (kube-sim serves only the apps
    // group, so these go as the agent's HTTP requests would).
    let with_template = |api_version: &str, kind: &str| {
        let template = json!({"metadata": {"labels": {"chaperone.dev/intercept": "false"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        let mut object = json!({"apiVersion": api_version, "kind": kind,
            "metadata": {"name": "off"}, "spec": {"template": template.clone()}});
        if kind == "CronJob" {
            object["spec"] = json!({"schedule": "* * * * *",
                "jobTemplate": {"spec": {"template": template}}});
        } else if kind == "PodTemplate" {
            object = json!({"apiVersion": api_version, "kind": kind,
                "metadata": {"name": "off"}, "template": template});
        }
        object
    };
    for (collection, api_version, kind) in [
        (
            "/apis/apps/v1/namespaces/default/replicasets",
            "apps/v1",
            "ReplicaSet",
        ),
        (
            "/apis/apps/v1/namespaces/default/statefulsets",
            "apps/v1",
            "StatefulSet",
        ),
        (
            "/apis/apps/v1/namespaces/default/daemonsets",
            "apps/v1",
            "DaemonSet",
        ),
        ("/apis/batch/v1/namespaces/default/jobs", "batch/v1", "Job"),
        (
            "/apis/batch/v1beta1/namespaces/default/cronjobs",
            "batch/v1beta1",
            "CronJob",
        ),
        (
            "/api/v1/namespaces/default/replicationcontrollers",
            "v1",
            "ReplicationController",
        ),
        (
            "/api/v1/namespaces/default/podtemplates",
            "v1",
            "PodTemplate",
        ),
        (
            "/apis/argoproj.io/v1alpha1/namespaces/default/rollouts",
            "argoproj.io/v1alpha1",
            "Rollout",
        ),
    ] {
        let before = h.agent_requests_seen().len();
        let reply = h.send(AgentRequest::post(
            collection,
            &with_template(api_version, kind),
        ));
        assert_protect_refusal(&h, kind, &reply, "chaperone.dev/intercept", before);
        let before = h.agent_requests_seen().len();
        let reply = h.send(AgentRequest::post(collection, &json!({})).body(
            "application/vnd.kubernetes.protobuf",
            b"k8s\x00\x0a\x02".to_vec(),
        ));
        assert_protect_refusal(
            &h,
            &format!("{kind} in protobuf"),
            &reply,
            "send JSON or YAML",
            before,
        );
    }

    let stored = store
        .get("deployments.apps", Some("default"), "web")
        .unwrap();
    assert!(
        stored["spec"]["template"]["metadata"]["labels"]["chaperone.dev/intercept"].is_null(),
        "{stored}"
    );
    assert!(
        store
            .get("deployments.apps", Some("default"), "off")
            .is_none()
    );
    assert!(
        store
            .list("pods", Some("default"))
            .iter()
            .all(|p| p["metadata"]["labels"]["chaperone.dev/intercept"] != "false"),
        "a pod opting out was stored"
    );

    // Workloads without the key are the agent's business, and so are the
    // everyday changes to them (`kubectl create deployment` sends
    // protobuf: read, not refused for its form).
    let fine = file("fine.json", &deployment("fine", json!({"tier": "x"})));
    for args in [
        &["apply", "-f", fine.as_str()][..],
        &["create", "deployment", "made", "--image=busybox"],
        &["set", "image", "deployment/web", "c=busybox:2"],
        &["rollout", "restart", "deployment/web"],
    ] {
        let out = h.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            all_bytes(&out)
        );
    }
    assert!(
        store
            .get("deployments.apps", Some("default"), "fine")
            .is_some()
    );
    let web = store
        .get("deployments.apps", Some("default"), "web")
        .unwrap();
    assert_eq!(
        web["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox:2"
    );

    let refused = h.wait_for_audit("a refused workload", |e| {
        e["objectRef"]["resource"] == "deployments" && e["responseStatus"]["code"] == 403
    });
    assert_eq!(
        refused["annotations"]["chaperone.dev/rule"],
        "chaperone-protect"
    );
}

fn chaperones_namespace_is_off_limits() {
    let h = Harness::start(HarnessSpec::default()).unwrap();
    h.sim
        .store()
        .create(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "chaperone-ca", "namespace": NODE_NAMESPACE},
            "data": {"ca.key": "a2V5"}}))
        .unwrap();
    let out = h.kubectl(&["get", "secrets", "-n", NODE_NAMESPACE]);
    assert!(!out.status.success(), "{}", all_bytes(&out));
    assert!(
        all_bytes(&out).contains("chaperone's own"),
        "{}",
        all_bytes(&out)
    );

    for (what, request) in [
        (
            "reading its Secrets",
            AgentRequest::get(format!(
                "/api/v1/namespaces/{NODE_NAMESPACE}/secrets/chaperone-ca"
            )),
        ),
        (
            "deleting its Secrets",
            AgentRequest::delete(format!(
                "/api/v1/namespaces/{NODE_NAMESPACE}/secrets/chaperone-ca"
            )),
        ),
        (
            "creating a pod there",
            AgentRequest::post(
                format!("/api/v1/namespaces/{NODE_NAMESPACE}/pods"),
                &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                    "spec": {"containers": [{"name": "x", "image": "x"}]}}),
            ),
        ),
    ] {
        let before = h.agent_requests_seen().len();
        let reply = h.send(request);
        assert_protect_refusal(&h, what, &reply, "chaperone's own", before);
    }
    let before = h.agent_requests_seen().len();
    let reply = h.send(AgentRequest::delete(format!(
        "/api/v1/namespaces/{NODE_NAMESPACE}"
    )));
    assert_protect_refusal(
        &h,
        "deleting the namespace",
        &reply,
        "chaperone's namespace",
        before,
    );
    assert!(
        h.sim
            .store()
            .get("namespaces", None, NODE_NAMESPACE)
            .is_some()
    );
    assert!(
        h.sim
            .store()
            .get("secrets", Some(NODE_NAMESPACE), "chaperone-ca")
            .is_some()
    );
}

fn chaperones_cluster_objects_are_off_limits() {
    let h = Harness::start(HarnessSpec::default()).unwrap();
    let store = h.sim.store();
    let labels = json!({"app.kubernetes.io/name": "chaperone-node"});
    store
        .create(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "chaperone-node", "namespace": "kube-system"},
            "spec": {"selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "chaperone"}]}}}}))
        .unwrap();
    let out = h.kubectl(&["delete", "daemonset", "chaperone-node", "-n", "kube-system"]);
    assert!(!out.status.success(), "{}", all_bytes(&out));
    assert!(
        all_bytes(&out).contains("weaken the guard"),
        "{}",
        all_bytes(&out)
    );

    for (what, request) in [
        (
            "scaling the DaemonSet down",
            AgentRequest::patch(
                "/apis/apps/v1/namespaces/kube-system/daemonsets/chaperone-node",
                "application/merge-patch+json",
                &json!({"spec": {"template": {"spec": {"nodeSelector": {"none": "none"}}}}}),
            ),
        ),
        (
            "deleting the webhook",
            AgentRequest::delete(
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/chaperone-webhook",
            ),
        ),
        (
            "deleting every webhook",
            AgentRequest::delete(
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
            ),
        ),
        (
            "deleting the ApprovalRequest CRD",
            AgentRequest::delete(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/approvalrequests.chaperone.dev",
            ),
        ),
        (
            "rewriting chaperone's ClusterRole",
            AgentRequest::put(
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/chaperone-node",
                &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": "chaperone-node"}, "rules": []}),
            ),
        ),
        (
            "deleting chaperone's ClusterRoleBinding",
            AgentRequest::delete(
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/chaperone-node",
            ),
        ),
    ] {
        let before = h.agent_requests_seen().len();
        let reply = h.send(request);
        assert_protect_refusal(&h, what, &reply, "weaken the guard", before);
    }
    assert!(
        store
            .get("daemonsets.apps", Some("kube-system"), "chaperone-node")
            .is_some()
    );
    assert!(
        store
            .get(
                "customresourcedefinitions.apiextensions.k8s.io",
                None,
                "approvalrequests.chaperone.dev"
            )
            .is_some()
    );
    // Others' objects of the same kinds are the agent's RBAC's business.
    let reply = h.send(AgentRequest::post(
        "/apis/apps/v1/namespaces/kube-system/daemonsets",
        &json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent-tools"},
            "spec": {"selector": {"matchLabels": {"app": "tools"}},
                "template": {"metadata": {"labels": {"app": "tools"}},
                    "spec": {"containers": [{"name": "c", "image": "tools"}]}}}}),
    ));
    assert_eq!(reply.status, 201, "{}", reply.body);
}

/// A person decides approvals: an agent may read them (to see its own
/// request's state) but not create, change or decide one.
fn agents_may_not_write_approval_requests() {
    let h = Harness::start(HarnessSpec::default()).unwrap();
    let approval = json!({"apiVersion": "chaperone.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": "ar-forged", "namespace": NODE_NAMESPACE},
        "spec": {"requester": {"username": "x"}, "request": {"verb": "delete"}}});
    let path = format!("/apis/chaperone.dev/v1alpha1/namespaces/{NODE_NAMESPACE}/approvalrequests");
    for (what, request) in [
        (
            "creating an approval",
            AgentRequest::post(path.clone(), &approval),
        ),
        (
            "approving one",
            AgentRequest::patch(
                format!("{path}/ar-forged/status"),
                "application/merge-patch+json",
                &json!({"status": {"state": "Approved", "decidedBy": "alice"}}),
            ),
        ),
        (
            "creating one elsewhere",
            AgentRequest::post(
                "/apis/chaperone.dev/v1alpha1/namespaces/default/approvalrequests",
                &approval,
            ),
        ),
    ] {
        let before = h.agent_requests_seen().len();
        let reply = h.send(request);
        assert_protect_refusal(&h, what, &reply, "a person decides them", before);
    }
    assert!(h.approvals().is_empty());
    let reply = h.get(&path);
    assert_eq!(
        reply.status, 200,
        "reading approvals is allowed: {}",
        reply.body
    );
}

/// Writes to AgentPolicy objects pass only where a policy rule names
/// `agentpolicies` explicitly; `defaultAction: allow` does not.
fn agent_policies_need_a_rule_that_names_them() {
    let policy = |name: &str| {
        json!({"apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": name},
            "spec": {"subjects": [{"groups": ["system:serviceaccounts"]}], "defaultAction": "allow"}})
    };
    let crd: Value = serde_yaml::from_str(include_str!(
        "../../deploy/base/crds/agentpolicies.chaperone.dev.yaml"
    ))
    .unwrap();
    let path = "/apis/chaperone.dev/v1alpha1/agentpolicies";

    let h = Harness::start(HarnessSpec::default()).unwrap();
    h.sim.store().create(crd.clone()).unwrap();
    let before = h.agent_requests_seen().len();
    let reply = h.send(AgentRequest::post(path, &policy("lenient")));
    assert_protect_refusal(
        &h,
        "an AgentPolicy create",
        &reply,
        "names the resource agentpolicies",
        before,
    );

    let h = Harness::start(HarnessSpec {
        policy: r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: policy-author
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: may-write-policies
      apiGroups: [chaperone.dev]
      resources: [agentpolicies]
      action: allow
  defaultAction: allow
"#
        .into(),
        ..HarnessSpec::default()
    })
    .unwrap();
    h.sim.store().create(crd).unwrap();
    let reply = h.send(AgentRequest::post(path, &policy("lenient")));
    assert_eq!(reply.status, 201, "{}", reply.body);
}

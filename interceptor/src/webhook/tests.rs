use http::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::inject::annotation_op;
use super::review::PatchOp;
use super::*;

fn review(pod: Value) -> AdmissionReview {
    serde_json::from_value(json!({
        "apiVersion": ADMISSION_V1,
        "kind": "AdmissionReview",
        "request": {
            "uid": "u1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "agents",
            "operation": "CREATE",
            "object": pod,
        }
    }))
    .unwrap()
}

fn sa_pod(labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "a", "labels": labels},
        "spec": {
            "containers": [{"name": "c", "image": "i"}],
            "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt",
                               "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
            ]}}]
        }
    })
}

fn response(review: &AdmissionReview) -> &AdmissionResponse {
    review.response.as_ref().unwrap()
}

#[test]
fn namespace_scope_patches_unlabeled_pods_but_honours_an_opt_out() {
    let injector = Injector::default();
    let unlabeled = injector.mutate(&review(sa_pod(json!({}))), Scope::Namespace);
    assert!(response(&unlabeled).patch.is_some());
    let opted_out = injector.mutate(
        &review(sa_pod(json!({INTERCEPT_LABEL: "false"}))),
        Scope::Namespace,
    );
    assert!(response(&opted_out).allowed);
    assert!(response(&opted_out).patch.is_none());
}

#[test]
fn pod_scope_needs_the_label_set_to_true() {
    let injector = Injector::default();
    for labels in [json!({}), json!({INTERCEPT_LABEL: "yes"})] {
        let out = injector.mutate(&review(sa_pod(labels)), Scope::PodLabel);
        assert!(response(&out).allowed);
        assert!(response(&out).patch.is_none());
    }
}

#[test]
fn a_token_for_another_audience_is_left_alone_in_impersonate_mode() {
    let injector = Injector {
        mode: CredentialMode::Impersonate,
        ..Injector::default()
    };
    let mut pod = sa_pod(json!({INTERCEPT_LABEL: "true"}));
    pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"] =
        json!("vault");
    let out = injector.mutate(&review(pod), Scope::PodLabel);
    let patch = response(&out).decoded_patch().unwrap().unwrap();
    let text = patch.to_string();
    assert!(!text.contains("audience"), "{text}");
    assert!(text.contains(DEFAULT_CA_BUNDLE_CONFIGMAP), "{text}");
}

#[test]
fn reapplying_a_manifest_that_names_kube_root_ca_keeps_the_injected_bundle() {
    // `kubectl apply` of the same pod manifest again: the client's
    // three-way merge sends kube-root-ca.crt back; without the webhook's
    // patch the API server refuses the update (pod volumes are
    // immutable), as it did on the real 1.20 server.
    let injector = Injector::default();
    let mut old = sa_pod(json!({INTERCEPT_LABEL: "true"}));
    old["spec"]["volumes"][0]["projected"]["sources"][1]["configMap"]["name"] =
        json!(DEFAULT_CA_BUNDLE_CONFIGMAP);
    old["metadata"]["annotations"] = json!({INJECTED_ANNOTATION: "passthrough"});
    let mut new = sa_pod(json!({INTERCEPT_LABEL: "true", "changed": "yes"}));
    new["metadata"]["annotations"] = json!({INJECTED_ANNOTATION: "passthrough"});
    let mut r = review(new.clone());
    let request = r.request.as_mut().unwrap();
    request.operation = "UPDATE".into();
    request.old_object = Some(old.clone());
    let out = injector.mutate(&r, Scope::PodLabel);
    let patch = response(&out).decoded_patch().unwrap().unwrap();
    assert_eq!(
        patch,
        json!([{"op": "replace",
                "path": "/spec/volumes/0/projected/sources/1/configMap/name",
                "value": DEFAULT_CA_BUNDLE_CONFIGMAP}])
    );
    // A pod the webhook never injected is left as its writer sent it.
    old["metadata"]["annotations"] = json!({});
    r.request.as_mut().unwrap().old_object = Some(old);
    let out = injector.mutate(&r, Scope::PodLabel);
    assert!(response(&out).allowed && response(&out).patch.is_none());
}

#[test]
fn updates_and_subresources_are_allowed_unchanged() {
    let mut r = review(sa_pod(json!({INTERCEPT_LABEL: "true"})));
    r.request.as_mut().unwrap().operation = "UPDATE".into();
    let out = Injector::default().mutate(&r, Scope::PodLabel);
    assert!(response(&out).allowed && response(&out).patch.is_none());
}

#[test]
fn a_review_for_another_kind_is_denied_with_a_hint() {
    let mut r = review(json!({}));
    r.request.as_mut().unwrap().kind.kind = "Deployment".into();
    r.request.as_mut().unwrap().kind.group = "apps".into();
    let out = Injector::default().mutate(&r, Scope::PodLabel);
    let status = response(&out).status.clone().unwrap();
    assert!(!response(&out).allowed);
    assert_eq!(status.code, 400);
    assert!(status.message.contains("MutatingWebhookConfiguration"));
}

#[test]
fn malformed_bodies_get_http_400_with_a_status() {
    let injector = Injector::default();
    let (code, body) = review_http(&injector, b"{not json", Scope::PodLabel);
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let status: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 400);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("AdmissionReview")
    );

    let v1beta1 = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                         "request": {"uid": "x", "kind": {"version": "v1", "kind": "Pod"},
                                     "operation": "CREATE"}});
    let (code, body) = review_http(&injector, v1beta1.to_string().as_bytes(), Scope::PodLabel);
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("admissionReviewVersions"));

    let no_request = json!({"apiVersion": ADMISSION_V1, "kind": "AdmissionReview"});
    let (code, _) = review_http(
        &injector,
        no_request.to_string().as_bytes(),
        Scope::PodLabel,
    );
    assert_eq!(code, StatusCode::BAD_REQUEST);
}

#[test]
fn annotation_keys_are_escaped_as_json_pointers() {
    let pod: Pod = serde_json::from_value(json!({"metadata": {"annotations": {}}})).unwrap();
    let PatchOp::Add { path, .. } = annotation_op(&pod, "passthrough") else {
        panic!("expected add");
    };
    assert_eq!(path, "/metadata/annotations/chaperone.dev~1injected");
}

// === the gate ===

const GATE_IMAGE: &str = "registry.example/chaperone:1.2.3";

fn gating() -> Injector {
    Injector {
        gate_image: Some(GATE_IMAGE.to_owned()),
        ..Injector::default()
    }
}

/// The pod as the API server would store it after `injector`'s answer.
fn patched(injector: &Injector, pod: &Value, scope: Scope) -> Value {
    let out = injector.mutate(&review(pod.clone()), scope);
    let mut pod = pod.clone();
    if let Some(patch) = response(&out).decoded_patch() {
        let patch: json_patch::Patch = serde_json::from_value(patch.unwrap()).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    pod
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

fn gate_volumes(pod: &Value) -> usize {
    pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == GATE_VOLUME)
        .count()
}

#[test]
fn agent_pods_get_the_gate_first_with_chaperone_ca_alone() {
    let mut pod = sa_pod(json!({INTERCEPT_LABEL: "true"}));
    pod["spec"]["initContainers"] = json!([{"name": "setup", "image": "busybox"}]);
    let stored = patched(&gating(), &pod, Scope::PodLabel);
    assert_eq!(init_names(&stored), ["chaperone-gate", "setup"]);
    let gate = &stored["spec"]["initContainers"][0];
    assert_eq!(gate["image"], GATE_IMAGE);
    assert_eq!(gate["args"], json!(["gate"]));
    assert_eq!(gate["securityContext"]["runAsNonRoot"], true);
    assert_eq!(gate["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        gate["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(
        gate["volumeMounts"][0],
        json!({"name": GATE_VOLUME, "mountPath": crate::gate::GATE_CA_DIR, "readOnly": true})
    );
    assert_eq!(gate_volumes(&stored), 1);
    let volume = stored["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == GATE_VOLUME)
        .unwrap();
    // chaperone's CA alone: the bundle's ca.crt also trusts the API server.
    assert_eq!(
        volume["configMap"],
        json!({"name": DEFAULT_CA_BUNDLE_CONFIGMAP,
               "items": [{"key": "chaperone-ca.crt", "path": "chaperone-ca.crt"}]})
    );
    // The user's container and init container are as written.
    assert_eq!(
        stored["spec"]["initContainers"][1],
        pod["spec"]["initContainers"][0]
    );
    assert_eq!(stored["spec"]["containers"], pod["spec"]["containers"]);
    // Also a pod that mounts no token, and one in a labeled namespace.
    let mut tokenless = pod.clone();
    tokenless["spec"]["volumes"] = Value::Null;
    tokenless["spec"].as_object_mut().unwrap().remove("volumes");
    let stored = patched(&gating(), &tokenless, Scope::Namespace);
    assert_eq!(init_names(&stored), ["chaperone-gate", "setup"]);
    assert_eq!(gate_volumes(&stored), 1);
}

#[test]
fn the_gate_is_added_once_under_reinvocation_and_a_copied_spec() {
    let pod = sa_pod(json!({INTERCEPT_LABEL: "true"}));
    let once = patched(&gating(), &pod, Scope::PodLabel);
    // Reinvocation (IfNeeded) sends the patched pod back, with the
    // defaults the API server adds to the new container.
    let mut defaulted = once.clone();
    defaulted["spec"]["initContainers"][0]["terminationMessagePath"] =
        json!("/dev/termination-log");
    let out = gating().mutate(&review(defaulted.clone()), Scope::PodLabel);
    assert!(response(&out).patch.is_none(), "{:?}", response(&out).patch);
    // An agent that creates a new pod from its own (patched) spec.
    let twice = patched(&gating(), &defaulted, Scope::Namespace);
    assert_eq!(init_names(&twice), ["chaperone-gate"]);
    assert_eq!(gate_volumes(&twice), 1);
}

#[test]
fn a_look_alike_gate_or_ca_volume_written_by_the_agent_is_replaced() {
    let mut pod = sa_pod(json!({INTERCEPT_LABEL: "true"}));
    pod["spec"]["initContainers"] = json!([
        {"name": "setup", "image": "busybox"},
        {"name": "chaperone-gate", "image": GATE_IMAGE, "args": ["gate"],
         "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": "chaperone-webhook.chaperone-system.svc"}]},
    ]);
    pod["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": GATE_VOLUME, "configMap": {"name": "my-own-ca"}}));
    let stored = patched(&gating(), &pod, Scope::PodLabel);
    assert_eq!(init_names(&stored), ["chaperone-gate", "setup"]);
    assert!(stored["spec"]["initContainers"][0].get("env").is_none());
    assert_eq!(gate_volumes(&stored), 1);
    assert_eq!(
        stored["spec"]["volumes"][1]["configMap"]["name"],
        DEFAULT_CA_BUNDLE_CONFIGMAP
    );
}

#[test]
fn pods_out_of_scope_get_no_gate() {
    for (labels, scope) in [
        (json!({}), Scope::PodLabel),
        (json!({INTERCEPT_LABEL: "false"}), Scope::Namespace),
    ] {
        let out = gating().mutate(&review(sa_pod(labels)), scope);
        assert!(response(&out).patch.is_none());
    }
}

#[test]
fn replacing_a_gated_pod_with_its_own_manifest_keeps_the_gate() {
    // `kubectl replace -f pod.yaml`: the manifest has neither the gate nor
    // its volume; init containers and volumes are immutable, so the update
    // must send them back unchanged.
    let manifest = sa_pod(json!({INTERCEPT_LABEL: "true"}));
    let stored = patched(&gating(), &manifest, Scope::PodLabel);
    let mut new = manifest.clone();
    new["metadata"]["annotations"] = stored["metadata"]["annotations"].clone();
    new["spec"]["volumes"][0] = stored["spec"]["volumes"][0].clone();
    let mut r = review(new.clone());
    let request = r.request.as_mut().unwrap();
    request.operation = "UPDATE".into();
    request.old_object = Some(stored.clone());
    let out = gating().mutate(&r, Scope::PodLabel);
    let patch: json_patch::Patch =
        serde_json::from_value(response(&out).decoded_patch().unwrap().unwrap()).unwrap();
    json_patch::patch(&mut new, &patch).unwrap();
    assert_eq!(new["spec"], stored["spec"]);
    // An update that kept them is left alone.
    r.request.as_mut().unwrap().object = Some(stored.clone());
    let out = gating().mutate(&r, Scope::PodLabel);
    assert!(response(&out).patch.is_none());
}

#[test]
fn a_gate_turned_into_a_sidecar_is_replaced() {
    // restartPolicy: Always makes an init container a sidecar: the kubelet
    // starts the pod's containers once it runs, not once it succeeds.
    let pod = sa_pod(json!({INTERCEPT_LABEL: "true"}));
    let mut copied = patched(&gating(), &pod, Scope::PodLabel);
    copied["spec"]["initContainers"][0]["restartPolicy"] = json!("Always");
    let stored = patched(&gating(), &copied, Scope::PodLabel);
    assert_eq!(init_names(&stored), ["chaperone-gate"]);
    assert!(
        stored["spec"]["initContainers"][0]
            .get("restartPolicy")
            .is_none()
    );
}

/// The attest webhook's refusals read as one sentence: a missing line
/// continuation once put 22 spaces into the middle of them.
#[test]
fn attest_refusals_are_one_sentence_each() {
    let wrong_kind = Injector::default().attest(&review(sa_pod(json!({}))));
    let message = serde_json::to_value(response(&wrong_kind)).unwrap()["status"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("only attests"), "{message}");
    assert!(!message.contains("  "), "{message:?}");
}

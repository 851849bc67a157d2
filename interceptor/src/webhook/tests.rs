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

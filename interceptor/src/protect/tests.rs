//! The protect stage's refusals, and the bodies it reads: every form a
//! write's body comes in, read as the API server reads it.

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};

use super::*;

fn protect() -> Protect {
    Protect::new(["chaperone-system".to_owned()])
}

fn request(method: &str, path: &str) -> RequestInfo {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    RequestInfo::parse(&method.parse::<Method>().unwrap(), path, Some(query))
}

fn refused(check: Check) -> String {
    match check {
        Check::Refuse(status) => {
            assert_eq!(status.code, 403);
            status.message
        }
        other => panic!("not refused: {other:?}"),
    }
}

fn body_check(method: &str, path: &str, content_type: &str, body: &str) -> Result<(), String> {
    body_check_with(method, path, content_type, body, None)
}

fn body_check_with(
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
    current: Option<&str>,
) -> Result<(), String> {
    let request = request(method, path);
    assert_eq!(
        protect().check(&request),
        Check::ReadBody,
        "{method} {path}"
    );
    protect()
        .check_body(
            &request,
            Some(content_type),
            &WholeBody::Complete(Bytes::from(body.to_owned())),
            current,
        )
        .map_err(|status| {
            assert_eq!(status.code, 403);
            status.message
        })
}

const POD: &str = "/api/v1/namespaces/default/pods/agent-0";
const NS: &str = "/api/v1/namespaces/agents";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

#[test]
fn kubectl_label_overwrite_is_refused() {
    // `kubectl label pod agent-0 chaperone.dev/intercept=false --overwrite`
    let why = body_check(
        "PATCH",
        POD,
        MERGE,
        r#"{"metadata":{"labels":{"chaperone.dev/intercept":"false"}}}"#,
    )
    .unwrap_err();
    assert!(why.contains("chaperone.dev/intercept"), "{why}");
    assert!(why.contains("pod"), "{why}");
    // `kubectl label pod agent-0 chaperone.dev/intercept-`
    body_check(
        "PATCH",
        POD,
        STRATEGIC,
        r#"{"metadata":{"labels":{"chaperone.dev/intercept":null}}}"#,
    )
    .unwrap_err();
    // The namespace, and the annotation.
    body_check(
        "PATCH",
        NS,
        STRATEGIC,
        r#"{"metadata":{"annotations":{"chaperone.dev/intercept":"false"}}}"#,
    )
    .unwrap_err();
    // Other labels and setting "true" are fine.
    body_check(
        "PATCH",
        POD,
        MERGE,
        r#"{"metadata":{"labels":{"app":"x"}}}"#,
    )
    .unwrap();
    body_check(
        "PATCH",
        NS,
        MERGE,
        r#"{"metadata":{"labels":{"chaperone.dev/intercept":"true"}}}"#,
    )
    .unwrap();
    body_check(
        "PATCH",
        POD,
        STRATEGIC,
        r#"{"spec":{"activeDeadlineSeconds":5}}"#,
    )
    .unwrap();
}

#[test]
fn merge_patches_that_reach_the_label_indirectly_are_refused() {
    for patch in [
        r#"{"metadata":{"labels":null}}"#,
        r#"{"metadata":null}"#,
        r#"[]"#,
        r#"{"metadata":{"labels":{"$patch":"replace","app":"x"}}}"#,
        r#"{"metadata":{"$patch":"replace"}}"#,
        r#"{"$patch":"replace","metadata":{}}"#,
        r#"{"metadata":{"$retainKeys":["name"]}}"#,
        // Go's JSON decoding folds case, Unicode included.
        r#"{"Metadata":{"LABELS":{"chaperone.dev/intercept":"false"}}}"#,
        "{\"metadata\":{\"label\u{17F}\":{\"chaperone.dev/intercept\":\"false\"}}}",
        r#"{"metadata":{"labels":{"chaperone.dev/intercept":false}}}"#,
    ] {
        assert!(
            body_check("PATCH", POD, STRATEGIC, patch).is_err(),
            "{patch} was let through"
        );
    }
}

#[test]
fn json_patches_that_reach_the_label_are_refused() {
    for ops in [
        json!([{"op": "replace", "path": "/metadata/labels/chaperone.dev~1intercept", "value": "false"}]),
        json!([{"op": "remove", "path": "/metadata/labels/chaperone.dev~1intercept"}]),
        json!([{"op": "replace", "path": "/metadata/labels", "value": {}}]),
        json!([{"op": "remove", "path": "/metadata/labels"}]),
        json!([{"op": "replace", "path": "/metadata", "value": {"name": "agent-0"}}]),
        json!([{"op": "replace", "path": "", "value": {}}]),
        json!([{"op": "move", "from": "/metadata/labels/chaperone.dev~1intercept", "path": "/metadata/labels/x"}]),
        json!([{"op": "copy", "from": "/metadata/labels/app", "path": "/metadata/labels/chaperone.dev~1intercept"}]),
        json!([{"op": "add", "path": "/metadata/annotations/chaperone.dev~1intercept", "value": "false"}]),
        json!([{"op": "add", "path": "/metadata/Labels", "value": {"chaperone.dev/intercept": "false"}}]),
    ] {
        assert!(
            body_check("PATCH", POD, JSON_PATCH, &ops.to_string()).is_err(),
            "{ops} was let through"
        );
    }
    for ops in [
        json!([{"op": "add", "path": "/metadata/labels/app", "value": "x"}]),
        json!([{"op": "test", "path": "/metadata/labels", "value": {}}]),
        json!([{"op": "add", "path": "/metadata/labels/chaperone.dev~1intercept", "value": "true"}]),
        json!([{"op": "replace", "path": "/spec/activeDeadlineSeconds", "value": 5}]),
    ] {
        body_check("PATCH", POD, JSON_PATCH, &ops.to_string())
            .unwrap_or_else(|why| panic!("{ops} refused: {why}"));
    }
}

#[test]
fn whole_objects_keep_the_label() {
    let pod = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "agent-0", "labels": labels}})
        .to_string()
    };
    // Create: a pod opting out of a labeled namespace would be unguarded.
    body_check(
        "POST",
        "/api/v1/namespaces/default/pods",
        "application/json",
        &pod(json!({"chaperone.dev/intercept": "false"})),
    )
    .unwrap_err();
    body_check(
        "POST",
        "/api/v1/namespaces/default/pods",
        "application/json",
        &pod(json!({"app": "x"})),
    )
    .unwrap();
    // Update: the label chaperone knows of must stay.
    body_check_with(
        "PUT",
        POD,
        "application/json",
        &pod(json!({"app": "x"})),
        Some("true"),
    )
    .unwrap_err();
    body_check_with(
        "PUT",
        POD,
        "application/json",
        &pod(json!({"chaperone.dev/intercept": "true"})),
        Some("true"),
    )
    .unwrap();
    body_check_with("PUT", POD, "application/json", &pod(json!({})), None).unwrap();
    // Server-side apply, in YAML, with a merge key hiding the label.
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: agent-0\n  labels:\n    <<: &off {\"chaperone.dev/intercept\": \"false\"}\n";
    body_check("PATCH", &format!("{POD}?fieldManager=x"), APPLY, yaml).unwrap_err();
    body_check_with(
        "PATCH",
        POD,
        APPLY,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: agent-0\n",
        Some("true"),
    )
    .unwrap_err();
    // The status subresource carries metadata too.
    body_check(
        "PUT",
        &format!("{POD}/status"),
        "application/json",
        &pod(json!({"chaperone.dev/intercept": "false"})),
    )
    .unwrap_err();
}

#[test]
fn unreadable_bodies_to_pods_and_namespaces_are_refused() {
    let request = request("PATCH", POD);
    for (content_type, body) in [
        (
            "application/vnd.kubernetes.protobuf",
            WholeBody::Complete(Bytes::from_static(b"k8s\x00\x0a")),
        ),
        (MERGE, WholeBody::Complete(Bytes::from_static(b"{not json"))),
        (MERGE, WholeBody::TooLarge { read: 0 }),
    ] {
        let status = protect()
            .check_body(&request, Some(content_type), &body, None)
            .unwrap_err();
        assert_eq!(status.code, 403, "{content_type}: {}", status.message);
    }
    // Bodies that are not pods (exec, eviction) are not read.
    for path in [
        "/api/v1/namespaces/default/pods/agent-0/exec?command=ls",
        "/api/v1/namespaces/default/pods/agent-0/eviction",
    ] {
        assert_eq!(protect().check(&request_post(path)), Check::Pass, "{path}");
    }
}

/// Every built-in kind whose controller makes pods, and the path of its
/// pod template.
const WORKLOADS: &[(&str, &str)] = &[
    ("/apis/apps/v1/namespaces/agents/deployments", "Deployment"),
    ("/apis/apps/v1/namespaces/agents/replicasets", "ReplicaSet"),
    (
        "/apis/apps/v1/namespaces/agents/statefulsets",
        "StatefulSet",
    ),
    ("/apis/apps/v1/namespaces/agents/daemonsets", "DaemonSet"),
    (
        "/apis/extensions/v1beta1/namespaces/agents/deployments",
        "Deployment",
    ),
    ("/apis/batch/v1/namespaces/agents/jobs", "Job"),
    ("/apis/batch/v1beta1/namespaces/agents/cronjobs", "CronJob"),
    ("/apis/batch/v1/namespaces/agents/cronjobs", "CronJob"),
    (
        "/api/v1/namespaces/agents/replicationcontrollers",
        "ReplicationController",
    ),
    ("/api/v1/namespaces/agents/podtemplates", "PodTemplate"),
];

/// `kind`'s object with `metadata` as its pod template's metadata.
fn workload(kind: &str, template_metadata: Value) -> Value {
    let template = json!({"metadata": template_metadata,
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    match kind {
        "PodTemplate" => json!({"kind": kind, "metadata": {"name": "w"}, "template": template}),
        "CronJob" => json!({"kind": kind, "metadata": {"name": "w"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}}),
        _ => json!({"kind": kind, "metadata": {"name": "w"}, "spec": {"template": template}}),
    }
}

/// The same nesting as a merge patch, or as a JSON pointer prefix.
fn template_prefix(kind: &str) -> &'static str {
    match kind {
        "PodTemplate" => "/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => "/spec/template",
    }
}

#[test]
fn workloads_may_not_carry_the_opt_out_in_their_pod_template() {
    for (collection, kind) in WORKLOADS {
        let object = format!("{collection}/w");
        let off = workload(
            kind,
            json!({"labels": {"chaperone.dev/intercept": "false"}}),
        );
        // Create, replace, server-side apply.
        let why =
            body_check("POST", collection, "application/json", &off.to_string()).expect_err(kind);
        assert!(
            why.contains("chaperone.dev/intercept")
                && why.contains(&format!("{kind}'s pod template"))
                && why.contains("ask a cluster admin"),
            "{why}"
        );
        body_check("PUT", &object, "application/json", &off.to_string()).expect_err(kind);
        body_check("PATCH", &object, APPLY, &off.to_string()).expect_err(kind);
        // YAML, the annotation, and a value that is not "false".
        let yaml = serde_yaml::to_string(&workload(
            kind,
            json!({"annotations": {"chaperone.dev/intercept": "no"}}),
        ))
        .unwrap();
        body_check("POST", collection, "application/yaml", &yaml).expect_err(kind);
        // Merge and strategic merge patches: set, remove, replace.
        let merge = |metadata: Value| {
            let mut patch = json!({});
            let mut at = &mut patch;
            for step in template_prefix(kind).split('/').skip(1) {
                at = &mut at[step];
            }
            *at = json!({"metadata": metadata});
            patch.to_string()
        };
        for (content_type, patch) in [
            (
                MERGE,
                merge(json!({"labels": {"chaperone.dev/intercept": "false"}})),
            ),
            (
                STRATEGIC,
                merge(json!({"labels": {"chaperone.dev/intercept": null}})),
            ),
            (STRATEGIC, merge(json!({"labels": null}))),
            (STRATEGIC, merge(json!({"labels": {"$patch": "replace"}}))),
            (MERGE, merge(Value::Null)),
        ] {
            body_check("PATCH", &object, content_type, &patch)
                .expect_err(&format!("{kind} {patch}"));
        }
        // JSON patches at the key, at an ancestor, moving it away.
        let prefix = template_prefix(kind);
        for ops in [
            json!([{"op": "add", "path": format!("{prefix}/metadata/labels/chaperone.dev~1intercept"), "value": "false"}]),
            json!([{"op": "remove", "path": format!("{prefix}/metadata/labels/chaperone.dev~1intercept")}]),
            json!([{"op": "replace", "path": format!("{prefix}/metadata/labels"), "value": {"chaperone.dev/intercept": "false"}}]),
            json!([{"op": "replace", "path": prefix, "value": {}}]),
            json!([{"op": "copy", "from": "/metadata/labels", "path": format!("{prefix}/metadata/labels")}]),
            json!([{"op": "move", "from": format!("{prefix}/metadata/annotations/chaperone.dev~1intercept"), "path": "/x"}]),
        ] {
            body_check("PATCH", &object, JSON_PATCH, &ops.to_string())
                .expect_err(&format!("{kind} {ops}"));
        }

        // What an agent does every day passes: no key, other labels,
        // "true", a JSON patch to the containers, a rollout restart.
        let fine = workload(kind, json!({"labels": {"app": "web"}}));
        body_check("POST", collection, "application/json", &fine.to_string())
            .unwrap_or_else(|why| panic!("{kind}: {why}"));
        let on = workload(kind, json!({"labels": {"chaperone.dev/intercept": "true"}}));
        body_check("PUT", &object, "application/json", &on.to_string())
            .unwrap_or_else(|why| panic!("{kind}: {why}"));
        body_check(
            "PATCH",
            &object,
            STRATEGIC,
            &merge(json!({"annotations": {"kubectl.kubernetes.io/restartedAt": "now"}})),
        )
        .unwrap_or_else(|why| panic!("{kind}: {why}"));
        body_check(
            "PATCH",
            &object,
            JSON_PATCH,
            &json!([{"op": "replace", "path": format!("{prefix}/spec/containers/0/image"), "value": "b"}])
                .to_string(),
        )
        .unwrap_or_else(|why| panic!("{kind}: {why}"));
        // The workload's own labels make no pod: not checked.
        body_check(
            "PATCH",
            &object,
            MERGE,
            r#"{"metadata":{"labels":{"chaperone.dev/intercept":"false"}}}"#,
        )
        .unwrap_or_else(|why| panic!("{kind}: {why}"));
    }
}

#[test]
fn template_checks_read_the_fields_as_the_api_server_does() {
    let deployments = "/apis/apps/v1/namespaces/agents/deployments";
    for body in [
        // Go's JSON decoding folds case, Unicode included.
        r#"{"Spec":{"TEMPLATE":{"Metadata":{"labels":{"chaperone.dev/intercept":"false"}}}}}"#,
        "{\"spec\":{\"template\":{\"metadata\":{\"label\u{17F}\":{\"chaperone.dev/intercept\":\"false\"}}}}}",
        r#"{"spec":{"template":{"metadata":{"labels":{"chaperone.dev/intercept":false}}}}}"#,
    ] {
        assert!(
            body_check("POST", deployments, "application/json", body).is_err(),
            "{body} was let through"
        );
    }
    // A merge key hiding the label in YAML.
    let yaml = "kind: Deployment\nspec:\n  template:\n    metadata:\n      labels:\n        <<: {\"chaperone.dev/intercept\": \"false\"}\n";
    body_check("POST", deployments, "application/yaml", yaml).unwrap_err();
    // kubectl's strategic merge patches order lists with
    // $setElementOrder: harmless, let through; $retainKeys is not.
    body_check(
        "PATCH",
        &format!("{deployments}/web"),
        STRATEGIC,
        r#"{"spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"c"}],"containers":[{"name":"c","image":"b"}]}}}}"#,
    )
    .unwrap();
    body_check(
        "PATCH",
        &format!("{deployments}/web"),
        STRATEGIC,
        r#"{"spec":{"template":{"$retainKeys":["spec"]}}}"#,
    )
    .unwrap_err();
}

#[test]
fn workload_bodies_chaperone_cannot_read_are_refused() {
    let job = request("POST", "/apis/batch/v1/namespaces/agents/jobs");
    assert_eq!(protect().check(&job), Check::ReadBody);
    for (content_type, body) in [
        (
            "application/vnd.kubernetes.protobuf",
            WholeBody::Complete(Bytes::from_static(b"k8s\x00\x0a")),
        ),
        (
            "application/json",
            WholeBody::Complete(Bytes::from_static(b"{not json")),
        ),
        ("application/json", WholeBody::TooLarge { read: 0 }),
    ] {
        let status = protect()
            .check_body(&job, Some(content_type), &body, None)
            .unwrap_err();
        assert_eq!(status.code, 403, "{content_type}: {}", status.message);
        assert!(
            status.message.contains("Job's pod template"),
            "{}",
            status.message
        );
    }
    // A dry run is judged like the write itself.
    body_check(
        "POST",
        "/apis/batch/v1/namespaces/agents/jobs?dryRun=All",
        "application/json",
        &workload(
            "Job",
            json!({"labels": {"chaperone.dev/intercept": "false"}}),
        )
        .to_string(),
    )
    .unwrap_err();
    // A Scale carries no template, and reads and deletes carry no body.
    for (method, path) in [
        (
            "PUT",
            "/apis/apps/v1/namespaces/agents/deployments/web/scale",
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/agents/deployments/web/scale",
        ),
        ("GET", "/apis/apps/v1/namespaces/agents/deployments/web"),
        ("DELETE", "/apis/batch/v1/namespaces/agents/jobs/j"),
        ("POST", "/api/v1/namespaces/agents/configmaps"),
        (
            "POST",
            "/apis/networking.k8s.io/v1/namespaces/agents/networkpolicies",
        ),
    ] {
        assert_eq!(
            protect().check(&request(method, path)),
            Check::Pass,
            "{method} {path}"
        );
    }
}

#[test]
fn custom_resources_may_not_carry_the_opt_out_anywhere() {
    let collection = "/apis/argoproj.io/v1alpha1/namespaces/agents/rollouts";
    let rollout = |labels: Value| {
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "r"},
            "spec": {"workload": {"podTemplate": {"metadata": {"labels": labels}}}}})
        .to_string()
    };
    let why = body_check(
        "POST",
        collection,
        "application/json",
        &rollout(json!({"chaperone.dev/intercept": "false"})),
    )
    .unwrap_err();
    assert!(
        why.contains("rollouts (argoproj.io)")
            && why.contains("spec.workload.podTemplate.metadata.labels.chaperone.dev/intercept"),
        "{why}"
    );
    body_check(
        "PATCH",
        &format!("{collection}/r"),
        APPLY,
        &rollout(json!({"chaperone.dev/intercept": "no"})),
    )
    .unwrap_err();
    body_check(
        "PATCH",
        &format!("{collection}/r"),
        MERGE,
        r#"{"spec":{"pods":[{"labels":{"chaperone.dev/intercept":null}}]}}"#,
    )
    .unwrap_err();
    for ops in [
        json!([{"op": "add", "path": "/spec/t/metadata/labels/chaperone.dev~1intercept", "value": "false"}]),
        json!([{"op": "remove", "path": "/spec/t/metadata/labels/chaperone.dev~1intercept"}]),
        json!([{"op": "add", "path": "/spec/t/metadata/labels", "value": {"chaperone.dev/intercept": "false"}}]),
        json!([{"op": "copy", "from": "/metadata/labels/chaperone.dev~1intercept", "path": "/spec/x"}]),
    ] {
        body_check(
            "PATCH",
            &format!("{collection}/r"),
            JSON_PATCH,
            &ops.to_string(),
        )
        .expect_err(&ops.to_string());
    }
    // Without the key, or with "true", custom resources are the agent's business.
    body_check(
        "POST",
        collection,
        "application/json",
        &rollout(json!({"app": "r"})),
    )
    .unwrap();
    body_check(
        "POST",
        collection,
        "application/json",
        &rollout(json!({"chaperone.dev/intercept": "true"})),
    )
    .unwrap();
    body_check(
        "PATCH",
        &format!("{collection}/r"),
        JSON_PATCH,
        &json!([{"op": "add", "path": "/spec/t/metadata/labels/chaperone.dev~1intercept", "value": "true"}]).to_string(),
    )
    .unwrap();
    // Built-in groups without templates are not read.
    assert_eq!(
        protect().check(&request(
            "POST",
            "/apis/networking.k8s.io/v1/namespaces/agents/ingresses"
        )),
        Check::Pass
    );
}

// === protobuf bodies, as kubectl's typed clients send them ===

/// A protobuf field: `number`, length-delimited `bytes`.
fn pb(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let varint = |mut v: u64, out: &mut Vec<u8>| loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    };
    varint(u64::from(number) << 3 | 2, &mut out);
    varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// `ObjectMeta` with `labels` (field 11) and a name.
fn pb_meta(labels: &[(&str, &str)]) -> Vec<u8> {
    let mut meta = pb(1, b"w");
    for (k, v) in labels {
        meta.extend(pb(11, &[pb(1, k.as_bytes()), pb(2, v.as_bytes())].concat()));
    }
    meta
}

/// The envelope around `raw` of `kind`.
fn pb_body(kind: &str, raw: &[u8]) -> WholeBody {
    let type_meta = [pb(1, b"v1"), pb(2, kind.as_bytes())].concat();
    let body = [b"k8s\0".to_vec(), pb(1, &type_meta), pb(2, raw)].concat();
    WholeBody::Complete(Bytes::from(body))
}

/// `raw` nested along `fields` (outermost first) around `inner`.
fn pb_nest(fields: &[u32], inner: Vec<u8>) -> Vec<u8> {
    fields.iter().rev().fold(inner, |acc, &n| pb(n, &acc))
}

#[test]
fn protobuf_workloads_are_read_not_refused_for_their_form() {
    let protobuf = Some("application/vnd.kubernetes.protobuf");
    for (collection, kind, path) in [
        (
            "/apis/apps/v1/namespaces/agents/deployments",
            "Deployment",
            &[2, 3][..],
        ),
        (
            "/apis/apps/v1/namespaces/agents/daemonsets",
            "DaemonSet",
            &[2, 2],
        ),
        ("/apis/batch/v1/namespaces/agents/jobs", "Job", &[2, 6]),
        (
            "/apis/batch/v1beta1/namespaces/agents/cronjobs",
            "CronJob",
            &[2, 5, 2, 6],
        ),
        (
            "/api/v1/namespaces/agents/podtemplates",
            "PodTemplate",
            &[2],
        ),
        ("/api/v1/namespaces/agents/pods", "Pod", &[]),
    ] {
        let create = request("POST", collection);
        assert_eq!(protect().check(&create), Check::ReadBody, "{kind}");
        let object = |labels: &[(&str, &str)]| {
            // The object's own metadata (field 1) says nothing; the template's does.
            let mut raw = pb(1, &pb_meta(&[("chaperone.dev/intercept", "true")]));
            raw.extend(pb_nest(path, pb(1, &pb_meta(labels))));
            if path.is_empty() {
                raw = pb(1, &pb_meta(labels));
            }
            raw
        };
        let check =
            |raw: Vec<u8>| protect().check_body(&create, protobuf, &pb_body(kind, &raw), None);
        check(object(&[("app", "w")])).unwrap_or_else(|s| panic!("{kind}: {}", s.message));
        check(object(&[("chaperone.dev/intercept", "true")]))
            .unwrap_or_else(|s| panic!("{kind}: {}", s.message));
        let status = check(object(&[
            ("app", "w"),
            ("chaperone.dev/intercept", "false"),
        ]))
        .expect_err(kind);
        assert!(
            status.message.contains("to \"false\""),
            "{}",
            status.message
        );
        // A template repeated: the API server merges both.
        let mut twice = object(&[("app", "w")]);
        twice.extend(pb_nest(
            path,
            pb(1, &pb_meta(&[("chaperone.dev/intercept", "no")])),
        ));
        if !path.is_empty() {
            check(twice).expect_err(kind);
        }
        // Another kind in the envelope is not read as this one.
        let other = protect().check_body(
            &create,
            protobuf,
            &pb_body("ConfigMap", &object(&[("app", "w")])),
            None,
        );
        assert!(other.unwrap_err().message.contains("kind ConfigMap"));
    }
    // An update that drops the label chaperone knows a pod carries.
    let update = request("PUT", POD);
    let status = protect()
        .check_body(
            &update,
            protobuf,
            &pb_body("Pod", &pb(1, &pb_meta(&[]))),
            Some("true"),
        )
        .unwrap_err();
    assert!(
        status.message.contains("leaves it out"),
        "{}",
        status.message
    );
    // Garbage is refused, saying what to send instead.
    let status = protect()
        .check_body(
            &request("POST", "/apis/apps/v1/namespaces/agents/deployments"),
            protobuf,
            &WholeBody::Complete(Bytes::from_static(b"k8s\0\x12\x05ab")),
            None,
        )
        .unwrap_err();
    assert!(
        status.message.contains("send JSON or YAML"),
        "{}",
        status.message
    );
}

#[test]
fn bodies_that_name_a_key_twice_are_refused() {
    let deployments = "/apis/apps/v1/namespaces/agents/deployments";
    for (content_type, body) in [
        // Go merges the two specs into one; a last-wins reader sees none.
        (
            "application/json",
            r#"{"spec":{"template":{"metadata":{"labels":{"chaperone.dev/intercept":"false"}}}},"spec":{"replicas":1}}"#,
        ),
        (
            "application/json",
            r#"{"spec":{"template":{"metadata":{"labels":{"chaperone.dev/intercept":"false"}}},"Template":{}}}"#,
        ),
        (
            "application/yaml",
            "spec:\n  template:\n    metadata:\n      labels:\n        chaperone.dev/intercept: \"false\"\nSpec:\n  replicas: 1\n",
        ),
    ] {
        let why = body_check("POST", deployments, content_type, body).unwrap_err();
        assert!(why.contains("twice") || why.contains("duplicate"), "{why}");
    }
    body_check(
        "PATCH",
        POD,
        MERGE,
        r#"{"metadata":{"labels":{"chaperone.dev/intercept":"false"}},"metadata":{}}"#,
    )
    .unwrap_err();
    // The same key in different objects is fine.
    body_check(
        "POST",
        deployments,
        "application/json",
        r#"{"metadata":{"name":"a"},"spec":{"template":{"metadata":{"name":"b"}}}}"#,
    )
    .unwrap();
}

fn request_post(path: &str) -> RequestInfo {
    request("POST", path)
}

#[test]
fn chaperones_namespace_is_off_limits() {
    let message = refused(protect().check(&request(
        "GET",
        "/api/v1/namespaces/chaperone-system/secrets/chaperone-ca",
    )));
    assert!(message.contains("chaperone-system"), "{message}");
    for (method, path) in [
        ("DELETE", "/api/v1/namespaces/chaperone-system"),
        ("PATCH", "/api/v1/namespaces/chaperone-system"),
        (
            "DELETE",
            "/apis/apps/v1/namespaces/chaperone-system/daemonsets/chaperone-node",
        ),
        (
            "POST",
            "/api/v1/namespaces/chaperone-system/pods/chaperone-node-x/exec?command=sh",
        ),
        ("GET", "/api/v1/namespaces/chaperone-system/pods"),
        (
            "DELETE",
            "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/approvalrequests/a",
        ),
    ] {
        refused(protect().check(&request(method, path)));
    }
    // Writing an approval gets the approval's own refusal, there too.
    let message = refused(protect().check(&request(
        "PATCH",
        "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/approvalrequests/a/status",
    )));
    assert!(
        message.contains("agents may not patch approval requests"),
        "{message}"
    );
    // Reading approvals (to follow one's own) and the namespace object is fine.
    for path in [
        "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/approvalrequests",
        "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/approvalrequests/a",
        "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/approvalrequests/a/status",
        "/api/v1/namespaces/chaperone-system",
    ] {
        assert_eq!(
            protect().check(&request("GET", path)),
            Check::Pass,
            "{path}"
        );
    }
}

#[test]
fn chaperones_cluster_objects_are_off_limits() {
    for (method, path) in [
        (
            "DELETE",
            "/apis/apps/v1/namespaces/kube-system/daemonsets/chaperone-node",
        ),
        (
            "DELETE",
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/chaperone",
        ),
        (
            "PATCH",
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/chaperone-x",
        ),
        (
            "DELETE",
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        ),
        (
            "DELETE",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/agentpolicies.chaperone.dev",
        ),
        (
            "PUT",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/approvalrequests.chaperone.dev",
        ),
        (
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/chaperone-node",
        ),
        (
            "PATCH",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/chaperone-node",
        ),
        (
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        ),
        ("DELETE", "/api/v1/namespaces"),
    ] {
        refused(protect().check(&request(method, path)));
    }
    for (method, path) in [
        (
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/agentpolicies.chaperone.dev",
        ),
        (
            "DELETE",
            "/apis/apps/v1/namespaces/dev/daemonsets/log-shipper",
        ),
        (
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/viewer",
        ),
        ("DELETE", "/api/v1/namespaces/dev"),
        ("DELETE", "/api/v1/namespaces/dev/pods/agent-0"),
    ] {
        assert_eq!(
            protect().check(&request(method, path)),
            Check::Pass,
            "{method} {path}"
        );
    }
}

#[test]
fn approvals_and_policies() {
    let message = refused(protect().check(&request(
        "PATCH",
        "/apis/chaperone.dev/v1alpha1/namespaces/dev/approvalrequests/a",
    )));
    assert!(message.contains("a person decides"), "{message}");
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let path = if method == "POST" {
            "/apis/chaperone.dev/v1alpha1/agentpolicies"
        } else {
            "/apis/chaperone.dev/v1alpha1/agentpolicies/coder"
        };
        assert_eq!(
            protect().check(&request(method, path)),
            Check::NeedsExplicitGrant,
            "{method}"
        );
    }
    assert_eq!(
        protect().check(&request(
            "GET",
            "/apis/chaperone.dev/v1alpha1/agentpolicies"
        )),
        Check::Pass
    );
}

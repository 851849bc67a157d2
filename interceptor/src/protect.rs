//! The protect stage: built-in refusals that keep an agent from lowering its
//! own guard. Evaluated for every guarded request after authentication and
//! before policy; no `AgentPolicy` can configure them away (except the one
//! documented opening: writes to `AgentPolicy` objects that a policy rule
//! names explicitly).
//!
//! Refused, whatever the policy says:
//!
//! - writes whose body sets, changes or removes the `chaperone.dev/intercept`
//!   label or annotation of a pod or namespace (create, update, JSON patch,
//!   merge patch, strategic merge patch, server-side apply), and bodies to
//!   pods and namespaces chaperone cannot read (protobuf, too large);
//! - anything in chaperone's own namespace (`chaperone-system` by default),
//!   except reading `ApprovalRequest`s, and writes to that namespace object;
//! - writes to chaperone's DaemonSets, webhook configurations, CRDs
//!   (`*.chaperone.dev`) and cluster RBAC (`chaperone*`), and collection
//!   deletes that would take them along;
//! - writes to `ApprovalRequest`s (a person decides them);
//! - writes to `AgentPolicy` objects, unless a rule grants them explicitly.
//!
//! A pod that loses its label by some other path (a person, a controller)
//! stays guarded anyway: see [`crate::pods`], which guards a pod for its
//! lifetime.

use serde_json::Value;

use crate::{kstatus::Status, proxy::body::WholeBody, request::RequestInfo};

/// The label (and annotation) that makes a pod, or every pod of a
/// namespace, an agent.
pub const INTERCEPT_KEY: &str = crate::pods::INTERCEPT_LABEL;

/// The policy rule name recorded for a protect refusal.
pub const RULE: &str = "chaperone-protect";

/// Longest pod or namespace body read to check the intercept label; the API
/// server's own limit is 3 MiB.
pub const BODY_READ_LIMIT: usize = 4 << 20;

/// chaperone's built-in refusals, configured with its own namespaces.
#[derive(Clone, Debug)]
pub struct Protect {
    own_namespaces: Vec<String>,
}

/// What the protect stage says about a request.
#[derive(Debug, PartialEq)]
pub enum Check {
    /// Nothing protected is touched.
    Pass,
    /// Refused: the 403 to answer.
    Refuse(Box<Status>),
    /// A write to a pod or namespace: read the body, then ask
    /// [`Protect::check_body`].
    ReadBody,
    /// A write to `AgentPolicy` objects: allowed only when the policy
    /// decision comes from a rule that names `agentpolicies` explicitly.
    NeedsExplicitGrant,
}

const WRITES: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];
const READS: [&str; 3] = ["get", "list", "watch"];

fn is_write(request: &RequestInfo) -> bool {
    WRITES.contains(&request.verb.as_str())
}

impl Protect {
    /// `own_namespaces`: chaperone's namespace(s), where its DaemonSet,
    /// CA and approvals live.
    pub fn new(own_namespaces: impl IntoIterator<Item = String>) -> Self {
        let mut own_namespaces: Vec<String> = own_namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
        own_namespaces.sort();
        own_namespaces.dedup();
        Protect { own_namespaces }
    }

    pub fn own_namespaces(&self) -> &[String] {
        &self.own_namespaces
    }

    fn is_own(&self, namespace: &str) -> bool {
        self.own_namespaces.iter().any(|n| n == namespace)
    }

    /// The refusals that need only the request line.
    pub fn check(&self, request: &RequestInfo) -> Check {
        if !request.is_resource_request {
            return Check::Pass;
        }
        let group = request.api_group.as_str();
        let resource = request.resource.as_str();
        let name = request.name.as_str();
        let verb = request.verb.as_str();
        let refuse = |message: String| {
            Check::Refuse(Box::new(
                Status::forbidden(format!("chaperone: {message}"))
                    .with_details(group, resource, name),
            ))
        };

        // Approvals first: wherever they are, a person decides them.
        if crate::approval::writes_approvals(request) {
            return Check::Refuse(Box::new(crate::approval::agents_may_not_decide(request)));
        }

        // chaperone's namespace: the namespace object itself, and all in it.
        if group.is_empty() && resource == "namespaces" {
            if is_write(request) && (name.is_empty() || self.is_own(name)) {
                return refuse(format!(
                    "agents may not {verb} chaperone's namespace{}: it holds the guard itself",
                    if name.is_empty() { "s" } else { "" }
                ));
            }
        } else if self.is_own(&request.namespace) {
            let reads_approvals =
                group == "chaperone.dev" && resource == "approvalrequests" && READS.contains(&verb);
            if !reads_approvals {
                return refuse(format!(
                    "agents may not {verb} {} in namespace {}: it is chaperone's own (agents may only read ApprovalRequests there)",
                    request.resource_path(),
                    request.namespace
                ));
            }
        }

        if is_write(request) {
            let everything = verb == "deletecollection";
            let chaperones = match (group, resource) {
                ("apps", "daemonsets") => name.starts_with("chaperone"),
                (
                    "admissionregistration.k8s.io",
                    "mutatingwebhookconfigurations" | "validatingwebhookconfigurations",
                ) => everything || name.starts_with("chaperone"),
                ("apiextensions.k8s.io", "customresourcedefinitions") => {
                    everything || name.ends_with(".chaperone.dev")
                }
                ("rbac.authorization.k8s.io", "clusterroles" | "clusterrolebindings") => {
                    everything || name.starts_with("chaperone")
                }
                _ => false,
            };
            if chaperones {
                return refuse(format!(
                    "agents may not {verb} chaperone's {}{}: it would weaken the guard",
                    request.resource_path(),
                    if name.is_empty() {
                        String::new()
                    } else {
                        format!(" \"{name}\"")
                    }
                ));
            }
            if group == "chaperone.dev" && resource == "agentpolicies" {
                return Check::NeedsExplicitGrant;
            }
        }

        if matches!(verb, "create" | "update" | "patch") && group.is_empty() {
            let object = match resource {
                "pods" => !matches!(
                    request.subresource.as_str(),
                    "exec" | "attach" | "portforward" | "proxy" | "log" | "eviction" | "binding"
                ),
                "namespaces" => true,
                _ => false,
            };
            if object {
                return Check::ReadBody;
            }
        }
        Check::Pass
    }

    /// The refusal of an `AgentPolicy` write no rule grants explicitly.
    pub fn policy_write_refused(request: &RequestInfo) -> Status {
        Status::forbidden(format!(
            "chaperone: agents may not {} AgentPolicies unless a policy rule names the resource \
             agentpolicies explicitly (a wildcard does not grant it)",
            request.verb
        ))
        .with_details(&request.api_group, &request.resource, &request.name)
    }

    /// For [`Check::ReadBody`]: whether the write's body would set, change
    /// or remove the intercept label or annotation. `current_label` is the
    /// object's label value as chaperone knows it (the pod tracker's
    /// watch), `None` when unknown or absent.
    pub fn check_body(
        &self,
        request: &RequestInfo,
        content_type: Option<&str>,
        body: &WholeBody,
        current_label: Option<&str>,
    ) -> Result<(), Box<Status>> {
        let kind = if request.resource == "namespaces" {
            "namespace"
        } else {
            "pod"
        };
        let refuse = |why: String| {
            Box::new(
                Status::forbidden(format!(
                    "chaperone: agents may not change the {INTERCEPT_KEY} label or annotation of a \
                     {kind}, which decides what chaperone guards: {why}"
                ))
                .with_details("", &request.resource, &request.name),
            )
        };
        let bytes = match body {
            WholeBody::Complete(bytes) => bytes,
            WholeBody::TooLarge { .. } => {
                return Err(refuse(format!(
                    "the body is larger than {BODY_READ_LIMIT} bytes, so chaperone cannot check it"
                )));
            }
            WholeBody::Failed(why) => {
                return Err(Box::new(Status::bad_request(format!(
                    "chaperone: reading the request body failed: {why}"
                ))));
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            // Nothing to apply; the API server refuses it.
            return Ok(());
        }
        let media = content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let form = match (request.verb.as_str(), media.as_str()) {
            ("patch", "application/json-patch+json") => Form::JsonPatch,
            ("patch", "application/merge-patch+json") => Form::MergePatch,
            ("patch", "application/strategic-merge-patch+json") => Form::MergePatch,
            ("patch", "application/apply-patch+yaml" | "application/apply-patch+json") => {
                Form::Object
            }
            ("create" | "update", "application/json" | "application/yaml" | "") => Form::Object,
            _ => {
                return Err(refuse(format!(
                    "chaperone cannot read a {} body of type \"{media}\" to check it; send JSON or YAML",
                    request.verb
                )));
            }
        };
        let value = parse(bytes).map_err(|why| refuse(format!("the body is unreadable: {why}")))?;
        let result = match form {
            Form::JsonPatch => json_patch_touches(&value),
            Form::MergePatch => merge_patch_touches(&value),
            Form::Object => object_touches(&value, current_label),
        };
        result.map_err(refuse)
    }
}

enum Form {
    JsonPatch,
    /// RFC 7386 merge patch, and strategic merge patch (its directives are
    /// refused wherever they could reach the label).
    MergePatch,
    /// A whole object: create, update, server-side apply.
    Object,
}

/// JSON, or YAML (with merge keys applied, as the API server's YAML reader
/// does).
fn parse(bytes: &[u8]) -> Result<Value, String> {
    if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
        return Ok(value);
    }
    let mut yaml: serde_yaml::Value = serde_yaml::from_slice(bytes).map_err(|e| e.to_string())?;
    yaml.apply_merge().map_err(|e| e.to_string())?;
    serde_json::to_value(yaml).map_err(|e| e.to_string())
}

/// Go's `encoding/json` matches field names case-insensitively, with
/// Unicode simple folding (`ſ` is `s`, the Kelvin sign `k`): the API
/// server (before 1.23) reads `"Labels"` or `"labelſ"` as `labels`.
fn field_is(key: &str, field: &str) -> bool {
    let folded: String = key
        .chars()
        .map(|c| match c {
            '\u{17F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    folded == field
}

/// Every value of `object` whose key reads as `field`.
fn fields<'v>(
    object: &'v serde_json::Map<String, Value>,
    field: &'static str,
) -> impl Iterator<Item = &'v Value> {
    object
        .iter()
        .filter(move |(k, _)| field_is(k, field))
        .map(|(_, v)| v)
}

const MAPS: [&str; 2] = ["labels", "annotations"];

/// A merge or strategic merge patch: only setting the key to `"true"` is
/// allowed; removing it (`null`), replacing the whole object, metadata or
/// map, and directives (`$patch`, `$retainKeys`, ...) that could reach it
/// are refused.
fn merge_patch_touches(patch: &Value) -> Result<(), String> {
    let Some(root) = patch.as_object() else {
        return Err("the patch replaces the whole object".into());
    };
    if let Some(directive) = root.keys().find(|k| k.starts_with('$')) {
        return Err(format!("the patch has the directive {directive}"));
    }
    for metadata in fields(root, "metadata") {
        let Some(metadata) = metadata.as_object() else {
            return Err("the patch replaces metadata".into());
        };
        if let Some(directive) = metadata.keys().find(|k| k.starts_with('$')) {
            return Err(format!(
                "the patch has the directive {directive} in metadata"
            ));
        }
        for map in MAPS {
            for value in fields(metadata, map) {
                let Some(entries) = value.as_object() else {
                    return Err(format!("the patch replaces metadata.{map}"));
                };
                if let Some(directive) = entries.keys().find(|k| k.starts_with('$')) {
                    return Err(format!(
                        "the patch has the directive {directive} in metadata.{map}"
                    ));
                }
                if let Some(set) = entries.get(INTERCEPT_KEY)
                    && set != "true"
                {
                    return Err(format!(
                        "the patch sets metadata.{map}[{INTERCEPT_KEY}] to {set}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A JSON patch (RFC 6902): no operation may write at or above
/// `/metadata/labels/chaperone.dev~1intercept` (or the annotation), nor
/// move it away.
fn json_patch_touches(patch: &Value) -> Result<(), String> {
    let Some(ops) = patch.as_array() else {
        return Err("a JSON patch is a list of operations".into());
    };
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        if kind == "test" {
            continue;
        }
        let mut pointers = vec![op.get("path")];
        if kind == "move" {
            pointers.push(op.get("from"));
        }
        for pointer in pointers {
            let Some(pointer) = pointer.and_then(Value::as_str) else {
                return Err(format!("operation {op} has no path"));
            };
            if reaches_key(pointer) {
                // Adding "true" exactly at the key itself is the one harmless write.
                let sets_true = matches!(kind, "add" | "replace")
                    && op.get("value").is_some_and(|v| v == "true")
                    && tokens(pointer).len() == 3;
                if !sets_true {
                    return Err(format!("the operation {kind} {pointer} reaches it"));
                }
            }
        }
    }
    Ok(())
}

/// The JSON pointer's reference tokens, unescaped.
fn tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Whether a pointer is the intercept key or one of its ancestors.
fn reaches_key(pointer: &str) -> bool {
    let tokens = tokens(pointer);
    match tokens.as_slice() {
        [] => true,
        [metadata] => field_is(metadata, "metadata"),
        [metadata, map] => field_is(metadata, "metadata") && MAPS.iter().any(|m| field_is(map, m)),
        [metadata, map, key, ..] => {
            field_is(metadata, "metadata")
                && MAPS.iter().any(|m| field_is(map, m))
                && key == INTERCEPT_KEY
        }
    }
}

/// A whole object (create, update, apply): the key, where present, must say
/// `"true"`; a label chaperone knows the object carries must be kept.
fn object_touches(object: &Value, current_label: Option<&str>) -> Result<(), String> {
    let Some(root) = object.as_object() else {
        return Err("the body is not an object".into());
    };
    let mut label = None;
    for metadata in fields(root, "metadata") {
        let Some(metadata) = metadata.as_object() else {
            continue;
        };
        for map in MAPS {
            for entries in fields(metadata, map) {
                let Some(set) = entries.as_object().and_then(|e| e.get(INTERCEPT_KEY)) else {
                    continue;
                };
                if set != "true" {
                    return Err(format!(
                        "the body sets metadata.{map}[{INTERCEPT_KEY}] to {set}"
                    ));
                }
                if map == "labels" {
                    label = Some(set);
                }
            }
        }
    }
    if let Some(current) = current_label
        && label.is_none()
    {
        return Err(format!(
            "the object carries the label \"{current}\" and the body leaves it out (which removes it)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::Method;
    use serde_json::json;

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
}

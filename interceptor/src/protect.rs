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
//! - the same in the pod template of a built-in workload (Deployment,
//!   ReplicaSet, StatefulSet, DaemonSet, Job, CronJob, ReplicationController,
//!   PodTemplate; any version), whose controller would make pods with it: a
//!   Job whose template says `"false"` in a labeled namespace would start
//!   pods the node agent leaves alone. The workload's own labels do not
//!   decide anything and are not checked; removing `"true"` by replacing
//!   the whole workload is not seen (it changes nothing in a labeled
//!   namespace, and in any other an agent that may create pods there can
//!   create unguarded ones anyway);
//! - in a custom resource (an API group with a dot, not `*.k8s.io`), whose
//!   controller may make pods from any field: the key with any value but
//!   `"true"` anywhere in the body. A controller that builds pod labels from
//!   something else (a list of `key=value` strings, a template in a string)
//!   is beyond what chaperone can read: keep such kinds from agents by RBAC
//!   or policy;
//! - bodies of those writes that name one key twice in an object (also as
//!   Go folds field names' case): Go's decoder merges both, a last-wins
//!   reader would judge another object;
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

/// Longest body read to check the intercept label; the API server's own
/// limit is 3 MiB.
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
    /// A write to a pod, namespace, workload with a pod template or custom
    /// resource: read the body, then ask [`Protect::check_body`].
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

        if matches!(verb, "create" | "update" | "patch") && holder(request).is_some() {
            return Check::ReadBody;
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

    /// Whether [`Protect::check_body`] compares the write with the
    /// object's current intercept label (pods and namespaces, whose label
    /// the pod tracker knows).
    pub fn reads_current_label(request: &RequestInfo) -> bool {
        matches!(holder(request), Some(Holder::Object(_)))
    }

    /// For [`Check::ReadBody`]: whether the write's body would set, change
    /// or remove the intercept label or annotation of a pod or namespace,
    /// of a workload's pod template, or anywhere in a custom resource.
    /// `current_label` is a pod's or namespace's label value as chaperone
    /// knows it (the pod tracker's watch), `None` when unknown or absent.
    pub fn check_body(
        &self,
        request: &RequestInfo,
        content_type: Option<&str>,
        body: &WholeBody,
        current_label: Option<&str>,
    ) -> Result<(), Box<Status>> {
        let Some(holder) = holder(request) else {
            return Ok(());
        };
        let refuse = |why: String| {
            Box::new(
                Status::forbidden(holder.refusal(request, &why)).with_details(
                    &request.api_group,
                    &request.resource,
                    &request.name,
                ),
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
            ("create" | "update", proto::MEDIA_TYPE) if holder.fields().is_some() => {
                // kubectl's typed clients (`kubectl create deployment`,
                // `kubectl create job`) send protobuf.
                return proto::object_touches(bytes, holder, current_label).map_err(refuse);
            }
            _ => {
                return Err(refuse(format!(
                    "chaperone cannot read a {} body of type \"{media}\" to check it; send JSON or YAML",
                    request.verb
                )));
            }
        };
        let value = parse(bytes).map_err(|why| refuse(format!("the body is unreadable: {why}")))?;
        let result = match (holder, form) {
            (Holder::Custom, Form::JsonPatch) => json_patch_names_key(&value),
            (Holder::Custom, Form::MergePatch | Form::Object) => key_anywhere(&value, ""),
            (_, Form::JsonPatch) => json_patch_touches(&value, holder.path()),
            (_, Form::MergePatch) => merge_patch_touches(&value, holder.path()),
            (_, Form::Object) => object_touches(&value, holder.path(), current_label),
        };
        result.map_err(refuse)
    }
}

/// Where a write's body holds the label and annotation that decide what
/// chaperone guards.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Holder {
    /// The object's own metadata: `pod` or `namespace`.
    Object(&'static str),
    /// A workload's pod template at `path` (`spec.template`): its
    /// controller makes pods with the template's labels.
    Template {
        kind: &'static str,
        path: &'static [&'static str],
        /// The same path as protobuf field numbers, to the template's
        /// `ObjectMeta`.
        fields: &'static [u32],
    },
    /// A custom resource: chaperone knows neither whether nor where it
    /// holds a pod template, so the key anywhere in the body counts.
    Custom,
}

const SPEC_TEMPLATE: &[&str] = &["spec", "template"];

/// A workload kind with a pod template: group, resource, kind, the
/// template's JSON path, and its protobuf field numbers from the object to
/// the template's `ObjectMeta` (`k8s.io/api`'s `generated.proto`: `spec`
/// is 2 in every object, the template's `metadata` 1).
type TemplateKind = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [u32],
);

/// The built-in kinds whose controllers make pods from a template, by API
/// group and resource (every version: `batch/v1beta1` CronJobs on 1.20,
/// the `extensions` group's old workloads).
const TEMPLATES: &[TemplateKind] = &[
    // ReplicationControllerSpec.template = 3
    (
        "",
        "replicationcontrollers",
        "ReplicationController",
        SPEC_TEMPLATE,
        &[2, 3, 1],
    ),
    // PodTemplate.template = 2
    ("", "podtemplates", "PodTemplate", &["template"], &[2, 1]),
    // DeploymentSpec, ReplicaSetSpec, StatefulSetSpec: template = 3
    (
        "apps",
        "deployments",
        "Deployment",
        SPEC_TEMPLATE,
        &[2, 3, 1],
    ),
    (
        "apps",
        "replicasets",
        "ReplicaSet",
        SPEC_TEMPLATE,
        &[2, 3, 1],
    ),
    (
        "apps",
        "statefulsets",
        "StatefulSet",
        SPEC_TEMPLATE,
        &[2, 3, 1],
    ),
    // DaemonSetSpec.template = 2
    ("apps", "daemonsets", "DaemonSet", SPEC_TEMPLATE, &[2, 2, 1]),
    (
        "extensions",
        "deployments",
        "Deployment",
        SPEC_TEMPLATE,
        &[2, 3, 1],
    ),
    (
        "extensions",
        "replicasets",
        "ReplicaSet",
        SPEC_TEMPLATE,
        &[2, 3, 1],
    ),
    (
        "extensions",
        "daemonsets",
        "DaemonSet",
        SPEC_TEMPLATE,
        &[2, 2, 1],
    ),
    // JobSpec.template = 6
    ("batch", "jobs", "Job", SPEC_TEMPLATE, &[2, 6, 1]),
    // CronJobSpec.jobTemplate = 5, JobTemplateSpec.spec = 2
    (
        "batch",
        "cronjobs",
        "CronJob",
        &["spec", "jobTemplate", "spec", "template"],
        &[2, 5, 2, 6, 1],
    ),
];

/// What holds the intercept key in a create, update or patch of this
/// request's resource, if anything does.
fn holder(request: &RequestInfo) -> Option<Holder> {
    let group = request.api_group.as_str();
    let resource = request.resource.as_str();
    let subresource = request.subresource.as_str();
    match (group, resource) {
        ("", "pods") => {
            let object = !matches!(
                subresource,
                "exec" | "attach" | "portforward" | "proxy" | "log" | "eviction" | "binding"
            );
            return object.then_some(Holder::Object("pod"));
        }
        ("", "namespaces") => return Some(Holder::Object("namespace")),
        _ => {}
    }
    // A Scale carries no template; every other subresource (status) is
    // read like the object.
    if subresource == "scale" {
        return None;
    }
    if let Some((.., kind, path, fields)) = TEMPLATES
        .iter()
        .find(|(g, r, ..)| *g == group && *r == resource)
    {
        return Some(Holder::Template { kind, path, fields });
    }
    is_custom_group(group).then_some(Holder::Custom)
}

/// A custom resource's API group: custom groups have a dot; built-in ones
/// have none (`apps`, `batch`) or end in `.k8s.io`. chaperone's own
/// (`chaperone.dev`) are refused or granted before bodies are read.
fn is_custom_group(group: &str) -> bool {
    group.contains('.') && !group.ends_with(".k8s.io") && group != "chaperone.dev"
}

impl Holder {
    fn path(self) -> &'static [&'static str] {
        match self {
            Holder::Template { path, .. } => path,
            Holder::Object(_) | Holder::Custom => &[],
        }
    }

    /// The protobuf field numbers from the object to the `ObjectMeta` that
    /// holds the key; `None` where the API server takes no protobuf
    /// (custom resources).
    fn fields(self) -> Option<&'static [u32]> {
        match self {
            Holder::Object(_) => Some(&[1]),
            Holder::Template { fields, .. } => Some(fields),
            Holder::Custom => None,
        }
    }

    /// The kind a protobuf body must say it is (`None`: any).
    fn kind(self) -> Option<&'static str> {
        match self {
            Holder::Object("pod") => Some("Pod"),
            Holder::Object(_) => Some("Namespace"),
            Holder::Template { kind, .. } => Some(kind),
            Holder::Custom => None,
        }
    }

    /// The refusal's message: what was refused, why it matters, and what
    /// to do instead.
    fn refusal(self, request: &RequestInfo, why: &str) -> String {
        match self {
            Holder::Object(kind) => format!(
                "chaperone: agents may not change the {INTERCEPT_KEY} label or annotation of a \
                 {kind}, which decides what chaperone guards: {why}; ask a cluster admin to \
                 make this change"
            ),
            Holder::Template { kind, path, .. } => format!(
                "chaperone: agents may not set, change or remove the {INTERCEPT_KEY} label or \
                 annotation in a {kind}'s pod template ({}.metadata), which decides whether \
                 chaperone guards the pods made from it: {why}; leave the key out (the pods of a \
                 labeled namespace are guarded) or ask a cluster admin to write this {kind}",
                path.join(".")
            ),
            Holder::Custom => format!(
                "chaperone: agents may not write the {INTERCEPT_KEY} label or annotation into \
                 {} ({}), a custom resource whose controller may make pods with it: {why}; ask \
                 a cluster admin to write this object",
                request.resource, request.api_group
            ),
        }
    }
}

// === protobuf ===

/// Kubernetes' protobuf bodies (`application/vnd.kubernetes.protobuf`): the
/// `k8s\0` magic, then a `runtime.Unknown` whose `raw` is the object. Only
/// the path to the intercept key is read; a field repeated on the way is
/// merged by the API server, so every occurrence is read.
mod proto {
    use super::{Holder, INTERCEPT_KEY};

    pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
    const MAGIC: &[u8] = b"k8s\0";
    /// `ObjectMeta.labels` and `ObjectMeta.annotations`.
    const LABELS: u32 = 11;
    const ANNOTATIONS: u32 = 12;

    /// One field: its number and, for length-delimited ones, the bytes.
    struct Field<'b> {
        number: u32,
        bytes: Option<&'b [u8]>,
    }

    fn varint(input: &mut &[u8]) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = input.split_first().ok_or("a truncated varint")?;
            *input = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    /// The fields of one message, in order.
    fn fields(mut input: &[u8]) -> Result<Vec<Field<'_>>, String> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let key = varint(&mut input)?;
            let number = u32::try_from(key >> 3).map_err(|_| "a field number out of range")?;
            let take = |input: &mut &[u8], n: usize| -> Result<(), String> {
                if input.len() < n {
                    return Err("a truncated field".into());
                }
                *input = &input[n..];
                Ok(())
            };
            let bytes = match key & 7 {
                0 => {
                    varint(&mut input)?;
                    None
                }
                1 => {
                    take(&mut input, 8)?;
                    None
                }
                2 => {
                    let len = usize::try_from(varint(&mut input)?)
                        .map_err(|_| "a length out of range")?;
                    if input.len() < len {
                        return Err("a truncated field".into());
                    }
                    let (bytes, rest) = input.split_at(len);
                    input = rest;
                    Some(bytes)
                }
                5 => {
                    take(&mut input, 4)?;
                    None
                }
                wire => return Err(format!("wire type {wire}, which Kubernetes never sends")),
            };
            out.push(Field { number, bytes });
        }
        Ok(out)
    }

    /// Every length-delimited field `number` of a message.
    fn embedded(message: &[u8], number: u32) -> Result<Vec<&[u8]>, String> {
        fields(message)?
            .into_iter()
            .filter(|f| f.number == number)
            .map(|f| {
                f.bytes
                    .ok_or_else(|| format!("field {number} is not a message"))
            })
            .collect()
    }

    fn string(bytes: &[u8]) -> Result<&str, String> {
        std::str::from_utf8(bytes).map_err(|_| "a string that is not UTF-8".into())
    }

    /// The object inside the envelope, once its kind is the expected one.
    fn object<'b>(body: &'b [u8], kind: Option<&str>) -> Result<&'b [u8], String> {
        let unknown = body
            .strip_prefix(MAGIC)
            .ok_or("a protobuf body without the k8s magic")?;
        let mut raw: &[u8] = &[];
        for field in fields(unknown)? {
            match (field.number, field.bytes) {
                // typeMeta: apiVersion 1, kind 2.
                (1, Some(type_meta)) => {
                    for said in embedded(type_meta, 2)? {
                        let said = string(said)?;
                        if kind.is_some_and(|k| k != said) {
                            return Err(format!("a protobuf body of kind {said}"));
                        }
                    }
                }
                // A repeated bytes field: the last one counts.
                (2, Some(bytes)) => raw = bytes,
                // contentEncoding, contentType: only the plain form.
                (3 | 4, Some(b"")) => {}
                (3 | 4, _) => return Err("an encoded protobuf body".into()),
                _ => {}
            }
        }
        Ok(raw)
    }

    /// The `(map, value)` of each intercept key in the labels and
    /// annotations at the holder's path, in order.
    fn keys(body: &[u8], holder: Holder) -> Result<Vec<(&'static str, String)>, String> {
        let path = holder.fields().unwrap_or(&[1]);
        let mut level = vec![object(body, holder.kind())?];
        for &number in path {
            let mut next = Vec::new();
            for message in level {
                next.extend(embedded(message, number)?);
            }
            level = next;
        }
        let mut keys = Vec::new();
        for metadata in level {
            for field in fields(metadata)? {
                let map = match field.number {
                    LABELS => "labels",
                    ANNOTATIONS => "annotations",
                    _ => continue,
                };
                let entry = field.bytes.ok_or("a map entry that is not a message")?;
                let mut key = "";
                let mut value = "";
                for part in fields(entry)? {
                    match (part.number, part.bytes) {
                        (1, Some(bytes)) => key = string(bytes)?,
                        (2, Some(bytes)) => value = string(bytes)?,
                        _ => return Err("a malformed map entry".into()),
                    }
                }
                if key == INTERCEPT_KEY {
                    keys.push((map, value.to_owned()));
                }
            }
        }
        Ok(keys)
    }

    /// The protobuf form of [`super::object_touches`].
    pub fn object_touches(
        body: &[u8],
        holder: Holder,
        current_label: Option<&str>,
    ) -> Result<(), String> {
        let keys = keys(body, holder).map_err(|why| {
            format!("chaperone cannot read this protobuf body ({why}); send JSON or YAML")
        })?;
        let at = holder
            .path()
            .iter()
            .chain(["metadata"].iter())
            .copied()
            .collect::<Vec<_>>()
            .join(".");
        let mut label = None;
        for (map, value) in keys {
            if value != "true" {
                return Err(format!(
                    "the body sets {at}.{map}[{INTERCEPT_KEY}] to \"{value}\""
                ));
            }
            if map == "labels" {
                label = Some(value);
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
/// does). An object that names one key twice (also as Go folds case) is
/// refused: chaperone's reader keeps the last, Go's decoder merges both
/// into one field, so the two would read different objects.
fn parse(bytes: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<OneReading>(bytes) {
        Ok(OneReading) => {
            return serde_json::from_slice::<Value>(bytes).map_err(|e| e.to_string());
        }
        Err(e) if e.is_data() => return Err(e.to_string()),
        Err(_) => {}
    }
    let mut yaml: serde_yaml::Value = serde_yaml::from_slice(bytes).map_err(|e| e.to_string())?;
    yaml.apply_merge().map_err(|e| e.to_string())?;
    let value = serde_json::to_value(yaml).map_err(|e| e.to_string())?;
    serde_json::from_value::<OneReading>(value.clone()).map_err(|e| e.to_string())?;
    Ok(value)
}

/// A JSON document whose objects name no key twice, as Go folds field
/// names (`fold`): what deserializing it proves.
struct OneReading;

impl<'de> serde::Deserialize<'de> for OneReading {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OneReadingVisitor)
    }
}

struct OneReadingVisitor;

impl<'de> serde::de::Visitor<'de> for OneReadingVisitor {
    type Value = OneReading;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_i64<E>(self, _: i64) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_u64<E>(self, _: u64) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_f64<E>(self, _: f64) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_str<E>(self, _: &str) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_unit<E>(self) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_none<E>(self) -> Result<OneReading, E> {
        Ok(OneReading)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneReading, A::Error> {
        while seq.next_element::<OneReading>()?.is_some() {}
        Ok(OneReading)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OneReading, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(fold(&key)) {
                return Err(serde::de::Error::custom(format!(
                    "the key \"{key}\" appears twice in one object (keys differing only in \
                     case count as one, as the API server reads them)"
                )));
            }
            map.next_value::<OneReading>()?;
        }
        Ok(OneReading)
    }
}

/// Go's `encoding/json` matches field names case-insensitively, with
/// Unicode simple folding (`ſ` is `s`, the Kelvin sign `k`): the API
/// server (before 1.23) reads `"Labels"` or `"labelſ"` as `labels`.
fn field_is(key: &str, field: &str) -> bool {
    fold(key) == field.to_ascii_lowercase()
}

/// A field name as Go's decoder matches it.
fn fold(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '\u{17F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect()
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

/// The strategic merge patch directives that only order lists; every other
/// (`$patch`, `$retainKeys`, ...) can replace or drop the map below it.
fn is_harmless_directive(key: &str) -> bool {
    key.starts_with("$setElementOrder/")
}

fn directive(object: &serde_json::Map<String, Value>) -> Option<&String> {
    object
        .keys()
        .find(|k| k.starts_with('$') && !is_harmless_directive(k))
}

/// A merge or strategic merge patch: only setting the key to `"true"` is
/// allowed; removing it (`null`), replacing the whole object, the template,
/// its metadata or map, and directives (`$patch`, `$retainKeys`, ...) on the
/// way to it are refused. `path` leads from the root to the metadata that
/// holds the key (empty for a pod or namespace).
fn merge_patch_touches(patch: &Value, path: &[&'static str]) -> Result<(), String> {
    let Some(root) = patch.as_object() else {
        return Err("the patch replaces the whole object".into());
    };
    if let Some(directive) = directive(root) {
        return Err(format!("the patch has the directive {directive}"));
    }
    let mut level = vec![root];
    let mut walked: Vec<&str> = Vec::new();
    for step in path.iter().chain(["metadata"].iter()) {
        walked.push(step);
        let at = walked.join(".");
        let mut next = Vec::new();
        for object in &level {
            for value in fields(object, step) {
                let Some(value) = value.as_object() else {
                    return Err(format!("the patch replaces {at}"));
                };
                if let Some(directive) = directive(value) {
                    return Err(format!("the patch has the directive {directive} in {at}"));
                }
                next.push(value);
            }
        }
        level = next;
    }
    let at = walked.join(".");
    for metadata in level {
        for map in MAPS {
            for value in fields(metadata, map) {
                let Some(entries) = value.as_object() else {
                    return Err(format!("the patch replaces {at}.{map}"));
                };
                if let Some(directive) = directive(entries) {
                    return Err(format!(
                        "the patch has the directive {directive} in {at}.{map}"
                    ));
                }
                if let Some(set) = entries.get(INTERCEPT_KEY)
                    && set != "true"
                {
                    return Err(format!(
                        "the patch sets {at}.{map}[{INTERCEPT_KEY}] to {set}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A JSON patch (RFC 6902): no operation may write at or above
/// `<path>/metadata/labels/chaperone.dev~1intercept` (or the annotation),
/// nor move it away.
fn json_patch_touches(patch: &Value, path: &[&'static str]) -> Result<(), String> {
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
            if reaches_key(pointer, path) {
                // Adding "true" exactly at the key itself is the one harmless write.
                let sets_true = matches!(kind, "add" | "replace")
                    && op.get("value").is_some_and(|v| v == "true")
                    && tokens(pointer).len() == path.len() + 3;
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

/// Whether a pointer is the intercept key under `path`, one of its
/// ancestors, or below it.
fn reaches_key(pointer: &str, path: &[&'static str]) -> bool {
    let tokens = tokens(pointer);
    tokens.iter().enumerate().all(|(i, token)| {
        let depth = path.len();
        match i.cmp(&depth) {
            std::cmp::Ordering::Less => field_is(token, path[i]),
            std::cmp::Ordering::Equal => field_is(token, "metadata"),
            std::cmp::Ordering::Greater if i == depth + 1 => {
                MAPS.iter().any(|m| field_is(token, m))
            }
            std::cmp::Ordering::Greater if i == depth + 2 => token == INTERCEPT_KEY,
            std::cmp::Ordering::Greater => true,
        }
    })
}

/// A whole object (create, update, apply): the key under `path`, where
/// present, must say `"true"`; a label chaperone knows the object carries
/// must be kept.
fn object_touches(
    object: &Value,
    path: &[&'static str],
    current_label: Option<&str>,
) -> Result<(), String> {
    let Some(root) = object.as_object() else {
        return Err("the body is not an object".into());
    };
    let mut level = vec![root];
    for step in path.iter().chain(["metadata"].iter()) {
        level = level
            .into_iter()
            .flat_map(|object| fields(object, step))
            .filter_map(Value::as_object)
            .collect();
    }
    let at = path
        .iter()
        .chain(["metadata"].iter())
        .copied()
        .collect::<Vec<_>>()
        .join(".");
    let mut label = None;
    for metadata in level {
        for map in MAPS {
            for entries in fields(metadata, map) {
                let Some(set) = entries.as_object().and_then(|e| e.get(INTERCEPT_KEY)) else {
                    continue;
                };
                if set != "true" {
                    return Err(format!(
                        "the body sets {at}.{map}[{INTERCEPT_KEY}] to {set}"
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

/// A custom resource's body (object or merge patch): the key anywhere,
/// with any value but `"true"` (`null` removes it), is refused.
fn key_anywhere(value: &Value, at: &str) -> Result<(), String> {
    match value {
        Value::Object(object) => {
            for (key, value) in object {
                let here = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                if key == INTERCEPT_KEY && value != "true" {
                    return Err(format!("the body sets {here} to {value}"));
                }
                key_anywhere(value, &here)?;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| key_anywhere(item, &format!("{at}[{i}]"))),
        _ => Ok(()),
    }
}

/// A custom resource's JSON patch: no operation may name the key in its
/// path or source but to add `"true"`, nor carry it in its value.
fn json_patch_names_key(patch: &Value) -> Result<(), String> {
    let Some(ops) = patch.as_array() else {
        return Err("a JSON patch is a list of operations".into());
    };
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        if kind == "test" {
            continue;
        }
        for pointer in [op.get("path"), op.get("from")].into_iter().flatten() {
            let Some(pointer) = pointer.as_str() else {
                return Err(format!("operation {op} has a path that is not a string"));
            };
            let tokens = tokens(pointer);
            if let Some(i) = tokens.iter().position(|t| t == INTERCEPT_KEY) {
                let sets_true = matches!(kind, "add" | "replace")
                    && i + 1 == tokens.len()
                    && op.get("from").is_none()
                    && op.get("value").is_some_and(|v| v == "true");
                if !sets_true {
                    return Err(format!("the operation {kind} {pointer} reaches it"));
                }
            }
        }
        if let Some(value) = op.get("value") {
            key_anywhere(value, "value")?;
        }
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
            let why = body_check("POST", collection, "application/json", &off.to_string())
                .expect_err(kind);
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
                && why
                    .contains("spec.workload.podTemplate.metadata.labels.chaperone.dev/intercept"),
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
}

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
//!
//! This module decides what is protected and words the refusals; reading a
//! write's body for the intercept key is `body.rs`'s (JSON and YAML with
//! repeated keys refused, the patch forms), with `proto.rs` for protobuf
//! bodies. Neither knows of `Status` or refusals.

mod body;
mod proto;
#[cfg(test)]
mod tests;

use self::body::Holder;
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
                Status::forbidden(refusal(holder, request, &why)).with_details(
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
        body::touches(&request.verb, content_type, bytes, holder, current_label)
            .map_err(|why| refuse(why.to_string()))
    }
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

/// The refusal's message for a body that touches the key where `holder`
/// holds it: what was refused, why it matters, and what to do instead.
fn refusal(holder: Holder, request: &RequestInfo, why: &str) -> String {
    match holder {
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

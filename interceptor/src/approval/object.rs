//! The `ApprovalRequest` object (chaperone.dev/v1alpha1, namespaced): the
//! same fields in the cluster (CRD, `deploy/base/crds/`) and in the local
//! file store. The CRD's schema is written by hand; every field here must be
//! in it, or a real API server prunes it.

use std::fmt;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::identity::Caller;
use crate::request::RequestInfo;

/// Label carrying [`request_key`]: a retry finds its approval by it.
pub const REQUEST_KEY_LABEL: &str = "chaperone.dev/request-key";
/// Label carrying [`grant_key`]: grants are found by it.
pub const GRANT_KEY_LABEL: &str = "chaperone.dev/grant-key";

/// A request an agent made that a rule says a human must approve.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaperone.dev",
    version = "v1alpha1",
    kind = "ApprovalRequest",
    plural = "approvalrequests",
    singular = "approvalrequest",
    shortname = "apr",
    category = "chaperone",
    namespaced,
    status = "ApprovalStatus",
    derive = "PartialEq",
    doc = "A request an agent made that waits for a human's approval."
)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequestSpec {
    pub requester: Requester,
    pub request: HeldRequest,
    /// The AgentPolicy whose rule asked for approval.
    pub policy: String,
    /// The rule's name (or `rules[N]`).
    pub rule: String,
    /// The effect as the API server computed it with `dryRun=All`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<serde_json::Value>,
    /// RFC 3339: after this the approval can no longer be used.
    pub expires_at: String,
    /// How long the node holds the agent's request (the rule's holdTimeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_seconds: Option<u64>,
    /// The node whose agent made the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The authenticated caller, bound to its kernel-attested pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requester {
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<RequesterPod>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequesterPod {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// The Kubernetes request that is held.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldRequest {
    pub verb: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subresource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// For exec: the command the agent asked to run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A masked summary of the body of a create, update or patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_summary: Option<String>,
    /// The SHA-256 of the body (hex): the approval lets through only a
    /// request with this very body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
    /// The path, for a non-resource request.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// The HTTP method the agent sent (`DELETE`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The canonical path and the whole query, exactly as chaperone
    /// forwards them (`/apis/apps/v1/namespaces/prod-a/deployments/web?dryRun=All`):
    /// the approval lets through only a request with this very target.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
}

impl HeldRequest {
    pub fn from_info(info: &RequestInfo) -> Self {
        HeldRequest {
            verb: info.verb.clone(),
            api_group: info.api_group.clone(),
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            command: info.command.clone(),
            body_summary: None,
            body_sha256: None,
            path: if info.is_resource_request {
                String::new()
            } else {
                info.path.clone()
            },
            method: String::new(),
            target: String::new(),
        }
    }

    /// Binds the request to what is forwarded: `method` and `uri`, the
    /// canonical target (see [`crate::request::CanonicalTarget`]) with its
    /// whole query. An approval releases only a request with the same.
    pub fn bind(&mut self, method: &http::Method, uri: &http::Uri) {
        self.method = method.as_str().to_owned();
        self.target = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| uri.path().to_owned());
    }

    /// The query of the bound target (`dryRun=All`), empty without one.
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// Whether `other` is the very request this one is: same caller-facing
    /// reading, same method, target (query included), command and body.
    /// The summary is left out: it is derived from the body.
    pub fn is_same_request(&self, other: &HeldRequest) -> bool {
        self.is_same_object(other)
            && self.verb == other.verb
            && self.command == other.command
            && self.body_sha256 == other.body_sha256
            && self.method == other.method
            && self.target == other.target
    }

    /// Whether `other` is on the same object (group, resource,
    /// subresource, namespace, name), whatever its verb, query or body.
    pub fn is_same_object(&self, other: &HeldRequest) -> bool {
        self.api_group == other.api_group
            && self.resource == other.resource
            && self.subresource == other.subresource
            && self.namespace == other.namespace
            && self.name == other.name
            && self.path == other.path
    }

    /// `delete deployments.apps "web" in namespace "prod-a"`.
    pub fn describe(&self) -> String {
        let mut out = self.verb.clone();
        out.push(' ');
        if self.resource.is_empty() {
            out.push_str(&self.path);
            return out;
        }
        out.push_str(&self.resource);
        if !self.subresource.is_empty() {
            out.push('/');
            out.push_str(&self.subresource);
        }
        if !self.api_group.is_empty() {
            out.push('.');
            out.push_str(&self.api_group);
        }
        if !self.name.is_empty() {
            out.push_str(&format!(" \"{}\"", self.name));
        }
        if !self.namespace.is_empty() {
            out.push_str(&format!(" in namespace \"{}\"", self.namespace));
        }
        if !self.command.is_empty() {
            out.push_str(&format!(": {}", self.command.join(" ")));
        }
        out
    }
}

/// Where an approval stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum State {
    #[default]
    Pending,
    Approved,
    Denied,
    Expired,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a just-in-time grant covers, named by the approver.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
pub enum GrantScope {
    /// The same caller's requests on the same object (group, resource,
    /// subresource, namespace, name) that the same rule holds.
    #[value(name = "object")]
    Object,
    /// Every request of the same caller that the same rule holds.
    #[value(name = "rule")]
    Rule,
}

impl GrantScope {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantScope::Object => "Object",
            GrantScope::Rule => "Rule",
        }
    }

    /// For a person: what a grant of this scope on `approval` lets through.
    pub fn describe(self, approval: &ApprovalRequest) -> String {
        let request = &approval.spec.request;
        match self {
            GrantScope::Object => {
                let mut object = HeldRequest {
                    verb: "requests on".into(),
                    command: Vec::new(),
                    ..request.clone()
                }
                .describe();
                if request.resource.is_empty() {
                    object = format!("requests on {}", request.path);
                }
                format!(
                    "{object} that rule {}/{} holds",
                    approval.spec.policy, approval.spec.rule
                )
            }
            GrantScope::Rule => format!(
                "every request rule {}/{} holds",
                approval.spec.policy, approval.spec.rule
            ),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    #[serde(default)]
    pub state: State,
    /// The person who approved or denied (as the API server authenticated
    /// them, from a SelfSubjectReview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Their groups, for the SubjectAccessReview the nodes make.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decided_by_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A just-in-time window (`15m`) in which the same caller may repeat
    /// the same rule's requests without a new approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_expires_at: Option<String>,
    /// What the grant covers: the same object, or everything the rule
    /// holds. Absent (approvals decided before scopes existed): the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_scope: Option<GrantScope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
    /// When the approved request went through (an approval is used once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<String>,
    /// Why a node did not accept a decision (no right to approve, the
    /// requester approving itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_decision: Option<String>,
    /// chaperone's admission webhook's signature over the decision and
    /// who the API server says made it (see [`super::attest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<super::attest::Attestation>,
}

impl ApprovalRequest {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("")
    }

    pub fn state(&self) -> State {
        self.status.as_ref().map(|s| s.state).unwrap_or_default()
    }

    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        parse_time(&self.spec.expires_at)
    }

    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.state() == State::Expired || self.expires_at().is_none_or(|at| at <= now)
    }

    pub fn is_used(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.used_at.is_some())
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(String::as_str)
    }

    /// What the grant of this approval covers (the rule for grants made
    /// before scopes existed).
    pub fn grant_scope(&self) -> GrantScope {
        self.status
            .as_ref()
            .and_then(|s| s.grant_scope)
            .unwrap_or(GrantScope::Rule)
    }

    /// Whether this approval's grant covers `request` (same caller and
    /// rule are the grant key's).
    pub fn grant_covers(&self, request: &HeldRequest) -> bool {
        match self.grant_scope() {
            GrantScope::Rule => true,
            GrantScope::Object => self.spec.request.is_same_object(request),
        }
    }

    /// When the grant this approval opened ends, if it opened one that is
    /// not revoked.
    pub fn grant_until(&self) -> Option<OffsetDateTime> {
        let status = self.status.as_ref()?;
        if status.state != State::Approved || status.revoked_by.is_some() {
            return None;
        }
        parse_time(status.grant_expires_at.as_deref()?)
    }
}

/// Same caller, same request, same rule: the key a retry is found by.
pub fn request_key(caller: &Caller, request: &HeldRequest, policy: &str, rule: &str) -> String {
    let mut hash = Sha256::new();
    for part in [
        caller.username.as_str(),
        policy,
        rule,
        &request.verb,
        &request.api_group,
        &request.resource,
        &request.subresource,
        &request.namespace,
        &request.name,
        &request.path,
        &request.method,
        &request.target,
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    for arg in &request.command {
        hash.update(arg.as_bytes());
        hash.update([1]);
    }
    if let Some(body) = &request.body_sha256 {
        hash.update([2]);
        hash.update(body.as_bytes());
    }
    hex::encode(&hash.finalize()[..16])
}

/// Same caller, same rule: the key a grant applies to.
pub fn grant_key(username: &str, policy: &str, rule: &str) -> String {
    let mut hash = Sha256::new();
    for part in [username, policy, rule] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..16])
}

/// A fresh approval id: `apr-` and 8 hex digits.
pub fn new_id() -> String {
    let bytes: [u8; 4] = rand::random();
    format!("apr-{}", hex::encode(bytes))
}

pub fn format_time(at: OffsetDateTime) -> String {
    at.replace_nanosecond(0)
        .unwrap_or(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

impl Requester {
    pub fn from_caller(caller: &Caller) -> Self {
        Requester {
            username: caller.username.clone(),
            uid: caller.uid.clone(),
            groups: caller.groups.clone(),
            pod: caller.pod.as_ref().map(|pod| RequesterPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.to_string(),
            }),
        }
    }
}

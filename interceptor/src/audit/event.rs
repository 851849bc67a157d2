//! `audit.k8s.io/v1` `Event` and `EventList`, serialized exactly as the API
//! server writes them (k8s.io/apiserver/pkg/apis/audit/v1/types.go): the
//! same field names and order, `omitempty` fields left out when empty,
//! `responseStatus` as a `metav1.Status` (with its always-present empty
//! `metadata`), times as `metav1.MicroTime` (RFC 3339, microseconds, UTC).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::policy::RecordLevel;
use crate::record::{Exchange, Stage, UserInfo, micro_time};

pub const API_VERSION: &str = "audit.k8s.io/v1";

/// Annotation keys chaperone adds to every event.
pub mod annotations {
    pub const DECISION: &str = "chaperone.dev/decision";
    pub const RULE: &str = "chaperone.dev/rule";
    pub const POLICY: &str = "chaperone.dev/policy";
    pub const APPROVAL: &str = "chaperone.dev/approval";
    pub const APPROVED_BY: &str = "chaperone.dev/approved-by";
    pub const POD: &str = "chaperone.dev/pod";
    pub const NODE: &str = "chaperone.dev/node";
    pub const MASKED: &str = "chaperone.dev/masked";
    pub const DRY_RUN: &str = "chaperone.dev/dry-run";
    /// `unbound`: a service-account token that names no pod, accepted
    /// from a guarded pod because `requirePodBinding: false` opts in.
    pub const TOKEN_BINDING: &str = "chaperone.dev/token-binding";
    /// The executable of the process that opened the agent's connection
    /// (`/proc/PID/exe` when chaperone accepted it; `[comm]` when it
    /// could not be read).
    pub const EXECUTABLE: &str = "chaperone.dev/executable";
    /// That process: `kubectl pid 4242 uid 1000`.
    pub const PROCESS: &str = "chaperone.dev/process";
    /// Its parents, nearest first: `sh(4200) < agent(4100)`.
    pub const PARENTS: &str = "chaperone.dev/parents";
}

/// `authentication.k8s.io/v1` `UserInfo`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct User {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl From<&UserInfo> for User {
    fn from(u: &UserInfo) -> Self {
        Self {
            username: u.username.clone(),
            uid: u.uid.clone(),
            groups: u.groups.clone(),
            extra: u.extra.clone(),
        }
    }
}

/// `audit.k8s.io/v1` `ObjectReference`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub resource: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(rename = "apiGroup", skip_serializing_if = "String::is_empty")]
    pub api_group: String,
    #[serde(rename = "apiVersion", skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subresource: String,
}

/// The subset of `metav1.Status` the API server puts in `responseStatus`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResponseStatus {
    /// `metav1.ListMeta`: a struct, so `omitempty` never drops it.
    pub metadata: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub code: i32,
}

fn is_zero(code: &i32) -> bool {
    *code == 0
}

/// One `audit.k8s.io/v1` `Event`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub level: &'static str,
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub stage: &'static str,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub verb: String,
    pub user: User,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impersonated_user: Option<User>,
    #[serde(rename = "sourceIPs", skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_ref: Option<ObjectReference>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_status: Option<ResponseStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_object: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_object: Option<Value>,
    pub request_received_timestamp: String,
    pub stage_timestamp: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn level_name(level: RecordLevel) -> Option<&'static str> {
    match level {
        RecordLevel::None => None,
        RecordLevel::Metadata => Some("Metadata"),
        RecordLevel::Request => Some("Request"),
        RecordLevel::RequestResponse => Some("RequestResponse"),
    }
}

impl Event {
    /// The event for one exchange, or `None` when its level is `None` (not
    /// audited, as with the API server's audit policy).
    pub fn from_exchange(e: &Exchange) -> Option<Self> {
        let level = level_name(e.decision.level)?;
        let info = &e.request;
        let object_ref = info.is_resource_request.then(|| ObjectReference {
            resource: info.resource.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            uid: String::new(),
            api_group: info.api_group.clone(),
            api_version: info.api_version.clone(),
            resource_version: String::new(),
            subresource: info.subresource.clone(),
        });
        let failure = e.status.is_failure();
        let response_status = (e.status.code != 0).then(|| ResponseStatus {
            metadata: BTreeMap::new(),
            status: if failure {
                "Failure".into()
            } else {
                String::new()
            },
            message: if failure {
                e.status.message.clone().unwrap_or_default()
            } else {
                String::new()
            },
            reason: if failure {
                e.status.reason.clone().unwrap_or_default()
            } else {
                String::new()
            },
            code: i32::from(e.status.code),
        });
        // Bodies: resource requests only, at the level that keeps them.
        let (request_object, response_object) = if info.is_resource_request {
            (
                (e.decision.level >= RecordLevel::Request)
                    .then(|| e.request_body.clone())
                    .flatten(),
                (e.decision.level >= RecordLevel::RequestResponse
                    && e.stage == Stage::ResponseComplete)
                    .then(|| e.response_body.clone())
                    .flatten(),
            )
        } else {
            (None, None)
        };
        let stage_time = match e.stage {
            Stage::RequestReceived => e.received,
            Stage::ResponseStarted => e.response_started.unwrap_or(e.completed),
            Stage::ResponseComplete => e.completed,
        };
        let mut notes = BTreeMap::new();
        notes.insert(
            annotations::DECISION.to_owned(),
            e.decision.verdict().to_owned(),
        );
        notes.insert(annotations::RULE.to_owned(), e.decision.rule.to_string());
        notes.insert(
            annotations::POLICY.to_owned(),
            e.decision.policy.to_string(),
        );
        if let Some(approval) = &e.decision.approval {
            notes.insert(annotations::APPROVAL.to_owned(), approval.to_string());
        }
        if let Some(by) = &e.decision.approved_by {
            notes.insert(annotations::APPROVED_BY.to_owned(), by.to_string());
        }
        if let Some(pod) = &e.caller.pod {
            notes.insert(
                annotations::POD.to_owned(),
                format!("{}/{}", pod.namespace, pod.name),
            );
        }
        notes.insert(annotations::NODE.to_owned(), e.node.to_string());
        notes.insert(annotations::MASKED.to_owned(), e.masked_fields.to_string());
        if e.decision.dry_run {
            notes.insert(annotations::DRY_RUN.to_owned(), "true".to_owned());
        }
        if let Some(process) = &e.caller.process {
            notes.insert(
                annotations::EXECUTABLE.to_owned(),
                process.executable_or_command(),
            );
            notes.insert(annotations::PROCESS.to_owned(), process.summary());
            if !process.parents.is_empty() {
                notes.insert(annotations::PARENTS.to_owned(), process.parents_line());
            }
        }
        if e.caller.is_unbound_on_pod() {
            notes.insert(annotations::TOKEN_BINDING.to_owned(), "unbound".to_owned());
        }
        Some(Self {
            kind: "Event",
            api_version: API_VERSION,
            level,
            audit_id: e.audit_id.to_string(),
            stage: e.stage.as_str(),
            request_uri: e.request_uri.clone(),
            verb: info.verb.clone(),
            user: User::from(&UserInfo::from(&*e.caller)),
            impersonated_user: e.impersonated_user.as_ref().map(User::from),
            source_ips: e.source_ips.iter().map(ToString::to_string).collect(),
            user_agent: e.user_agent.clone().unwrap_or_default(),
            object_ref,
            response_status,
            request_object,
            response_object,
            request_received_timestamp: micro_time(e.received),
            stage_timestamp: micro_time(stage_time),
            annotations: notes,
        })
    }

    /// One JSON line, as the log backend writes it (without the newline).
    pub fn to_line(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an audit event always serializes")
    }
}

/// The body of a webhook batch: an `EventList` of already serialized events.
pub fn event_list(items: &[Vec<u8>]) -> Vec<u8> {
    let size: usize = items.iter().map(|i| i.len() + 1).sum();
    let mut body = Vec::with_capacity(size + 96);
    body.extend_from_slice(
        br#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{},"items":["#,
    );
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    body
}

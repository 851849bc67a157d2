//! What an agent is told when its held request does not go through: a 403
//! `Status` naming the approval id, how a person decides it, and what a
//! retry will do. And what lands in an approval's `preview`.

use std::time::Duration;

use serde_json::{Value, json};

use super::Outcome;
use crate::kstatus::Status;
use crate::policy::{Decision, deny::describe_target};
use crate::request::RequestInfo;

/// The `details.causes[].reason` carrying the approval id.
pub const APPROVAL_CAUSE: &str = "ChaperoneApproval";

impl Outcome {
    /// The approval the outcome is about.
    pub fn id(&self) -> Option<&str> {
        match self {
            Outcome::Approved(d) | Outcome::Denied(d) | Outcome::Granted { decided: d, .. } => {
                Some(&d.id)
            }
            Outcome::StillPending { id, .. }
            | Outcome::Expired { id }
            | Outcome::UsedElsewhere { id } => Some(id),
            Outcome::Unavailable(_) => None,
        }
    }
}

/// The refusal for an outcome that does not let the request through.
/// `approve` is the command that approves it (see
/// [`super::Approvals::approve_command`]).
pub fn refusal(
    outcome: &Outcome,
    approve: &str,
    decision: &Decision,
    request: &RequestInfo,
    hold: Duration,
) -> Status {
    let target = describe_target(request);
    let held = format!(
        "chaperone: approval required: policy \"{}\" rule \"{}\" holds {} on {target} for a person's approval",
        decision.policy, decision.rule, request.verb
    );
    let status = match outcome {
        Outcome::StillPending { id, .. } => Status::forbidden(format!(
            "{held}; nobody decided within {}s. Approval {id} is pending: a person approves it with \
             `{approve}`; retry the same request after it is approved and it will go through",
            hold.as_secs()
        )),
        Outcome::Denied(decided) => Status::forbidden(format!(
            "{held}; approval {} was denied by {}{}; do not retry it, ask a person how to proceed",
            decided.id,
            decided.by,
            decided
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        Outcome::Expired { id } => Status::forbidden(format!(
            "{held}; approval {id} expired before anyone decided; retry to ask again"
        )),
        Outcome::UsedElsewhere { id } => Status::forbidden(format!(
            "{held}; approval {id} already let an identical request through (an approval is used once); \
             retry to ask again"
        )),
        Outcome::Unavailable(why) => Status::service_unavailable(format!(
            "{held}, and the approval could not be recorded: {why}"
        )),
        // Approved and granted requests are forwarded, never refused.
        Outcome::Approved(_) | Outcome::Granted { .. } => Status::forbidden(held),
    };
    let status = status.with_details(&request.api_group, &request.resource, &request.name);
    match outcome.id() {
        Some(id) => status.with_cause(APPROVAL_CAUSE, id),
        None => status,
    }
}

/// Whether a request would change an `ApprovalRequest` (agents never may).
pub fn writes_approvals(request: &RequestInfo) -> bool {
    request.is_resource_request
        && request.api_group == "chaperone.dev"
        && request.resource == "approvalrequests"
        && !matches!(request.verb.as_str(), "get" | "list" | "watch")
}

pub fn agents_may_not_decide(request: &RequestInfo) -> Status {
    Status::forbidden(format!(
        "chaperone: agents may not {} approval requests: a person decides them with `kubectl chaperone`",
        request.verb
    ))
    .with_details(&request.api_group, &request.resource, &request.name)
}

/// Largest preview kept on an approval (bytes of JSON).
const PREVIEW_LIMIT: usize = 32 * 1024;

/// What the `dryRun=All` answer leaves on the approval: the object (masked
/// by the caller, see [`super::preview::mask_object`]) without managed
/// fields or last-applied configuration; for an error, its code, reason
/// and message.
pub fn preview_summary(mut value: Value) -> Value {
    if value["kind"] == "Status" {
        let mut status = serde_json::Map::new();
        for key in ["kind", "status", "code", "reason", "message", "details"] {
            if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                status.insert(key.into(), v.clone());
            }
        }
        return Value::Object(status);
    }
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(notes) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            notes.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    let size = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0);
    if size > PREVIEW_LIMIT {
        return json!({
            "kind": value["kind"],
            "apiVersion": value["apiVersion"],
            "metadata": {
                "name": value["metadata"]["name"],
                "namespace": value["metadata"]["namespace"],
            },
            "note": format!("the object is {size} bytes; only its name is kept"),
        });
    }
    value
}

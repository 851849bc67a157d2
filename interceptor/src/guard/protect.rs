//! Stage `protect`: the refusals no AgentPolicy can lift. Before policy,
//! chaperone's built-in refusals (`protect.rs`: an agent may not unguard
//! itself, touch chaperone or decide approvals); after policy, writes that
//! would store chaperone's masks in place of real values
//! (`mask/writeback.rs`).

use std::sync::Arc;

use http::{header, request::Parts};

use super::{NodeGuard, Pass, content_type, read_body};
use crate::{
    exec,
    kstatus::Status,
    mask::{Target, writeback},
    policy::{Action, Decision, PolicyInput, PolicySet},
    protect::{self, Check},
    proxy::body::{RequestBody, WholeBody},
    request::RequestInfo,
};

impl NodeGuard {
    /// The built-in refusals, before policy (some read the body of a write
    /// to a pod, a namespace, a workload with a pod template or a custom
    /// resource, bounded).
    pub(super) async fn protect(
        &self,
        parts: &Parts,
        body: &mut RequestBody,
        request: &RequestInfo,
        policy: &PolicySet,
        input: &PolicyInput<'_>,
    ) -> Pass {
        let protect = &self.parts.protect;
        match protect.check(request) {
            Check::Pass => Ok(()),
            Check::Refuse(status) => Err(status),
            Check::NeedsExplicitGrant => {
                if policy.grants_explicitly(input, &request.resource) {
                    Ok(())
                } else {
                    Err(Box::new(protect::Protect::policy_write_refused(request)))
                }
            }
            Check::ReadBody => {
                let whole = read_body(parts, body, protect::BODY_READ_LIMIT).await;
                let current = self.parts.pods.as_ref().and_then(|pods| {
                    if !protect::Protect::reads_current_label(request) {
                        None
                    } else if request.resource == "namespaces" {
                        pods.intercept_label("", &request.name)
                    } else {
                        pods.intercept_label(&request.namespace, &request.name)
                    }
                });
                protect.check_body(request, content_type(parts), &whole, current.as_deref())
            }
        }
    }

    /// The refusal of a create, update or patch of a masked resource type
    /// whose body carries chaperone's masks (see `mask::writeback`). Only
    /// for a request policy lets through or holds.
    pub(super) async fn refuse_masked_write(
        &self,
        parts: &Parts,
        body: &mut RequestBody,
        request: &RequestInfo,
        decision: &Decision,
    ) -> Pass {
        if (decision.refuses() && decision.enforce != Action::Approve)
            || !reads_body(parts, request)
            || !matches!(
                self.parts.masker.target(request),
                Some(Target::Secret | Target::ConfigMap | Target::Workload)
            )
        {
            return Ok(());
        }
        match read_body(parts, body, writeback::BODY_READ_LIMIT).await {
            WholeBody::Complete(bytes) => match writeback::find_markers(&bytes) {
                Some(fields) => Err(Box::new(writeback::refusal(request, &fields))),
                None => Ok(()),
            },
            WholeBody::TooLarge { .. } => Err(Box::new(Status::too_large(format!(
                "chaperone: writes of {} are checked for masked values and may be at most {} bytes",
                request.resource,
                writeback::BODY_READ_LIMIT
            )))),
            // The agent went away: forwarding fails the same way.
            WholeBody::Failed(_) => Ok(()),
        }
    }
}

/// The decision recorded for a built-in refusal: chaperone's own rule.
pub(super) fn decision(status: &Status) -> Decision {
    Decision {
        rule: Arc::from(protect::RULE),
        message: Some(Arc::from(status.message.as_str())),
        ..super::exchange::refused_before_policy()
    }
}

/// Whether a request's body is one chaperone reads to judge it (masked
/// writes) or to show it (held requests): creates, updates and patches,
/// not exec/attach streams or upgrades.
pub(super) fn reads_body(parts: &Parts, request: &RequestInfo) -> bool {
    matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    ) && request.is_resource_request
        && !exec::is_exec(request)
        && !parts.headers.contains_key(header::UPGRADE)
}

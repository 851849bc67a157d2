//! Stage `hold`: a request policy says to `approve` waits for a person
//! (an `ApprovalRequest`, `approval/`), up to its hold timeout. Approved,
//! it goes on; otherwise the agent gets the 403 naming the approval.

use std::sync::Arc;

use http::request::Parts;
use sha2::{Digest, Sha256};

use super::{
    NodeGuard, Pass, content_type, exchange::ExchangeDraft, protect::reads_body, read_body,
};
use crate::{
    approval::{self, Ask, HeldRequest, Outcome},
    identity::Caller,
    policy::{Action, Decision},
    proxy::body::{RequestBody, WholeBody},
};

impl NodeGuard {
    /// Holds the request when `decision` says `approve` (and approvals
    /// run); passes any other request on untouched.
    pub(super) async fn hold(
        &self,
        x: &mut ExchangeDraft,
        parts: &Parts,
        body: &mut RequestBody,
        caller: &Caller,
        decision: &Decision,
    ) -> Pass {
        let Some(approvals) = &self.parts.approvals else {
            return Ok(());
        };
        if decision.enforce != Action::Approve {
            return Ok(());
        }
        let hold = decision
            .hold_timeout
            .unwrap_or(crate::policy::DEFAULT_HOLD_TIMEOUT);
        // Only a held request's body is read before it is forwarded
        // (bounded): the person sees it, masked, and the approval is for
        // this very body.
        let mut held = HeldRequest::from_info(&x.request);
        held.bind(&parts.method, &parts.uri);
        // A delete's body (DeleteOptions: dryRun, propagation) changes
        // what runs: it is bound to the approval too.
        let binds_body = reads_body(parts, &x.request) || parts.method == http::Method::DELETE;
        let whole = if binds_body {
            let whole = read_body(parts, body, approval::preview::BODY_READ_LIMIT).await;
            held.body_summary = approval::preview::body_summary(
                &self.parts.masker,
                &x.request,
                content_type(parts),
                &whole,
            );
            if let WholeBody::Complete(bytes) = &whole {
                held.body_sha256 = Some(hex::encode(Sha256::digest(bytes)));
            }
            Some(whole)
        } else {
            None
        };
        let ask = Ask {
            caller,
            request: held,
            policy: &decision.policy,
            rule: &decision.rule,
        };
        let request = x.request.clone();
        let preview = async {
            match &self.preview {
                Some(client) => {
                    client
                        .preview(parts, caller, &request, whole.as_ref())
                        .await
                }
                None => None,
            }
        };
        // Set before the wait: an agent that gives up while held is
        // audited as a held request it abandoned.
        x.decision = Some(decision.clone());
        match approvals.hold(ask, hold, preview).await {
            Outcome::Approved(decided) | Outcome::Granted { decided, .. } => {
                tracing::info!(
                    audit_id = %x.audit_id,
                    approval = %decided.id,
                    by = %decided.by,
                    "approved: forwarding the held request"
                );
                x.approval = Some((Arc::from(decided.id), Arc::from(decided.by)));
                Ok(())
            }
            other => {
                if let Some(id) = other.id() {
                    x.approval = Some((Arc::from(id), Arc::from("")));
                }
                let approve = other
                    .id()
                    .map(|id| approvals.approve_command(id))
                    .unwrap_or_default();
                Err(Box::new(approval::refusal(
                    &other, &approve, decision, &x.request, hold,
                )))
            }
        }
    }
}

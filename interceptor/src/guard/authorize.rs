//! Stage `authorize`: what policy decided, enforced. A `deny` (or an
//! `approve` where no approvals run) is refused with the policy's 403,
//! which tells the agent what it may do instead.

use uuid::Uuid;

use super::Pass;
use crate::policy::{Action, Decision, PolicyInput, PolicySet, deny::refusal_status};

/// The refusal of a request `decision` refuses, unless it is to be held
/// for a person (`approve` while approvals run: see the `hold` stage).
pub(super) fn refuse_denied(
    policy: &PolicySet,
    input: &PolicyInput<'_>,
    decision: &Decision,
    approvals_run: bool,
) -> Pass {
    let held = decision.enforce == Action::Approve && approvals_run;
    if decision.refuses() && !held {
        return Err(Box::new(refusal_status(policy, input, decision)));
    }
    Ok(())
}

/// A dry-run policy refuses nothing: what it would have refused is logged
/// (and recorded with the decision).
pub(super) fn log_dry_run(audit_id: Uuid, decision: &Decision) {
    if decision.dry_run {
        tracing::info!(
            audit_id = %audit_id,
            policy = &*decision.policy,
            rule = &*decision.rule,
            would = %decision.action,
            "dry-run: would have refused"
        );
    }
}

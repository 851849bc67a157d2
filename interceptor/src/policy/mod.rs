//! Policy: `AgentPolicy` (chaperone.dev/v1alpha1) compiled into matchers and
//! evaluated per request.
//!
//! # Semantics
//!
//! - A policy **selects** a caller when any of its `subjects` entries
//!   matches (within one entry, every field that is set must match).
//! - Within a policy, rules are ordered and the **first matching rule**
//!   decides; when none matches, the policy's `defaultAction` decides, and
//!   a policy without one abstains (the CRD's schema says the same).
//! - **Several policies** may select the same caller. Each decides on its
//!   own (its first matching rule, else its default, else it abstains) and
//!   the **most restrictive** decision wins: `deny` > `approve` > `mask` >
//!   `allow`; on a tie an explicit rule beats a default, then the policy
//!   whose name sorts first. Every policy
//!   that decides must agree, so adding a policy never loosens another. A
//!   baseline that only restricts (say, no exec in production for every
//!   agent) leaves `defaultAction` out and so abstains on everything else.
//!   The record level is the highest any deciding policy asks for.
//! - A caller no policy decides for (none selects it, or all abstain) gets
//!   [`PolicySet::unmatched`] (`deny` by default: an unknown agent is
//!   refused).
//! - **Dry-run** policies enforce nothing. They are evaluated the same way,
//!   apart from the enforcing ones; when their outcome is more restrictive
//!   than the enforced one, the decision says `dry_run: true`, `action` is
//!   what the dry-run policy would have done and `enforce` what is actually
//!   done, and the record level is at least `Metadata` so it is recorded.
//!   A caller selected only by dry-run policies is allowed.
//! - `approve` never allows by itself: the evaluator returns
//!   [`Action::Approve`] and the proxy holds the request for a person's
//!   decision (see [`crate::approval`]); without an approval store it
//!   refuses with [`deny::approval_required_status`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::Caller;
use crate::request::RequestInfo;

pub mod cli;
mod compile;
pub mod deny;
mod evaluate;
mod explain;
mod glob;
pub mod resources;
pub mod schema;
mod spec;
mod store;
#[cfg(test)]
mod tests;
pub mod watch;

pub(crate) use compile::parse_duration;
pub use compile::{DurationError, PolicyError};
pub use evaluate::{DEFAULT_HOLD_TIMEOUT, PolicySet};
pub use explain::{Explanation, PolicyTrace, RuleTrace};
pub use glob::Glob;
pub use schema::InvalidName;
pub use spec::{
    AgentPolicy, AgentPolicySpec, AgentPolicyStatus, Condition, CredentialMode, DocumentError,
    LabelSelector, LabelSelectorRequirement, NamespaceSubject, PolicyDocument, Rule,
    SelectorOperator, Subject, parse_documents,
};
pub use store::{ApplyOutcome, InvalidPolicy, LoadError, PolicyStore, policy_files};

/// What a rule says to do with a matching request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Mask,
    Approve,
}

impl Action {
    /// How restrictive an action is, for combining several policies:
    /// `allow` < `mask` < `approve` < `deny`.
    pub fn restrictiveness(self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::Mask => 1,
            Action::Approve => 2,
            Action::Deny => 3,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Mask => "mask",
            Action::Approve => "approve",
        })
    }
}

/// How much of a request is recorded, with the audit policy's level names.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    schemars::JsonSchema,
)]
pub enum RecordLevel {
    None,
    #[default]
    Metadata,
    Request,
    RequestResponse,
}

impl fmt::Display for RecordLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The outcome of evaluating policy for one request. Cloning it never
/// allocates: the strings are shared with the compiled policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What the deciding rule says (for a dry-run decision: what it would
    /// have done).
    pub action: Action,
    /// What the proxy must do. Equal to `action` unless `dry_run`.
    pub enforce: Action,
    pub record: RecordLevel,
    /// The policy's name (policies are cluster-scoped), or empty for the
    /// built-in decision for callers no policy selects.
    pub policy: Arc<str>,
    /// The rule's name (or `rules[N]`), or `default`.
    pub rule: Arc<str>,
    /// The rule's message for the agent, if it set one.
    pub message: Option<Arc<str>>,
    /// The decision comes from a dry-run policy: `action` is recorded, not
    /// enforced.
    pub dry_run: bool,
    /// For `approve`: how long to hold the request for a human.
    pub hold_timeout: Option<Duration>,
}

impl Decision {
    /// `true` when the proxy must refuse the request (a `deny`, or an
    /// `approve` while approvals are not available).
    pub fn refuses(&self) -> bool {
        matches!(self.enforce, Action::Deny | Action::Approve)
    }
}

/// Everything evaluation looks at for one request.
#[derive(Clone, Copy, Debug)]
pub struct PolicyInput<'a> {
    pub request: &'a RequestInfo,
    pub caller: &'a Caller,
    /// Labels of the caller's namespace, needed when a policy selects
    /// subjects by namespace labels ([`PolicySet::uses_namespace_labels`]).
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    /// The exec command (argv); by default the request's own `command`.
    pub exec_command: Option<&'a [String]>,
}

impl<'a> PolicyInput<'a> {
    pub fn new(request: &'a RequestInfo, caller: &'a Caller) -> Self {
        PolicyInput {
            request,
            caller,
            namespace_labels: None,
            exec_command: (!request.command.is_empty()).then_some(&request.command[..]),
        }
    }

    pub fn with_namespace_labels(mut self, labels: &'a BTreeMap<String, String>) -> Self {
        self.namespace_labels = Some(labels);
        self
    }

    /// The caller's namespace: its pod's, else its service account's.
    pub fn caller_namespace(&self) -> Option<&'a str> {
        match &self.caller.pod {
            Some(pod) => Some(pod.namespace.as_str()),
            None => self.caller.service_account().map(|(ns, _)| ns),
        }
    }
}

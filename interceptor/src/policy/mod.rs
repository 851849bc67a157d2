//! Policy: `AgentPolicy` (chaperone.dev/v1alpha1) compiled into matchers and
//! evaluated per request. The evaluator is built by the policy issue (#5);
//! this file fixes the decision types.

use std::fmt;

/// What a rule says to do with a matching request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Mask,
    Approve,
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
    serde::Deserialize,
)]
pub enum RecordLevel {
    None,
    #[default]
    Metadata,
    Request,
    RequestResponse,
}

/// The outcome of evaluating policy for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub record: RecordLevel,
    /// `namespace/name` of the policy, or empty for the built-in default.
    pub policy: String,
    /// The rule's name (or `rules[N]`), or `default`.
    pub rule: String,
    /// The rule's message for the agent, if it set one.
    pub message: Option<String>,
    /// The policy is in dry-run: a `deny` is recorded but not enforced.
    pub dry_run: bool,
}

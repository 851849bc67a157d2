//! A person's decision on an approval, checked the same way whichever tool
//! makes it: `kubectl chaperone approve|deny` (cluster or `--local-dir`)
//! and the admin API in local mode. The node agents check every decision
//! again before they act on it ([`super::Approvals`]).

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::{ApprovalRequest, LocalStore, State, format_time};

/// A person's ruling on an approval request: who decides what. (Named
/// apart from [`crate::policy::Decision`], what policy decides.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruling {
    /// `Approved` or `Denied`.
    pub state: State,
    pub by: String,
    pub groups: Vec<String>,
    pub reason: Option<String>,
    /// A just-in-time window (`15m`) for an approval.
    pub grant: Option<String>,
    /// What the grant covers (the object when not said).
    pub grant_scope: Option<super::GrantScope>,
}

/// Why a decision is not made.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("approval {id} expired at {at}; the agent can retry its request to ask again")]
    Expired { id: String, at: String },
    #[error("approval {id} is already {state} (by {by})")]
    Decided {
        id: String,
        state: State,
        by: String,
    },
    #[error(
        "you ({by}) requested approval {id} and cannot {verb} it yourself: a requester never approves its own request"
    )]
    OwnRequest {
        id: String,
        by: String,
        verb: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(super::StoreError),
    #[error("{0}")]
    Store(super::StoreError),
}

impl Ruling {
    pub fn verb(&self) -> &'static str {
        if self.state == State::Approved {
            "approve"
        } else {
            "deny"
        }
    }

    /// The status to write on `approval` for this decision, if it may be
    /// made: the approval is pending and not expired, the decider is not
    /// the requester, a grant is a duration and goes with an approval.
    pub fn status_for(
        &self,
        approval: &ApprovalRequest,
        now: OffsetDateTime,
    ) -> Result<Value, Refused> {
        let id = approval.name().to_owned();
        if !matches!(self.state, State::Approved | State::Denied) {
            return Err(Refused::Invalid(format!(
                "a decision approves or denies, not {}",
                self.state
            )));
        }
        if self.by.trim().is_empty() {
            return Err(Refused::Invalid(
                "a decision says who makes it (by)".to_owned(),
            ));
        }
        match approval.state() {
            State::Pending if approval.is_expired(now) => {
                return Err(Refused::Expired {
                    id,
                    at: approval.spec.expires_at.clone(),
                });
            }
            State::Pending => {}
            state => {
                let by = approval
                    .status
                    .as_ref()
                    .and_then(|s| s.decided_by.clone())
                    .unwrap_or_default();
                return Err(Refused::Decided { id, state, by });
            }
        }
        if self.by == approval.spec.requester.username {
            return Err(Refused::OwnRequest {
                id,
                by: self.by.clone(),
                verb: self.verb().to_owned(),
            });
        }
        let mut status = json!({
            "state": self.state,
            "decidedBy": self.by,
            "decidedByGroups": self.groups,
            "decidedAt": format_time(now),
        });
        if let Some(reason) = &self.reason {
            status["reason"] = json!(reason);
        }
        if let Some(grant) = &self.grant {
            if self.state != State::Approved {
                return Err(Refused::Invalid(
                    "a grant goes with an approval, not a denial".to_owned(),
                ));
            }
            let duration = crate::config::parse_duration_with_unit(grant)
                .map_err(|e| Refused::Invalid(format!("grant {grant:?}: {e}")))?;
            status["grant"] = json!(grant);
            status["grantExpiresAt"] = json!(format_time(now + duration));
            status["grantScope"] = json!(self.grant_scope.unwrap_or(super::GrantScope::Object));
        }
        Ok(status)
    }
}

impl LocalStore {
    /// Makes `decision` on approval `id` in this directory; the approval as
    /// it now stands.
    pub fn decide(&self, id: &str, decision: &Ruling) -> Result<ApprovalRequest, Refused> {
        let approval = self.read(id).map_err(|why| {
            if self.exists(id) {
                Refused::Store(why)
            } else {
                Refused::NotFound(why)
            }
        })?;
        let status = decision.status_for(&approval, OffsetDateTime::now_utc())?;
        self.patch_status(id, &status).map_err(Refused::Store)?;
        self.read(id).map_err(Refused::Store)
    }
}

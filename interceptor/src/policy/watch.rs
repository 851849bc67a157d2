//! Cluster mode: watch `AgentPolicy` objects, keep the [`PolicyStore`] in
//! step, and say on each object's status whether it was accepted (condition
//! `Accepted`), and if not, why and which generation stays in force.

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use super::spec::{AgentPolicy, AgentPolicyStatus, Condition};
use super::store::{ApplyOutcome, PolicyStore};

/// The condition type chaperone sets on every policy.
pub const ACCEPTED: &str = "Accepted";

/// The status chaperone wants on one object.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate {
    pub name: String,
    pub status: AgentPolicyStatus,
}

/// Turns watcher events into store updates and the statuses to write. Pure
/// apart from the store, so it is tested without a cluster.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Objects of a (re)list in progress, applied together at `InitDone`.
    relist: Option<Vec<AgentPolicy>>,
}

impl Reconciler {
    /// Handles one event; `now` is the RFC 3339 time for new transitions.
    /// Returns the statuses that differ from what the objects already say.
    pub fn handle(
        &mut self,
        store: &PolicyStore,
        event: watcher::Event<AgentPolicy>,
        now: &str,
    ) -> Vec<StatusUpdate> {
        match event {
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                Vec::new()
            }
            watcher::Event::InitApply(object) => {
                self.relist.get_or_insert_with(Vec::new).push(object);
                Vec::new()
            }
            watcher::Event::InitDone => {
                let objects = self.relist.take().unwrap_or_default();
                let outcomes = store.replace_all(&objects);
                objects
                    .iter()
                    .zip(&outcomes)
                    .filter_map(|(object, outcome)| status_update(object, outcome, now))
                    .collect()
            }
            watcher::Event::Apply(object) => {
                let outcome = store.apply(&object);
                status_update(&object, &outcome, now).into_iter().collect()
            }
            watcher::Event::Delete(object) => {
                if let Some(name) = &object.metadata.name {
                    store.remove(name);
                }
                Vec::new()
            }
        }
    }
}

/// The status an object should carry after `outcome`, or `None` when it
/// already carries it (so writing status does not loop through the watch).
pub fn status_update(
    object: &AgentPolicy,
    outcome: &ApplyOutcome,
    now: &str,
) -> Option<StatusUpdate> {
    let (status, reason, message) = match &outcome.result {
        Ok(()) => (
            "True",
            "Valid",
            "the policy is valid and in force".to_owned(),
        ),
        Err(why) => {
            let kept = match outcome.active_generation {
                Some(g) => format!("generation {g} stays in force"),
                None => "no earlier version was valid, so this policy is not in force".to_owned(),
            };
            (
                "False",
                "Invalid",
                format!("invalid: {why}; {kept}; fix the object and apply it again"),
            )
        }
    };
    let previous = object
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.to_owned(),
    };
    let condition = Condition {
        type_: ACCEPTED.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: outcome.generation,
        last_transition_time,
    };
    let mut conditions: Vec<Condition> = object
        .status
        .iter()
        .flat_map(|s| s.conditions.iter())
        .filter(|c| c.type_ != ACCEPTED)
        .cloned()
        .collect();
    conditions.push(condition);
    let desired = AgentPolicyStatus {
        conditions,
        active_generation: outcome.active_generation,
    };
    (object.status.as_ref() != Some(&desired)).then(|| StatusUpdate {
        name: outcome.name.clone(),
        status: desired,
    })
}

/// Watches `AgentPolicy` objects cluster-wide until the stream ends (it
/// retries with backoff, so in practice until the task is dropped). Keeps
/// `store` in step and writes each object's `Accepted` condition.
pub async fn watch_crds(client: kube::Client, store: &PolicyStore) -> anyhow::Result<()> {
    let api: Api<AgentPolicy> = Api::all(client);
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut reconciler = Reconciler::default();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "watching AgentPolicy objects failed; retrying. Check that the CRD \
                     agentpolicies.chaperone.dev is installed and that chaperone may list and \
                     watch it"
                );
                continue;
            }
        };
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        for update in reconciler.handle(store, event, &now) {
            let patch = Patch::Merge(json!({ "status": update.status }));
            if let Err(error) = api
                .patch_status(&update.name, &PatchParams::default(), &patch)
                .await
            {
                tracing::warn!(
                    policy = %update.name,
                    %error,
                    "could not write the policy's status; check that chaperone may patch \
                     agentpolicies/status"
                );
            }
        }
    }
    Ok(())
}

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
/// `synced` passes once the first full list is in `store` (`/readyz`).
pub async fn watch_crds(
    client: kube::Client,
    store: &PolicyStore,
    synced: crate::admin::Check,
) -> anyhow::Result<()> {
    let api: Api<AgentPolicy> = Api::all(client);
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut reconciler = Reconciler::default();
    let mut failures = crate::logs::Throttle::default();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => {
                // `Init` starts every retry's list: only what the list
                // brings shows the watch works again.
                if !matches!(event, watcher::Event::Init) {
                    failures.reset();
                }
                event
            }
            Err(error) => {
                if let Some(left_out) = failures.allow() {
                    tracing::warn!(
                        repeated = left_out,
                        "{}; retrying",
                        crate::logs::watch_error(
                            &error,
                            "AgentPolicy objects (agentpolicies.chaperone.dev)"
                        )
                    );
                }
                continue;
            }
        };
        let listed = matches!(event, watcher::Event::InitDone);
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let updates = reconciler.handle(store, event, &now);
        if listed {
            synced.set_ok();
        }
        for update in updates {
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

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::identity::Caller;
    use crate::policy::{Action, PolicyInput};
    use crate::request::RequestInfo;

    fn policy(name: &str, generation: i64, action: &str) -> AgentPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\n\
             metadata: {{name: {name}, generation: {generation}}}\n\
             spec:\n  subjects: [{{users: [\"*\"]}}]\n  rules: [{{name: all, action: {action}}}]\n"
        ))
        .unwrap()
    }

    fn decide(store: &PolicyStore) -> Action {
        let request = RequestInfo::parse(&http::Method::GET, "/api/v1/namespaces/a/pods", None);
        let caller = Caller {
            username: "bot".into(),
            ..Caller::default()
        };
        store.evaluate(&PolicyInput::new(&request, &caller)).action
    }

    /// Writes the update onto the object, as the API server would.
    fn written(mut object: AgentPolicy, update: &StatusUpdate) -> AgentPolicy {
        object.status = Some(update.status.clone());
        object
    }

    #[test]
    fn the_initial_list_is_applied_at_once_and_every_object_gets_a_condition() {
        let store = PolicyStore::new();
        let mut reconciler = Reconciler::default();
        let now = "2026-01-01T00:00:00Z";
        assert!(reconciler.handle(&store, Event::Init, now).is_empty());
        for object in [policy("a", 1, "allow"), {
            let mut bad = policy("b", 4, "deny");
            bad.spec.rules[0].hold_timeout = Some("1m".into());
            bad
        }] {
            assert!(
                reconciler
                    .handle(&store, Event::InitApply(object), now)
                    .is_empty()
            );
        }
        assert_eq!(
            decide(&store),
            Action::Deny,
            "nothing applied before InitDone"
        );
        let updates = reconciler.handle(&store, Event::InitDone, now);
        assert_eq!(decide(&store), Action::Allow);
        assert_eq!(updates.len(), 2);
        let a = &updates[0].status;
        assert_eq!(updates[0].name, "a");
        assert_eq!(a.active_generation, Some(1));
        let condition = &a.conditions[0];
        assert_eq!(
            (
                condition.type_.as_str(),
                condition.status.as_str(),
                condition.reason.as_str()
            ),
            ("Accepted", "True", "Valid")
        );
        assert_eq!(condition.observed_generation, Some(1));
        assert_eq!(condition.last_transition_time, now);
        let b = &updates[1].status.conditions[0];
        assert_eq!((b.status.as_str(), b.reason.as_str()), ("False", "Invalid"));
        assert!(
            b.message.starts_with(
                "invalid: spec.rules[0].holdTimeout: holdTimeout applies to action approve only"
            ),
            "{}",
            b.message
        );
        assert!(
            b.message
                .contains("no earlier version was valid, so this policy is not in force"),
            "{}",
            b.message
        );
    }

    #[test]
    fn an_invalid_update_keeps_the_previous_generation_and_says_so() {
        let store = PolicyStore::new();
        let mut reconciler = Reconciler::default();
        let v1 = policy("p", 1, "allow");
        let update = reconciler.handle(&store, Event::Apply(v1.clone()), "t1");
        let v1 = written(v1, &update[0]);
        // the status write comes back through the watch: nothing more to do
        assert!(
            reconciler
                .handle(&store, Event::Apply(v1.clone()), "t2")
                .is_empty()
        );

        let mut v2 = policy("p", 2, "approve");
        v2.spec.rules[0].hold_timeout = Some("later".into());
        v2.status = v1.status.clone();
        let update = reconciler.handle(&store, Event::Apply(v2.clone()), "t3");
        assert_eq!(decide(&store), Action::Allow, "generation 1 stays");
        let status = &update[0].status;
        assert_eq!(status.active_generation, Some(1));
        let condition = &status.conditions[0];
        assert_eq!(condition.status, "False");
        assert_eq!(condition.observed_generation, Some(2));
        assert_eq!(condition.last_transition_time, "t3");
        assert!(
            condition
                .message
                .contains("\"later\" is not a duration; write e.g. \"30s\", \"5m\" or \"1h30m\""),
            "{}",
            condition.message
        );
        assert!(
            condition
                .message
                .ends_with("generation 1 stays in force; fix the object and apply it again"),
            "{}",
            condition.message
        );

        let mut v3 = policy("p", 3, "mask");
        v3.status = Some(status.clone());
        let update = reconciler.handle(&store, Event::Apply(v3.clone()), "t4");
        assert_eq!(decide(&store), Action::Mask);
        assert_eq!(update[0].status.conditions[0].status, "True");
        assert_eq!(update[0].status.active_generation, Some(3));

        reconciler.handle(&store, Event::Delete(v3), "t5");
        assert_eq!(decide(&store), Action::Deny, "deleted: no policy selects");
    }

    #[test]
    fn a_relist_drops_policies_deleted_meanwhile() {
        let store = PolicyStore::new();
        let mut reconciler = Reconciler::default();
        reconciler.handle(&store, Event::Apply(policy("gone", 1, "allow")), "t");
        assert_eq!(decide(&store), Action::Allow);
        reconciler.handle(&store, Event::Init, "t");
        reconciler.handle(&store, Event::InitApply(policy("kept", 1, "mask")), "t");
        reconciler.handle(&store, Event::InitDone, "t");
        assert_eq!(
            store.snapshot().policy_names().collect::<Vec<_>>(),
            ["kept"]
        );
        assert_eq!(decide(&store), Action::Mask);
    }
}

//! Is this `SIGTERM` chaperone's removal, or an upgrade, a drain, a restart?
//!
//! A fail-closed node agent keeps its programs pinned when it exits, so
//! agents stay refused until the next node agent adopts them. When the
//! DaemonSet that runs it is gone, no next agent comes: then it detaches the
//! programs and removes the pins itself, as `chaperone detach` does.
//!
//! The signal is the agent's own pod's controlling DaemonSet (its
//! `ownerReferences`, read once at start): removed when the API server
//! answers 404 for it, when it has a `deletionTimestamp`, or when the
//! DaemonSet of that name has another uid (deleted and created again).
//! Anything else keeps the pins (fail closed).
//!
//! The answer is also watched from the start, because `kubectl delete -k
//! deploy/` deletes the node agent's service account and RBAC before (or
//! while) the DaemonSet's pods are told to stop: by then a fresh `GET` is
//! refused, but the watch already saw the DaemonSet go.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

/// The controlling owner of the node agent's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controller {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// What the API server said about the DaemonSet of the controller's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// 404 (or a watch saw it deleted, or listed nothing).
    Gone,
    Present {
        uid: String,
        /// `metadata.deletionTimestamp`: deletion has begun.
        deleting: Option<String>,
    },
}

/// What to do with the pins on exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinsOnExit {
    /// The DaemonSet is gone or going: detach and unpin. Says why.
    Removed(String),
    /// The DaemonSet is there (rolling update, drain, restart): keep them.
    Present(String),
    /// Cannot tell: keep them (fail closed). Says why.
    Unknown(String),
}

/// The controlling owner reference of `pod`, if any.
pub fn controller_of(pod: &Pod) -> Option<Controller> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| Controller {
            kind: owner.kind.clone(),
            namespace,
            name: owner.name.clone(),
            uid: owner.uid.clone(),
        })
}

/// Why the API server did not say whether the DaemonSet exists.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    #[error("HTTP {code} {reason}: {message}")]
    Refused {
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{0}")]
    Unreachable(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The pod's owner is unknown or not a DaemonSet.
    #[error("not asked")]
    NotAsked,
}

/// The decision. `fresh` is a `GET` of the DaemonSet now (or why it
/// failed); `watched` what the watch saw last. Only a positive answer from
/// the API server removes; a fresh answer wins over the watch.
pub fn decide(
    controller: Option<&Controller>,
    fresh: Result<Seen, Unanswered>,
    watched: Option<&Seen>,
) -> PinsOnExit {
    let Some(controller) = controller else {
        return PinsOnExit::Unknown(
            "the node agent could not read its own pod's owner from the API server".into(),
        );
    };
    if controller.kind != "DaemonSet" {
        return PinsOnExit::Unknown(format!(
            "this pod is controlled by {controller}, not a DaemonSet"
        ));
    }
    let judge = |seen: &Seen| -> PinsOnExit {
        match seen {
            Seen::Gone => PinsOnExit::Removed(format!("{controller} is gone")),
            Seen::Present { uid, .. } if *uid != controller.uid => PinsOnExit::Removed(format!(
                "{controller} (uid {}) was deleted; the DaemonSet of that name now is another \
                 one (uid {uid})",
                controller.uid
            )),
            Seen::Present {
                deleting: Some(since),
                ..
            } => PinsOnExit::Removed(format!("{controller} is being deleted (since {since})")),
            Seen::Present { deleting: None, .. } => PinsOnExit::Present(format!(
                "{controller} is present (rolling update, drain or restart)"
            )),
        }
    };
    match (fresh, watched.map(judge)) {
        (Ok(seen), _) => judge(&seen),
        (Err(_), Some(PinsOnExit::Removed(why))) => PinsOnExit::Removed(format!(
            "{why} (as the watch saw before the API server stopped answering)"
        )),
        (Err(error), _) => PinsOnExit::Unknown(format!(
            "the API server did not say whether {controller} still exists: {error}"
        )),
    }
}

/// The node agent's view of its own DaemonSet, kept from start to exit.
pub struct RemovalWatch {
    client: Client,
    namespace: String,
    pod: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    controller: Option<Controller>,
    watched: Option<Seen>,
}

impl RemovalWatch {
    /// Reads the pod `namespace/pod` (retrying until the API server answers)
    /// and, when a DaemonSet controls it, watches that DaemonSet.
    pub fn start(client: Client, namespace: &str, pod: &str) -> RemovalWatch {
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(watch(
            client.clone(),
            namespace.to_owned(),
            pod.to_owned(),
            state.clone(),
        ));
        RemovalWatch {
            client,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            state,
            task,
        }
    }

    /// Decides, asking the API server once more (within `limit`).
    pub async fn check(&self, limit: Duration) -> PinsOnExit {
        let known = self.state.lock().unwrap().controller.clone();
        let controller = match known {
            Some(controller) => Some(controller),
            None => tokio::time::timeout(limit, self.own_controller())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
        };
        let fresh = match &controller {
            Some(controller) if controller.kind == "DaemonSet" => {
                match tokio::time::timeout(limit, get_daemonset(&self.client, controller)).await {
                    Ok(result) => result,
                    Err(_) => Err(Unanswered::Timeout(limit)),
                }
            }
            _ => Err(Unanswered::NotAsked),
        };
        let watched = self.state.lock().unwrap().watched.clone();
        decide(controller.as_ref(), fresh, watched.as_ref())
    }

    async fn own_controller(&self) -> Result<Option<Controller>, kube::Error> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get(&self.pod)
            .await?;
        Ok(controller_of(&pod))
    }
}

impl Drop for RemovalWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn get_daemonset(client: &Client, controller: &Controller) -> Result<Seen, Unanswered> {
    match Api::<DaemonSet>::namespaced(client.clone(), &controller.namespace)
        .get(&controller.name)
        .await
    {
        Ok(ds) => Ok(seen(&ds)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Seen::Gone),
        Err(kube::Error::Api(status)) => Err(Unanswered::Refused {
            code: status.code,
            reason: status.reason,
            message: status.message,
        }),
        Err(error) => Err(Unanswered::Unreachable(error.to_string())),
    }
}

fn seen(ds: &DaemonSet) -> Seen {
    Seen::Present {
        uid: ds.metadata.uid.clone().unwrap_or_default(),
        deleting: ds
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
    }
}

async fn watch(client: Client, namespace: String, pod: String, state: Arc<Mutex<State>>) {
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let mut delay = Duration::from_millis(500);
    let controller = loop {
        match pods.get(&pod).await {
            Ok(pod) => break controller_of(&pod),
            Err(error) => {
                tracing::warn!(
                    pod = %format!("{namespace}/{pod}"),
                    %error,
                    "cannot read the node agent's own pod yet (needed to tell chaperone's \
                     removal from an upgrade on exit); retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    let Some(controller) = controller.filter(|c| c.kind == "DaemonSet") else {
        tracing::info!(
            pod = %format!("{namespace}/{pod}"),
            "no DaemonSet controls this pod: on exit the eBPF programs stay pinned (failOpen: false)"
        );
        return;
    };
    tracing::info!(daemonset = %controller, uid = %controller.uid, "watching the DaemonSet that runs this node agent: on exit, its removal detaches the programs");
    state.lock().unwrap().controller = Some(controller.clone());
    let daemonsets = Api::<DaemonSet>::namespaced(client, &controller.namespace);
    let mut events = std::pin::pin!(
        watcher(
            daemonsets,
            watcher::Config::default().fields(&format!("metadata.name={}", controller.name)),
        )
        .default_backoff()
    );
    let mut listed: Option<Seen> = None;
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(watcher::Event::Init) => {
                listed = Some(Seen::Gone);
                None
            }
            Ok(watcher::Event::InitApply(ds)) => {
                listed = Some(seen(&ds));
                None
            }
            Ok(watcher::Event::InitDone) => listed.take(),
            Ok(watcher::Event::Apply(ds)) => Some(seen(&ds)),
            Ok(watcher::Event::Delete(_)) => Some(Seen::Gone),
            Err(error) => {
                tracing::debug!(%error, daemonset = %controller, "DaemonSet watch failed; retrying");
                None
            }
        };
        if let Some(update) = update {
            match &update {
                Seen::Gone => tracing::info!(
                    "the watch saw {controller} deleted: on exit this node agent detaches its programs"
                ),
                Seen::Present {
                    deleting: Some(since),
                    ..
                } => tracing::info!(
                    "the watch saw {controller} being deleted (since {since}): on exit this node \
                     agent detaches its programs"
                ),
                Seen::Present { .. } => {
                    tracing::debug!(?update, daemonset = %controller, "DaemonSet")
                }
            }
            state.lock().unwrap().watched = Some(update);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        Controller {
            kind: "DaemonSet".into(),
            namespace: "chaperone-system".into(),
            name: "chaperone-node".into(),
            uid: "u1".into(),
        }
    }

    fn present(uid: &str) -> Seen {
        Seen::Present {
            uid: uid.into(),
            deleting: None,
        }
    }

    fn removed(v: &PinsOnExit) -> bool {
        matches!(v, PinsOnExit::Removed(_))
    }

    #[test]
    fn a_present_daemonset_keeps_the_pins() {
        let v = decide(Some(&controller()), Ok(present("u1")), None);
        assert!(matches!(v, PinsOnExit::Present(_)), "{v:?}");
    }

    #[test]
    fn gone_deleting_or_replaced_removes() {
        let c = controller();
        assert!(removed(&decide(Some(&c), Ok(Seen::Gone), None)));
        let deleting = Seen::Present {
            uid: "u1".into(),
            deleting: Some("2026-11-23T16:00:00Z".into()),
        };
        let v = decide(Some(&c), Ok(deleting), None);
        assert!(
            matches!(&v, PinsOnExit::Removed(why) if why.contains("being deleted")),
            "{v:?}"
        );
        let v = decide(Some(&c), Ok(present("u2")), None);
        assert!(
            matches!(&v, PinsOnExit::Removed(why) if why.contains("u2")),
            "{v:?}"
        );
    }

    #[test]
    fn an_unanswered_question_keeps_the_pins_unless_the_watch_saw_the_removal() {
        let c = controller();
        let down = || Err(Unanswered::Unreachable("connection refused".to_owned()));
        let v = decide(Some(&c), down(), None);
        assert!(
            matches!(&v, PinsOnExit::Unknown(why) if why.contains("connection refused")),
            "{v:?}"
        );
        let v = decide(Some(&c), down(), Some(&present("u1")));
        assert!(matches!(v, PinsOnExit::Unknown(_)), "{v:?}");
        // kubectl delete -k: the RBAC went first, the watch saw the rest.
        let v = decide(Some(&c), down(), Some(&Seen::Gone));
        assert!(
            matches!(&v, PinsOnExit::Removed(why) if why.contains("watch")),
            "{v:?}"
        );
    }

    #[test]
    fn a_fresh_answer_wins_over_the_watch() {
        let c = controller();
        let v = decide(Some(&c), Ok(present("u1")), Some(&Seen::Gone));
        assert!(matches!(v, PinsOnExit::Present(_)), "{v:?}");
    }

    #[test]
    fn without_a_daemonset_owner_nothing_is_removed() {
        let v = decide(None, Ok(Seen::Gone), Some(&Seen::Gone));
        assert!(matches!(v, PinsOnExit::Unknown(_)), "{v:?}");
        let mut c = controller();
        c.kind = "ReplicaSet".into();
        let v = decide(Some(&c), Ok(Seen::Gone), None);
        assert!(matches!(v, PinsOnExit::Unknown(_)), "{v:?}");
    }

    #[test]
    fn the_controller_is_the_controlling_owner_reference() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "chaperone-node-x7k2p",
                "namespace": "chaperone-system",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "n"},
                    {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "chaperone-node",
                     "uid": "u1", "controller": true, "blockOwnerDeletion": true},
                ],
            },
        }))
        .unwrap();
        assert_eq!(controller_of(&pod), Some(controller()));
        let orphan: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
        assert_eq!(controller_of(&orphan), None);
    }
}

//! The pod tracker: which cgroups on this node belong to agent pods.
//!
//! It watches the pods scheduled on this node (and the namespaces labeled
//! `chaperone.dev/intercept: "true"`), finds each agent pod's cgroup by the
//! kubelet's naming, and keeps the eBPF `AGENT_CGROUPS` map in step: a pod
//! labeled (or in a labeled namespace) is added, a deleted or finished one
//! removed.
//!
//! A pod once guarded stays guarded for its lifetime (its uid), whatever
//! later happens to its label or its namespace's: an agent that gets its
//! label removed (by itself through another path, a controller, a person)
//! must not walk out of the guard with the processes it already runs. The
//! pod's cgroup is released only when the pod is deleted or finished.
//!
//! It registers the **pod-level** cgroup. The eBPF programs match a listed
//! cgroup and every cgroup below it, so this guards all of the pod's
//! containers, including the ones started after the pod was first seen
//! (restarts, sidecars, `kubectl debug` ephemeral containers), with no race
//! between a container's start and its registration.
//!
//! An agent pod whose cgroup cannot be found (yet: the kubelet creates it
//! when the sandbox starts) is retried, logged, and counted
//! ([`PodTracker::unresolved`]); it is never silently left unguarded.
//!
//! The kubelet names pod cgroups like this (cgroup v2):
//!
//! | driver   | QoS        | pod cgroup                                                        |
//! |----------|------------|-------------------------------------------------------------------|
//! | systemd  | burstable  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | systemd  | besteffort | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` |
//! | systemd  | guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice`                         |
//! | cgroupfs | burstable  | `kubepods/burstable/pod<uid>`                                     |
//! | cgroupfs | guaranteed | `kubepods/pod<uid>`                                               |
//!
//! (`<uid_>` is the pod uid with `_` for `-`.) Containers are below, as
//! `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`
//! (systemd) or `<id>` (cgroupfs). The kubelet may sit under a prefix
//! (`kubelet.slice/kubelet-kubepods.slice/…` in kind), so the tracker walks
//! the tree from a configurable root instead of computing one path.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    error::Error,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};

use crate::{
    identity::PodRef,
    redirect::{CgroupId, Redirector, cgroupfs::cgroup_id},
};

/// The label that makes a pod, or every pod of a namespace, an agent.
pub const INTERCEPT_LABEL: &str = "chaperone.dev/intercept";

/// How deep below the root pod cgroups are looked for.
const MAX_POD_DEPTH: usize = 8;
/// How deep below a pod cgroup its containers are looked for.
const MAX_CONTAINER_DEPTH: usize = 4;

pub type SinkError = Box<dyn Error + Send + Sync>;

/// Where agent cgroups go: the eBPF `AGENT_CGROUPS` map in production
/// ([`Redirector`]), a fake in tests.
pub trait AgentCgroupSink: Send + Sync {
    fn add(&self, id: CgroupId) -> Result<(), SinkError>;
    fn remove(&self, id: CgroupId) -> Result<(), SinkError>;
}

impl AgentCgroupSink for Redirector {
    fn add(&self, id: CgroupId) -> Result<(), SinkError> {
        Ok(self.add_agent_cgroup(id)?)
    }

    fn remove(&self, id: CgroupId) -> Result<(), SinkError> {
        Ok(self.remove_agent_cgroup(id)?)
    }
}

/// An agent pod that should be guarded but is not (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnresolvedPod {
    pub pod: PodRef,
    /// Why: no cgroup found yet, or the map update failed.
    pub reason: String,
    pub attempts: u32,
}

/// Watches this node's pods and keeps the agent cgroups in step.
pub struct PodTracker {
    sink: Arc<dyn AgentCgroupSink>,
    cgroup_root: PathBuf,
    retry_interval: Duration,
    state: Mutex<State>,
    index: RwLock<Index>,
    /// Where unresolved agent pods are counted (`chaperone_unresolved_pods`).
    metrics: Option<crate::admin::Metrics>,
    /// Passes once the first lists of pods and namespaces are in (`/readyz`).
    synced: Option<crate::admin::Check>,
}

#[derive(Default)]
struct State {
    /// Every pod on this node, by uid, as last seen.
    pods: HashMap<String, SeenPod>,
    /// Namespaces labeled for interception.
    agent_namespaces: HashSet<String>,
    /// Pods whose cgroup is in the sink, by uid.
    registered: HashMap<String, Registration>,
    /// Every pod that was ever an agent pod, by uid, while it exists: it
    /// stays guarded even if it (or its namespace) loses the label.
    guarded_for_life: HashSet<String>,
    unresolved: BTreeMap<String, UnresolvedPod>,
}

struct SeenPod {
    pod: PodRef,
    /// Succeeded or Failed: its containers are gone.
    finished: bool,
}

#[derive(Clone)]
struct Registration {
    cgroup: CgroupId,
    path: PathBuf,
    pod: PodRef,
}

/// What the proxy looks up, kept apart from the reconcile state so a lookup
/// never waits for a cgroup walk.
#[derive(Default)]
struct Index {
    pods: HashMap<CgroupId, (PathBuf, PodRef)>,
    containers: HashMap<CgroupId, PodRef>,
}

// === impl PodTracker ===

impl PodTracker {
    /// A tracker that registers agent cgroups with `sink`, looking for pod
    /// cgroups below `cgroup_root` (production: the cgroup v2 mount, see
    /// [`crate::redirect::cgroup2_mount`]).
    pub fn new(sink: Arc<dyn AgentCgroupSink>, cgroup_root: impl Into<PathBuf>) -> Self {
        PodTracker {
            sink,
            cgroup_root: cgroup_root.into(),
            retry_interval: Duration::from_secs(2),
            state: Mutex::new(State::default()),
            index: RwLock::new(Index::default()),
            metrics: None,
            synced: None,
        }
    }

    /// Counts unresolved agent pods in `metrics` on every reconcile, and
    /// passes `synced` once this node's pods and the labeled namespaces
    /// have been listed.
    pub fn reporting(
        mut self,
        metrics: crate::admin::Metrics,
        synced: crate::admin::Check,
    ) -> Self {
        metrics.unresolved_pods(0);
        self.metrics = Some(metrics);
        self.synced = Some(synced);
        self
    }

    /// How often unresolved agent pods are looked for again.
    pub fn with_retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// The pod a cgroup belongs to: a registered pod cgroup, or any cgroup
    /// below one (a container's).
    pub fn pod_for_cgroup(&self, id: CgroupId) -> Option<PodRef> {
        {
            let index = read(&self.index);
            if let Some((_, pod)) = index.pods.get(&id) {
                return Some(pod.clone());
            }
            if let Some(pod) = index.containers.get(&id) {
                return Some(pod.clone());
            }
        }
        // A container we have not seen yet: look below the pod cgroups.
        let pod_dirs: Vec<(PathBuf, PodRef)> = read(&self.index).pods.values().cloned().collect();
        let mut containers = HashMap::new();
        for (dir, pod) in &pod_dirs {
            walk_dirs(dir, MAX_CONTAINER_DEPTH, &mut |path| {
                if let Ok(id) = cgroup_id(path) {
                    containers.insert(id, pod.clone());
                }
                true
            });
        }
        let found = containers.get(&id).cloned();
        write(&self.index).containers = containers;
        found
    }

    /// Agent pods that are not guarded, with the reason.
    pub fn unresolved(&self) -> Vec<UnresolvedPod> {
        lock(&self.state).unresolved.values().cloned().collect()
    }

    /// How many agent pods are not guarded (for a gauge).
    pub fn unresolved_count(&self) -> usize {
        lock(&self.state).unresolved.len()
    }

    /// How many agent pods are guarded (for a gauge).
    pub fn guarded_count(&self) -> usize {
        lock(&self.state).registered.len()
    }

    /// The registered pod cgroups.
    pub fn guarded_cgroups(&self) -> Vec<(CgroupId, PodRef)> {
        lock(&self.state)
            .registered
            .values()
            .map(|r| (r.cgroup, r.pod.clone()))
            .collect()
    }

    /// The intercept label of a pod on this node (`namespace`/`name`), or
    /// `"true"` for a namespace (`namespace` empty) labeled for interception;
    /// `None` when the object is unknown here or carries no label. The
    /// protect stage keeps a whole-object write from dropping it.
    pub fn intercept_label(&self, namespace: &str, name: &str) -> Option<String> {
        let state = lock(&self.state);
        if namespace.is_empty() {
            return state
                .agent_namespaces
                .contains(name)
                .then(|| "true".to_owned());
        }
        state
            .pods
            .values()
            .find(|seen| seen.pod.namespace == namespace && seen.pod.name == name)
            .and_then(|seen| seen.pod.labels.get(INTERCEPT_LABEL).cloned())
    }

    // --- the watch, as events ---

    /// A pod on this node was added or changed.
    pub fn apply_pod(&self, pod: &Pod) {
        if let Some((uid, seen)) = seen_pod(pod) {
            lock(&self.state).pods.insert(uid, seen);
        }
        self.reconcile();
    }

    /// A pod on this node was deleted.
    pub fn delete_pod(&self, pod: &Pod) {
        if let Some(uid) = pod.uid() {
            lock(&self.state).pods.remove(&uid);
        }
        self.reconcile();
    }

    /// The complete set of pods on this node (after a (re)list).
    pub fn replace_pods(&self, pods: &[Pod]) {
        lock(&self.state).pods = pods.iter().filter_map(seen_pod).collect();
        self.reconcile();
    }

    /// A namespace was added or changed.
    pub fn apply_namespace(&self, namespace: &Namespace) {
        {
            let mut state = lock(&self.state);
            let name = namespace.name_any();
            if labeled(namespace.labels()) {
                state.agent_namespaces.insert(name);
            } else {
                state.agent_namespaces.remove(&name);
            }
        }
        self.reconcile();
    }

    /// A namespace was deleted, or no longer carries the label.
    pub fn delete_namespace(&self, namespace: &Namespace) {
        lock(&self.state)
            .agent_namespaces
            .remove(&namespace.name_any());
        self.reconcile();
    }

    /// The complete set of namespaces (after a (re)list); unlabeled ones
    /// may be included and are ignored.
    pub fn replace_namespaces(&self, namespaces: &[Namespace]) {
        lock(&self.state).agent_namespaces = namespaces
            .iter()
            .filter(|ns| labeled(ns.labels()))
            .map(|ns| ns.name_any())
            .collect();
        self.reconcile();
    }

    /// Bring the sink in line with the pods: register agent pods, remove the
    /// rest, retry the unresolved.
    pub fn reconcile(&self) {
        let mut state = lock(&self.state);
        let state = &mut *state;
        // Only a pod that is gone (deleted, or missing from a relist) is
        // forgotten; an unlabeled one stays guarded.
        state
            .guarded_for_life
            .retain(|uid| state.pods.contains_key(uid));
        let desired: HashMap<&String, &PodRef> = state
            .pods
            .iter()
            .filter(|(uid, seen)| {
                !seen.finished
                    && (labeled(&seen.pod.labels)
                        || (state.agent_namespaces.contains(&seen.pod.namespace)
                            && !opted_out(&seen.pod.labels))
                        || state.guarded_for_life.contains(*uid))
            })
            .map(|(uid, seen)| (uid, &seen.pod))
            .collect();
        for uid in desired.keys() {
            if !state.guarded_for_life.contains(*uid) {
                state.guarded_for_life.insert((*uid).clone());
            }
        }

        let gone: Vec<String> = state
            .registered
            .keys()
            .filter(|uid| !desired.contains_key(uid))
            .cloned()
            .collect();
        for uid in gone {
            let registration = &state.registered[&uid];
            match self.sink.remove(registration.cgroup) {
                Ok(()) => {
                    tracing::info!(
                        pod = %pod_name(&registration.pod),
                        cgroup = %registration.cgroup,
                        "no longer guarding pod"
                    );
                    state.registered.remove(&uid);
                }
                // Kept registered: removal is retried on the next round.
                Err(error) => tracing::error!(
                    pod = %pod_name(&registration.pod),
                    cgroup = %registration.cgroup,
                    %error,
                    "cannot remove the pod's cgroup from the agent map"
                ),
            }
        }

        let missing: Vec<(&String, &PodRef)> = desired
            .iter()
            .filter(|(uid, _)| !state.registered.contains_key(**uid))
            .map(|(uid, pod)| (*uid, *pod))
            .collect();
        let found = if missing.is_empty() {
            HashMap::new()
        } else {
            find_pod_cgroups(&self.cgroup_root)
        };
        let mut still_unresolved = BTreeMap::new();
        for (uid, pod) in missing {
            let outcome = match found.get(uid) {
                None => Err(format!(
                    "no cgroup for pod uid {uid} under {} yet (sandbox not started, or the \
                     kubelet's cgroup root is elsewhere)",
                    self.cgroup_root.display()
                )),
                Some(path) => cgroup_id(path)
                    .map_err(|e| format!("cannot stat {}: {e}", path.display()))
                    .and_then(|id| {
                        self.sink
                            .add(id)
                            .map(|()| (id, path.clone()))
                            .map_err(|e| format!("cannot add cgroup {id} to the agent map: {e}"))
                    }),
            };
            match outcome {
                Ok((cgroup, path)) => {
                    tracing::info!(
                        pod = %pod_name(pod),
                        %cgroup,
                        path = %path.display(),
                        "guarding pod"
                    );
                    state.registered.insert(
                        uid.clone(),
                        Registration {
                            cgroup,
                            path,
                            pod: pod.clone(),
                        },
                    );
                }
                Err(reason) => {
                    let attempts = state.unresolved.get(uid).map_or(0, |u| u.attempts) + 1;
                    // Loud on the first miss, then about once a minute.
                    if attempts == 1 || attempts.is_multiple_of(30) {
                        tracing::warn!(
                            pod = %pod_name(pod),
                            attempts,
                            "agent pod is NOT guarded yet: {reason}; retrying"
                        );
                    }
                    still_unresolved.insert(
                        uid.clone(),
                        UnresolvedPod {
                            pod: pod.clone(),
                            reason,
                            attempts,
                        },
                    );
                }
            }
        }
        state.unresolved = still_unresolved;
        if let Some(metrics) = &self.metrics {
            metrics.unresolved_pods(i64::try_from(state.unresolved.len()).unwrap_or(i64::MAX));
        }

        let mut index = write(&self.index);
        index.pods = state
            .registered
            .values()
            .map(|r| (r.cgroup, (r.path.clone(), r.pod.clone())))
            .collect();
        let live: HashSet<&str> = state.registered.keys().map(String::as_str).collect();
        index
            .containers
            .retain(|_, pod| live.contains(pod.uid.as_str()));
    }

    /// Watch the pods on `node_name` and the labeled namespaces through
    /// `client` until the watch ends, retrying unresolved pods meanwhile.
    /// Watch errors are logged and retried with backoff.
    pub async fn run(self: Arc<Self>, client: Client, node_name: &str) -> anyhow::Result<()> {
        let pods = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        )
        .default_backoff()
        .map(|event| Update::Pod(event.map(boxed)));
        let namespaces = watcher(
            Api::<Namespace>::all(client),
            watcher::Config::default().labels(&format!("{INTERCEPT_LABEL}=true")),
        )
        .default_backoff()
        .map(|event| Update::Namespace(event.map(boxed)));
        let mut updates = std::pin::pin!(futures::stream::select(pods, namespaces));
        let mut retry = tokio::time::interval(self.retry_interval);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pod_list: Option<Vec<Pod>> = None;
        let mut namespace_list: Option<Vec<Namespace>> = None;
        let (mut pods_listed, mut namespaces_listed) = (false, false);
        let (mut pod_failures, mut namespace_failures) = (
            crate::logs::Throttle::default(),
            crate::logs::Throttle::default(),
        );
        loop {
            tokio::select! {
                update = updates.next() => match update.inspect(|update| match update {
                    // A watch that works again logs its next failure at once.
                    // `Init` starts every retry's list: only what the list
                    // brings shows the watch works again.
                    Update::Pod(Ok(event)) if !matches!(event, watcher::Event::Init) => {
                        pod_failures.reset()
                    }
                    Update::Namespace(Ok(event)) if !matches!(event, watcher::Event::Init) => {
                        namespace_failures.reset()
                    }
                    _ => {}
                }) {
                    None => anyhow::bail!("the pod and namespace watches ended"),
                    Some(Update::Pod(Err(error))) => {
                        if let Some(left_out) = pod_failures.allow() {
                            tracing::warn!(
                                node = node_name,
                                repeated = left_out,
                                "{}; retrying (new agent pods on this node are not guarded \
                                 until it works)",
                                crate::logs::watch_error(&error, "this node's pods")
                            );
                        }
                    }
                    Some(Update::Namespace(Err(error))) => {
                        if let Some(left_out) = namespace_failures.allow() {
                            tracing::warn!(
                                repeated = left_out,
                                "{}; retrying",
                                crate::logs::watch_error(&error, "labeled namespaces")
                            );
                        }
                    }
                    Some(Update::Pod(Ok(event))) => match event {
                        watcher::Event::Apply(pod) => self.apply_pod(&pod),
                        watcher::Event::Delete(pod) => self.delete_pod(&pod),
                        watcher::Event::Init => pod_list = Some(Vec::new()),
                        watcher::Event::InitApply(pod) => {
                            pod_list.get_or_insert_with(Vec::new).push(*pod);
                        }
                        watcher::Event::InitDone => {
                            self.replace_pods(&pod_list.take().unwrap_or_default());
                            pods_listed = true;
                            self.mark_synced(pods_listed, namespaces_listed);
                        }
                    },
                    Some(Update::Namespace(Ok(event))) => match event {
                        watcher::Event::Apply(ns) => self.apply_namespace(&ns),
                        watcher::Event::Delete(ns) => self.delete_namespace(&ns),
                        watcher::Event::Init => namespace_list = Some(Vec::new()),
                        watcher::Event::InitApply(ns) => {
                            namespace_list.get_or_insert_with(Vec::new).push(*ns);
                        }
                        watcher::Event::InitDone => {
                            self.replace_namespaces(&namespace_list.take().unwrap_or_default());
                            namespaces_listed = true;
                            self.mark_synced(pods_listed, namespaces_listed);
                        }
                    },
                },
                _ = retry.tick() => {
                    if self.unresolved_count() > 0 {
                        self.reconcile();
                    }
                }
            }
        }
    }
}

impl PodTracker {
    fn mark_synced(&self, pods_listed: bool, namespaces_listed: bool) {
        if pods_listed
            && namespaces_listed
            && let Some(synced) = &self.synced
        {
            synced.set_ok();
        }
    }
}

enum Update {
    Pod(Result<watcher::Event<Box<Pod>>, watcher::Error>),
    Namespace(Result<watcher::Event<Box<Namespace>>, watcher::Error>),
}

/// Objects are large; keep the update enum small.
fn boxed<K>(event: watcher::Event<K>) -> watcher::Event<Box<K>> {
    match event {
        watcher::Event::Apply(pod) => watcher::Event::Apply(Box::new(pod)),
        watcher::Event::Delete(pod) => watcher::Event::Delete(Box::new(pod)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(pod) => watcher::Event::InitApply(Box::new(pod)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn labeled(labels: &BTreeMap<String, String>) -> bool {
    labels.get(INTERCEPT_LABEL).is_some_and(|v| v == "true")
}

/// A pod in a labeled namespace that says `chaperone.dev/intercept: "false"`
/// is not an agent, as the webhook (its objectSelector) and `kubectl
/// chaperone status` read it: intercepting it would send its API
/// connections to a CA it was never given. Only a pod's first sighting
/// decides; once guarded, a later opt-out label does not release it
/// (`guarded_for_life`). Agents may not write the label on pods nor in any
/// workload's pod template (`protect`), so the opt-out comes from a person
/// or a controller running what a person wrote; a pod already labeled
/// when the node agent starts (made before chaperone was deployed) is
/// left alone as well, which deploy/README.md asks operators to review.
fn opted_out(labels: &BTreeMap<String, String>) -> bool {
    labels.get(INTERCEPT_LABEL).is_some_and(|v| v == "false")
}

fn seen_pod(pod: &Pod) -> Option<(String, SeenPod)> {
    let uid = pod.uid()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let pod_ref = PodRef {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: uid.as_str().into(),
        service_account,
        labels: pod.labels().clone(),
    };
    Some((
        uid,
        SeenPod {
            pod: pod_ref,
            finished: matches!(phase, Some("Succeeded" | "Failed")),
        },
    ))
}

fn pod_name(pod: &PodRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// The pod uid a cgroup directory name stands for, under either kubelet
/// cgroup driver: `…-pod<uid_>.slice` (systemd) or `pod<uid>` (cgroupfs).
pub fn pod_uid_of_cgroup(name: &str) -> Option<String> {
    if let Some(slice) = name.strip_suffix(".slice") {
        let (prefix, uid) = slice.rsplit_once("-pod")?;
        if !prefix.contains("kubepods") {
            return None;
        }
        let uid = uid.replace('_', "-");
        return is_uid(&uid).then_some(uid);
    }
    let uid = name.strip_prefix("pod")?;
    is_uid(uid).then(|| uid.to_string())
}

/// A Kubernetes object uid: a UUID (8-4-4-4-12 hex digits).
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Every pod cgroup below `root`, by pod uid. Pod cgroups are not descended
/// into (their containers do not matter here).
pub fn find_pod_cgroups(root: &Path) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    walk_dirs(root, MAX_POD_DEPTH, &mut |path| {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match pod_uid_of_cgroup(name) {
            Some(uid) => {
                if let Some(other) = found.insert(uid.to_ascii_lowercase(), path.to_path_buf()) {
                    tracing::warn!(
                        pod_uid = %uid,
                        first = %other.display(),
                        second = %path.display(),
                        "two cgroups are named for the same pod; using the second"
                    );
                }
                false
            }
            None => true,
        }
    });
    found
}

/// Visit the directories below `root` (not `root` itself), breadth first,
/// down to `max_depth`; `visit` returns whether to descend. Unreadable
/// directories (a cgroup removed meanwhile) are skipped.
fn walk_dirs(root: &Path, max_depth: usize, visit: &mut dyn FnMut(&Path) -> bool) {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..max_depth {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let path = entry.path();
                    if visit(&path) {
                        next.push(path);
                    }
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::{
        api::core::v1::{PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::redirect::cgroup2_mount;

    /// Records what is in the agent map.
    #[derive(Default)]
    struct FakeSink {
        ids: Mutex<BTreeSet<CgroupId>>,
        fail_adds: std::sync::atomic::AtomicBool,
    }

    impl FakeSink {
        fn ids(&self) -> BTreeSet<CgroupId> {
            lock(&self.ids).clone()
        }
    }

    impl AgentCgroupSink for FakeSink {
        fn add(&self, id: CgroupId) -> Result<(), SinkError> {
            if self.fail_adds.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("map is full".into());
            }
            lock(&self.ids).insert(id);
            Ok(())
        }
        fn remove(&self, id: CgroupId) -> Result<(), SinkError> {
            lock(&self.ids).remove(&id);
            Ok(())
        }
    }

    /// A test subtree of cgroups; created under the real cgroup v2 mount
    /// when running as root, else under a temporary directory (the walk
    /// and naming are the same; only ids differ in kind).
    struct Tree {
        root: PathBuf,
        _tmp: Option<tempfile::TempDir>,
        real: bool,
    }

    impl Tree {
        fn real_cgroup() -> Option<Tree> {
            if !nix::unistd::geteuid().is_root() {
                println!("SKIPPED: creating cgroups needs root");
                return None;
            }
            let Ok(mount) = cgroup2_mount() else {
                println!("SKIPPED: no cgroup v2 mount on this machine");
                return None;
            };
            let root = mount.join(format!(
                "chaperone-test-pods-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            fs::create_dir(&root).unwrap();
            Some(Tree {
                root,
                _tmp: None,
                real: true,
            })
        }

        fn plain() -> Tree {
            let tmp = tempfile::tempdir().unwrap();
            Tree {
                root: tmp.path().to_path_buf(),
                _tmp: Some(tmp),
                real: false,
            }
        }

        fn mkdir(&self, rel: &str) -> PathBuf {
            let path = self.root.join(rel);
            fs::create_dir_all(&path).unwrap();
            path
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            if self.real {
                remove_tree(&self.root);
            }
        }
    }

    /// cgroup directories are removed bottom-up with rmdir (their control
    /// files cannot be unlinked).
    fn remove_tree(path: &Path) {
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&entry.path());
                }
            }
        }
        if fs::remove_dir(path).is_err() {
            let _ = fs::remove_dir_all(path);
        }
    }

    const UID_A: &str = "0f6c1a52-7d3e-4b8e-9a51-2c4e8f9d1b01";
    const UID_B: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
    const UID_C: &str = "9e8d7c6b-5a4f-4e3d-2c1b-0a9f8e7d6c5b";
    const UID_D: &str = "44444444-4444-4444-8444-444444444444";
    const UID_E: &str = "55555555-aaaa-4bbb-8ccc-dddddddddddd";

    fn underscored(uid: &str) -> String {
        uid.replace('-', "_")
    }

    /// Pod and container cgroups the way kubelets name them, for the pod
    /// uids above; returns (uid, pod cgroup, container cgroup) each.
    fn kubelet_layout(tree: &Tree) -> Vec<(&'static str, PathBuf, PathBuf)> {
        let ctr = "3f1e0b5a9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
        let a = underscored(UID_A);
        let b = underscored(UID_B);
        let c = underscored(UID_C);
        let layouts = [
            // systemd driver, burstable, containerd
            (
                UID_A,
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{a}.slice"),
                format!("cri-containerd-{ctr}.scope"),
            ),
            // systemd driver, besteffort, CRI-O
            (
                UID_B,
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{b}.slice"
                ),
                format!("crio-{ctr}.scope"),
            ),
            // systemd driver, guaranteed (no QoS level), Docker
            (
                UID_C,
                format!("kubepods.slice/kubepods-pod{c}.slice"),
                format!("docker-{ctr}.scope"),
            ),
            // cgroupfs driver, burstable
            (
                UID_D,
                format!("kubepods/burstable/pod{UID_D}"),
                ctr.to_string(),
            ),
            // cgroupfs driver, guaranteed
            (UID_E, format!("kubepods/pod{UID_E}"), ctr.to_string()),
        ];
        layouts
            .into_iter()
            .map(|(uid, pod, container)| {
                let pod_dir = tree.mkdir(&pod);
                let container_dir = tree.mkdir(&format!("{pod}/{container}"));
                (uid, pod_dir, container_dir)
            })
            .collect()
    }

    fn pod(namespace: &str, name: &str, uid: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(format!("{name}-sa")),
                node_name: Some("node-1".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn namespace(name: &str, labeled: bool) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        if labeled {
            ns.metadata.labels = Some([(INTERCEPT_LABEL.into(), "true".into())].into());
        }
        ns
    }

    const AGENT: &[(&str, &str)] = &[(INTERCEPT_LABEL, "true")];

    #[test]
    fn kubelet_cgroup_names_give_the_pod_uid() {
        let a = underscored(UID_A);
        assert_eq!(
            pod_uid_of_cgroup(&format!("kubepods-burstable-pod{a}.slice")).as_deref(),
            Some(UID_A)
        );
        assert_eq!(
            pod_uid_of_cgroup(&format!("kubepods-pod{a}.slice")).as_deref(),
            Some(UID_A)
        );
        assert_eq!(
            pod_uid_of_cgroup(&format!("kubelet-kubepods-besteffort-pod{a}.slice")).as_deref(),
            Some(UID_A)
        );
        assert_eq!(
            pod_uid_of_cgroup(&format!("pod{UID_A}")).as_deref(),
            Some(UID_A)
        );
        for not_a_pod in [
            "kubepods.slice",
            "kubepods-burstable.slice",
            "system.slice",
            "podman-1234.scope",
            "pod",
            "podnotauid",
            &format!("cri-containerd-{a}.scope"),
            &format!("user-pod{a}.slice"),
        ] {
            assert_eq!(pod_uid_of_cgroup(not_a_pod), None, "{not_a_pod}");
        }
    }

    fn check_layout_is_resolved(tree: &Tree) {
        let layout = kubelet_layout(tree);
        tree.mkdir("system.slice/containerd.service");
        let found = find_pod_cgroups(&tree.root);
        assert_eq!(found.len(), layout.len(), "{found:?}");
        for (uid, pod_dir, _) in &layout {
            assert_eq!(found.get(*uid), Some(pod_dir), "pod {uid}");
        }

        let sink = Arc::new(FakeSink::default());
        let tracker = PodTracker::new(sink.clone(), &tree.root);
        let pods: Vec<Pod> = layout
            .iter()
            .enumerate()
            .map(|(i, (uid, _, _))| pod("agents", &format!("agent-{i}"), uid, AGENT))
            .collect();
        tracker.replace_pods(&pods);
        assert_eq!(tracker.unresolved_count(), 0, "{:?}", tracker.unresolved());
        let expected: BTreeSet<CgroupId> = layout
            .iter()
            .map(|(_, pod_dir, _)| cgroup_id(pod_dir).unwrap())
            .collect();
        assert_eq!(sink.ids(), expected);

        // Both the pod cgroup and a container cgroup below it map to the pod.
        for (i, (uid, pod_dir, container_dir)) in layout.iter().enumerate() {
            let by_pod = tracker.pod_for_cgroup(cgroup_id(pod_dir).unwrap()).unwrap();
            assert_eq!(by_pod.uid, *uid);
            assert_eq!(by_pod.name, format!("agent-{i}"));
            assert_eq!(by_pod.service_account, format!("agent-{i}-sa"));
            let by_container = tracker
                .pod_for_cgroup(cgroup_id(container_dir).unwrap())
                .unwrap();
            assert_eq!(by_container, by_pod);
        }
        // A container started later is found too.
        let (_, pod_dir, _) = &layout[0];
        let late = pod_dir.join("cri-containerd-late.scope");
        fs::create_dir(&late).unwrap();
        assert_eq!(
            tracker
                .pod_for_cgroup(cgroup_id(&late).unwrap())
                .unwrap()
                .uid,
            UID_A
        );
        // Cgroups that belong to no agent pod map to nothing.
        let other = cgroup_id(&tree.root.join("system.slice/containerd.service")).unwrap();
        assert_eq!(tracker.pod_for_cgroup(other), None);
    }

    #[test]
    fn kubelet_cgroups_in_the_real_cgroup2_tree_are_resolved() {
        let Some(tree) = Tree::real_cgroup() else {
            return;
        };
        check_layout_is_resolved(&tree);
    }

    #[test]
    fn the_real_agent_map_follows_the_pods() {
        let Some(tree) = Tree::real_cgroup() else {
            return;
        };
        let layout = kubelet_layout(&tree);
        let id = |i: usize| cgroup_id(&layout[i].1).unwrap();
        let redirector = match Redirector::attach(crate::redirect::RedirectSpec {
            cgroup: tree.root.clone(),
            proxy_v4: Some(std::net::Ipv4Addr::new(192, 0, 2, 1)),
            proxy_v6: None,
            proxy_port: 6443,
        }) {
            Ok(redirector) => Arc::new(redirector),
            Err(error) => {
                println!("SKIPPED: cannot attach the eBPF programs here: {error}");
                return;
            }
        };
        let tracker = PodTracker::new(redirector.clone(), &tree.root);
        let in_map = || {
            redirector
                .agent_cgroups()
                .into_iter()
                .collect::<BTreeSet<_>>()
        };

        tracker.replace_pods(&[
            pod("dev", "agent", UID_A, AGENT),
            pod("dev", "cgroupfs-agent", UID_D, AGENT),
            pod("dev", "web", UID_B, &[]),
        ]);
        assert_eq!(in_map(), [id(0), id(3)].into());
        // Unlabeled: still guarded for the pod's lifetime.
        tracker.apply_pod(&pod("dev", "agent", UID_A, &[]));
        assert_eq!(in_map(), [id(0), id(3)].into());
        tracker.delete_pod(&pod("dev", "agent", UID_A, &[]));
        assert_eq!(in_map(), [id(3)].into());
        tracker.delete_pod(&pod("dev", "cgroupfs-agent", UID_D, AGENT));
        assert!(in_map().is_empty());
    }

    #[test]
    fn kubelet_cgroups_in_a_plain_tree_are_resolved() {
        check_layout_is_resolved(&Tree::plain());
    }

    #[test]
    fn labeling_unlabeling_and_deleting_pods_update_the_agent_map() {
        let tree = Tree::plain();
        let layout = kubelet_layout(&tree);
        let id = |i: usize| cgroup_id(&layout[i].1).unwrap();
        let sink = Arc::new(FakeSink::default());
        let tracker = PodTracker::new(sink.clone(), &tree.root);

        // Only the labeled pod is guarded.
        tracker.replace_pods(&[
            pod("dev", "agent", UID_A, AGENT),
            pod("dev", "web", UID_B, &[]),
            pod("dev", "opted-false", UID_C, &[(INTERCEPT_LABEL, "false")]),
        ]);
        assert_eq!(sink.ids(), [id(0)].into());
        assert_eq!(tracker.guarded_count(), 1);

        // Labeling a pod adds it.
        tracker.apply_pod(&pod("dev", "web", UID_B, AGENT));
        assert_eq!(sink.ids(), [id(0), id(1)].into());

        // Unlabeling (or labeling "false") does not release it: a pod once
        // guarded stays guarded for its lifetime.
        tracker.apply_pod(&pod("dev", "web", UID_B, &[]));
        assert_eq!(sink.ids(), [id(0), id(1)].into());
        tracker.apply_pod(&pod("dev", "web", UID_B, &[(INTERCEPT_LABEL, "false")]));
        assert_eq!(sink.ids(), [id(0), id(1)].into());
        assert!(tracker.pod_for_cgroup(id(1)).is_some());

        // Deleting removes it, and the lookup forgets it.
        tracker.delete_pod(&pod("dev", "web", UID_B, &[]));
        assert_eq!(sink.ids(), [id(0)].into());
        assert_eq!(tracker.pod_for_cgroup(id(1)), None);
        tracker.delete_pod(&pod("dev", "agent", UID_A, AGENT));
        assert!(sink.ids().is_empty());
        assert_eq!(tracker.guarded_count(), 0);
        // A new pod with the uid of a deleted one (never in practice) starts
        // from its own label.
        tracker.apply_pod(&pod("dev", "web", UID_B, &[]));
        assert!(sink.ids().is_empty());
        tracker.delete_pod(&pod("dev", "web", UID_B, &[]));

        // A finished pod's cgroup is released.
        tracker.apply_pod(&pod("dev", "agent", UID_A, AGENT));
        assert_eq!(sink.ids(), [id(0)].into());
        let mut done = pod("dev", "agent", UID_A, AGENT);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        tracker.apply_pod(&done);
        assert!(sink.ids().is_empty());

        // A relist without a pod removes it too.
        tracker.apply_pod(&pod("dev", "agent", UID_A, AGENT));
        tracker.replace_pods(&[pod("dev", "web", UID_B, &[])]);
        assert!(sink.ids().is_empty());
    }

    #[test]
    fn labeling_a_namespace_guards_all_its_pods() {
        let tree = Tree::plain();
        let layout = kubelet_layout(&tree);
        let id = |i: usize| cgroup_id(&layout[i].1).unwrap();
        let sink = Arc::new(FakeSink::default());
        let tracker = PodTracker::new(sink.clone(), &tree.root);
        tracker.replace_pods(&[
            pod("ci", "runner-1", UID_A, &[]),
            pod("ci", "runner-2", UID_B, &[]),
            pod("web", "frontend", UID_C, &[]),
        ]);
        assert!(sink.ids().is_empty());

        tracker.apply_namespace(&namespace("ci", true));
        assert_eq!(sink.ids(), [id(0), id(1)].into());
        // A pod arriving later in the labeled namespace is guarded too.
        tracker.apply_pod(&pod("ci", "runner-3", UID_D, &[]));
        assert_eq!(sink.ids(), [id(0), id(1), id(3)].into());

        // Unlabeling the namespace (the labeled watch reports a delete)
        // leaves its pods guarded for their lifetime; a pod arriving after
        // it is not an agent.
        tracker.delete_namespace(&namespace("ci", false));
        assert_eq!(sink.ids(), [id(0), id(1), id(3)].into());
        tracker.delete_pod(&pod("ci", "runner-3", UID_D, &[]));
        assert_eq!(sink.ids(), [id(0), id(1)].into());

        // Relisting namespaces: only labeled ones count; pods already
        // guarded stay until they are gone (here: a relist without them).
        tracker.replace_namespaces(&[namespace("ci", false), namespace("web", true)]);
        assert_eq!(sink.ids(), [id(0), id(1), id(2)].into());
        tracker.replace_pods(&[pod("web", "frontend", UID_C, &[])]);
        assert_eq!(sink.ids(), [id(2)].into());
        tracker.apply_namespace(&namespace("web", false));
        assert_eq!(sink.ids(), [id(2)].into());
    }

    /// The real-cluster tier found it: a pod labeled `intercept: "false"`
    /// in a labeled namespace was intercepted anyway, though the webhook
    /// gave it no CA (its connections failed, and it could not reach its
    /// kubelet). It opts out as it does for the webhook; a guarded pod
    /// labeled "false" afterwards stays guarded.
    #[test]
    fn a_pod_that_opts_out_of_a_labeled_namespace_is_not_guarded() {
        let tree = Tree::plain();
        let layout = kubelet_layout(&tree);
        let id = |i: usize| cgroup_id(&layout[i].1).unwrap();
        let sink = Arc::new(FakeSink::default());
        let tracker = PodTracker::new(sink.clone(), &tree.root);
        tracker.apply_namespace(&namespace("ci", true));
        tracker.replace_pods(&[
            pod("ci", "runner", UID_A, &[]),
            pod("ci", "tool", UID_B, &[(INTERCEPT_LABEL, "false")]),
        ]);
        assert_eq!(sink.ids(), [id(0)].into());

        tracker.apply_pod(&pod("ci", "runner", UID_A, &[(INTERCEPT_LABEL, "false")]));
        assert_eq!(sink.ids(), [id(0)].into(), "guarded for its lifetime");
    }

    /// A minimal API server for the watch: lists return the objects given
    /// at start, watches stream whatever the test sends. Records every
    /// request's path and query.
    mod fake_api {
        use std::{convert::Infallible, net::Ipv4Addr};

        use bytes::Bytes;
        use http_body_util::{Full, StreamBody, combinators::BoxBody};
        use hyper::{Request, Response, body::Frame, service::service_fn};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use serde_json::{Value, json};
        use tokio::sync::broadcast;

        use super::*;

        pub struct FakeApi {
            pub client: Client,
            pub requests: Arc<Mutex<Vec<String>>>,
            events: broadcast::Sender<(&'static str, String)>,
        }

        impl FakeApi {
            pub async fn start(pods: Vec<Pod>, namespaces: Vec<Namespace>) -> FakeApi {
                let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .await
                    .unwrap();
                let port = listener.local_addr().unwrap().port();
                let requests = Arc::new(Mutex::new(Vec::new()));
                let (events, _) = broadcast::channel(64);
                let lists = Arc::new((
                    list(
                        "PodList",
                        pods.iter().map(|p| serde_json::to_value(p).unwrap()),
                    ),
                    list(
                        "NamespaceList",
                        namespaces.iter().map(|n| serde_json::to_value(n).unwrap()),
                    ),
                ));
                let (seen, tx) = (requests.clone(), events.clone());
                tokio::spawn(async move {
                    loop {
                        let (tcp, _) = listener.accept().await.unwrap();
                        let (seen, tx, lists) = (seen.clone(), tx.clone(), lists.clone());
                        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (seen, tx, lists) = (seen.clone(), tx.clone(), lists.clone());
                            async move {
                                let uri = req.uri().to_string();
                                lock(&seen).push(uri.clone());
                                let kind = if req.uri().path() == "/api/v1/pods" {
                                    "pods"
                                } else {
                                    "namespaces"
                                };
                                let body: BoxBody<Bytes, Infallible> = if uri.contains("watch=true")
                                {
                                    let rx = tx.subscribe();
                                    let stream =
                                        futures::stream::unfold(rx, move |mut rx| async move {
                                            loop {
                                                match rx.recv().await {
                                                    Ok((k, line)) if k == kind => {
                                                        let frame =
                                                            Frame::data(Bytes::from(line + "\n"));
                                                        return Some((Ok(frame), rx));
                                                    }
                                                    Ok(_) => continue,
                                                    Err(_) => return None,
                                                }
                                            }
                                        });
                                    BoxBody::new(StreamBody::new(stream))
                                } else {
                                    let list = if kind == "pods" { &lists.0 } else { &lists.1 };
                                    BoxBody::new(Full::new(Bytes::from(list.to_string())))
                                };
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .header("content-type", "application/json")
                                        .body(body)
                                        .unwrap(),
                                )
                            }
                        });
                        tokio::spawn(async move {
                            let builder =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        });
                    }
                });
                let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
                FakeApi {
                    client: Client::try_from(config).unwrap(),
                    requests,
                    events,
                }
            }

            /// Send a watch event (`ADDED`, `MODIFIED`, `DELETED`).
            pub fn send(&self, kind: &'static str, event: &str, object: Value) {
                let line = json!({"type": event, "object": object}).to_string();
                // Until the watch connects nobody listens; callers wait for it.
                let _ = self.events.send((kind, line));
            }

            pub fn watching(&self, kind: &str) -> bool {
                lock(&self.requests)
                    .iter()
                    .any(|r| r.starts_with(&format!("/api/v1/{kind}?")) && r.contains("watch=true"))
            }
        }

        fn list(kind: &str, items: impl Iterator<Item = Value>) -> Value {
            json!({
                "kind": kind,
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "1"},
                "items": items.collect::<Vec<_>>(),
            })
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting until {what}");
    }

    fn versioned<T: serde::Serialize>(object: &T, version: u32) -> serde_json::Value {
        let mut value = serde_json::to_value(object).unwrap();
        value["metadata"]["resourceVersion"] = version.to_string().into();
        value
    }

    #[tokio::test]
    async fn the_watch_drives_the_agent_map() {
        let tree = Tree::plain();
        let layout = kubelet_layout(&tree);
        let id = |i: usize| cgroup_id(&layout[i].1).unwrap();
        let api = fake_api::FakeApi::start(
            vec![
                pod("dev", "agent", UID_A, AGENT),
                pod("dev", "web", UID_B, &[]),
            ],
            vec![],
        )
        .await;
        let sink = Arc::new(FakeSink::default());
        let tracker = Arc::new(
            PodTracker::new(sink.clone(), &tree.root)
                .with_retry_interval(Duration::from_millis(50)),
        );
        let run = tokio::spawn(tracker.clone().run(api.client.clone(), "node-1"));

        eventually("the listed agent pod is guarded", || {
            sink.ids() == [id(0)].into()
        })
        .await;
        eventually("both watches are open", || {
            api.watching("pods") && api.watching("namespaces")
        })
        .await;
        {
            let requests = lock(&api.requests);
            assert!(
                requests.iter().all(|r| !r.starts_with("/api/v1/pods")
                    || r.contains("fieldSelector=spec.nodeName%3Dnode-1")),
                "{requests:?}"
            );
            assert!(
                requests.iter().any(|r| r.starts_with("/api/v1/namespaces")
                    && r.contains("labelSelector=chaperone.dev%2Fintercept%3Dtrue")),
                "{requests:?}"
            );
        }

        // Labeling a pod.
        api.send(
            "pods",
            "MODIFIED",
            versioned(&pod("dev", "web", UID_B, AGENT), 2),
        );
        eventually("the labeled pod is guarded", || {
            sink.ids() == [id(0), id(1)].into()
        })
        .await;

        // Deleting a pod.
        api.send(
            "pods",
            "DELETED",
            versioned(&pod("dev", "agent", UID_A, AGENT), 3),
        );
        eventually("the deleted pod is released", || {
            sink.ids() == [id(1)].into()
        })
        .await;

        // A new pod in a namespace that then gets labeled.
        api.send(
            "pods",
            "ADDED",
            versioned(&pod("ci", "runner", UID_C, &[]), 4),
        );
        api.send("namespaces", "ADDED", versioned(&namespace("ci", true), 5));
        eventually("the labeled namespace's pod is guarded", || {
            sink.ids() == [id(1), id(2)].into()
        })
        .await;
        assert_eq!(tracker.pod_for_cgroup(id(2)).unwrap().name, "runner");

        // An agent pod scheduled before its cgroup exists is retried.
        let late = "66666666-6666-4666-8666-666666666666";
        api.send(
            "pods",
            "ADDED",
            versioned(&pod("dev", "late", late, AGENT), 6),
        );
        eventually("the pod is reported unresolved", || {
            tracker.unresolved_count() == 1
        })
        .await;
        let dir = tree.mkdir(&format!("kubepods/besteffort/pod{late}"));
        eventually("the retry finds it", || {
            sink.ids().contains(&cgroup_id(&dir).unwrap()) && tracker.unresolved_count() == 0
        })
        .await;
        run.abort();
    }

    #[test]
    fn a_pod_without_a_cgroup_is_reported_and_retried_until_found() {
        let tree = Tree::plain();
        let sink = Arc::new(FakeSink::default());
        let tracker = PodTracker::new(sink.clone(), &tree.root);

        tracker.apply_pod(&pod("dev", "agent", UID_A, AGENT));
        assert!(sink.ids().is_empty());
        assert_eq!(tracker.unresolved_count(), 1);
        let unresolved = &tracker.unresolved()[0];
        assert_eq!(unresolved.pod.name, "agent");
        assert!(unresolved.reason.contains(UID_A), "{}", unresolved.reason);
        tracker.reconcile();
        assert_eq!(tracker.unresolved()[0].attempts, 2);

        // The kubelet starts the sandbox; the next retry finds it.
        let dir = tree.mkdir(&format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            underscored(UID_A)
        ));
        tracker.reconcile();
        assert_eq!(tracker.unresolved_count(), 0);
        assert_eq!(sink.ids(), [cgroup_id(&dir).unwrap()].into());

        // A failing map update is reported the same way, never dropped.
        let tracker = PodTracker::new(sink.clone(), &tree.root);
        sink.fail_adds
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracker.apply_pod(&pod("dev", "agent", UID_A, AGENT));
        assert_eq!(tracker.guarded_count(), 0);
        assert!(tracker.unresolved()[0].reason.contains("map is full"));
        sink.fail_adds
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracker.reconcile();
        assert_eq!(tracker.guarded_count(), 1);
        assert_eq!(tracker.unresolved_count(), 0);

        // An agent pod stays one when it loses its label (it is guarded for
        // its lifetime), so it is still reported; once deleted it is not.
        let tracker = PodTracker::new(sink.clone(), tree.root.join("nowhere"));
        tracker.apply_pod(&pod("dev", "agent", UID_B, AGENT));
        assert_eq!(tracker.unresolved_count(), 1);
        tracker.apply_pod(&pod("dev", "agent", UID_B, &[]));
        assert_eq!(tracker.unresolved_count(), 1);
        tracker.delete_pod(&pod("dev", "agent", UID_B, &[]));
        assert_eq!(tracker.unresolved_count(), 0);
    }
}

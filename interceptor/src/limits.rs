//! Per-pod limits: how many connections and how many requests in flight
//! (watches and other streams included) one agent pod may hold on this
//! node's proxy, so one agent cannot exhaust the memory every agent on the
//! node relies on. Past a limit the agent gets a 429 `Status` with
//! `Retry-After`, as the API server's own flow control answers.
//!
//! The key is what the kernel attested for the connection (the pod's uid,
//! or the agent cgroup where no pod is known), never anything the request
//! says. Connections the kernel did not attest (local mode, tests) are not
//! limited.
//!
//! The map of pods is touched when a connection opens and when it ends;
//! a request only counts itself on its connection's [`ConnectionSlot`]
//! (one atomic operation on the pod's counter, no lock).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{identity::PodUid, kstatus::Status, redirect::CgroupId};

/// Connections one pod may hold unless configured (about 50 KiB each).
pub const DEFAULT_CONNECTIONS_PER_POD: usize = 256;
/// Requests one pod may have in flight unless configured, watches and
/// followed logs included (a controller-like agent with a thousand watches
/// fits).
pub const DEFAULT_REQUESTS_PER_POD: usize = 2048;
/// What `Retry-After` says.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// The limits; 0 means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitConfig {
    pub connections_per_pod: usize,
    pub requests_per_pod: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            connections_per_pod: DEFAULT_CONNECTIONS_PER_POD,
            requests_per_pod: DEFAULT_REQUESTS_PER_POD,
        }
    }
}

/// Whose usage a connection counts against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Pod(PodUid),
    Cgroup(CgroupId),
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::Pod(uid) => write!(f, "pod {uid}"),
            LimitKey::Cgroup(id) => write!(f, "cgroup {id}"),
        }
    }
}

/// One pod's live usage, shared by its connections.
#[derive(Default)]
struct Usage {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

/// The live usage of every pod with a connection open.
pub struct PodLimits {
    config: LimitConfig,
    pods: Mutex<HashMap<LimitKey, Arc<Usage>>>,
}

/// One counted connection: its pod's usage, held until the connection and
/// every request counted on it have ended.
pub struct ConnectionSlot {
    limits: Arc<PodLimits>,
    key: LimitKey,
    usage: Arc<Usage>,
}

/// One counted request in flight; released on drop.
pub struct RequestSlot {
    connection: Arc<ConnectionSlot>,
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnectionSlot({})", self.key)
    }
}

impl std::fmt::Debug for RequestSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestSlot({})", self.connection.key)
    }
}

impl PodLimits {
    pub fn new(config: LimitConfig) -> Arc<Self> {
        Arc::new(PodLimits {
            config,
            pods: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> LimitConfig {
        self.config
    }

    /// Counts a connection of `key` (when it is accepted), or says why not.
    pub fn connection(self: &Arc<Self>, key: LimitKey) -> Result<Arc<ConnectionSlot>, Box<Status>> {
        let limit = self.config.connections_per_pod;
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let usage = pods.entry(key.clone()).or_default().clone();
        if take(&usage.connections, limit).is_err() {
            if usage.connections.load(Ordering::Acquire) == 0
                && usage.requests.load(Ordering::Acquire) == 0
            {
                pods.remove(&key);
            }
            return Err(Box::new(too_many(format!(
                "chaperone: this pod already has {limit} connections through chaperone, its \
                 per-pod limit; close some or retry later"
            ))));
        }
        Ok(Arc::new(ConnectionSlot {
            limits: self.clone(),
            key,
            usage,
        }))
    }

    /// `(connections, requests)` of `key` now.
    pub fn usage(&self, key: &LimitKey) -> (usize, usize) {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.get(key).map_or((0, 0), |u| {
            (
                u.connections.load(Ordering::Acquire),
                u.requests.load(Ordering::Acquire),
            )
        })
    }

    /// How many pods have usage recorded (entries leave at zero).
    pub fn tracked(&self) -> usize {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl ConnectionSlot {
    /// Counts a request in flight on this connection against its pod, or
    /// says why not. No lock: one atomic operation on the pod's counter.
    pub fn request(self: &Arc<Self>) -> Result<RequestSlot, Box<Status>> {
        let limit = self.limits.config.requests_per_pod;
        match take(&self.usage.requests, limit) {
            Ok(()) => Ok(RequestSlot {
                connection: self.clone(),
            }),
            Err(()) => Err(Box::new(too_many(format!(
                "chaperone: this pod already has {limit} requests in flight (watches included) \
                 through chaperone, its per-pod limit; close some or retry later"
            )))),
        }
    }
}

/// Adds one to `count` unless it is at `limit` (0: unlimited).
fn take(count: &AtomicUsize, limit: usize) -> Result<(), ()> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (limit == 0 || n < limit).then_some(n + 1)
        })
        .map(drop)
        .map_err(drop)
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.connection
            .usage
            .requests
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ConnectionSlot {
    /// Runs after every request counted on the connection has ended (each
    /// holds the slot), so a pod whose last connection ends has no usage
    /// left and leaves the map.
    fn drop(&mut self) {
        let mut pods = self.limits.pods.lock().unwrap_or_else(|p| p.into_inner());
        let left = self.usage.connections.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0
            && self.usage.requests.load(Ordering::Acquire) == 0
            && pods
                .get(&self.key)
                .is_some_and(|usage| Arc::ptr_eq(usage, &self.usage))
        {
            pods.remove(&self.key);
        }
    }
}

/// A 429 `Status` with `retryAfterSeconds`, as the API server's.
pub fn too_many(message: impl Into<String>) -> Status {
    let mut status = Status::new(429, "TooManyRequests", message);
    status.retry_after_seconds = Some(RETRY_AFTER_SECONDS);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_pod_and_release_on_drop() {
        let limits = PodLimits::new(LimitConfig {
            connections_per_pod: 2,
            requests_per_pod: 3,
        });
        let a = LimitKey::Pod("a".into());
        let b = LimitKey::Pod("b".into());
        let c1 = limits.connection(a.clone()).unwrap();
        let c2 = limits.connection(a.clone()).unwrap();
        let refused = limits.connection(a.clone()).unwrap_err();
        assert_eq!(refused.code, 429);
        assert_eq!(refused.reason, "TooManyRequests");
        assert_eq!(refused.retry_after_seconds, Some(RETRY_AFTER_SECONDS));
        assert!(
            refused.message.contains("2 connections"),
            "{}",
            refused.message
        );
        // Another pod is not affected.
        let _b = limits.connection(b.clone()).unwrap();
        drop(c1);
        let c3 = limits.connection(a.clone()).unwrap();

        // Requests count per pod, whichever of its connections carries them.
        let mut requests: Vec<RequestSlot> = (0..2).map(|_| c2.request().unwrap()).collect();
        requests.push(c3.request().unwrap());
        let refused = c2.request().unwrap_err();
        assert_eq!(refused.code, 429);
        assert!(
            refused.message.contains("3 requests"),
            "{}",
            refused.message
        );
        assert!(c3.request().is_err());
        assert_eq!(limits.usage(&a), (2, 3));
        drop(requests);
        assert_eq!(limits.usage(&a), (2, 0));
    }

    #[test]
    fn a_connection_stays_counted_until_its_last_request_ends() {
        let limits = PodLimits::new(LimitConfig {
            connections_per_pod: 1,
            requests_per_pod: 0,
        });
        let key = LimitKey::Pod("a".into());
        let connection = limits.connection(key.clone()).unwrap();
        let watch = connection.request().unwrap();
        // The connection ended; its watch's body is still being dropped.
        drop(connection);
        assert_eq!(limits.usage(&key), (1, 1));
        assert!(limits.connection(key.clone()).is_err());
        drop(watch);
        assert_eq!(limits.usage(&key), (0, 0));
        assert_eq!(limits.tracked(), 0);
        assert!(limits.connection(key).is_ok());
    }

    #[test]
    fn entries_leave_at_zero_and_zero_means_unlimited() {
        let limits = PodLimits::new(LimitConfig {
            connections_per_pod: 0,
            requests_per_pod: 1,
        });
        let slots: Vec<Arc<ConnectionSlot>> = (0..1000)
            .map(|i| {
                limits
                    .connection(LimitKey::Cgroup(CgroupId(i % 3)))
                    .unwrap()
            })
            .collect();
        assert_eq!(limits.tracked(), 3);
        drop(slots);
        assert_eq!(limits.tracked(), 0);
        let seven = limits.connection(LimitKey::Cgroup(CgroupId(7))).unwrap();
        let eight = limits.connection(LimitKey::Cgroup(CgroupId(8))).unwrap();
        let _one = seven.request().unwrap();
        assert!(seven.request().is_err());
        assert!(eight.request().is_ok());
        assert_eq!(limits.tracked(), 2);
    }
}

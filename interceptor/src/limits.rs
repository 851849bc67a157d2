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

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::kstatus::Status;

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
    Pod(Arc<str>),
    Cgroup(u64),
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::Pod(uid) => write!(f, "pod {uid}"),
            LimitKey::Cgroup(id) => write!(f, "cgroup {id}"),
        }
    }
}

#[derive(Default)]
struct Usage {
    connections: usize,
    requests: usize,
}

/// The live usage of every pod with a connection open.
pub struct PodLimits {
    config: LimitConfig,
    usage: Mutex<HashMap<LimitKey, Usage>>,
}

/// Which count a slot holds.
#[derive(Clone, Copy)]
enum Kind {
    Connection,
    Request,
}

/// One counted connection or request; released on drop.
pub struct Slot {
    limits: Arc<PodLimits>,
    key: LimitKey,
    kind: Kind,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({})", self.key)
    }
}

impl PodLimits {
    pub fn new(config: LimitConfig) -> Arc<Self> {
        Arc::new(PodLimits {
            config,
            usage: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> LimitConfig {
        self.config
    }

    /// Counts a connection of `key`, or says why not.
    pub fn connection(self: &Arc<Self>, key: LimitKey) -> Result<Slot, Box<Status>> {
        self.take(key, Kind::Connection)
    }

    /// Counts a request in flight for `key`, or says why not.
    pub fn request(self: &Arc<Self>, key: LimitKey) -> Result<Slot, Box<Status>> {
        self.take(key, Kind::Request)
    }

    fn take(self: &Arc<Self>, key: LimitKey, kind: Kind) -> Result<Slot, Box<Status>> {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let entry = usage.entry(key.clone()).or_default();
        let (count, limit, what) = match kind {
            Kind::Connection => (
                &mut entry.connections,
                self.config.connections_per_pod,
                "connections",
            ),
            Kind::Request => (
                &mut entry.requests,
                self.config.requests_per_pod,
                "requests in flight (watches included)",
            ),
        };
        if limit > 0 && *count >= limit {
            let empty = entry.connections == 0 && entry.requests == 0;
            if empty {
                usage.remove(&key);
            }
            return Err(Box::new(too_many(format!(
                "chaperone: this pod already has {limit} {what} through chaperone, its per-pod limit; \
                 close some or retry later"
            ))));
        }
        *count += 1;
        Ok(Slot {
            limits: self.clone(),
            key,
            kind,
        })
    }

    /// `(connections, requests)` of `key` now.
    pub fn usage(&self, key: &LimitKey) -> (usize, usize) {
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        usage
            .get(key)
            .map_or((0, 0), |u| (u.connections, u.requests))
    }

    /// How many pods have usage recorded (entries leave at zero).
    pub fn tracked(&self) -> usize {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut usage = self.limits.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = usage.get_mut(&self.key) {
            match self.kind {
                Kind::Connection => entry.connections = entry.connections.saturating_sub(1),
                Kind::Request => entry.requests = entry.requests.saturating_sub(1),
            }
            if entry.connections == 0 && entry.requests == 0 {
                usage.remove(&self.key);
            }
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
        let _c2 = limits.connection(a.clone()).unwrap();
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
        let _c3 = limits.connection(a.clone()).unwrap();

        let requests: Vec<Slot> = (0..3).map(|_| limits.request(a.clone()).unwrap()).collect();
        assert_eq!(limits.request(a.clone()).unwrap_err().code, 429);
        assert_eq!(limits.usage(&a), (2, 3));
        drop(requests);
        assert_eq!(limits.usage(&a), (2, 0));
    }

    #[test]
    fn entries_leave_at_zero_and_zero_means_unlimited() {
        let limits = PodLimits::new(LimitConfig {
            connections_per_pod: 0,
            requests_per_pod: 1,
        });
        let slots: Vec<Slot> = (0..1000)
            .map(|i| limits.connection(LimitKey::Cgroup(i % 3)).unwrap())
            .collect();
        assert_eq!(limits.tracked(), 3);
        drop(slots);
        assert_eq!(limits.tracked(), 0);
        let _one = limits.request(LimitKey::Cgroup(7)).unwrap();
        assert!(limits.request(LimitKey::Cgroup(7)).is_err());
        assert!(limits.request(LimitKey::Cgroup(8)).is_ok());
        assert_eq!(limits.tracked(), 1);
    }
}

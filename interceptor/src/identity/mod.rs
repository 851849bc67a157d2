//! Who is calling: the kernel-attested pod and process, and the verified
//! token, bound together into one [`Caller`] that policy, masking, approval,
//! recording and audit all use. Token verification is built by the identity
//! issue (#4); this file fixes the types.

use std::collections::BTreeMap;

/// The pod a connection came from, as the pod tracker resolved it from the
/// kernel-attested cgroup id.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

/// The process that opened the connection, from the kernel record and
/// `/proc` at accept time.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub uid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    /// `/proc/PID/exe`, when it could still be read.
    pub executable: String,
    /// Parents, nearest first: `(pid, comm)`.
    pub parents: Vec<(u32, String)>,
}

/// The authenticated caller of one request.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Caller {
    /// `system:serviceaccount:NS:NAME` for service accounts.
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// The kernel-attested pod, when the connection came through the redirect.
    pub pod: Option<PodRef>,
    pub process: Option<ProcessInfo>,
    /// The cgroup id the kernel recorded for the connection.
    pub cgroup_id: Option<u64>,
}

impl Caller {
    /// `(namespace, name)` when the username is a service account's.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_is_split_from_the_username() {
        let caller = Caller {
            username: "system:serviceaccount:agents:coder".into(),
            ..Caller::default()
        };
        assert_eq!(caller.service_account(), Some(("agents", "coder")));
        let user = Caller {
            username: "alice".into(),
            ..Caller::default()
        };
        assert_eq!(user.service_account(), None);
    }
}

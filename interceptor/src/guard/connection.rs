//! What the guard keeps for one agent connection: made once when the proxy
//! accepts the connection (after the kernel attested it and TLS was
//! set up), owned by that connection and by its requests still in flight,
//! dropped when the last of them ends. Nothing here is shared between
//! connections except the pod's limit counter, taken once, here.

use std::sync::Arc;

use time::OffsetDateTime;

use super::GuardParts;
use crate::{
    identity::{PodRef, ProcessInfo},
    kstatus::Status,
    limits::{ConnectionSlot, LimitKey, PodLimits},
    proxy::ConnectionInfo,
    record::{Session, SessionMeta},
    redirect::{AgentAddr, CgroupId},
};

/// One agent connection, as the guard knows it.
pub struct Connection {
    /// The pod the kernel-attested cgroup belongs to.
    pub(super) pod: Option<PodRef>,
    /// The process that dialed, read from `/proc` at accept while it is
    /// still there (`None`: it already exited, or no attestation).
    pub(super) process: Option<ProcessInfo>,
    /// The caller's own cgroup, as the kernel recorded it.
    pub(super) cgroup_id: Option<CgroupId>,
    pub(super) peer: AgentAddr,
    /// The recording of this connection.
    pub(super) session: Option<Session>,
    /// The connection's place in its pod's connection limit (`None`: not
    /// limited), or the 429 every request on it gets when the pod is over it.
    pub(super) limit: Result<Option<Arc<ConnectionSlot>>, Box<Status>>,
}

impl Connection {
    pub(super) fn open(parts: &GuardParts, limits: &Arc<PodLimits>, info: &ConnectionInfo) -> Self {
        let pod = info.attested.as_ref().and_then(|attested| {
            let pods = parts.pods.as_ref()?;
            pods.pod_for_cgroup(attested.agent_cgroup_id)
                .or_else(|| pods.pod_for_cgroup(attested.cgroup_id))
        });
        let process = info
            .attested
            .as_ref()
            .and_then(|attested| ProcessInfo::from_proc(attested.pid).ok());
        let session = parts.recorder.as_ref().map(|recorder| {
            recorder.session(SessionMeta {
                pod: pod.clone(),
                peer: info.peer,
                started: OffsetDateTime::from(info.accepted_at),
            })
        });
        let limit_key = match (&pod, &info.attested) {
            (Some(pod), _) if !pod.uid.is_empty() => Some(LimitKey::Pod(pod.uid.clone())),
            (_, Some(attested)) => Some(LimitKey::Cgroup(attested.agent_cgroup_id)),
            _ => None,
        };
        let limit = limit_key.map(|key| limits.connection(key)).transpose();
        Connection {
            pod,
            process,
            cgroup_id: info.attested.as_ref().map(|a| a.cgroup_id),
            peer: info.peer,
            session,
            limit,
        }
    }
}

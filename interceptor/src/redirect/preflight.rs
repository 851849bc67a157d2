//! What the kernel and this process must offer before the programs load, and
//! what to tell the user when they do not.

use std::{fs, path::PathBuf};

use super::cgroupfs;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The facts `chaperone check` prints and error hints are built from.
#[derive(Clone, Debug)]
pub struct Preflight {
    pub kernel: String,
    pub cgroup2_mount: Option<PathBuf>,
    pub effective_capabilities: u64,
    pub missing_capabilities: Vec<&'static str>,
    /// `/proc/sys/kernel/unprivileged_bpf_disabled`, if readable.
    pub unprivileged_bpf_disabled: Option<String>,
}

impl Preflight {
    pub fn ready(&self) -> bool {
        self.cgroup2_mount.is_some() && self.missing_capabilities.is_empty()
    }
}

pub fn preflight() -> Preflight {
    let effective = effective_capabilities().unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    // CAP_BPF + CAP_PERFMON (5.8+) or CAP_SYS_ADMIN load programs; attaching
    // to cgroups needs CAP_NET_ADMIN.
    if !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !(has(CAP_PERFMON) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    Preflight {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into()),
        cgroup2_mount: cgroupfs::cgroup2_mount().ok(),
        effective_capabilities: effective,
        missing_capabilities: missing,
        unprivileged_bpf_disabled: fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
            .ok()
            .map(|s| s.trim().to_owned()),
    }
}

/// One sentence that says what to check, for load and attach errors.
pub(crate) fn hint() -> String {
    let facts = preflight();
    if !facts.missing_capabilities.is_empty() {
        return format!(
            "This process lacks {}: run as root, or give the node agent these capabilities \
             (the DaemonSet in deploy/ does)",
            facts.missing_capabilities.join(", ")
        );
    }
    if facts.cgroup2_mount.is_none() {
        return "No cgroup v2 hierarchy is mounted; chaperone attaches to cgroup v2".into();
    }
    format!(
        "Kernel {} must support cgroup sock_addr hooks (connect4/6 since 4.17, getpeername4/6 \
         since 5.8), sock_ops and LRU hash maps; run `chaperone check` for details",
        facts.kernel
    )
}

fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so map
/// creation does not fail there. Newer kernels use memory cgroups instead.
pub(crate) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, initialized struct.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if result != 0 {
        tracing::debug!("could not lift RLIMIT_MEMLOCK; fine on kernels 5.11 and later");
    }
}

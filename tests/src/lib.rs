//! Chaperone's test fixtures: the test topology (agent network namespaces and
//! cgroups on this machine) and the API-server simulator ([`sim`], also run
//! standalone as the `kube-sim` binary).

pub mod bench;
pub mod e2e;
pub mod inprocess;
pub mod load;
pub mod prom;
pub mod real_api;
pub mod sim;
pub mod topology;

/// `true` when running as root. Tests that need the kernel (eBPF, network
/// namespaces, cgroups) call [`require_root!`] and skip with a clear line
/// otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the calling test (returns early) with a clear message when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIPPED {}: needs root (eBPF, network namespaces and cgroups); CI runs as root",
                module_path!()
            );
            return;
        }
    };
}

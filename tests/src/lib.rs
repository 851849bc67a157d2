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
pub mod wait;

/// `true` when running as root. Tests that need the kernel (eBPF, network
/// namespaces, cgroups) call [`require_root!`] and skip with a clear line
/// otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the calling test (returns early) with a clear message when not root.
/// Under CI (`CI=true`), which runs as root, it fails instead: a kernel
/// test that cannot run there proves nothing.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            $crate::skip!(
                ci_fails,
                "needs root (eBPF, network namespaces and cgroups); CI runs as root"
            );
        }
    };
}

/// The one way a test skips: prints `SKIPPED <test module>: <why>` and
/// returns from the test. `skip!(ci_fails, ...)` is for a prerequisite CI
/// provides (root, a tool `cargo xtask setup` installs, the real API
/// server): under CI (`CI=true`) its absence fails the test instead.
#[macro_export]
macro_rules! skip {
    (ci_fails, $($why:tt)+) => {{
        let why = format!($($why)+);
        if $crate::real_api::in_ci() {
            panic!("{why} (under CI this test must run, not skip)");
        }
        eprintln!("SKIPPED {}: {why}", module_path!());
        return;
    }};
    ($($why:tt)+) => {{
        eprintln!("SKIPPED {}: {}", module_path!(), format!($($why)+));
        return;
    }};
}

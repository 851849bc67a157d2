//! The kernel side of the data path, seen from userspace: load chaperone's
//! eBPF programs, attach them at a cgroup, keep their maps, and claim the
//! kernel's record of each redirected connection when the proxy accepts it.
//!
//! - [`cgroupfs`]: where cgroup v2 is mounted (hybrid layouts included) and
//!   cgroup ids.
//! - [`addr`]: the typed addresses that go in and out of the maps.
//! - [`loader`]: [`Redirector`], the loaded and attached programs.
//! - [`pin`]: the pinned links and maps that outlive a fail-closed node
//!   agent, and `chaperone detach`.

pub mod addr;
#[allow(unsafe_code)] // raw bpf(2) calls aya does not wrap
mod bpf_sys;
pub mod cgroupfs;
mod loader;
pub mod pin;
#[allow(unsafe_code)] // setrlimit(RLIMIT_MEMLOCK) before loading programs
mod preflight;

pub use addr::{AgentAddr, AttestedConnection, CgroupId, OrigDst, ProxyAddr, RefusedDestination};
pub use cgroupfs::{CgroupMountError, cgroup2_mount, cgroup2_root_at};
pub use loader::{Lifetime, RedirectCounters, RedirectError, RedirectSpec, Redirector};
pub use pin::{DetachRefusal, DetachReport, PinDir, detach_all};
pub use preflight::{Preflight, preflight};

//! The kernel side of the data path, seen from userspace: load chaperone's
//! eBPF programs, attach them at a cgroup, keep their maps, and claim the
//! kernel's record of each redirected connection when the proxy accepts it.
//!
//! - [`cgroupfs`]: where cgroup v2 is mounted (hybrid layouts included) and
//!   cgroup ids.
//! - [`addr`]: the typed addresses that go in and out of the maps.
//! - [`loader`]: [`Redirector`], the loaded and attached programs.

pub mod addr;
pub mod cgroupfs;
mod loader;
mod preflight;

pub use addr::{AttestedConnection, CgroupId, OrigDst, RefusedDestination};
pub use cgroupfs::{CgroupMountError, cgroup2_mount};
pub use loader::{RedirectCounters, RedirectError, RedirectSpec, Redirector};
pub use preflight::{Preflight, preflight};

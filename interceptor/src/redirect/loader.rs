//! [`Redirector`]: chaperone's eBPF programs, loaded, attached at one cgroup,
//! with typed access to their maps.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use interceptor_ebpf::{ConnKey, OrigRecord, RedirectConfig, SockAddrKey, counter, names};

use super::{
    addr::{AttestedConnection, CgroupId, RefusedDestination, conn_key, sock_addr_key},
    preflight,
};

/// The compiled programs, embedded at build time (see `interceptor/build.rs`).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor-ebpf"));

/// On kernels with BPF links (5.7+, which aya uses there) a cgroup link is
/// always multi-attach and the kernel wants no flags: `Single` is flags 0.
/// Chaperone's programs therefore coexist with other cgroup programs (CNIs).
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Where and how to redirect.
#[derive(Clone, Debug)]
pub struct RedirectSpec {
    /// The cgroup (v2) directory to attach at: the hierarchy's root in
    /// production, a test subtree in tests.
    pub cgroup: PathBuf,
    /// The proxy's address for IPv4 (and IPv4-mapped) targets. Never
    /// 127.0.0.1: from a pod's network namespace that is the pod itself.
    pub proxy_v4: Option<Ipv4Addr>,
    /// The proxy's address for IPv6 targets.
    pub proxy_v6: Option<Ipv6Addr>,
    pub proxy_port: u16,
    /// `SO_MARK` of chaperone's own sockets; they are never redirected.
    pub mark: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot open the cgroup {path} to attach to: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("cannot load chaperone's eBPF programs: {source}. {hint}")]
    Load {
        source: Box<aya::EbpfError>,
        hint: String,
    },
    #[error("the eBPF object has no {what} `{name}`: the binary was built from mismatched sources")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("cannot load or attach the eBPF program `{program}`: {source}. {hint}")]
    Program {
        program: &'static str,
        source: Box<aya::programs::ProgramError>,
        hint: String,
    },
    #[error("eBPF map `{map}` refused an update: {source}")]
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("the proxy spec has no address: set an IPv4 and/or IPv6 proxy address")]
    NoProxyAddress,
}

/// Counters kept by the programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectCounters {
    pub redirected: u64,
    pub refused: u64,
    pub no_proxy: u64,
    pub marked_skipped: u64,
    pub connections_recorded: u64,
    pub peername_rewritten: u64,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Redirector {
    spec: RedirectSpec,
    agent_cgroups: Mutex<HashMap<MapData, u64, u32>>,
    targets: Mutex<HashMap<MapData, SockAddrKey, u8>>,
    refused: Mutex<HashMap<MapData, SockAddrKey, u8>>,
    connections: Mutex<HashMap<MapData, ConnKey, OrigRecord>>,
    counters: PerCpuArray<MapData, u64>,
    // Owns the programs and their links: dropped last, it detaches them.
    _ebpf: Ebpf,
}

impl Redirector {
    /// Loads the programs, configures the proxy address, and attaches
    /// connect4/6, getpeername4/6 and sock_ops at `spec.cgroup`. Nothing is
    /// redirected until agent cgroups and targets are added.
    pub fn attach(spec: RedirectSpec) -> Result<Self, RedirectError> {
        if spec.proxy_v4.is_none() && spec.proxy_v6.is_none() {
            return Err(RedirectError::NoProxyAddress);
        }
        preflight::raise_memlock_limit();
        let cgroup = File::open(&spec.cgroup).map_err(|source| RedirectError::Cgroup {
            path: spec.cgroup.clone(),
            source,
        })?;
        let mut ebpf = Ebpf::load(PROGRAMS).map_err(|source| RedirectError::Load {
            hint: preflight::hint(),
            source: Box::new(source),
        })?;
        // aya-log events (debug lines from the programs) go to `tracing` via
        // the `log` bridge. Without the logger the programs still run.
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(error) => tracing::debug!(%error, "eBPF log events are not available"),
        }

        let mut config: Array<MapData, RedirectConfig> = take_map(&mut ebpf, names::CONFIG)?;
        config
            .set(0, redirect_config(&spec), 0)
            .map_err(|source| RedirectError::Map {
                map: names::CONFIG,
                source: Box::new(source),
            })?;

        for name in [
            names::CONNECT4,
            names::CONNECT6,
            names::GETPEERNAME4,
            names::GETPEERNAME6,
        ] {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(RedirectError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| program_error(name, source))?;
            program
                .load()
                .map_err(|source| program_error(name, source))?;
            program
                .attach(&cgroup, ATTACH_MODE)
                .map_err(|source| program_error(name, source))?;
        }
        let sock_ops: &mut SockOps = ebpf
            .program_mut(names::SOCK_OPS)
            .ok_or(RedirectError::Missing {
                what: "program",
                name: names::SOCK_OPS,
            })?
            .try_into()
            .map_err(|source| program_error(names::SOCK_OPS, source))?;
        sock_ops
            .load()
            .map_err(|source| program_error(names::SOCK_OPS, source))?;
        sock_ops
            .attach(&cgroup, ATTACH_MODE)
            .map_err(|source| program_error(names::SOCK_OPS, source))?;

        let redirector = Redirector {
            agent_cgroups: Mutex::new(take_map(&mut ebpf, names::AGENT_CGROUPS)?),
            targets: Mutex::new(take_map(&mut ebpf, names::TARGETS)?),
            refused: Mutex::new(take_map(&mut ebpf, names::REFUSED)?),
            connections: Mutex::new(take_map(&mut ebpf, names::CONNECTIONS)?),
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            spec,
            _ebpf: ebpf,
        };
        tracing::info!(
            cgroup = %redirector.spec.cgroup.display(),
            proxy_v4 = ?redirector.spec.proxy_v4,
            proxy_v6 = ?redirector.spec.proxy_v6,
            proxy_port = redirector.spec.proxy_port,
            "eBPF redirect attached"
        );
        Ok(redirector)
    }

    pub fn spec(&self) -> &RedirectSpec {
        &self.spec
    }

    /// Guard the processes of this cgroup and of every cgroup below it.
    pub fn add_agent_cgroup(&self, id: CgroupId) -> Result<(), RedirectError> {
        lock(&self.agent_cgroups)
            .insert(id.0, 1, 0)
            .map_err(|source| RedirectError::Map {
                map: names::AGENT_CGROUPS,
                source: Box::new(source),
            })
    }

    /// Stop guarding a cgroup. Removing one that is not there is not an error.
    pub fn remove_agent_cgroup(&self, id: CgroupId) -> Result<(), RedirectError> {
        remove_if_present(&self.agent_cgroups, &id.0, names::AGENT_CGROUPS)
    }

    pub fn agent_cgroups(&self) -> Vec<CgroupId> {
        lock(&self.agent_cgroups)
            .keys()
            .filter_map(Result::ok)
            .map(CgroupId)
            .collect()
    }

    /// Redirect agent connections to this API-server address.
    pub fn add_target(&self, addr: SocketAddr) -> Result<(), RedirectError> {
        lock(&self.targets)
            .insert(sock_addr_key(addr), 1, 0)
            .map_err(|source| RedirectError::Map {
                map: names::TARGETS,
                source: Box::new(source),
            })
    }

    pub fn remove_target(&self, addr: SocketAddr) -> Result<(), RedirectError> {
        remove_if_present(&self.targets, &sock_addr_key(addr), names::TARGETS)
    }

    /// Make agent connections to this destination fail with `EPERM`.
    pub fn refuse(&self, destination: RefusedDestination) -> Result<(), RedirectError> {
        lock(&self.refused)
            .insert(destination.key(), 1, 0)
            .map_err(|source| RedirectError::Map {
                map: names::REFUSED,
                source: Box::new(source),
            })
    }

    pub fn unrefuse(&self, destination: RefusedDestination) -> Result<(), RedirectError> {
        remove_if_present(&self.refused, &destination.key(), names::REFUSED)
    }

    /// Claims the kernel's record of an accepted connection (`peer` is the
    /// agent's side, `local` the proxy's). The record is removed: each
    /// connection is attested once. `None` when the connection was not
    /// redirected by these programs.
    pub fn take_connection(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<AttestedConnection> {
        let key = conn_key(normalize(peer), normalize(local));
        let mut connections = lock(&self.connections);
        let record = connections.get(&key, 0).ok()?;
        // Already read; a failed delete only leaves an entry the LRU ages out.
        let _ = connections.remove(&key);
        Some(record.into())
    }

    pub fn counters(&self) -> RedirectCounters {
        let sum = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        RedirectCounters {
            redirected: sum(counter::REDIRECTED),
            refused: sum(counter::REFUSED),
            no_proxy: sum(counter::NO_PROXY),
            marked_skipped: sum(counter::MARKED_SKIPPED),
            connections_recorded: sum(counter::CONNECTIONS_RECORDED),
            peername_rewritten: sum(counter::PEERNAME_REWRITTEN),
        }
    }
}

fn redirect_config(spec: &RedirectSpec) -> RedirectConfig {
    let mut flags = 0;
    if spec.proxy_v4.is_some() {
        flags |= RedirectConfig::HAS_V4;
    }
    if spec.proxy_v6.is_some() {
        flags |= RedirectConfig::HAS_V6;
    }
    RedirectConfig {
        proxy_v4: spec.proxy_v4.map(|ip| ip.octets()).unwrap_or_default(),
        proxy_v6: spec.proxy_v6.map(|ip| ip.octets()).unwrap_or_default(),
        proxy_port: spec.proxy_port,
        _pad: 0,
        mark: spec.mark,
        flags,
    }
}

/// An IPv4-mapped IPv6 socket address (a dual-stack listener's view) is the
/// IPv4 address it maps.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, RedirectError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(RedirectError::Missing { what: "map", name })?;
    M::try_from(map).map_err(|source| RedirectError::Map {
        map: name,
        source: Box::new(source),
    })
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &Mutex<HashMap<MapData, K, V>>,
    key: &K,
    name: &'static str,
) -> Result<(), RedirectError> {
    match lock(map).remove(key) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(RedirectError::Map {
            map: name,
            source: Box::new(source),
        }),
    }
}

/// Map handles are only touched for one syscall at a time; a poisoned lock
/// (a panic elsewhere mid-syscall) leaves the handle itself intact.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn program_error(program: &'static str, source: aya::programs::ProgramError) -> RedirectError {
    RedirectError::Program {
        program,
        hint: preflight::hint(),
        source: Box::new(source),
    }
}

/// Drains aya-log events (debug lines from the programs) into `log`, which
/// the tracing subscriber picks up. A small thread, off the data path.
fn spawn_log_reader(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let spawned = std::thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || {
            loop {
                logger.flush();
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        });
    if let Err(error) = spawned {
        tracing::debug!(%error, "eBPF log events will not be read");
    }
}

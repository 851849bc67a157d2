//! [`Redirector`]: chaperone's eBPF programs, loaded, attached at one cgroup,
//! with typed access to their maps.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapType, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps, links::FdLink},
};
use interceptor_ebpf::{
    ConnKey, OrigRecord, RedirectConfig, SockAddrKey, capacity, counter, names,
};

use super::{
    addr::{
        AgentAddr, AttestedConnection, CgroupId, ProxyAddr, RefusedDestination, conn_key,
        sock_addr_key,
    },
    bpf_sys::{self, attach_type},
    pin::{DetachReport, PinDir, PinDirError, PinHold},
    preflight,
};

/// The compiled programs, embedded at build time (see `interceptor/build.rs`);
/// empty in a build without the `ebpf` feature.
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
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot open the cgroup {path} to attach to: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error(
        "this chaperone was built without its eBPF programs (the `ebpf` feature, on by \
         default, was turned off, as for the fuzz targets): build it with default features, \
         `cargo build --release -p chaperone`"
    )]
    NotBuilt,
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
    #[error(
        "cgroup {0} holds chaperone itself (it is chaperone's own cgroup or one above it): \
         guarding it would send chaperone's own upstream connections back into its proxy. \
         Is the node agent's pod labeled for interception?"
    )]
    OwnCgroup(CgroupId),
    #[error("the proxy spec has no address: set an IPv4 and/or IPv6 proxy address")]
    NoProxyAddress,
    #[error(transparent)]
    PinDir(#[from] PinDirError),
    #[error(
        "the kernel attached `{program}` without a BPF link (kernel before 5.7?), so it \
         cannot be pinned: {source}"
    )]
    NotALink {
        program: &'static str,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("cannot hold the pin directory {path}: {source}")]
    Hold { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Detach(#[from] super::pin::DetachRefusal),
    #[error("cannot pin the link of `{program}` at {path}: {source}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Counters kept by the programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectCounters {
    pub redirected: u64,
    pub refused: u64,
    pub no_proxy: u64,
    pub connections_recorded: u64,
    pub peername_rewritten: u64,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Redirector {
    spec: RedirectSpec,
    /// chaperone's own cgroup and every cgroup above it: never agent
    /// cgroups, so chaperone's own sockets are never redirected. (Nothing
    /// else tells them apart: no mark, no option an agent could set too.)
    own_lineage: Vec<CgroupId>,
    agent_cgroups: Mutex<HashMap<MapData, u64, u32>>,
    targets: Mutex<HashMap<MapData, SockAddrKey, u8>>,
    refused: Mutex<HashMap<MapData, SockAddrKey, u8>>,
    connections: Mutex<HashMap<MapData, ConnKey, OrigRecord>>,
    counters: PerCpuArray<MapData, u64>,
    /// Links this redirector holds by file descriptor (pinned or adopted).
    links: Vec<HeldLink>,
    /// The links are pinned: they stay attached when this process exits
    /// (until [`Redirector::remove_pins`]).
    pinned: AtomicBool,
    /// With pinned links: the pin directory and this agent's hold on it.
    pin_hold: Option<(PinDir, PinHold)>,
    /// Where the maps' sizes are reported ([`Redirector::report_to`]).
    metrics: std::sync::OnceLock<crate::admin::Metrics>,
    // Owns the programs (and the links not in `links`): dropped last, it
    // detaches what is not pinned.
    _ebpf: Ebpf,
}

impl Drop for Redirector {
    fn drop(&mut self) {
        if !self.pinned.load(Ordering::SeqCst) && self.pin_hold.is_some() {
            // remove_pins detached the links already.
            return;
        }
        if self.pinned.load(Ordering::SeqCst) {
            tracing::info!(
                "the eBPF programs stay attached (pinned): agents' API connections are \
                 refused until a node agent runs again (failOpen: false)"
            );
            return;
        }
        for link in &self.links {
            if let Err(error) = bpf_sys::link_detach(link.fd.as_fd()) {
                tracing::warn!(program = link.program, %error, "detaching an adopted link");
            }
        }
    }
}

/// A cgroup link held by file descriptor.
struct HeldLink {
    program: &'static str,
    fd: OwnedFd,
}

/// What happens to the programs and maps when the node agent exits.
#[derive(Clone, Debug)]
pub enum Lifetime {
    /// Owned by this process: exit (clean or crash) detaches them. Tests.
    Process,
    /// Pinned under `bpffs`: they stay attached and keep redirecting to the
    /// proxy address after any exit, so agents' connections are refused
    /// while no node agent runs (fail closed). A previous agent's pins are
    /// adopted: its links get the new programs atomically.
    Pinned { bpffs: PathBuf },
    /// Adopts whatever a previous (fail-closed) agent pinned under `bpffs`,
    /// so the handover has no gap, then removes the pins: the programs go
    /// with this process (fail open).
    AdoptThenRelease { bpffs: PathBuf },
}

impl Redirector {
    /// Loads the programs, configures the proxy address, and attaches
    /// connect4/6, getpeername4/6 and sock_ops at `spec.cgroup`, owned by
    /// this process (dropping the redirector detaches them). Nothing is
    /// redirected until agent cgroups and targets are added.
    pub fn attach(spec: RedirectSpec) -> Result<Self, RedirectError> {
        Self::attach_with(spec, Lifetime::Process)
    }

    /// [`Redirector::attach`], with the programs' lifetime chosen by
    /// `lifetime`: pinned (they outlive the process, and a previous node
    /// agent's pins are adopted without a gap) or not.
    pub fn attach_with(spec: RedirectSpec, lifetime: Lifetime) -> Result<Self, RedirectError> {
        if PROGRAMS.is_empty() {
            return Err(RedirectError::NotBuilt);
        }
        if spec.proxy_v4.is_none() && spec.proxy_v6.is_none() {
            return Err(RedirectError::NoProxyAddress);
        }
        preflight::raise_memlock_limit();
        let cgroup = File::open(&spec.cgroup).map_err(|source| RedirectError::Cgroup {
            path: spec.cgroup.clone(),
            source,
        })?;
        let cgroup_id = super::cgroupfs::cgroup_id(&spec.cgroup)
            .map_err(|source| RedirectError::Cgroup {
                path: spec.cgroup.clone(),
                source,
            })?
            .0;
        let mut pin_hold = None;
        let pins = match &lifetime {
            Lifetime::Process => None,
            Lifetime::Pinned { bpffs } => {
                let (pins, hold) = hold_pin_dir(bpffs)?;
                pin_hold = Some(hold);
                Some(pins)
            }
            Lifetime::AdoptThenRelease { bpffs } => PinDir::existing(bpffs),
        };
        let carried_cgroups = match &pins {
            Some(pins) => replace_incompatible_maps(pins),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        if let Some(pins) = &pins {
            for shape in SHARED_MAPS {
                loader.map_pin_path(shape.name, pins.map(shape.name));
            }
        }
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|source| RedirectError::Load {
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
        let agent_cgroups: HashMap<MapData, u64, u32> = take_map(&mut ebpf, names::AGENT_CGROUPS)?;
        let mut agent_cgroups = agent_cgroups;
        for id in carried_cgroups {
            let _ = agent_cgroups.insert(id, 1, 0);
        }

        let keep_pins = matches!(lifetime, Lifetime::Pinned { .. });
        let mut links = Vec::new();
        for (name, attach_type) in ATTACHED_PROGRAMS {
            load_program(&mut ebpf, name)?;
            let adopted = match &pins {
                Some(pins) => adopt_link(&ebpf, pins, name, attach_type, cgroup_id),
                None => None,
            };
            let fd = match adopted {
                Some(fd) => Some(fd),
                None => {
                    let fresh = attach_program(&mut ebpf, name, &cgroup, keep_pins)?;
                    match (fresh, &pins) {
                        (Some(link), Some(pins)) => Some(pin_fresh_link(pins, name, link)?),
                        _ => None,
                    }
                }
            };
            if !keep_pins && let Some(pins) = &pins {
                let path = pins.link(name);
                if fd.is_none()
                    && path.exists()
                    && let Ok(old) = bpf_sys::obj_get(&path)
                {
                    // A pin we could not adopt: our own link is attached
                    // now, so the old one can go.
                    let _ = bpf_sys::link_detach(old.as_fd());
                }
                // Adopted or not, the link is ours alone now: it goes when
                // this process does.
                let _ = std::fs::remove_file(&path);
            }
            if let Some(fd) = fd {
                links.push(HeldLink { program: name, fd });
            }
        }
        if let Some(pins) = &pins {
            remove_stale_links(pins);
            if !keep_pins {
                for shape in SHARED_MAPS {
                    let _ = std::fs::remove_file(pins.map(shape.name));
                }
                pins.remove_empty();
                tracing::info!(
                    bpffs = %pins.root().display(),
                    "failOpen: took over the pinned programs and maps and removed the pins; \
                     they detach when this node agent exits"
                );
            }
        }

        let redirector = Redirector {
            own_lineage: super::cgroupfs::own_lineage().unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot read chaperone's own cgroup");
                Vec::new()
            }),
            agent_cgroups: Mutex::new(agent_cgroups),
            targets: Mutex::new(take_map(&mut ebpf, names::TARGETS)?),
            refused: Mutex::new(take_map(&mut ebpf, names::REFUSED)?),
            connections: Mutex::new(take_map(&mut ebpf, names::CONNECTIONS)?),
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            spec,
            links,
            pinned: AtomicBool::new(keep_pins),
            pin_hold: pins.clone().zip(pin_hold),
            metrics: std::sync::OnceLock::new(),
            _ebpf: ebpf,
        };
        tracing::info!(
            cgroup = %redirector.spec.cgroup.display(),
            proxy_v4 = ?redirector.spec.proxy_v4,
            proxy_v6 = ?redirector.spec.proxy_v6,
            proxy_port = redirector.spec.proxy_port,
            pinned = ?pins.as_ref().filter(|_| keep_pins).map(|p| p.root().display().to_string()),
            "eBPF redirect attached"
        );
        Ok(redirector)
    }

    /// `true` when the programs stay attached after this process exits.
    pub fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::SeqCst)
    }

    /// chaperone is being removed from this node: detaches the pinned links
    /// and removes every pin, as `chaperone detach` does, so agents reach
    /// the API server directly. Refuses (`None`, nothing touched) while
    /// another node agent on this node holds the same pins (a DaemonSet
    /// created again before this agent finished): they are its now.
    pub fn remove_pins(&self) -> Result<Option<DetachReport>, RedirectError> {
        let Some((pins, hold)) = &self.pin_hold else {
            return Ok(Some(DetachReport::default()));
        };
        let alone = hold.only_holder().map_err(|source| RedirectError::Hold {
            path: pins.root().to_path_buf(),
            source,
        })?;
        if !alone {
            return Ok(None);
        }
        self.pinned.store(false, Ordering::SeqCst);
        Ok(Some(super::pin::detach_all(pins.root())?))
    }

    /// Replaces the targets with exactly `targets` (a pinned TARGETS map may
    /// hold a previous configuration's).
    pub fn set_targets(&self, targets: &[SocketAddr]) -> Result<(), RedirectError> {
        let wanted: Vec<SockAddrKey> = targets.iter().map(|t| sock_addr_key(*t)).collect();
        let stale: Vec<SockAddrKey> = lock(&self.targets)
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for target in targets {
            self.add_target(*target)?;
        }
        for key in stale {
            remove_if_present(&self.targets, &key, names::TARGETS)?;
        }
        self.report_sizes();
        Ok(())
    }

    pub fn spec(&self) -> &RedirectSpec {
        &self.spec
    }

    /// Guard the processes of this cgroup and of every cgroup below it.
    /// chaperone's own cgroup and those above it are refused.
    pub fn add_agent_cgroup(&self, id: CgroupId) -> Result<(), RedirectError> {
        if self.own_lineage.contains(&id) {
            return Err(RedirectError::OwnCgroup(id));
        }
        let inserted = lock(&self.agent_cgroups)
            .insert(id.0, 1, 0)
            .map_err(|source| RedirectError::Map {
                map: names::AGENT_CGROUPS,
                source: Box::new(source),
            });
        self.report_sizes();
        inserted
    }

    /// Stop guarding a cgroup. Removing one that is not there is not an error.
    pub fn remove_agent_cgroup(&self, id: CgroupId) -> Result<(), RedirectError> {
        let removed = remove_if_present(&self.agent_cgroups, &id.0, names::AGENT_CGROUPS);
        self.report_sizes();
        removed
    }

    /// Reports the sizes of the agent-cgroup, target and refused maps to
    /// `metrics` (`chaperone_redirect_map_entries{map}`), now and whenever
    /// they change.
    pub fn report_to(&self, metrics: crate::admin::Metrics) {
        let _ = self.metrics.set(metrics);
        self.report_sizes();
    }

    fn report_sizes(&self) {
        let Some(metrics) = self.metrics.get() else {
            return;
        };
        let count = |len: usize| i64::try_from(len).unwrap_or(i64::MAX);
        metrics.redirect_map_entries(
            names::AGENT_CGROUPS,
            count(lock(&self.agent_cgroups).keys().count()),
        );
        metrics.redirect_map_entries(names::TARGETS, count(lock(&self.targets).keys().count()));
        metrics.redirect_map_entries(names::REFUSED, count(lock(&self.refused).keys().count()));
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
        let inserted = lock(&self.targets)
            .insert(sock_addr_key(addr), 1, 0)
            .map_err(|source| RedirectError::Map {
                map: names::TARGETS,
                source: Box::new(source),
            });
        self.report_sizes();
        inserted
    }

    pub fn remove_target(&self, addr: SocketAddr) -> Result<(), RedirectError> {
        let removed = remove_if_present(&self.targets, &sock_addr_key(addr), names::TARGETS);
        self.report_sizes();
        removed
    }

    /// Make agent connections to this destination fail with `EPERM`.
    pub fn refuse(&self, destination: RefusedDestination) -> Result<(), RedirectError> {
        let inserted = lock(&self.refused)
            .insert(destination.key(), 1, 0)
            .map_err(|source| RedirectError::Map {
                map: names::REFUSED,
                source: Box::new(source),
            });
        self.report_sizes();
        inserted
    }

    /// Replaces the refused destinations with exactly `destinations` (a
    /// pinned REFUSED map may hold a previous configuration's).
    pub fn set_refused(&self, destinations: &[RefusedDestination]) -> Result<(), RedirectError> {
        let wanted: Vec<SockAddrKey> = destinations.iter().map(|d| d.key()).collect();
        let stale: Vec<SockAddrKey> = lock(&self.refused)
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for destination in destinations {
            self.refuse(*destination)?;
        }
        for key in stale {
            remove_if_present(&self.refused, &key, names::REFUSED)?;
        }
        self.report_sizes();
        Ok(())
    }

    pub fn unrefuse(&self, destination: RefusedDestination) -> Result<(), RedirectError> {
        let removed = remove_if_present(&self.refused, &destination.key(), names::REFUSED);
        self.report_sizes();
        removed
    }

    /// Claims the kernel's record of an accepted connection (the socket's
    /// peer is the agent's side, its local address the proxy's). The record
    /// is removed: each connection is attested once. `None` when the
    /// connection was not redirected by these programs.
    pub fn take_connection(
        &self,
        agent: AgentAddr,
        proxy: ProxyAddr,
    ) -> Option<AttestedConnection> {
        let key = conn_key(AgentAddr(normalize(agent.0)), ProxyAddr(normalize(proxy.0)));
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
        _retired_mark: 0,
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

// === pinning ===

/// The programs chaperone attaches, with their `bpf_attach_type`.
const ATTACHED_PROGRAMS: [(&str, u32); 6] = [
    (names::CONNECT4, attach_type::CGROUP_INET4_CONNECT),
    (names::CONNECT6, attach_type::CGROUP_INET6_CONNECT),
    (names::GETPEERNAME4, attach_type::CGROUP_INET4_GETPEERNAME),
    (names::GETPEERNAME6, attach_type::CGROUP_INET6_GETPEERNAME),
    (names::SOCK_OPS, attach_type::CGROUP_SOCK_OPS),
    (names::SOCK_CREATE, attach_type::CGROUP_INET_SOCK_CREATE),
];

/// The layout a pinned map must have for this version's programs to use it.
struct MapShape {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const fn shape<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> MapShape {
    MapShape {
        name,
        map_type,
        key_size: std::mem::size_of::<K>() as u32,
        value_size: std::mem::size_of::<V>() as u32,
        max_entries,
    }
}

/// The maps that are pinned and shared between node agents (and between an
/// old agent's programs and a new agent's proxy during a handover).
const SHARED_MAPS: [MapShape; 7] = [
    shape::<u64, u32>(names::AGENT_CGROUPS, MapType::Hash, capacity::AGENT_CGROUPS),
    shape::<SockAddrKey, u8>(names::TARGETS, MapType::Hash, capacity::TARGETS),
    shape::<SockAddrKey, u8>(names::REFUSED, MapType::Hash, capacity::REFUSED),
    shape::<u32, RedirectConfig>(names::CONFIG, MapType::Array, 1),
    shape::<u64, OrigRecord>(names::SOCKETS, MapType::LruHash, capacity::SOCKETS),
    shape::<ConnKey, OrigRecord>(names::CONNECTIONS, MapType::LruHash, capacity::CONNECTIONS),
    shape::<u32, u64>(names::COUNTERS, MapType::PerCpuArray, counter::LEN),
];

/// Creates the pin directory and takes this agent's shared hold on it,
/// again if an agent removing chaperone took the directory away meanwhile.
fn hold_pin_dir(bpffs: &std::path::Path) -> Result<(PinDir, PinHold), RedirectError> {
    let mut attempts = 0;
    loop {
        let pins = PinDir::create(bpffs)?;
        match PinHold::take(pins.root()) {
            Ok(Some(hold)) => return Ok((pins, hold)),
            Ok(None) if attempts < 5 => attempts += 1,
            Ok(None) => {
                return Err(RedirectError::Hold {
                    path: bpffs.to_path_buf(),
                    source: io::Error::other("the directory keeps being removed"),
                });
            }
            Err(source) => {
                return Err(RedirectError::Hold {
                    path: bpffs.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Unpins every pinned map whose layout differs from this version's (a
/// version with another map layout pinned it), so the loader creates a
/// fresh one. The old programs keep their old maps until their links get
/// the new programs. Returns the agent cgroups to carry over when
/// `AGENT_CGROUPS` itself is replaced.
fn replace_incompatible_maps(pins: &PinDir) -> Vec<u64> {
    let mut carried = Vec::new();
    for shape in &SHARED_MAPS {
        let path = pins.map(shape.name);
        if !path.exists() {
            continue;
        }
        let info = match aya::maps::MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(error) => {
                tracing::warn!(map = shape.name, %error, "unreadable pinned map: replacing it");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        let same_type = info
            .map_type()
            .is_ok_and(|t| std::mem::discriminant(&t) == std::mem::discriminant(&shape.map_type));
        if same_type
            && info.key_size() == shape.key_size
            && info.value_size() == shape.value_size
            && info.max_entries() == shape.max_entries
        {
            continue;
        }
        tracing::warn!(
            map = shape.name,
            pinned = format!(
                "{:?} key {} value {} max {}",
                info.map_type().ok(),
                info.key_size(),
                info.value_size(),
                info.max_entries()
            ),
            expected = format!(
                "{:?} key {} value {} max {}",
                shape.map_type, shape.key_size, shape.value_size, shape.max_entries
            ),
            "the pinned map was made by a chaperone with another map layout: replacing it \
             (the attached programs switch to the new map when their links are updated)"
        );
        if shape.name == names::AGENT_CGROUPS && info.key_size() == 8 {
            carried = read_u64_keys(&path);
        }
        if let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(map = shape.name, %error, "cannot unpin the incompatible map");
        }
    }
    carried
}

/// The u64 keys of the pinned map at `path`, whatever its value type.
fn read_u64_keys(path: &std::path::Path) -> Vec<u64> {
    let Ok(map) = MapData::from_pin(path) else {
        return Vec::new();
    };
    let Ok(info) = map.info() else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    // A typed view with a value type of the pinned size: only keys are read.
    match info.value_size() {
        1 => collect_keys::<u8>(map, &mut keys),
        2 => collect_keys::<u16>(map, &mut keys),
        4 => collect_keys::<u32>(map, &mut keys),
        8 => collect_keys::<u64>(map, &mut keys),
        other => tracing::warn!(
            value_size = other,
            "cannot carry the agent cgroups over: the pod tracker re-adds them"
        ),
    }
    keys
}

fn collect_keys<V: aya::Pod>(map: MapData, keys: &mut Vec<u64>) {
    if let Ok(map) = HashMap::<MapData, u64, V>::try_from(aya::maps::Map::HashMap(map)) {
        keys.extend(map.keys().filter_map(Result::ok));
    }
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), RedirectError> {
    let program = ebpf.program_mut(name).ok_or(RedirectError::Missing {
        what: "program",
        name,
    })?;
    let result = if name == names::SOCK_OPS {
        let program: &mut SockOps = program
            .try_into()
            .map_err(|source| program_error(name, source))?;
        program.load()
    } else if name == names::SOCK_CREATE {
        let program: &mut CgroupSock = program
            .try_into()
            .map_err(|source| program_error(name, source))?;
        program.load()
    } else {
        let program: &mut CgroupSockAddr = program
            .try_into()
            .map_err(|source| program_error(name, source))?;
        program.load()
    };
    result.map_err(|source| program_error(name, source))
}

/// Attaches `name` at `cgroup` with a new link. With `take`, the link is
/// handed back (to be pinned); otherwise the program keeps it and it goes
/// with the [`Ebpf`].
fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    take: bool,
) -> Result<Option<FdLink>, RedirectError> {
    let program = ebpf.program_mut(name).ok_or(RedirectError::Missing {
        what: "program",
        name,
    })?;
    // The three cgroup program types attach and hand over their links
    // alike; only the type differs.
    macro_rules! attach_as {
        ($kind:ty) => {{
            let program: &mut $kind = program
                .try_into()
                .map_err(|source| program_error(name, source))?;
            let id = program
                .attach(cgroup, ATTACH_MODE)
                .map_err(|source| program_error(name, source))?;
            if take {
                let link = program
                    .take_link(id)
                    .map_err(|source| program_error(name, source))?;
                Some(
                    FdLink::try_from(link).map_err(|source| RedirectError::NotALink {
                        program: name,
                        source: Box::new(source),
                    })?,
                )
            } else {
                None
            }
        }};
    }
    let link: Option<FdLink> = if name == names::SOCK_OPS {
        attach_as!(SockOps)
    } else if name == names::SOCK_CREATE {
        attach_as!(CgroupSock)
    } else {
        attach_as!(CgroupSockAddr)
    };
    Ok(link)
}

/// Takes over the link a previous node agent pinned for `name`: if it is a
/// cgroup link of the right hook at the same cgroup, its program is
/// replaced by the newly loaded one in one step (`BPF_LINK_UPDATE`), so the
/// hook is never without a chaperone program. `None` when there is nothing
/// to adopt or the pin is unusable (it is then replaced after the new link
/// is attached, see [`pin_fresh_link`]).
fn adopt_link(
    ebpf: &Ebpf,
    pins: &PinDir,
    name: &'static str,
    attach_type: u32,
    cgroup_id: u64,
) -> Option<OwnedFd> {
    let path = pins.link(name);
    if !path.exists() {
        return None;
    }
    let fd = match bpf_sys::obj_get(&path) {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(program = name, %error, path = %path.display(), "unusable pin: replacing it");
            return None;
        }
    };
    let info = match bpf_sys::link_info(fd.as_fd()) {
        Ok(info) => info,
        Err(error) => {
            tracing::warn!(program = name, %error, "pinned object is not a link: replacing it");
            return None;
        }
    };
    if info.link_type != bpf_sys::LINK_TYPE_CGROUP
        || info.attach_type != attach_type
        || info.cgroup_id != cgroup_id
    {
        tracing::warn!(
            program = name,
            link = info.id,
            pinned_cgroup = info.cgroup_id,
            cgroup = cgroup_id,
            "the pinned link is for another hook or cgroup: replacing it"
        );
        return None;
    }
    let program_fd = ebpf.program(name)?.fd().ok()?;
    match bpf_sys::link_update(fd.as_fd(), program_fd.as_fd()) {
        Ok(()) => {
            tracing::info!(
                program = name,
                link = info.id,
                old_program = info.prog_id,
                "adopted the pinned link: its program was replaced in place, no gap"
            );
            Some(fd)
        }
        Err(error) => {
            tracing::warn!(program = name, %error, "cannot update the pinned link: replacing it");
            None
        }
    }
}

/// Pins a freshly attached link at the program's pin path. A pin already
/// there (a link this version cannot adopt) is detached only now, after the
/// new link is attached, so the hook is never left without a program.
fn pin_fresh_link(
    pins: &PinDir,
    name: &'static str,
    link: FdLink,
) -> Result<OwnedFd, RedirectError> {
    let path = pins.link(name);
    // bpffs refuses names with a dot.
    let staging = pins.links().join(format!("{name}-new"));
    let _ = std::fs::remove_file(&staging);
    let pin_error = |source: io::Error, path: &std::path::Path| RedirectError::Pin {
        program: name,
        path: path.to_path_buf(),
        source,
    };
    let pinned = link
        .pin(&staging)
        .map_err(|e| pin_error(io::Error::other(e.to_string()), &staging))?;
    let fd = bpf_sys::obj_get(&staging).map_err(|e| pin_error(e, &staging))?;
    drop(pinned);
    if path.exists() {
        if let Ok(old) = bpf_sys::obj_get(&path) {
            let _ = bpf_sys::link_detach(old.as_fd());
        }
        let _ = std::fs::remove_file(&path);
    }
    std::fs::rename(&staging, &path).map_err(|e| pin_error(e, &path))?;
    Ok(fd)
}

/// Detaches and unpins links of programs this version no longer has.
fn remove_stale_links(pins: &PinDir) {
    for (name, path) in super::pin::entries(&pins.links()) {
        if ATTACHED_PROGRAMS
            .iter()
            .any(|(program, _)| *program == name)
        {
            continue;
        }
        tracing::warn!(pin = %path.display(), "detaching a pinned link this version does not use");
        if let Ok(fd) = bpf_sys::obj_get(&path) {
            let _ = bpf_sys::link_detach(fd.as_fd());
        }
        let _ = std::fs::remove_file(&path);
    }
}

//! Map layouts shared by chaperone's eBPF programs and its userspace loader.
//!
//! Every type here is `#[repr(C)]`, has explicit padding fields (the kernel
//! hashes keys byte for byte, so padding must be zero and named), and stores
//! addresses as 16 bytes: IPv4 addresses in their IPv4-mapped IPv6 form
//! (`::ffff:a.b.c.d`), so one lookup serves `connect4`, `connect6` and
//! IPv4-mapped destinations alike. Ports are in host byte order.
#![no_std]

/// Names of the maps and programs in the object, so both sides agree.
pub mod names {
    pub const AGENT_CGROUPS: &str = "AGENT_CGROUPS";
    pub const TARGETS: &str = "TARGETS";
    pub const REFUSED: &str = "REFUSED";
    pub const CONFIG: &str = "CONFIG";
    pub const SOCKETS: &str = "SOCKETS";
    pub const CONNECTIONS: &str = "CONNECTIONS";
    pub const COUNTERS: &str = "COUNTERS";

    pub const CONNECT4: &str = "chaperone_connect4";
    pub const CONNECT6: &str = "chaperone_connect6";
    pub const GETPEERNAME4: &str = "chaperone_getpeername4";
    pub const GETPEERNAME6: &str = "chaperone_getpeername6";
    pub const SOCK_OPS: &str = "chaperone_sock_ops";
    pub const SOCK_CREATE: &str = "chaperone_sock_create";
}

/// Capacity of the maps. The connection maps are LRUs: an entry the proxy
/// never claimed (the agent gave up before the handshake) ages out.
pub mod capacity {
    pub const AGENT_CGROUPS: u32 = 16_384;
    pub const TARGETS: u32 = 256;
    pub const REFUSED: u32 = 1_024;
    pub const SOCKETS: u32 = 65_536;
    pub const CONNECTIONS: u32 = 65_536;
}

/// The value under [`AgentCgroup`] keys: which agent a cgroup belongs to.
/// Userspace keeps the meaning (pod, container); the kernel only needs to know
/// that the cgroup is guarded.
pub type AgentCgroupFlags = u32;

/// `(address, port)` as a map key. `port == 0` means any port and an all-zero
/// address means any address (used only in [`names::REFUSED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddrKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

impl SockAddrKey {
    pub const ANY_ADDR: [u8; 16] = [0; 16];

    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 2],
        }
    }
}

/// The key under which `sock_ops` files a redirected connection: the agent's
/// side (`src`) and the proxy's side (`dst`), exactly as the proxy sees its
/// accepted socket (peer = `src`, local = `dst`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
}

/// What the kernel knew when the agent called `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigRecord {
    /// cgroup v2 id (the inode of the cgroup directory) of the caller.
    pub cgroup_id: u64,
    /// The destination the agent dialed (IPv4-mapped for IPv4).
    pub orig_addr: [u8; 16],
    pub orig_port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the socket that dialed, so
    /// `getpeername` answers in the family the agent used.
    pub family: u16,
    /// Thread-group id (the process id) that called `connect()`.
    pub pid: u32,
    pub uid: u32,
    pub _pad: u32,
    /// The agent cgroup that matched: the caller's own cgroup or the nearest
    /// ancestor listed in [`names::AGENT_CGROUPS`] (a pod's cgroup guards
    /// every container below it).
    pub agent_cgroup_id: u64,
}

/// Where redirected connections go. One entry in [`names::CONFIG`]. While
/// `flags` lacks [`RedirectConfig::HAS_V4`] / [`RedirectConfig::HAS_V6`],
/// agent connections to targets of that family are refused: the programs
/// fail closed.
///
/// Nothing here lets a socket skip the redirect: chaperone's own sockets are
/// told apart by not being in [`names::AGENT_CGROUPS`], which agents cannot
/// change, never by anything a process can set on its own socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RedirectConfig {
    pub proxy_v4: [u8; 4],
    pub proxy_v6: [u8; 16],
    pub proxy_port: u16,
    pub _pad: u16,
    /// Always 0. Versions before this one kept a socket mark here and let
    /// sockets carrying it skip the redirect (`SO_MARK` is settable with
    /// `CAP_NET_RAW` alone since Linux 5.17, so agents could too). Kept, and
    /// kept zero, so the layout of a pinned map stays the same and an older
    /// version's programs, until a handover replaces them, exempt nothing.
    pub _retired_mark: u32,
    pub flags: u32,
}

impl RedirectConfig {
    pub const HAS_V4: u32 = 1;
    pub const HAS_V6: u32 = 1 << 1;
}

/// Indexes into the per-CPU counter array [`names::COUNTERS`].
pub mod counter {
    pub const REDIRECTED: u32 = 0;
    pub const REFUSED: u32 = 1;
    pub const NO_PROXY: u32 = 2;
    /// Retired: counted sockets skipped for carrying chaperone's mark,
    /// which no longer exempts anything.
    pub const RETIRED_MARKED_SKIPPED: u32 = 3;
    pub const CONNECTIONS_RECORDED: u32 = 4;
    pub const PEERNAME_REWRITTEN: u32 = 5;
    pub const LEN: u32 = 6;
}

/// The IPv4-mapped IPv6 form of an IPv4 address given as its four bytes.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address, if it is one.
pub const fn as_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
    {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are plain `#[repr(C)]` data with explicit padding
    // fields, valid for any bit pattern.
    unsafe impl aya::Pod for super::SockAddrKey {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::OrigRecord {}
    unsafe impl aya::Pod for super::RedirectConfig {}
}

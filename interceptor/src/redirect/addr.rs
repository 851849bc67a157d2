//! Typed values that cross between the kernel maps and the rest of chaperone.
//! A `SocketAddr` never travels without saying whose it is.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use interceptor_ebpf::{ConnKey, OrigRecord, SockAddrKey, as_v4, v4_mapped};

/// A cgroup v2 id: the inode number of the cgroup's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

impl fmt::Display for CgroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The destination an agent dialed before the kernel redirected it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The agent's end of an accepted connection: the socket's peer (the
/// pod's address and ephemeral port).
///
/// The kernel files a redirected connection under the agent's end first;
/// the two ends are typed so that they cannot be passed the wrong way round:
///
/// ```
/// # use chaperone::redirect::{AgentAddr, ProxyAddr, Redirector};
/// fn claim(redirector: &Redirector, agent: AgentAddr, proxy: ProxyAddr) {
///     let _ = redirector.take_connection(agent, proxy);
/// }
/// ```
///
/// ```compile_fail
/// # use chaperone::redirect::{AgentAddr, ProxyAddr, Redirector};
/// fn claim(redirector: &Redirector, agent: AgentAddr, proxy: ProxyAddr) {
///     let _ = redirector.take_connection(proxy, agent);
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AgentAddr(pub SocketAddr);

impl AgentAddr {
    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for AgentAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(AgentAddr)
    }
}

/// The proxy's end of an accepted connection: the socket's local address
/// (the node address and proxy port the kernel rewrote the agent's
/// `connect()` to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProxyAddr(pub SocketAddr);

impl fmt::Display for ProxyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for ProxyAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(ProxyAddr)
    }
}

/// What the kernel attests about an accepted, redirected connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestedConnection {
    pub orig_dst: OrigDst,
    /// The caller's own cgroup.
    pub cgroup_id: CgroupId,
    /// The agent cgroup that matched (the caller's own or an ancestor).
    pub agent_cgroup_id: CgroupId,
    /// The process (thread-group id) that called `connect()`.
    pub pid: u32,
    pub uid: u32,
}

/// A destination agents must never dial directly: `connect()` fails with `EPERM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusedDestination {
    /// This port on any address (the kubelet's 10250 and read-only 10255,
    /// etcd's 2379-2380).
    Port(u16),
    /// This address on any port (the cloud metadata address).
    Addr(IpAddr),
    /// Exactly this address and port.
    SocketAddr(SocketAddr),
}

impl RefusedDestination {
    /// The bypasses that skip the API server's own audit: the kubelet API
    /// (and its unauthenticated read-only port, still enabled on some
    /// distributions), etcd, and the cloud metadata service.
    pub fn defaults() -> Vec<RefusedDestination> {
        vec![
            RefusedDestination::Port(10250),
            RefusedDestination::Port(10255),
            RefusedDestination::Port(2379),
            RefusedDestination::Port(2380),
            RefusedDestination::Addr(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))),
            RefusedDestination::Addr(IpAddr::V6(Ipv6Addr::new(
                0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254,
            ))),
        ]
    }

    /// What refuses agents a listener of chaperone's own (the admin port):
    /// the port on every address when it listens on all of them, otherwise
    /// exactly its address (127.0.0.1 still matters: a `hostNetwork` agent
    /// pod shares the node's loopback).
    pub fn listener(addr: SocketAddr) -> RefusedDestination {
        if addr.ip().is_unspecified() {
            RefusedDestination::Port(addr.port())
        } else {
            RefusedDestination::SocketAddr(addr)
        }
    }

    pub(crate) fn key(&self) -> SockAddrKey {
        match *self {
            RefusedDestination::Port(port) => SockAddrKey::new(SockAddrKey::ANY_ADDR, port),
            RefusedDestination::Addr(ip) => SockAddrKey::new(ip_key(ip), 0),
            RefusedDestination::SocketAddr(addr) => sock_addr_key(addr),
        }
    }
}

impl std::str::FromStr for RefusedDestination {
    type Err = String;

    /// `:10250` (a port), `169.254.169.254` (an address), `10.0.0.1:2379`,
    /// `[fd00::1]:2379`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix(':') {
            return port
                .parse()
                .map(RefusedDestination::Port)
                .map_err(|_| format!("`{s}`: expected `:PORT` with PORT in 1-65535"));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(RefusedDestination::SocketAddr(addr));
        }
        s.parse::<IpAddr>()
            .map(RefusedDestination::Addr)
            .map_err(|_| {
                format!("`{s}`: expected `:PORT`, an IP address, or `IP:PORT` (`[IPv6]:PORT`)")
            })
    }
}

/// A socket address as the maps store it: 16 bytes (IPv4-mapped for IPv4)
/// and a host-order port.
pub(crate) fn sock_addr_key(addr: SocketAddr) -> SockAddrKey {
    SockAddrKey::new(ip_key(addr.ip()), addr.port())
}

pub(crate) fn ip_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The 16-byte form back to an address: IPv4-mapped becomes IPv4.
pub(crate) fn ip_from_key(bytes: [u8; 16]) -> IpAddr {
    match as_v4(&bytes) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(bytes)),
    }
}

/// The key `sock_ops` filed the connection under: the agent's side is the
/// accepted socket's peer, the proxy's side its local address.
pub(crate) fn conn_key(agent: AgentAddr, proxy: ProxyAddr) -> ConnKey {
    ConnKey {
        src_addr: ip_key(agent.0.ip()),
        dst_addr: ip_key(proxy.0.ip()),
        src_port: agent.0.port(),
        dst_port: proxy.0.port(),
    }
}

impl From<OrigRecord> for AttestedConnection {
    fn from(record: OrigRecord) -> Self {
        AttestedConnection {
            orig_dst: OrigDst(SocketAddr::new(
                ip_from_key(record.orig_addr),
                record.orig_port,
            )),
            cgroup_id: CgroupId(record.cgroup_id),
            agent_cgroup_id: CgroupId(record.agent_cgroup_id),
            pid: record.pid,
            uid: record.uid,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, size_of};

    use super::*;

    // The kernel compares keys byte for byte: the layouts must have no
    // implicit padding, and must not change without the programs changing.
    #[test]
    fn map_layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<SockAddrKey>(), 20);
        assert_eq!(size_of::<ConnKey>(), 36);
        assert_eq!(size_of::<OrigRecord>(), 48);
        assert_eq!(align_of::<OrigRecord>(), 8);
        assert_eq!(size_of::<interceptor_ebpf::RedirectConfig>(), 32);
        assert_eq!(std::mem::offset_of!(OrigRecord, agent_cgroup_id), 40);
        assert_eq!(std::mem::offset_of!(ConnKey, src_port), 32);
        assert_eq!(std::mem::offset_of!(SockAddrKey, port), 16);
    }

    #[test]
    fn ipv4_is_stored_ipv4_mapped() {
        let key = sock_addr_key("10.96.0.1:443".parse().unwrap());
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1]
        );
        assert_eq!(key.port, 443);
        assert_eq!(key._pad, [0, 0]);
        // An IPv4-mapped IPv6 destination is the same key.
        assert_eq!(
            sock_addr_key("[::ffff:10.96.0.1]:443".parse().unwrap()),
            key
        );
    }

    #[test]
    fn ipv6_is_stored_as_is() {
        let key = sock_addr_key("[fd00::1]:6443".parse().unwrap());
        assert_eq!(key.addr, "fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(key.port, 6443);
    }

    #[test]
    fn records_come_back_as_the_address_the_agent_dialed() {
        let record = OrigRecord {
            cgroup_id: 7,
            orig_addr: v4_mapped([10, 96, 0, 1]),
            orig_port: 443,
            family: 2,
            pid: 42,
            uid: 1000,
            _pad: 0,
            agent_cgroup_id: 5,
        };
        let attested = AttestedConnection::from(record);
        assert_eq!(attested.orig_dst.0, "10.96.0.1:443".parse().unwrap());
        assert_eq!(attested.cgroup_id, CgroupId(7));
        assert_eq!(attested.agent_cgroup_id, CgroupId(5));
        assert_eq!((attested.pid, attested.uid), (42, 1000));
    }

    #[test]
    fn connection_key_puts_the_agent_first() {
        let key = conn_key(
            AgentAddr("10.0.0.2:40000".parse().unwrap()),
            ProxyAddr("10.0.0.1:15443".parse().unwrap()),
        );
        assert_eq!(key.src_addr, v4_mapped([10, 0, 0, 2]));
        assert_eq!(key.dst_addr, v4_mapped([10, 0, 0, 1]));
        assert_eq!((key.src_port, key.dst_port), (40000, 15443));
    }

    #[test]
    fn refused_destinations_parse_and_key() {
        let port: RefusedDestination = ":10250".parse().unwrap();
        assert_eq!(port.key(), SockAddrKey::new([0; 16], 10250));
        let addr: RefusedDestination = "169.254.169.254".parse().unwrap();
        assert_eq!(
            addr.key(),
            SockAddrKey::new(v4_mapped([169, 254, 169, 254]), 0)
        );
        let exact: RefusedDestination = "[fd00::1]:2379".parse().unwrap();
        assert_eq!(exact.key().port, 2379);
        assert!(":99999".parse::<RefusedDestination>().is_err());
        assert!("not-an-address".parse::<RefusedDestination>().is_err());
    }

    #[test]
    fn defaults_cover_kubelet_etcd_and_metadata() {
        let defaults = RefusedDestination::defaults();
        for port in [10250, 10255, 2379, 2380] {
            assert!(defaults.contains(&RefusedDestination::Port(port)));
        }
        assert!(defaults.contains(&RefusedDestination::Addr(
            "169.254.169.254".parse().unwrap()
        )));
    }
}

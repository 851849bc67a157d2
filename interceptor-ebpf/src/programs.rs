//! `cgroup/connect4|6`, `sock_ops` and `cgroup/getpeername4|6`: the
//! transparent redirect of agent connections to chaperone's proxy.
//!
//! The data path of one agent connection:
//! 1. `connect4|6`: an agent cgroup dials a target; remember the original
//!    destination under the socket cookie and rewrite to the proxy. Refused
//!    destinations fail with `EPERM`.
//! 2. `sock_ops` (TCP connect / established): file the record under the
//!    connection's four addresses, where the proxy looks it up on accept.
//! 3. `getpeername4|6`: show the agent the address it dialed.
//!
//! And `sock_create`: agent cgroups may not open MPTCP sockets. The kernel
//! runs `connect4|6` for an MPTCP socket on its first subflow, a TCP socket
//! of its own, so the redirect works but the record sits under the
//! subflow's cookie and `getpeername` on the agent's socket would show the
//! proxy. Refusing the socket (`EPERM`) is the honest answer; clients that
//! ask for MPTCP (Go's `SetMultipathTCP`, `mptcpize`) fall back to TCP.
//!
//! Nothing a process sets on its own socket (a mark, an option, a protocol)
//! exempts it: chaperone's own sockets are never redirected because its
//! cgroup is not an agent cgroup.

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::{debug, info};
use interceptor_ebpf::{
    AgentCgroupFlags, ConnKey, OrigRecord, RedirectConfig, SockAddrKey, as_v4, capacity, counter,
    v4_mapped,
};

const ALLOW: i32 = 1;
/// Returning 0 from a `cgroup/connect*` program makes `connect()` fail with
/// `EPERM`; from `cgroup/sock_create`, `socket()`.
const REFUSE: i32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_MPTCP: u32 = 262;
/// How many ancestors of the calling cgroup are checked: a pod's cgroup
/// guards every container (and sub-cgroup) below it.
const MAX_ANCESTOR_LEVEL: i32 = 12;

#[map]
static AGENT_CGROUPS: HashMap<u64, AgentCgroupFlags> =
    HashMap::with_max_entries(capacity::AGENT_CGROUPS, 0);

#[map]
static TARGETS: HashMap<SockAddrKey, u8> = HashMap::with_max_entries(capacity::TARGETS, 0);

#[map]
static REFUSED: HashMap<SockAddrKey, u8> = HashMap::with_max_entries(capacity::REFUSED, 0);

#[map]
static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

/// Socket cookie -> original destination, for `sock_ops` and `getpeername`.
#[map]
static SOCKETS: LruHashMap<u64, OrigRecord> = LruHashMap::with_max_entries(capacity::SOCKETS, 0);

/// Four addresses -> original destination, claimed by the proxy on accept.
#[map]
static CONNECTIONS: LruHashMap<ConnKey, OrigRecord> =
    LruHashMap::with_max_entries(capacity::CONNECTIONS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

#[cgroup_sock_addr(connect4)]
pub fn chaperone_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr for this hook.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let dst = SockAddrKey::new(v4_mapped(ip.to_ne_bytes()), u16::from_be(port as u16));
    match decide(&ctx, &dst, AF_INET) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect(config) => {
            if config.flags & RedirectConfig::HAS_V4 == 0 {
                bump(counter::NO_PROXY);
                return REFUSE;
            }
            // SAFETY: connect4 may write the destination it is handed.
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes(config.proxy_v4);
                (*sa).user_port = u32::from(config.proxy_port.to_be());
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn chaperone_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr for this hook.
    let (ip, port) = unsafe { ((*sa).user_ip6, (*sa).user_port) };
    let dst = SockAddrKey::new(ip6_bytes(ip), u16::from_be(port as u16));
    match decide(&ctx, &dst, AF_INET6) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect(config) => {
            // An IPv4-mapped destination is an IPv4 connection: send it to the
            // IPv4 proxy address, still written in its mapped form.
            let proxy = if as_v4(&dst.addr).is_some() {
                if config.flags & RedirectConfig::HAS_V4 == 0 {
                    bump(counter::NO_PROXY);
                    return REFUSE;
                }
                v4_mapped(config.proxy_v4)
            } else {
                if config.flags & RedirectConfig::HAS_V6 == 0 {
                    bump(counter::NO_PROXY);
                    return REFUSE;
                }
                config.proxy_v6
            };
            let words = ip6_words(proxy);
            // SAFETY: connect6 may write the destination it is handed.
            unsafe {
                (*sa).user_ip6[0] = words[0];
                (*sa).user_ip6[1] = words[1];
                (*sa).user_ip6[2] = words[2];
                (*sa).user_ip6[3] = words[3];
                (*sa).user_port = u32::from(config.proxy_port.to_be());
            }
            ALLOW
        }
    }
}

#[cgroup_sock(sock_create)]
pub fn chaperone_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock for this hook.
    let protocol = unsafe { (*ctx.sock).protocol };
    if protocol != IPPROTO_MPTCP {
        return ALLOW;
    }
    match agent_cgroup() {
        Some(agent_cgroup_id) => {
            bump(counter::REFUSED);
            info!(
                &ctx,
                "refused an MPTCP socket in agent cgroup {}", agent_cgroup_id
            );
            REFUSE
        }
        None => ALLOW,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn chaperone_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the helper accepts the sock_addr context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: plain map lookup; the value is copied out at once.
    if let Some(record) = unsafe { SOCKETS.get(&cookie) }
        && let Some(v4) = as_v4(&record.orig_addr)
    {
        // SAFETY: getpeername4 may rewrite the address it reports.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(v4);
            (*sa).user_port = u32::from(record.orig_port.to_be());
        }
        bump(counter::PEERNAME_REWRITTEN);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn chaperone_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the helper accepts the sock_addr context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: plain map lookup; the value is copied out at once.
    if let Some(record) = unsafe { SOCKETS.get(&cookie) } {
        let words = ip6_words(record.orig_addr);
        // SAFETY: getpeername6 may rewrite the address it reports.
        unsafe {
            (*sa).user_ip6[0] = words[0];
            (*sa).user_ip6[1] = words[1];
            (*sa).user_ip6[2] = words[2];
            (*sa).user_ip6[3] = words[3];
            (*sa).user_port = u32::from(record.orig_port.to_be());
        }
        bump(counter::PEERNAME_REWRITTEN);
    }
    ALLOW
}

#[sock_ops]
pub fn chaperone_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: the helper accepts the sock_ops context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: plain map lookup; the value is copied out at once.
    let Some(record) = (unsafe { SOCKETS.get(&cookie) }).copied() else {
        return 1;
    };
    let key = connection_key(&ctx);
    if CONNECTIONS.insert(&key, &record, 0).is_ok() && op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        bump(counter::CONNECTIONS_RECORDED);
    }
    1
}

/// The connection's four addresses. Every context field is loaded on its
/// own, straight from the context pointer: the verifier refuses a load
/// through a context pointer the compiler has offset and kept in a register.
#[inline(always)]
fn connection_key(ctx: &SockOpsContext) -> ConnKey {
    use core::ptr::{addr_of, read_volatile};
    let ops = ctx.ops;
    // SAFETY: each read is a single aligned u32 field of the live context.
    unsafe {
        let family = read_volatile(addr_of!((*ops).family));
        // local_port is in host order; remote_port holds the network-order
        // port in its upper 16 bits on little-endian machines.
        let local_port = read_volatile(addr_of!((*ops).local_port));
        let remote_port = read_volatile(addr_of!((*ops).remote_port));
        // All fields are read unconditionally, then selected: loads inside
        // the branches get merged into one load through a pointer phi.
        let local4 = read_volatile(addr_of!((*ops).local_ip4));
        let remote4 = read_volatile(addr_of!((*ops).remote_ip4));
        let local6 = [
            read_volatile(addr_of!((*ops).local_ip6[0])),
            read_volatile(addr_of!((*ops).local_ip6[1])),
            read_volatile(addr_of!((*ops).local_ip6[2])),
            read_volatile(addr_of!((*ops).local_ip6[3])),
        ];
        let remote6 = [
            read_volatile(addr_of!((*ops).remote_ip6[0])),
            read_volatile(addr_of!((*ops).remote_ip6[1])),
            read_volatile(addr_of!((*ops).remote_ip6[2])),
            read_volatile(addr_of!((*ops).remote_ip6[3])),
        ];
        let (src_addr, dst_addr) = if family == u32::from(AF_INET) {
            (
                v4_mapped(local4.to_ne_bytes()),
                v4_mapped(remote4.to_ne_bytes()),
            )
        } else {
            (ip6_bytes(local6), ip6_bytes(remote6))
        };
        ConnKey {
            src_addr,
            dst_addr,
            src_port: local_port as u16,
            dst_port: u16::from_be((remote_port >> 16) as u16),
        }
    }
}

enum Verdict {
    Pass,
    Refuse,
    Redirect(RedirectConfig),
}

/// The whole policy of the kernel side, for one `connect()`.
fn decide(ctx: &SockAddrContext, dst: &SockAddrKey, family: u16) -> Verdict {
    let is_target = unsafe { TARGETS.get(dst) }.is_some();
    let is_refused = !is_target && refused(dst);
    if !is_target && !is_refused {
        return Verdict::Pass;
    }
    let Some(agent_cgroup_id) = agent_cgroup() else {
        return Verdict::Pass;
    };
    if is_refused {
        bump(counter::REFUSED);
        info!(
            ctx,
            "refused direct connection to port {} from agent cgroup {}", dst.port, agent_cgroup_id
        );
        return Verdict::Refuse;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the socket type is readable in cgroup sock_addr programs.
    let sock_type = unsafe { (*sa).type_ };
    if sock_type != SOCK_STREAM {
        return Verdict::Pass;
    }
    let Some(config) = CONFIG.get(0).copied() else {
        bump(counter::NO_PROXY);
        return Verdict::Refuse;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let record = OrigRecord {
        // SAFETY: no arguments; always valid in this program type.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        orig_addr: dst.addr,
        orig_port: dst.port,
        family,
        pid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        _pad: 0,
        agent_cgroup_id,
    };
    // SAFETY: the helper accepts the sock_addr context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if SOCKETS.insert(&cookie, &record, 0).is_err() {
        // Without the record the proxy cannot attest the caller: refuse.
        bump(counter::NO_PROXY);
        return Verdict::Refuse;
    }
    bump(counter::REDIRECTED);
    debug!(
        ctx,
        "redirecting pid {} to the proxy (port {})", record.pid, dst.port
    );
    Verdict::Redirect(config)
}

/// The first cgroup, from the caller's own up to the root, that is an agent
/// cgroup.
fn agent_cgroup() -> Option<u64> {
    // SAFETY: no arguments; always valid in this program type.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { AGENT_CGROUPS.get(&own) }.is_some() {
        return Some(own);
    }
    let mut level = 1;
    while level <= MAX_ANCESTOR_LEVEL {
        // SAFETY: returns 0 past the caller's own depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == own {
            return None;
        }
        if unsafe { AGENT_CGROUPS.get(&id) }.is_some() {
            return Some(id);
        }
        level += 1;
    }
    None
}

/// A destination is refused by exact address and port, by address on any
/// port, or by port on any address.
fn refused(dst: &SockAddrKey) -> bool {
    let any_port = SockAddrKey::new(dst.addr, 0);
    let any_addr = SockAddrKey::new(SockAddrKey::ANY_ADDR, dst.port);
    unsafe {
        REFUSED.get(dst).is_some()
            || REFUSED.get(&any_port).is_some()
            || REFUSED.get(&any_addr).is_some()
    }
}

fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = [
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

fn ip6_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

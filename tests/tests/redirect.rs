//! The kernel redirect, proven with the kernel as the fixture: real eBPF
//! programs attached at a test cgroup subtree, a real network namespace, and a
//! real TCP client (`agent-probe`) placed in an agent cgroup named the way the
//! kubelet names them. Needs root; skips with a clear line otherwise.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use chaperone::redirect::{
    AgentAddr, CgroupId, ProxyAddr, RedirectSpec, Redirector, RefusedDestination,
};
use chaperone_tests::{
    require_root,
    topology::{Cgroup, Netns, Placement},
};
use serde_json::Value;

/// The `SO_MARK` chaperone once published as "its own sockets": a socket
/// carrying it skipped the redirect, and any root container can set it.
const OLD_CHAPERONE_MARK: u32 = 0x4348_5031;
const SERVICE_IP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 443);
const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

/// One agent pod and one ordinary process group on one "node".
struct Node {
    netns: Netns,
    agent: Cgroup,
    other: Cgroup,
    proxy_v4: TcpListener,
    proxy_v6: TcpListener,
    /// Stands in for the API server: reachable directly from the namespace.
    apiserver_v4: TcpListener,
    apiserver_v6: TcpListener,
    redirector: Redirector,
    // Dropped last: the subtree the programs are attached at.
    _subtree: Cgroup,
}

impl Node {
    fn new() -> Node {
        Node::with_proxy_port(None)
    }

    /// `proxy_port`: use this port for the proxy instead of the listeners'.
    fn with_proxy_port(proxy_port: Option<u16>) -> Node {
        let subtree = Cgroup::test_subtree().expect("create test cgroup subtree");
        let agent = subtree
            .child(
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod3f1c9a44_2b8e_4c1d_9a3e_5d2f7c8b9e10.slice/\
                 cri-containerd-4be8c2b0d9f1.scope",
            )
            .expect("agent cgroup");
        let other = subtree
            .child("system.slice/other.scope")
            .expect("other cgroup");
        let netns = Netns::create().expect("network namespace");
        let proxy_v4 = TcpListener::bind((netns.host_v4, 0)).unwrap();
        let port = proxy_v4.local_addr().unwrap().port();
        let proxy_v6 = TcpListener::bind((netns.host_v6, port)).unwrap();
        let apiserver_v4 = TcpListener::bind((netns.host_v4, 0)).unwrap();
        let apiserver_v6 = TcpListener::bind((netns.host_v6, 0)).unwrap();
        let redirector = Redirector::attach(RedirectSpec {
            cgroup: subtree.path.clone(),
            proxy_v4: Some(netns.host_v4),
            proxy_v6: Some(netns.host_v6),
            proxy_port: proxy_port.unwrap_or(port),
        })
        .expect("attach eBPF programs");
        redirector.add_agent_cgroup(CgroupId(agent.id())).unwrap();
        for listener in [&proxy_v4, &proxy_v6, &apiserver_v4, &apiserver_v6] {
            listener.set_nonblocking(true).unwrap();
        }
        Node {
            netns,
            agent,
            other,
            proxy_v4,
            proxy_v6,
            apiserver_v4,
            apiserver_v6,
            redirector,
            _subtree: subtree,
        }
    }

    fn apiserver_v4_addr(&self) -> SocketAddr {
        self.apiserver_v4.local_addr().unwrap()
    }

    fn in_agent(&self) -> Placement<'_> {
        Placement {
            cgroup: &self.agent,
            netns: &self.netns,
        }
    }

    fn in_other(&self) -> Placement<'_> {
        Placement {
            cgroup: &self.other,
            netns: &self.netns,
        }
    }
}

/// A running `agent-probe` and the JSON line it printed about its socket.
struct Probe {
    child: Child,
    report: Value,
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn probe(placement: Placement<'_>, target: SocketAddr, extra: &[&str]) -> Probe {
    let mut cmd: Command = placement.command(env!("CARGO_BIN_EXE_agent-probe"));
    cmd.arg(target.to_string()).args(extra);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn agent-probe");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read probe report");
    let report: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("probe printed {line:?}, not JSON: {e}"));
    Probe { child, report }
}

/// Accept one connection within `timeout`, or `None`.
fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok(accepted) => return Some(accepted),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn nothing_pending(listener: &TcpListener) -> bool {
    accept_within(listener, Duration::from_millis(300)).is_none()
}

#[test]
fn agent_dialing_the_service_ip_lands_on_the_proxy_with_its_identity() {
    require_root!();
    let node = Node::new();
    node.redirector.add_target(SERVICE_IP).unwrap();

    // Nothing answers 10.96.0.1 in this namespace: only the redirect can.
    let probe = probe(node.in_agent(), SERVICE_IP, &[]);
    assert_eq!(probe.report["connected"], true, "{}", probe.report);
    assert_eq!(
        probe.report["peer"], "10.96.0.1:443",
        "getpeername inside the agent must show the address it dialed"
    );

    let (stream, peer) =
        accept_within(&node.proxy_v4, Duration::from_secs(3)).expect("the proxy accepts the agent");
    let local = stream.local_addr().unwrap();
    let attested = node
        .redirector
        .take_connection(AgentAddr(peer), ProxyAddr(local))
        .expect("the kernel recorded the redirected connection");
    assert_eq!(attested.orig_dst.0, SERVICE_IP);
    assert_eq!(attested.cgroup_id, CgroupId(node.agent.id()));
    assert_eq!(attested.agent_cgroup_id, CgroupId(node.agent.id()));
    assert_eq!(
        u64::from(attested.pid),
        probe.report["pid"].as_u64().unwrap()
    );
    assert_eq!(attested.uid, 0);
    assert!(
        node.redirector
            .take_connection(AgentAddr(peer), ProxyAddr(local))
            .is_none(),
        "a connection is attested once"
    );
    let counters = node.redirector.counters();
    assert_eq!(counters.redirected, 1);
    assert!(counters.peername_rewritten >= 1);
}

#[test]
fn a_client_outside_the_agent_cgroup_is_not_redirected() {
    require_root!();
    let node = Node::new();
    let target = node.apiserver_v4_addr();
    node.redirector.add_target(target).unwrap();

    let outside = probe(node.in_other(), target, &[]);
    assert_eq!(outside.report["connected"], true, "{}", outside.report);
    let (stream, peer) = accept_within(&node.apiserver_v4, Duration::from_secs(3))
        .expect("the API server is reached directly");
    assert!(nothing_pending(&node.proxy_v4));
    assert!(
        node.redirector
            .take_connection(AgentAddr(peer), ProxyAddr(stream.local_addr().unwrap()))
            .is_none()
    );

    // The same target from the agent cgroup goes to the proxy.
    let inside = probe(node.in_agent(), target, &[]);
    assert_eq!(inside.report["peer"], target.to_string());
    assert!(accept_within(&node.proxy_v4, Duration::from_secs(3)).is_some());
    assert!(nothing_pending(&node.apiserver_v4));
}

/// Issue 24, attack 3: `SO_MARK` needs only `CAP_NET_RAW` since Linux 5.17,
/// which root containers have. No mark an agent sets on its socket, the
/// one chaperone once published included, lets it past the redirect.
#[test]
fn no_mark_an_agent_sets_exempts_its_socket_from_the_redirect() {
    require_root!();
    let node = Node::new();
    let target = node.apiserver_v4_addr();
    node.redirector.add_target(target).unwrap();

    for mark in [
        OLD_CHAPERONE_MARK,
        0x4000,
        0x8000,
        0xffff_0000,
        0xffff_ffff,
        7,
    ] {
        let marked = probe(node.in_agent(), target, &["--mark", &mark.to_string()]);
        assert_eq!(marked.report["connected"], true, "{}", marked.report);
        assert_eq!(
            marked.report["peer"],
            target.to_string(),
            "mark {mark:#x}: the agent sees the address it dialed"
        );
        assert!(
            accept_within(&node.proxy_v4, Duration::from_secs(3)).is_some(),
            "mark {mark:#x}: the marked socket must land on the proxy"
        );
        assert!(
            nothing_pending(&node.apiserver_v4),
            "mark {mark:#x}: the marked socket reached the API server directly"
        );
    }
    assert_eq!(node.redirector.counters().redirected, 6);

    // IPv6 sockets too.
    let target_v6 = node.apiserver_v6.local_addr().unwrap();
    node.redirector.add_target(target_v6).unwrap();
    let marked = probe(
        node.in_agent(),
        target_v6,
        &["--mark", &OLD_CHAPERONE_MARK.to_string()],
    );
    assert_eq!(marked.report["connected"], true, "{}", marked.report);
    assert!(accept_within(&node.proxy_v6, Duration::from_secs(3)).is_some());
    assert!(nothing_pending(&node.apiserver_v6));
}

/// TCP Fast Open opens the connection from `sendto(MSG_FASTOPEN)`, not
/// `connect()`: it is redirected all the same.
#[test]
fn a_fast_open_connection_is_redirected_too() {
    require_root!();
    let node = Node::new();
    node.redirector.add_target(SERVICE_IP).unwrap();
    let target = node.apiserver_v4_addr();
    node.redirector.add_target(target).unwrap();

    for dialed in [SERVICE_IP, target] {
        let report = probe(node.in_agent(), dialed, &["--fastopen"]);
        assert_eq!(report.report["connected"], true, "{}", report.report);
        assert_eq!(
            report.report["peer"],
            dialed.to_string(),
            "{}",
            report.report
        );
        assert!(
            accept_within(&node.proxy_v4, Duration::from_secs(3)).is_some(),
            "{dialed}: the fast-open connection must land on the proxy"
        );
        assert!(nothing_pending(&node.apiserver_v4));
    }
}

/// An MPTCP socket's `connect()` runs the connect program on its first
/// subflow, a TCP socket of the kernel's, so a redirect would attest the
/// connection but `getpeername` on the agent's socket would show the
/// proxy. Agent cgroups may not open MPTCP sockets at all; elsewhere they
/// work as before.
#[test]
fn an_agent_may_not_open_an_mptcp_socket() {
    require_root!();
    let node = Node::new();
    node.redirector.add_target(SERVICE_IP).unwrap();
    let target = node.apiserver_v4_addr();
    node.redirector.add_target(target).unwrap();

    let outside = probe(node.in_other(), target, &["--mptcp"]);
    if outside.report["stage"] == "socket" {
        chaperone_tests::skip!(
            "this kernel opens no MPTCP socket (is net.mptcp.enabled 0, or CONFIG_MPTCP off?): {}",
            outside.report
        );
    }
    assert_eq!(outside.report["connected"], true, "{}", outside.report);
    assert!(accept_within(&node.apiserver_v4, Duration::from_secs(3)).is_some());

    for (dialed, extra) in [
        (SERVICE_IP, &["--mptcp"][..]),
        (target, &["--mptcp"][..]),
        (target, &["--mptcp", "--v6-socket"][..]),
        (node.apiserver_v6.local_addr().unwrap(), &["--mptcp"][..]),
    ] {
        let inside = probe(node.in_agent(), dialed, extra);
        assert_eq!(inside.report["connected"], false, "{}", inside.report);
        assert_eq!(inside.report["stage"], "socket", "{}", inside.report);
        assert_eq!(inside.report["errno"], EPERM, "{}", inside.report);
    }
    assert!(nothing_pending(&node.proxy_v4));
    assert!(nothing_pending(&node.apiserver_v4));
    assert!(nothing_pending(&node.apiserver_v6));
    // Plain TCP from the same agent is redirected as always.
    let tcp = probe(node.in_agent(), SERVICE_IP, &[]);
    assert_eq!(tcp.report["peer"], "10.96.0.1:443", "{}", tcp.report);
    assert!(accept_within(&node.proxy_v4, Duration::from_secs(3)).is_some());
}

#[test]
fn a_destination_that_is_not_a_target_is_not_redirected() {
    require_root!();
    let node = Node::new();
    node.redirector.add_target(SERVICE_IP).unwrap();
    let elsewhere = node.apiserver_v4_addr();

    let probe = probe(node.in_agent(), elsewhere, &[]);
    assert_eq!(probe.report["connected"], true, "{}", probe.report);
    assert!(accept_within(&node.apiserver_v4, Duration::from_secs(3)).is_some());
    assert!(nothing_pending(&node.proxy_v4));
    assert_eq!(node.redirector.counters().redirected, 0);
}

#[test]
fn ipv6_targets_are_redirected() {
    require_root!();
    let node = Node::new();
    let target = node.apiserver_v6.local_addr().unwrap();
    node.redirector.add_target(target).unwrap();

    let probe = probe(node.in_agent(), target, &[]);
    assert_eq!(probe.report["connected"], true, "{}", probe.report);
    assert_eq!(probe.report["peer"], target.to_string());
    let (stream, peer) =
        accept_within(&node.proxy_v6, Duration::from_secs(3)).expect("the IPv6 proxy accepts");
    assert!(nothing_pending(&node.apiserver_v6));
    let attested = node
        .redirector
        .take_connection(AgentAddr(peer), ProxyAddr(stream.local_addr().unwrap()))
        .expect("attested");
    assert_eq!(attested.orig_dst.0, target);
}

#[test]
fn ipv4_mapped_targets_on_ipv6_sockets_are_redirected() {
    require_root!();
    let node = Node::new();
    let target = node.apiserver_v4_addr();
    node.redirector.add_target(target).unwrap();

    let probe = probe(node.in_agent(), target, &["--v6-socket"]);
    assert_eq!(probe.report["connected"], true, "{}", probe.report);
    let mapped = format!("[::ffff:{}]:{}", target.ip(), target.port());
    assert_eq!(probe.report["peer"], mapped);
    let (stream, peer) =
        accept_within(&node.proxy_v4, Duration::from_secs(3)).expect("the IPv4 proxy accepts");
    assert!(nothing_pending(&node.apiserver_v4));
    let attested = node
        .redirector
        .take_connection(AgentAddr(peer), ProxyAddr(stream.local_addr().unwrap()))
        .expect("attested");
    assert_eq!(attested.orig_dst.0, target);
}

#[test]
fn with_no_proxy_listening_the_agent_fails_and_never_reaches_the_target() {
    require_root!();
    // A port nothing listens on.
    let dead_port = {
        let probe_listener = TcpListener::bind("0.0.0.0:0").unwrap();
        probe_listener.local_addr().unwrap().port()
    };
    let node = Node::with_proxy_port(Some(dead_port));
    let target = node.apiserver_v4_addr();
    node.redirector.add_target(target).unwrap();

    let probe = probe(node.in_agent(), target, &[]);
    assert_eq!(probe.report["connected"], false, "{}", probe.report);
    assert_eq!(probe.report["errno"], ECONNREFUSED, "{}", probe.report);
    assert!(
        nothing_pending(&node.apiserver_v4),
        "the API server must not be reached"
    );
}

#[test]
fn refused_destinations_fail_with_eperm_only_for_agents() {
    require_root!();
    let node = Node::new();
    for destination in RefusedDestination::defaults() {
        node.redirector.refuse(destination).unwrap();
    }
    let kubelet = TcpListener::bind((node.netns.host_v4, 10250)).expect("bind the kubelet port");
    kubelet.set_nonblocking(true).unwrap();
    let kubelet_addr = kubelet.local_addr().unwrap();

    let agent = probe(node.in_agent(), kubelet_addr, &[]);
    assert_eq!(agent.report["connected"], false, "{}", agent.report);
    assert_eq!(agent.report["errno"], EPERM, "{}", agent.report);
    assert!(nothing_pending(&kubelet));

    let metadata: SocketAddr = "169.254.169.254:80".parse().unwrap();
    let agent_metadata = probe(node.in_agent(), metadata, &[]);
    assert_eq!(
        agent_metadata.report["errno"], EPERM,
        "{}",
        agent_metadata.report
    );
    let etcd: SocketAddr = SocketAddr::new(IpAddr::V4(node.netns.host_v4), 2379);
    let agent_etcd = probe(node.in_agent(), etcd, &[]);
    assert_eq!(agent_etcd.report["errno"], EPERM, "{}", agent_etcd.report);
    // The kubelet's read-only port (issue 24): pods, specs and env, no auth.
    let read_only = TcpListener::bind((node.netns.host_v4, 10255)).expect("bind :10255");
    read_only.set_nonblocking(true).unwrap();
    let agent_read_only = probe(node.in_agent(), read_only.local_addr().unwrap(), &[]);
    assert_eq!(
        agent_read_only.report["errno"], EPERM,
        "{}",
        agent_read_only.report
    );
    assert!(nothing_pending(&read_only));

    let outside = probe(node.in_other(), kubelet_addr, &[]);
    assert_eq!(outside.report["connected"], true, "{}", outside.report);
    assert!(accept_within(&kubelet, Duration::from_secs(3)).is_some());
    assert_eq!(node.redirector.counters().refused, 4);
}

#[test]
fn a_pod_cgroup_guards_the_containers_below_it() {
    require_root!();
    let node = Node::new();
    node.redirector
        .remove_agent_cgroup(CgroupId(node.agent.id()))
        .unwrap();
    let pod_cgroup = node.agent.path.parent().unwrap().to_path_buf();
    let pod_id = chaperone::redirect::cgroupfs::cgroup_id(&pod_cgroup).unwrap();
    node.redirector.add_agent_cgroup(pod_id).unwrap();
    node.redirector.add_target(SERVICE_IP).unwrap();

    let probe = probe(node.in_agent(), SERVICE_IP, &[]);
    assert_eq!(probe.report["connected"], true, "{}", probe.report);
    let (stream, peer) = accept_within(&node.proxy_v4, Duration::from_secs(3)).expect("redirected");
    let attested = node
        .redirector
        .take_connection(AgentAddr(peer), ProxyAddr(stream.local_addr().unwrap()))
        .unwrap();
    assert_eq!(attested.agent_cgroup_id, pod_id);
    assert_eq!(attested.cgroup_id, CgroupId(node.agent.id()));

    // Unlisting the pod stops the redirect.
    node.redirector.remove_agent_cgroup(pod_id).unwrap();
    let after = probe_expect_unreachable(&node);
    assert_eq!(after["connected"], false, "{after}");
    assert!(nothing_pending(&node.proxy_v4));
}

fn probe_expect_unreachable(node: &Node) -> Value {
    // 10.96.0.1 has no route other than the namespace's default, which leads
    // to the host where nothing answers it: the connect times out or fails.
    probe(node.in_agent(), SERVICE_IP, &[]).report.clone()
}

/// chaperone's own sockets are told apart by their cgroup, nothing else:
/// so it never makes its own cgroup (or one above it, up to the root) an
/// agent cgroup, which would send its upstream connections into its proxy.
#[test]
fn chaperone_never_guards_its_own_cgroup() {
    require_root!();
    let node = Node::new();
    let own = chaperone::redirect::cgroupfs::own_lineage().expect("this process's cgroups");
    assert!(!own.is_empty());
    for id in own {
        let refused = node.redirector.add_agent_cgroup(id);
        assert!(
            matches!(
                refused,
                Err(chaperone::redirect::RedirectError::OwnCgroup(refused)) if refused == id
            ),
            "cgroup {id}: {refused:?}"
        );
        assert!(!node.redirector.agent_cgroups().contains(&id));
    }
}

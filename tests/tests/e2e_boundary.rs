//! The node's boundary as an agent meets it (issue 24, items 2 and 8): a
//! real `chaperone node` against the simulator, real eBPF, a real agent
//! pod. The node finds every address the API server answers on by itself
//! (the `default/kubernetes` Service and Endpoints, watched), and refuses
//! agents its own admin port. Needs root; skips with a clear line otherwise.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    process::Stdio,
    time::{Duration, Instant},
};

use chaperone_tests::{
    e2e::{SERVICE_IP, World, WorldSpec},
    require_root,
    topology::Placement,
};
use serde_json::{Value, json};

const EPERM: i64 = 1;

fn probe(placement: Placement<'_>, target: SocketAddr) -> Value {
    let mut cmd = placement.command(env!("CARGO_BIN_EXE_agent-probe"));
    cmd.arg(target.to_string());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn agent-probe");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read probe report");
    let _ = child.kill();
    let _ = child.wait();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe printed {line:?}: {e}"))
}

/// Whether `listener` accepts a connection within `wait`.
fn accepts(listener: &TcpListener, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The agent dials `target` until a dial lands on the proxy rather than on
/// `listener` (the API server reached directly), for up to `limit`. `true`
/// when one did; every dial that reached `listener` is counted in `direct`.
fn redirected_within(
    world: &World,
    listener: &TcpListener,
    target: SocketAddr,
    limit: Duration,
    direct: &mut usize,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let report = probe(world.agent(), target);
        let reached = accepts(listener, Duration::from_millis(300));
        if reached {
            *direct += 1;
        } else if report["connected"] == true {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn endpoints(addr: SocketAddr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "subsets": [{
            "addresses": [{"ip": addr.ip().to_string()}],
            "ports": [{"name": "https", "port": addr.port(), "protocol": "TCP"}],
        }],
    })
}

/// Issue 24, attack 2: the agent dials an API-server endpoint (IP:6443)
/// instead of the `kubernetes` ClusterIP. Nobody told the node about it
/// (no `--target`): it learns it from `default/kubernetes` Endpoints, and
/// follows when they change.
#[test]
fn a_direct_dial_to_an_api_server_endpoint_is_redirected_and_follows_the_endpoints() {
    require_root!();
    let world = World::start(WorldSpec {
        direct_listener: true,
        direct_as_target: false,
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    let first = world.direct.as_ref().unwrap();
    let first_addr = first.local_addr().unwrap();

    world
        .sim()
        .store()
        .create(endpoints(first_addr))
        .expect("publish the API server's endpoint");
    let mut direct = 0;
    assert!(
        redirected_within(
            &world,
            first,
            first_addr,
            Duration::from_secs(15),
            &mut direct
        ),
        "a dial to the published endpoint {first_addr} never landed on the proxy \
         ({direct} reached the API server directly)\n{}",
        world.node.log_text()
    );
    // Once redirected, always: no dial gets past any more.
    for _ in 0..3 {
        let report = probe(world.agent(), first_addr);
        assert_eq!(report["connected"], true, "{report}");
        assert_eq!(report["peer"], first_addr.to_string(), "{report}");
        assert!(
            !accepts(first, Duration::from_millis(300)),
            "the endpoint was reached directly"
        );
    }

    // The API server moves: the new endpoint is guarded as well.
    let second = TcpListener::bind((world.netns.host_v4, 0)).unwrap();
    second.set_nonblocking(true).unwrap();
    let second_addr = second.local_addr().unwrap();
    let mut moved = world
        .sim()
        .store()
        .get("endpoints", Some("default"), "kubernetes")
        .unwrap();
    moved["subsets"] = endpoints(second_addr)["subsets"].clone();
    world.sim().store().update(moved).expect("move the endpoint");
    let mut direct = 0;
    assert!(
        redirected_within(
            &world,
            &second,
            second_addr,
            Duration::from_secs(15),
            &mut direct
        ),
        "after the Endpoints changed, a dial to {second_addr} never landed on the proxy\n{}",
        world.node.log_text()
    );
}

/// The `kubernetes` Service's ClusterIPs, IPv6 included, are targets
/// without `--target`. This node's proxy has no IPv6 address, so an IPv6
/// ClusterIP cannot be redirected: it is refused, never let through.
#[test]
fn every_cluster_ip_of_the_kubernetes_service_is_guarded() {
    require_root!();
    let world = World::start(WorldSpec::default()).expect("start the e2e world");
    let v6_cluster_ip = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1)),
        443,
    );
    world
        .sim()
        .store()
        .create(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {
                "clusterIP": SERVICE_IP.ip().to_string(),
                "clusterIPs": [SERVICE_IP.ip().to_string(), v6_cluster_ip.ip().to_string()],
                "ipFamilies": ["IPv4", "IPv6"],
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
            },
        }))
        .expect("create the kubernetes Service");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = probe(world.agent(), v6_cluster_ip);
        if last["errno"] == EPERM {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        last["errno"],
        EPERM,
        "the IPv6 ClusterIP was not guarded: {last}\n{}",
        world.node.log_text()
    );
    // The IPv4 ClusterIP is still redirected.
    let report = probe(world.agent(), SERVICE_IP);
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(report["peer"], SERVICE_IP.to_string(), "{report}");
}

/// Issue 24, item 8: chaperone's admin port (metrics name every agent's
/// verbs and resources) is refused to agents by chaperone's own programs,
/// on every address when it listens on all of them as in the DaemonSet.
#[test]
fn the_admin_port_is_refused_to_agents() {
    require_root!();
    let world = World::start(WorldSpec {
        admin_all_addresses: true,
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    let admin = SocketAddr::new(IpAddr::V4(world.netns.host_v4), world.node.admin_port);

    let report = probe(world.agent(), admin);
    assert_eq!(report["connected"], false, "{report}");
    assert_eq!(report["errno"], EPERM, "{report}");

    // The node itself (and its probes) still reach it.
    let metrics = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(3));
    assert!(metrics.is_ok(), "{metrics:?}");
    let other = world.unlabeled_cgroup("monitoring").unwrap();
    let outside = probe(
        Placement {
            cgroup: &other,
            netns: &world.netns,
        },
        admin,
    );
    assert_eq!(outside["connected"], true, "{outside}");
}

/// The host of the node's own API server URL (here the kubeconfig's
/// `https://127.0.0.1:PORT`) is a target without `--target`. From the
/// agent's namespace nothing listens there: only the redirect connects.
#[test]
fn the_nodes_own_api_server_host_is_guarded() {
    require_root!();
    let world = World::start(WorldSpec::default()).expect("start the e2e world");
    let server = world.sim().addr();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = probe(world.agent(), server);
        if last["connected"] == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last["connected"], true, "{last}\n{}", world.node.log_text());
    assert_eq!(last["peer"], server.to_string(), "{last}");
}

//! The node's boundary as an agent meets it (issue 24, items 2 and 8): a
//! real `chaperone node`, real eBPF, a real agent pod, against kube-sim and
//! the real kube-apiserver v1.20.2 (`on_both_servers!`). The node finds
//! every address the API server answers on by itself (the `default/kubernetes`
//! Service, Endpoints and EndpointSlices, watched; its own server's host),
//! and refuses agents its own admin port. Needs root; skips with a clear
//! line otherwise.
//!
//! Where each attack of issue 24 is tried (`::real`: on kube-apiserver
//! v1.20.2 as well as kube-sim):
//! 1. encoded paths: `request_oracle.rs` (real, HTTP/1.1 and HTTP/2),
//!    `e2e_guard::encoded_secret_paths_are_masked_or_refused_over_http1_and_http2`;
//! 2. the API server's own addresses: this file;
//! 3. the socket mark, MPTCP, `:10255`: `redirect.rs`, `kube_proxy_chains.rs`
//!    (the kernel path; no API server is involved);
//! 4. WebSocket watches and logs: `e2e_guard::watches_and_logs_over_websocket_are_refused_before_the_api_server`;
//! 5. un-guarding itself: `e2e_guard::an_agent_cannot_unlabel_itself`; the
//!    other built-in refusals in `inprocess_protect.rs` (kube-sim in process:
//!    the protect stage answers before anything is forwarded);
//! 6. chaperone's client certificate: [`an_agent_never_rides_on_chaperones_client_certificate`]
//!    (real only: kube-sim takes no client certificates);
//! 7. unbound tokens: `e2e_guard::a_token_bound_to_no_pod_is_refused`;
//! 8. unbounded state: `e2e_observe::metrics_stay_bounded_under_made_up_resources`,
//!    `e2e_observe::a_pod_over_its_in_flight_limit_gets_429_with_retry_after`,
//!    and the admin port here.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    process::Stdio,
    time::{Duration, Instant},
};

use base64::Engine as _;
use chaperone_tests::{
    e2e::{Backend, SERVICE_IP, World, WorldSpec, run_for},
    on_both_servers, require_root,
    topology::{Netns, Placement},
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

/// A node started without `--target` for the `kubernetes` ClusterIP must
/// still be given one (it refuses to start with none): an address nobody
/// dials.
const UNUSED_TARGET: &str = "192.0.2.1:9";

const PASSWORD: &str = "boundary-Pa55w0rd-do-not-leak";
const DENIED: &str = "secrets are not for agents (boundary test)";

/// Lets the agent do anything but read Secrets: a denial the agent can
/// only meet if its request went through chaperone.
const NO_SECRETS: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: no-secrets
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: no-secrets
      resources: [secrets]
      action: deny
      message: secrets are not for agents (boundary test)
  defaultAction: allow
"#;

/// An address of TEST-NET-1 (RFC 5737) per test process: the API server's
/// advertise address, or an address only an EndpointSlice names.
fn test_net_address(offset: u8) -> IpAddr {
    let n = (std::process::id() % 100) as u8;
    IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 10 + n + offset))
}

/// Makes `address` one of the host's own, on the host side of the agent
/// pod's veth: what the agent dials there reaches whatever listens on every
/// address (the API server) unless chaperone redirects it. Removed with
/// the veth when the namespace goes.
fn add_host_address(netns: &Netns, address: IpAddr) {
    let status = std::process::Command::new("ip")
        .args([
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            &netns.host_if,
        ])
        .status()
        .expect("run ip addr add");
    assert!(
        status.success(),
        "ip addr add {address} dev {}",
        netns.host_if
    );
}

fn api_server_port(world: &World) -> u16 {
    world
        .api
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API server URL has a port")
}

/// What the API server itself publishes in `default/kubernetes` Endpoints
/// (the real server writes them a moment after it is ready).
fn published_endpoints(world: &World) -> BTreeSet<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let published = world
            .api
            .get("endpoints", Some("default"), "kubernetes")
            .map(|e| endpoint_addresses(&e))
            .unwrap_or_default();
        if !published.is_empty() || Instant::now() > deadline {
            return published;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn endpoint_addresses(endpoints: &Value) -> BTreeSet<SocketAddr> {
    let mut all = BTreeSet::new();
    for subset in endpoints["subsets"].as_array().into_iter().flatten() {
        for address in subset["addresses"].as_array().into_iter().flatten() {
            for port in subset["ports"].as_array().into_iter().flatten() {
                let ip: IpAddr = address["ip"].as_str().unwrap().parse().unwrap();
                all.insert(SocketAddr::new(ip, port["port"].as_u64().unwrap() as u16));
            }
        }
    }
    all
}

fn create_secret(world: &World) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
    world
        .api
        .create(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": "default"},
            "data": {"password": encoded},
        }))
        .expect("create the Secret");
}

/// The attack: the agent's own token, straight at `server`, TLS
/// verification off (as an attacker would). What kubectl printed.
fn read_secret_at(world: &World, server: SocketAddr) -> (String, String) {
    let home = world.work.path().join("attacker-home");
    std::fs::create_dir_all(&home).unwrap();
    let empty = home.join("empty-kubeconfig");
    std::fs::write(&empty, "").unwrap();
    let mut kubectl = world.agent().command("kubectl");
    kubectl
        .args([
            &format!("--server=https://{server}"),
            &format!("--token={}", world.token),
            "--insecure-skip-tls-verify",
            "--request-timeout=5s",
            "get",
            "secret",
            "db",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.password}",
        ])
        .env("HOME", &home)
        .env("KUBECONFIG", &empty);
    let out = run_for(&mut kubectl, Duration::from_secs(20)).expect("run kubectl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that the agent reading the Secret at `server` meets chaperone's
/// denial within `limit`, and that no attempt ever returns the value.
fn assert_guarded_at(world: &World, server: SocketAddr, limit: Duration) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
    let deadline = Instant::now() + limit;
    let mut last = (String::new(), String::new());
    while Instant::now() < deadline {
        last = read_secret_at(world, server);
        let (stdout, stderr) = &last;
        assert!(
            !stdout.contains(&encoded) && !stdout.contains(PASSWORD),
            "the agent read the Secret at {server} without chaperone: {stdout}\n{}",
            world.node.log_text()
        );
        if stderr.contains(DENIED) {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!(
        "a read at {server} never met chaperone's denial: {last:?}\n{}",
        world.node.log_text()
    );
}

on_both_servers!(
    a_direct_dial_to_the_api_servers_published_endpoint_lands_on_the_proxy,
    every_cluster_ip_of_the_kubernetes_service_is_guarded,
    the_nodes_own_api_server_host_is_guarded,
    an_address_only_an_endpoint_slice_names_is_guarded,
    the_admin_port_is_refused_to_agents,
);

/// Issue 24, attack 2: the agent dials the API server's own address
/// (advertise address : secure port, as it publishes it in
/// `default/kubernetes`) instead of the ClusterIP, with its own token.
/// Nobody told the node (no `--target` for it): it learns it, and the
/// agent meets chaperone's policy there, never the API server.
fn a_direct_dial_to_the_api_servers_published_endpoint_lands_on_the_proxy(backend: Backend) {
    require_root!();
    let advertised = test_net_address(0);
    let world = World::start(WorldSpec {
        backend,
        advertise_address: Some(advertised),
        policy: NO_SECRETS.into(),
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    add_host_address(&world.netns, advertised);
    create_secret(&world);
    let endpoint = SocketAddr::new(advertised, api_server_port(&world));
    let published = published_endpoints(&world);
    assert!(
        published.contains(&endpoint),
        "the API server publishes {published:?}, not {endpoint}"
    );
    assert_guarded_at(&world, endpoint, Duration::from_secs(30));
    // The proxy answered where the agent dialed: its peer is the endpoint.
    let report = probe(world.agent(), endpoint);
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(report["peer"], endpoint.to_string(), "{report}");
}

/// The `kubernetes` Service's ClusterIPs are targets without `--target`:
/// the agent's in-cluster kubectl (`KUBERNETES_SERVICE_HOST`) works only
/// because the node learned the ClusterIP. IPv6: this node's proxy has no
/// IPv6 address, so an IPv6 ClusterIP is refused, never let through; that
/// half runs on kube-sim only, because the real 1.20 server's `kubernetes`
/// Service is single-stack (dual-stack is alpha there and the Service is
/// made from the primary range alone).
fn every_cluster_ip_of_the_kubernetes_service_is_guarded(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        service_ip_as_target: false,
        node_args: vec!["--target".into(), UNUSED_TARGET.into()],
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    let service = world
        .api
        .get("services", Some("default"), "kubernetes")
        .expect("the API server publishes the kubernetes Service");
    assert_eq!(service["spec"]["clusterIP"], SERVICE_IP.ip().to_string());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = probe(world.agent(), SERVICE_IP);
        if last["connected"] == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last["connected"], true, "{last}\n{}", world.node.log_text());
    assert_eq!(last["peer"], SERVICE_IP.to_string(), "{last}");
    let out = run_for(
        &mut world.agent_kubectl(&["get", "--raw", "/version"]),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "in-cluster kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    if backend == Backend::Real {
        return;
    }
    let v6_cluster_ip = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1)),
        443,
    );
    let mut dual = service;
    dual["spec"]["clusterIPs"] =
        json!([SERVICE_IP.ip().to_string(), v6_cluster_ip.ip().to_string()]);
    dual["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    world.api.update(dual).expect("make the Service dual-stack");
    let deadline = Instant::now() + Duration::from_secs(15);
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
}

/// The host of the node's own API server URL (here the kubeconfig's
/// `https://127.0.0.1:PORT`) is a target without `--target`. The API
/// server advertises another address, so only the node's own URL names
/// this one; from the agent's namespace nothing listens there: only the
/// redirect connects.
fn the_nodes_own_api_server_host_is_guarded(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        advertise_address: Some(test_net_address(100)),
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    let server = SocketAddr::new(
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        api_server_port(&world),
    );
    assert!(
        !published_endpoints(&world).contains(&server),
        "the API server publishes its loopback address"
    );
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

/// Issue 24, item 2: an address that only an EndpointSlice of the
/// `kubernetes` Service names (a dual-stack control plane's IPv6 slice, or
/// one written by hand) is guarded: IPv4 redirected; IPv6 refused while the
/// node has no proxy address of that family, redirected once it has one. Both servers are 1.20, which
/// serves EndpointSlices as `discovery.k8s.io/v1beta1` only.
fn an_address_only_an_endpoint_slice_names_is_guarded(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    let v4 = SocketAddr::new(test_net_address(50), 7443);
    let v6 = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x99)),
        6443,
    );
    for (name, family, address) in [("kubernetes-v4", "IPv4", v4), ("kubernetes-v6", "IPv6", v6)] {
        world
            .api
            .create(json!({
                "apiVersion": "discovery.k8s.io/v1beta1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "kubernetes"},
                },
                "addressType": family,
                "endpoints": [{"addresses": [address.ip().to_string()], "conditions": {"ready": true}}],
                "ports": [{"name": "https", "port": address.port(), "protocol": "TCP"}],
            }))
            .expect("create an EndpointSlice");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut last_v4, mut last_v6) = (Value::Null, Value::Null);
    while Instant::now() < deadline {
        last_v4 = probe(world.agent(), v4);
        last_v6 = probe(world.agent(), v6);
        if last_v4["connected"] == true && last_v6["errno"] == EPERM {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        last_v4["connected"],
        true,
        "{last_v4}\n{}",
        world.node.log_text()
    );
    assert_eq!(last_v4["peer"], v4.to_string(), "{last_v4}");
    assert_eq!(
        last_v6["errno"],
        EPERM,
        "{last_v6}\n{}",
        world.node.log_text()
    );

    // A dual-stack node (a proxy address of each family): the IPv6 slice
    // address is redirected, not refused.
    let mut world = world;
    let host_v6 = world.netns.host_v6.to_string();
    world
        .restart_node_with(&["--proxy-ip", &host_v6])
        .expect("restart the node with an IPv6 proxy address");
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        last_v6 = probe(world.agent(), v6);
        if last_v6["connected"] == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        last_v6["connected"],
        true,
        "{last_v6}\n{}",
        world.node.log_text()
    );
    assert_eq!(last_v6["peer"], v6.to_string(), "{last_v6}");
}

/// Issue 24, item 8: chaperone's admin port (metrics name every agent's
/// verbs and resources) is refused to agents by chaperone's own programs,
/// on every address when it listens on all of them as in the DaemonSet.
fn the_admin_port_is_refused_to_agents(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
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

/// The API server moves to another address: the node follows its
/// Endpoints. kube-sim only: a real kube-apiserver's endpoint reconciler
/// writes its own advertise address back within seconds, so its Endpoints
/// cannot be moved from outside; the real server's published endpoint is
/// covered above.
#[test]
fn a_direct_dial_follows_the_endpoints_when_they_move() {
    require_root!();
    let world = World::start(WorldSpec::default()).expect("start the e2e world");
    for _move in 0..2 {
        let listener = TcpListener::bind((world.netns.host_v4, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let mut moved = world
            .sim()
            .store()
            .get("endpoints", Some("default"), "kubernetes")
            .unwrap();
        moved["subsets"] = json!([{
            "addresses": [{"ip": address.ip().to_string()}],
            "ports": [{"name": "https", "port": address.port(), "protocol": "TCP"}],
        }]);
        world
            .sim()
            .store()
            .update(moved)
            .expect("move the endpoint");
        let mut direct = 0;
        assert!(
            redirected_within(
                &world,
                &listener,
                address,
                Duration::from_secs(15),
                &mut direct
            ),
            "after the Endpoints moved, a dial to {address} never landed on the proxy \
             ({direct} reached the API server directly)\n{}",
            world.node.log_text()
        );
        // Once redirected, always: no dial gets past any more.
        for _ in 0..3 {
            let report = probe(world.agent(), address);
            assert_eq!(report["connected"], true, "{report}");
            assert_eq!(report["peer"], address.to_string(), "{report}");
            assert!(
                !accepts(&listener, Duration::from_millis(300)),
                "the endpoint was reached directly"
            );
        }
    }
}

/// Issue 24, attack 6: chaperone authenticates with a client certificate
/// (of `system:masters` here) and the agent's own token has no rights. In
/// passthrough mode the agent's request must reach the API server as the
/// agent (which prefers a client certificate to a bearer token), so the
/// API server's RBAC refuses it and its audit log names the agent. Real
/// server only: kube-sim takes no client certificates, so on it the
/// attack cannot happen (`interceptor/tests/upstream_credentials.rs`
/// checks the TLS handshake itself).
#[test]
fn an_agent_never_rides_on_chaperones_client_certificate() {
    require_root!();
    chaperone_tests::require_real_api!();
    let world = World::start(WorldSpec {
        backend: Backend::Real,
        node_client_certificate: true,
        everyone_is_admin: false,
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    create_secret(&world);
    let out = run_for(
        &mut world.agent_kubectl(&[
            "get",
            "secret",
            "db",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.password}",
        ]),
        Duration::from_secs(30),
    )
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
    assert!(
        !stdout.contains(&encoded),
        "the agent read the Secret as chaperone: {stdout}"
    );
    let agent = "system:serviceaccount:default:agent";
    assert!(
        !out.status.success() && stderr.contains(agent) && stderr.contains("forbidden"),
        "the API server did not refuse the agent as itself: {stderr}\n{}",
        world.node.log_text()
    );
    let seen = world.api.seen("/api/v1/namespaces/default/secrets/db");
    assert!(!seen.is_empty(), "the API server saw no read of the Secret");
    for request in &seen {
        assert_eq!(request.user, agent, "{request:?}");
        assert_eq!(request.code, 403, "{request:?}");
    }
}

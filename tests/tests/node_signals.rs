//! What the node agent tells its operator is true: each gauge on
//! `/metrics` moves when its event happens, and `/readyz` waits for the pod
//! tracker and the policies. A real `chaperone node`, real eBPF, kube-sim;
//! root (skips with a clear line otherwise).

use std::{
    io::{Read, Write},
    process::Stdio,
    time::{Duration, Instant},
};

use chaperone_tests::{
    e2e::{World, WorldSpec},
    prom, require_root, wait,
};

/// `GET path` on the node agent's admin port: `(status code, body)`.
fn admin_get(world: &World, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", world.node.admin_port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

fn gauge(world: &World, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, body) = admin_get(world, "/metrics");
    assert_eq!(code, 200, "{body}");
    prom::parse(&body)
        .unwrap_or_else(|e| panic!("{e:#}\n{body}"))
        .sum(name, labels)
}

/// Waits until `gauge` reads `want`; panics with what it read otherwise.
fn wait_for_gauge(world: &World, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = gauge(world, name, labels);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {got}, expected {want}:\n{}",
            world.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `/readyz` answers 200; its body.
fn wait_ready(world: &World) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = admin_get(world, "/readyz");
        if code == 200 {
            return body;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const APPROVE_PROD_DELETES: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agent-guard
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: prod-deletes-need-approval
      verbs: [delete]
      namespaces: ["prod-*"]
      action: approve
      holdTimeout: 4s
  defaultAction: allow
"#;

/// `chaperone_approvals_held` was declared and never updated: it now
/// counts a held request while it waits, and drops when it stops waiting.
#[test]
fn approvals_held_counts_a_waiting_request() {
    require_root!();
    let world = World::start(WorldSpec {
        policy: APPROVE_PROD_DELETES.into(),
        ..WorldSpec::deciding_approvals()
    })
    .expect("start the e2e world");
    world
        .api
        .create(
            serde_json::json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod-a"}}),
        )
        .unwrap();
    world
        .api
        .create(serde_json::json!({"apiVersion":"v1","kind":"ConfigMap",
            "metadata":{"name":"settings","namespace":"prod-a"}}))
        .unwrap();
    assert_eq!(gauge(&world, "chaperone_approvals_held", &[]), 0.0);
    let mut held = world
        .agent_kubectl(&["delete", "configmap", "settings", "-n", "prod-a"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_gauge(&world, "chaperone_approvals_held", &[], 1.0);
    // Nobody decides: the hold times out and the request stops waiting.
    let _ = held.wait();
    wait_for_gauge(&world, "chaperone_approvals_held", &[], 0.0);
}

/// `chaperone_redirect_map_entries` and `chaperone_unresolved_pods` were
/// declared and never updated: the maps' sizes follow what the node agent
/// put in them, and a labeled pod on this node whose cgroup does not exist
/// is counted as unresolved.
#[test]
fn map_sizes_and_unresolved_pods_are_reported() {
    require_root!();
    let world = World::start(WorldSpec::default()).expect("start the e2e world");
    wait_ready(&world);
    let entries = |map: &str| gauge(&world, "chaperone_redirect_map_entries", &[("map", map)]);
    assert!(
        entries("AGENT_CGROUPS") >= 1.0,
        "{}",
        entries("AGENT_CGROUPS")
    );
    assert!(entries("TARGETS") >= 1.0, "{}", entries("TARGETS"));
    assert!(entries("REFUSED") >= 6.0, "defaults and the admin port");
    wait_for_gauge(&world, "chaperone_unresolved_pods", &[], 0.0);

    let before = entries("AGENT_CGROUPS");
    world
        .api
        .create(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent-nowhere", "namespace": "default",
                "labels": {"chaperone.dev/intercept": "true"}},
            "spec": {"nodeName": "e2e-node", "automountServiceAccountToken": false,
                "containers": [{"name": "agent", "image": "agent:latest"}]},
        }))
        .unwrap();
    wait_for_gauge(&world, "chaperone_unresolved_pods", &[], 1.0);
    assert_eq!(entries("AGENT_CGROUPS"), before, "nothing to guard yet");
}

/// deploy/README.md says the DaemonSet's pod is ready only once the pod
/// tracker has synced and policy is loaded; `/readyz` ignored both. With
/// cluster policies and no AgentPolicy CRD the policies never sync: not
/// ready, saying which check fails, and the log says to install the CRD
/// (no Rust debug dump).
#[test]
fn readyz_waits_for_pods_and_policies() {
    require_root!();
    let local = World::start(WorldSpec::default()).expect("start the e2e world");
    let body = wait_ready(&local);
    assert!(body.contains("[+]pods-synced ok"), "{body}");
    assert!(body.contains("[+]policies-synced ok"), "{body}");
    drop(local);

    let cluster = World::start(WorldSpec {
        policy: String::new(),
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    // The policy watch has tried and failed: the log says what to do.
    wait::wait_for(
        "the node to log that the AgentPolicy CRD must be installed",
        Duration::from_secs(20),
        || {
            cluster
                .node
                .log_text()
                .contains("install its CRD")
                .then_some(())
        },
    );
    let (code, body) = admin_get(&cluster, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("[-]policies-synced"), "{body}");
    // The watch retries every second or so; the warning is not repeated
    // within the minute: seen after two more attempts at the API server.
    let attempts = || {
        cluster
            .sim()
            .requests()
            .iter()
            .filter(|r| r.uri.contains("/agentpolicies"))
            .count()
    };
    let first = attempts();
    wait::wait_for(
        "the node to retry its AgentPolicy watch twice",
        Duration::from_secs(20),
        || (attempts() >= first + 2).then_some(()),
    );
    let log = cluster.node.log_text();
    assert!(!log.contains("ApiError"), "{log}");
    let warnings = log
        .lines()
        .filter(|l| l.contains("AgentPolicy objects") && l.contains("install its CRD"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}

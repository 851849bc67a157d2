//! What agents' API connections do when the node agent goes away and comes
//! back: fail closed (the default) keeps the programs pinned and refusing,
//! a new node agent adopts them without a window where agents go direct,
//! `failOpen` lets agents through after a clean exit, `chaperone detach`
//! removes everything, and so does a node agent on SIGTERM when its own
//! DaemonSet is gone or being deleted (but not while it is there, nor when
//! the API server cannot say). A real `chaperone node`, real eBPF, real kubectl; each
//! world pins into its own bpffs instance and detaches on teardown. Needs
//! root; skips with a clear line otherwise.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use chaperone_tests::{
    e2e::{
        NODE_DAEMONSET, NODE_NAMESPACE, SERVICE_IP, World, WorldSpec, create_node_pod, run_for,
        workspace_binary,
    },
    require_root,
    topology::Placement,
};
use serde_json::Value;

const ECONNREFUSED: i64 = 111;

fn world(node_args: &[&str]) -> World {
    World::start(WorldSpec {
        node_args: node_args.iter().map(|a| a.to_string()).collect(),
        direct_listener: true,
        ..WorldSpec::default()
    })
    .expect("start the e2e world")
}

fn direct_addr(world: &World) -> SocketAddr {
    world.direct.as_ref().unwrap().local_addr().unwrap()
}

/// One connect from `placement` to `target`: the probe's JSON report.
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

/// How many connections the direct listener accepted (drains it).
fn direct_accepts(listener: &TcpListener, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    let mut count = 0;
    loop {
        match listener.accept() {
            Ok(_) => count += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return count;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn kubectl_works(world: &World) -> bool {
    run_for(
        &mut world.agent_kubectl(&["get", "namespaces", "-o", "name"]),
        Duration::from_secs(30),
    )
    .map(|out| out.status.success())
    .unwrap_or(false)
}

fn link_pins(world: &World) -> Vec<String> {
    world
        .bpffs_pins()
        .into_iter()
        .filter(|p| p.starts_with("chaperone/links/"))
        .collect()
}

/// While no node agent runs, an agent's connect to the API server is
/// refused (it never reaches the API server directly), and a process
/// outside the agent cgroups is not affected.
fn assert_fails_closed(world: &World, how: &str) {
    let direct = world.direct.as_ref().unwrap();
    let report = probe(world.agent(), SERVICE_IP);
    assert_eq!(report["connected"], false, "{how}: {report}");
    assert_eq!(report["errno"], ECONNREFUSED, "{how}: {report}");
    let report = probe(world.agent(), direct_addr(world));
    assert_eq!(report["connected"], false, "{how}: {report}");
    assert_eq!(report["errno"], ECONNREFUSED, "{how}: {report}");
    assert_eq!(
        direct_accepts(direct, Duration::from_millis(300)),
        0,
        "{how}: the agent reached the API server without chaperone"
    );
    let unlabeled = world.unlabeled_cgroup("sshd").unwrap();
    let report = probe(
        Placement {
            cgroup: &unlabeled,
            netns: &world.netns,
        },
        direct_addr(world),
    );
    assert_eq!(report["connected"], true, "{how}: unlabeled: {report}");
    assert_eq!(
        direct_accepts(direct, Duration::from_secs(2)),
        1,
        "{how}: an unlabeled process reaches the API server as before"
    );
}

fn killed_node_agent_fails_closed(signal: libc::c_int, how: &str) {
    let mut world = world(&[]);
    assert!(kubectl_works(&world), "kubectl through chaperone");
    assert_eq!(
        link_pins(&world).len(),
        6,
        "one pinned link per program: {:?}",
        world.bpffs_pins()
    );
    world.node.signal_and_wait(signal);
    assert!(!world.node.is_running());
    assert_fails_closed(&world, how);
    assert_eq!(
        link_pins(&world).len(),
        6,
        "{how}: the pins outlive the agent"
    );
}

#[test]
fn sigkilled_node_agent_fails_closed() {
    require_root!();
    killed_node_agent_fails_closed(libc::SIGKILL, "after SIGKILL");
}

#[test]
fn sigtermed_node_agent_fails_closed() {
    require_root!();
    killed_node_agent_fails_closed(libc::SIGTERM, "after SIGTERM");
}

/// A restart while an agent keeps dialing: every attempt either reaches
/// chaperone or is refused; none reaches the API server directly. The new
/// node agent adopts the pinned links (their programs are replaced in
/// place) and kubectl works again.
#[test]
fn restarted_node_agent_takes_over_with_no_direct_window() {
    require_root!();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut world = world(&[]);
        let direct = direct_addr(&world);
        let mut dialer = world
            .agent()
            .command(env!("CARGO_BIN_EXE_agent-probe"))
            .args([direct.to_string().as_str(), "--repeat-ms", "6000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the dialing agent");
        let stdout = dialer.stdout.take().unwrap();
        let (first_connected, connected_seen) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut attempts = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let attempt: Value = serde_json::from_str(&line).unwrap();
                if attempt["connected"] == true {
                    let _ = first_connected.send(());
                }
                attempts.push(attempt);
            }
            attempts
        });
        // The agent reaches chaperone before the node agent goes away.
        connected_seen
            .recv_timeout(Duration::from_secs(20))
            .expect("the dialing agent never reached chaperone before the restart");
        world.node.signal_and_wait(signal);
        let stopped = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        world.restart_node().expect("a new node agent starts");
        let restarted = stopped.elapsed();
        let _ = dialer.wait();
        let attempts = reader.join().unwrap();

        let leaked = direct_accepts(world.direct.as_ref().unwrap(), Duration::from_millis(300));
        assert_eq!(leaked, 0, "connections reached the API server directly");
        let connected = attempts.iter().filter(|a| a["connected"] == true).count();
        let refused = attempts
            .iter()
            .filter(|a| a["errno"] == ECONNREFUSED)
            .count();
        let max_gap_ms = longest_refused_run_ms(&attempts);
        eprintln!(
            "restart after signal {signal}: {} attempts, {connected} reached chaperone, \
             {refused} refused, longest refused run {max_gap_ms} ms, agent down→ready {restarted:?}",
            attempts.len()
        );
        assert_eq!(
            connected + refused,
            attempts.len(),
            "every attempt either reached chaperone or was refused: {attempts:?}"
        );
        assert!(
            connected > 0 && refused > 0,
            "the dialer saw both sides of the restart"
        );
        assert!(
            attempts.last().unwrap()["connected"] == true,
            "after the restart the agent reaches chaperone again"
        );
        assert!(
            world.node.log_text().contains("adopted the pinned link"),
            "{}",
            world.node.log_text()
        );
        assert!(kubectl_works(&world), "kubectl after the restart");
        assert_eq!(link_pins(&world).len(), 6, "{:?}", world.bpffs_pins());
    }
}

/// Milliseconds between the first and last attempt of the longest run of
/// refused attempts.
fn longest_refused_run_ms(attempts: &[Value]) -> u64 {
    let mut longest = 0;
    let mut start: Option<u64> = None;
    for attempt in attempts {
        let t = attempt["t_ms"].as_u64().unwrap_or(0);
        if attempt["connected"] == true {
            start = None;
        } else {
            let s = *start.get_or_insert(t);
            longest = longest.max(t - s);
        }
    }
    longest
}

/// failOpen: nothing stays pinned, and after the node agent exits agents
/// reach the API server directly.
#[test]
fn fail_open_node_agent_lets_agents_through_after_exit() {
    require_root!();
    let mut world = world(&["--fail-open"]);
    let direct = world.direct.as_ref().unwrap();
    assert!(kubectl_works(&world));
    assert_eq!(
        link_pins(&world),
        Vec::<String>::new(),
        "failOpen pins no links"
    );
    let report = probe(world.agent(), direct_addr(&world));
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(
        direct_accepts(direct, Duration::from_millis(300)),
        0,
        "redirected to chaperone while it runs"
    );
    world.node.stop();
    let report = probe(world.agent(), direct_addr(&world));
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(
        direct_accepts(world.direct.as_ref().unwrap(), Duration::from_secs(2)),
        1,
        "after a failOpen exit the agent goes direct"
    );
}

/// Switching a node from fail closed to failOpen: the failOpen agent adopts
/// the pins (no gap), removes them, and lets agents through when it exits.
#[test]
fn fail_open_agent_adopts_and_releases_a_fail_closed_agents_pins() {
    require_root!();
    let mut world = world(&[]);
    world.node.signal_and_wait(libc::SIGKILL);
    world
        .restart_node_with(&["--fail-open"])
        .expect("failOpen node agent starts");
    assert!(world.node.log_text().contains("adopted the pinned link"));
    assert!(kubectl_works(&world));
    assert_eq!(
        world.bpffs_pins(),
        Vec::<String>::new(),
        "failOpen removed the pins"
    );
    world.node.stop();
    let report = probe(world.agent(), direct_addr(&world));
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(
        direct_accepts(world.direct.as_ref().unwrap(), Duration::from_secs(2)),
        1
    );
}

/// `chaperone detach` removes every pin and detaches the links, even those
/// no process holds any more: agents go direct, nothing is left in bpffs.
#[test]
fn detach_removes_every_pin_and_link() {
    require_root!();
    let mut world = world(&[]);
    world.node.signal_and_wait(libc::SIGKILL);
    assert_fails_closed(&world, "before detach");
    let out = Command::new(workspace_binary("chaperone"))
        .arg("detach")
        .arg("--bpffs")
        .arg(&world.bpffs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("detached and unpinned link").count(),
        6,
        "{stdout}"
    );
    assert_eq!(stdout.matches("unpinned map").count(), 7, "{stdout}");
    assert_eq!(world.bpffs_pins(), Vec::<String>::new());
    // The programs are off the cgroup: the agent reaches the target directly.
    let report = probe(world.agent(), direct_addr(&world));
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(
        direct_accepts(world.direct.as_ref().unwrap(), Duration::from_secs(2)),
        1
    );
    // Idempotent.
    let out = Command::new(workspace_binary("chaperone"))
        .arg("detach")
        .arg("--bpffs")
        .arg(&world.bpffs)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing pinned"));
}

/// A pinned map with another layout (a chaperone version with different
/// map types) does not brick the node: it is replaced, with a log line.
#[test]
fn incompatible_pinned_map_is_replaced() {
    require_root!();
    let mut world = world(&[]);
    world.node.signal_and_wait(libc::SIGKILL);
    let maps = world.bpffs.join("maps");
    // TARGETS becomes a per-CPU array: what an incompatible version left.
    std::fs::remove_file(maps.join("TARGETS")).unwrap();
    aya::maps::MapData::from_pin(maps.join("COUNTERS"))
        .unwrap()
        .pin(maps.join("TARGETS"))
        .unwrap();
    world.restart_node().expect("the node agent starts anyway");
    assert!(
        world.node.log_text().contains("another map layout"),
        "{}",
        world.node.log_text()
    );
    assert!(kubectl_works(&world), "kubectl through the new maps");
}

/// `chaperone detach` takes the programs off the cgroup even while a node
/// agent still holds the links (a lingering pod during removal).
#[test]
fn detach_works_while_a_node_agent_still_runs() {
    require_root!();
    let world = world(&[]);
    let out = Command::new(workspace_binary("chaperone"))
        .arg("detach")
        .arg("--bpffs")
        .arg(&world.bpffs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(world.bpffs_pins(), Vec::<String>::new());
    let report = probe(world.agent(), direct_addr(&world));
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(
        direct_accepts(world.direct.as_ref().unwrap(), Duration::from_secs(2)),
        1,
        "the running agent's links were detached too"
    );
}

// === removal: the node agent's own DaemonSet decides on SIGTERM ===

/// A world whose node agent is the pod of the DaemonSet
/// `chaperone-system/chaperone-node` in the simulator.
fn daemonset_world() -> World {
    let world = World::start(WorldSpec {
        direct_listener: true,
        node_pod: true,
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    wait_for_log(&world, "watching the DaemonSet that runs this node agent");
    world
}

fn wait_for_log(world: &World, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !world.node.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the node agent never logged {needle:?}:\n{}",
            world.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kubectl ARGS` as a cluster admin on the host.
fn admin_kubectl(world: &World, args: &[&str]) -> String {
    let admin = world.person("admin", &["system:masters"]).unwrap();
    let out = run_for(&mut admin.kubectl(args), Duration::from_secs(30)).unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// After the node agent exited: nothing is pinned and the agent's
/// connections reach the API server directly.
fn assert_detached(world: &World) {
    assert_eq!(
        world.bpffs_pins(),
        Vec::<String>::new(),
        "{}",
        world.node.log_text()
    );
    let report = probe(world.agent(), direct_addr(world));
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(
        direct_accepts(world.direct.as_ref().unwrap(), Duration::from_secs(2)),
        1,
        "after removal the agent goes direct"
    );
}

/// `kubectl delete daemonset` (what `kubectl delete -k deploy/` does), then
/// the pod's SIGTERM: the agent detaches its programs and removes the pins.
#[test]
fn deleted_daemonset_detaches_on_sigterm() {
    require_root!();
    let mut world = daemonset_world();
    assert!(kubectl_works(&world), "kubectl through chaperone");
    admin_kubectl(
        &world,
        &["delete", "daemonset", NODE_DAEMONSET, "-n", NODE_NAMESPACE],
    );
    assert!(world.node.signal_and_wait(libc::SIGTERM));
    let log = world.node.log_text();
    assert!(
        log.contains("chaperone is being removed from this node"),
        "{log}"
    );
    assert!(log.contains("chaperone-node is gone"), "{log}");
    assert_detached(&world);
}

/// A rolling update, a drain, a restart: the DaemonSet is there (even
/// changed), so SIGTERM keeps the pins, agents stay refused, and the next
/// node agent adopts them.
#[test]
fn present_daemonset_keeps_the_pins_on_sigterm() {
    require_root!();
    let mut world = daemonset_world();
    admin_kubectl(
        &world,
        &[
            "-n",
            NODE_NAMESPACE,
            "set",
            "env",
            &format!("daemonset/{NODE_DAEMONSET}"),
            "CHAPERONE_LOG=debug",
        ],
    );
    assert!(world.node.signal_and_wait(libc::SIGTERM));
    let log = world.node.log_text();
    assert!(log.contains("chaperone-node is present"), "{log}");
    assert_fails_closed(&world, "after SIGTERM with the DaemonSet present");
    assert_eq!(link_pins(&world).len(), 6, "{:?}", world.bpffs_pins());
    world.restart_node().expect("the next node agent starts");
    assert!(world.node.log_text().contains("adopted the pinned link"));
    assert!(kubectl_works(&world), "kubectl after the update");
}

/// `kubectl delete --cascade=foreground`: the DaemonSet stays, with a
/// deletionTimestamp, until its pods are gone; that is removal too.
#[test]
fn daemonset_being_deleted_detaches_on_sigterm() {
    require_root!();
    let mut world = daemonset_world();
    admin_kubectl(
        &world,
        &[
            "delete",
            "daemonset",
            NODE_DAEMONSET,
            "-n",
            NODE_NAMESPACE,
            "--cascade=foreground",
            "--wait=false",
        ],
    );
    let deleting = admin_kubectl(
        &world,
        &[
            "get",
            "daemonset",
            NODE_DAEMONSET,
            "-n",
            NODE_NAMESPACE,
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ],
    );
    assert!(!deleting.is_empty(), "the DaemonSet waits for its pods");
    assert!(world.node.signal_and_wait(libc::SIGTERM));
    let log = world.node.log_text();
    assert!(log.contains("is being deleted"), "{log}");
    assert_detached(&world);
}

/// The API server does not answer on SIGTERM: the agent cannot know, keeps
/// the pins (fail closed) and says what the operator can do.
#[test]
fn unreachable_api_server_keeps_the_pins_and_says_what_to_do() {
    require_root!();
    let mut world = daemonset_world();
    world.runtime.block_on(world.sim().shutdown());
    assert!(world.node.signal_and_wait(libc::SIGTERM));
    let log = world.node.log_text();
    assert!(
        log.contains("did not say whether DaemonSet chaperone-system/chaperone-node still exists"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "chaperone detach --bpffs {}",
            world.bpffs.display()
        )),
        "{log}"
    );
    assert!(log.contains("CHAPERONE_FAIL_OPEN=true"), "{log}");
    assert_fails_closed(&world, "SIGTERM without the API server");
    assert_eq!(link_pins(&world).len(), 6, "{:?}", world.bpffs_pins());
}

/// `kubectl delete -k deploy/` removes the node agent's service account
/// and RBAC with the DaemonSet, so at SIGTERM the API server no longer
/// answers it; the watch saw the DaemonSet go, and that is enough.
#[test]
fn a_deletion_the_watch_saw_detaches_even_when_the_api_server_is_gone() {
    require_root!();
    let mut world = daemonset_world();
    admin_kubectl(
        &world,
        &["delete", "daemonset", NODE_DAEMONSET, "-n", NODE_NAMESPACE],
    );
    wait_for_log(
        &world,
        "the watch saw DaemonSet chaperone-system/chaperone-node deleted",
    );
    world.runtime.block_on(world.sim().shutdown());
    assert!(world.node.signal_and_wait(libc::SIGTERM));
    let log = world.node.log_text();
    assert!(log.contains("as the watch saw"), "{log}");
    assert_detached(&world);
}

/// `kubectl delete` then `kubectl apply` at once: the new DaemonSet's agent
/// starts beside the old one (still draining) and adopts the pins. The old
/// agent sees its DaemonSet replaced, but must not take the programs away
/// from the new one: it leaves the pins, and agents stay guarded.
#[test]
fn a_recreated_daemonsets_agent_keeps_the_pins_the_old_one_leaves() {
    require_root!();
    let mut world = daemonset_world();
    admin_kubectl(
        &world,
        &["delete", "daemonset", NODE_DAEMONSET, "-n", NODE_NAMESPACE],
    );
    let pod = create_node_pod(&world.api, "e2e-node").unwrap();
    let mut new_agent = world.node_beside(Some(&pod)).expect("the new agent starts");
    assert!(new_agent.log_text().contains("adopted the pinned link"));
    assert!(world.node.signal_and_wait(libc::SIGTERM));
    let log = world.node.log_text();
    assert!(log.contains("now is another one"), "{log}");
    assert!(
        log.contains("another node agent on this node holds the pinned programs"),
        "{log}"
    );
    assert_eq!(link_pins(&world).len(), 6, "{:?}", world.bpffs_pins());
    assert!(kubectl_works(&world), "kubectl through the new agent");
    assert_eq!(
        direct_accepts(world.direct.as_ref().unwrap(), Duration::from_millis(300)),
        0,
        "nothing went direct"
    );
    new_agent.stop();
    assert_fails_closed(&world, "after the new agent's SIGTERM");
}

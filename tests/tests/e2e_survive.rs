//! Chaperone keeps working when clients and the API server misbehave, and
//! for more than kubectl: a second real client library (the official Python
//! client), agents that drop watches mid-stream, an API-server restart, and
//! a thousand concurrent watches. Every client runs inside the agent pod
//! (namespace + cgroup) as an in-cluster client and reaches the simulator
//! only through the kernel redirect. Needs root.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use chaperone_tests::{
    e2e::{World, WorldSpec, run_for, workspace_binary},
    require_root,
    sim::SimConfig,
};

const LIMIT: Duration = Duration::from_secs(30);

/// Whom the agent pod's requests act as (passthrough: its own token).
const AGENT: &str = "system:serviceaccount:default:agent";

/// A child process whose stdout lines arrive on a channel; killed on drop.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for a line starting with `prefix`; panics with everything seen
    /// (and `context`) when it does not come within `limit`.
    fn expect_line(
        &mut self,
        prefix: &str,
        limit: Duration,
        context: &dyn Fn() -> String,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "no line starting with {prefix:?} within {limit:?}\nstdout:\n{}\nstderr:\n{}\n{}",
                        self.seen.join("\n"),
                        self.stderr.lock().unwrap(),
                        context()
                    );
                }
            }
        }
    }

    /// Waits for the process to exit; its status and every stdout line.
    fn finish(&mut self, limit: Duration) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "still running after {limit:?}\nstdout:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF; collect what is left.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        (status, self.seen.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `agent-watch` (see its docs) inside the agent pod.
fn agent_watch(world: &World, watches: usize, name: &str, seconds: u32) -> Running {
    let mut cmd = world
        .agent()
        .in_cluster_command(&world.credentials, workspace_binary("agent-watch"));
    cmd.args(["--watches", &watches.to_string(), "--name", name])
        .args(["--seconds", &seconds.to_string()]);
    Running::spawn(cmd)
}

fn create_configmap(world: &World, name: &str) {
    world
        .sim()
        .store()
        .create(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default"},
            "data": {"made": "by the test"},
        }))
        .unwrap();
}

/// Polls `f` until it is true or `limit` passes.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// GET on chaperone's admin listener: (status code, body).
fn admin_get(world: &World, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", world.node.admin_port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

fn assert_healthy(world: &World) {
    let (code, body) = admin_get(world, "/healthz");
    assert_eq!(code, 200, "chaperone /healthz: {body}");
    let out = run_for(
        &mut world.agent_kubectl(&["get", "configmaps", "-o", "name"]),
        LIMIT,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "kubectl through chaperone failed: {}\nchaperone log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        world.node.log_text()
    );
}

fn python_client() -> PathBuf {
    let setup = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/setup.sh");
    let out = Command::new("sh").arg(&setup).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed (it installs the Python kubernetes client from PyPI on first use): {}",
        setup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn the_python_kubernetes_client_lists_and_watches_through_chaperone() {
    require_root!();
    let python = python_client();
    let world = World::start(WorldSpec::default()).unwrap();
    create_configmap(&world, "before");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/list_watch.py");
    let mut cmd = world
        .agent()
        .in_cluster_command(&world.credentials, &python);
    cmd.arg(&script).arg("made-meanwhile");
    let mut client = Running::spawn(cmd);
    let log = || format!("chaperone log:\n{}", world.node.log_text());
    let listed = client.expect_line("listed ", Duration::from_secs(60), &log);
    let rv = listed.split_whitespace().nth(2).unwrap().to_owned();
    assert!(
        client.seen.iter().any(|l| l == "item before"),
        "{:?}",
        client.seen
    );
    // Made after the list: only the watch (from the list's resourceVersion)
    // can deliver it.
    create_configmap(&world, "made-meanwhile");
    client.expect_line("event ADDED made-meanwhile", LIMIT, &log);
    let (code, _) = client.finish(LIMIT);
    assert_eq!(code, Some(0));

    // The simulator saw the library's own requests, which only the redirect
    // could have brought it.
    let requests = world.sim().requests();
    let from_python = |r: &&chaperone_tests::sim::RecordedRequest| {
        r.header("user-agent")
            .is_some_and(|ua| ua.starts_with("OpenAPI-Generator") && ua.contains("python"))
    };
    assert!(
        requests
            .iter()
            .filter(from_python)
            .any(|r| r.uri == "/api/v1/namespaces/default/configmaps" && r.status == 200),
        "no list from the Python client: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .filter(from_python)
            .any(|r| r.uri.contains("watch=true")
                && r.uri.contains(&format!("resourceVersion={rv}"))),
        "no watch from the Python client at resourceVersion {rv}: {:#?}",
        requests
            .iter()
            .map(|r| (&r.uri, r.header("user-agent")))
            .collect::<Vec<_>>()
    );
}

#[test]
fn watches_a_client_drops_mid_stream_release_their_upstream_streams() {
    require_root!();
    let world = World::start(WorldSpec::default()).unwrap();
    create_configmap(&world, "existing");
    let log = || format!("chaperone log:\n{}", world.node.log_text());
    // The agent's watches, as the simulator serves them (chaperone's own,
    // such as the pod tracker's, act as chaperone and are not counted).
    let agent_watches = || world.sim().open_watches_of(AGENT);

    // A custom HTTP/2 client: five watch streams, then the process dies.
    let mut watcher = agent_watch(&world, 5, "never-made", 60);
    watcher.expect_line("open 5", LIMIT, &log);
    assert!(
        eventually(Duration::from_secs(5), || agent_watches() == 5),
        "the simulator serves {} of the agent's watches, expected 5",
        agent_watches()
    );
    drop(watcher);
    assert!(
        eventually(Duration::from_secs(10), || agent_watches() == 0),
        "after the agent went away the simulator still serves {} of its watches: \
         chaperone did not release the upstream streams",
        agent_watches()
    );

    // Real kubectl, killed mid-watch.
    let mut kubectl = Running::spawn(world.agent_kubectl(&["get", "configmaps", "-w"]));
    kubectl.expect_line("existing", LIMIT, &log);
    assert!(
        eventually(Duration::from_secs(5), || agent_watches() == 1),
        "kubectl's watch is not open upstream ({} of the agent's watches)",
        agent_watches()
    );
    drop(kubectl);
    assert!(
        eventually(Duration::from_secs(10), || agent_watches() == 0),
        "kubectl's watch still open upstream after kubectl died"
    );
    assert_healthy(&world);
}

#[test]
fn an_upstream_restart_fails_in_flight_requests_cleanly_and_new_ones_succeed() {
    require_root!();
    let world = World::start(WorldSpec::default()).unwrap();
    let log = || format!("chaperone log:\n{}", world.node.log_text());
    let chaperone_pid = world.node.pid();

    let mut watcher = agent_watch(&world, 3, "never-made", 60);
    watcher.expect_line("open 3", LIMIT, &log);
    world.runtime.block_on(world.sim().shutdown());

    // In flight: every stream ends (an error or the end of the stream), none hangs.
    let (code, lines) = watcher.finish(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{lines:?}");
    eprintln!("in-flight watches when the API server went away: {lines:?}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("ended ")).count(),
        3,
        "{lines:?}"
    );

    // New requests while it is down: a Kubernetes Status (503), quickly.
    let started = Instant::now();
    let out = run_for(
        &mut world.agent_kubectl(&["get", "--raw", "/api/v1/namespaces/default/configmaps"]),
        LIMIT,
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ServiceUnavailable") && stderr.contains("cannot reach the API server"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    eprintln!("a new request while it was down: {}", stderr.trim());

    // The same address, CA and state again: the same chaperone serves new
    // requests (short ones and watches) without a restart.
    world.runtime.block_on(world.sim().restart()).unwrap();
    assert_healthy(&world);
    let mut watcher = agent_watch(&world, 3, "after-restart", 30);
    watcher.expect_line("open 3", LIMIT, &log);
    create_configmap(&world, "after-restart");
    watcher.expect_line("events 3", LIMIT, &log);
    assert_eq!(world.node.pid(), chaperone_pid);
    assert!(
        !world.node.log_text().contains("panicked"),
        "{}",
        world.node.log_text()
    );
}

#[test]
fn a_thousand_concurrent_watches_all_get_the_event() {
    require_root!();
    const WATCHES: usize = 1000;
    // A server that allows 100 streams per connection (as many balancers
    // do): 1,000 watches need chaperone to open at least ten connections.
    let world = World::start(WorldSpec {
        sim: SimConfig {
            http2_max_streams: 100,
            ..SimConfig::default().permissive()
        },
        ..WorldSpec::default()
    })
    .unwrap();
    let log = || format!("chaperone log:\n{}", world.node.log_text());
    let agent_watches = || world.sim().open_watches_of(AGENT);
    let rss_before = world.node.rss_kib().unwrap_or(0);
    let served_before = world.sim().served_connections();

    let started = Instant::now();
    let mut watcher = agent_watch(&world, WATCHES, "fan-out", 50);
    watcher.expect_line(&format!("open {WATCHES}"), Duration::from_secs(40), &log);
    let opened = started.elapsed();
    assert!(
        eventually(Duration::from_secs(5), || agent_watches() == WATCHES),
        "the simulator serves {} of the agent's watches",
        agent_watches()
    );
    let rss_open = world.node.rss_kib().unwrap_or(0);
    let upstream_connections = world.sim().open_connections();
    let handshakes = world.sim().served_connections() - served_before;
    assert!(
        upstream_connections >= WATCHES / 100,
        "{upstream_connections} upstream connections cannot carry {WATCHES} streams at 100 each"
    );

    let made = Instant::now();
    create_configmap(&world, "fan-out");
    watcher.expect_line(&format!("events {WATCHES}"), LIMIT, &log);
    let delivered = made.elapsed();
    eprintln!(
        "{WATCHES} watches through chaperone: all open in {opened:?}, one event reached all in \
         {delivered:?}; upstream connections {upstream_connections} ({handshakes} TLS handshakes); chaperone RSS {rss_before} KiB \
         before, {rss_open} KiB with the watches open"
    );

    drop(watcher);
    assert!(
        eventually(Duration::from_secs(15), || agent_watches() == 0),
        "{} of the agent's watches still open upstream after it left",
        agent_watches()
    );
    assert_healthy(&world);
}

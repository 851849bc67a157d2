//! Real kubectl, configured exactly like an in-cluster pod, inside an agent
//! namespace and cgroup, reaching the simulator only through chaperone's
//! kernel redirect and proxy. Every output must match the same command run
//! straight at the simulator. Needs root.

use std::time::Duration;

use chaperone_tests::{
    e2e::{Backend, World, WorldSpec, run_for},
    on_both_servers, require_root,
    wait::{Followed, wait_for},
};

const LIMIT: Duration = Duration::from_secs(60);

fn text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `args` through chaperone and directly; both must succeed with the
/// same stdout, which is returned.
fn same_both_ways(world: &World, args: &[&str]) -> String {
    let proxied = run_for(&mut world.agent_kubectl(args), LIMIT).unwrap();
    let direct = run_for(&mut world.direct_kubectl(args), LIMIT).unwrap();
    assert!(
        proxied.status.success(),
        "kubectl {args:?} through chaperone failed: {}\nchaperone log:\n{}",
        String::from_utf8_lossy(&proxied.stderr),
        world.node.log_text()
    );
    assert!(
        direct.status.success(),
        "kubectl {args:?} direct failed: {}",
        String::from_utf8_lossy(&direct.stderr)
    );
    assert_eq!(
        text(&proxied),
        text(&direct),
        "kubectl {args:?}: output differs through chaperone"
    );
    text(&proxied)
}

on_both_servers!(
    everyday_kubectl_works_through_chaperone_unchanged,
    reads_writes_and_discovery_match_the_api_server,
);

fn everyday_kubectl_works_through_chaperone_unchanged(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        ..WorldSpec::default()
    })
    .expect("start the e2e world");

    let namespaces = same_both_ways(&world, &["get", "namespaces", "-o", "name"]);
    assert!(namespaces.contains("namespace/default"), "{namespaces}");
    let version = same_both_ways(&world, &["get", "--raw", "/version"]);
    assert!(version.contains("gitVersion"), "{version}");
}

fn agent_ok(world: &World, args: &[&str]) -> String {
    let out = run_for(&mut world.agent_kubectl(args), LIMIT).unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?} through chaperone failed: {}\nchaperone log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        world.node.log_text()
    );
    text(&out)
}

fn agent_fails(world: &World, args: &[&str]) -> String {
    let out = run_for(&mut world.agent_kubectl(args), LIMIT).unwrap();
    assert!(
        !out.status.success(),
        "kubectl {args:?} should have failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(world: &World, name: &str, yaml: &str) -> String {
    // The agent's private mount namespace still sees the host's /tmp.
    let path = world.work.path().join(name);
    std::fs::write(&path, yaml).unwrap();
    path.to_string_lossy().into_owned()
}

/// A pod, and on the simulator its log (a real server needs a kubelet for
/// logs).
fn seed_pod(world: &World, name: &str, log: &[&str]) {
    world
        .api
        .create(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "app:1",
                     "env": [{"name": "MODE", "value": "demo"}]}]},
        }))
        .unwrap();
    if world.api.backend() == Backend::Real {
        return;
    }
    for line in log {
        world
            .sim()
            .store()
            .append_log("default", name, None, line)
            .unwrap();
    }
}

fn reads_writes_and_discovery_match_the_api_server(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        ..WorldSpec::default()
    })
    .unwrap();
    seed_pod(&world, "web-0", &["starting", "ready"]);

    same_both_ways(&world, &["get", "pod", "web-0", "-o", "yaml"]);
    same_both_ways(
        &world,
        &[
            "get",
            "pods",
            "-o",
            "custom-columns=NAME:.metadata.name,PHASE:.status.phase",
        ],
    );
    let resources = same_both_ways(&world, &["api-resources", "--no-headers", "-o", "name"]);
    assert!(resources.contains("deployments.apps"), "{resources}");
    assert_eq!(
        same_both_ways(&world, &["auth", "can-i", "delete", "pods"]).trim(),
        "yes"
    );
    if backend == Backend::Sim {
        // Logs come from a kubelet, which the real server here has not.
        same_both_ways(&world, &["logs", "web-0"]);
    }

    // Writes, each on its own object through chaperone, checked in the store.
    let cm = write(
        &world,
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: agent-cm\ndata:\n  a: \"1\"\n",
    );
    assert_eq!(
        agent_ok(&world, &["create", "-f", &cm]).trim(),
        "configmap/agent-cm created"
    );
    assert_eq!(
        agent_ok(&world, &["label", "configmap", "agent-cm", "tier=web"]).trim(),
        "configmap/agent-cm labeled"
    );
    assert_eq!(
        agent_ok(
            &world,
            &[
                "patch",
                "configmap",
                "agent-cm",
                "-p",
                r#"{"data":{"b":"2"}}"#
            ]
        )
        .trim(),
        "configmap/agent-cm patched"
    );
    let stored = world
        .api
        .get("configmaps", Some("default"), "agent-cm")
        .unwrap();
    assert_eq!(stored["data"]["b"], "2");
    assert_eq!(stored["metadata"]["labels"]["tier"], "web");
    let applied = write(
        &world,
        "apply.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  k: v\n",
    );
    assert_eq!(
        agent_ok(&world, &["apply", "-f", &applied]).trim(),
        "configmap/applied created"
    );
    assert_eq!(
        agent_ok(&world, &["apply", "-f", &applied]).trim(),
        "configmap/applied unchanged"
    );
    let ssa = write(
        &world,
        "ssa.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  k: v\n",
    );
    assert_eq!(
        agent_ok(&world, &["apply", "--server-side", "-f", &ssa]).trim(),
        "configmap/ssa serverside-applied"
    );
    // Typed `kubectl create` commands send protobuf bodies.
    assert_eq!(
        agent_ok(
            &world,
            &[
                "create",
                "deployment",
                "preview",
                "--image=web:2",
                "--port=8080"
            ]
        )
        .trim(),
        "deployment.apps/preview created"
    );
    let deployment = world
        .api
        .get("deployments.apps", Some("default"), "preview")
        .unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "web:2"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        8080
    );
    assert_eq!(
        agent_ok(&world, &["delete", "configmap", "agent-cm"]).trim(),
        "configmap \"agent-cm\" deleted"
    );
    assert!(
        world
            .api
            .get("configmaps", Some("default"), "agent-cm")
            .is_none()
    );
}

#[test]
fn exec_carries_stdin_stdout_and_the_exit_code() {
    require_root!();
    let world = World::start(WorldSpec::default()).unwrap();
    seed_pod(&world, "web-0", &["line one"]);

    let exec = run_for(
        &mut world.agent_kubectl(&["exec", "web-0", "--", "sh", "-c", "echo hello; exit 3"]),
        LIMIT,
    )
    .unwrap();
    assert_eq!(text(&exec), "hello\n");
    assert_eq!(
        exec.status.code(),
        Some(3),
        "exit code: {}",
        String::from_utf8_lossy(&exec.stderr)
    );
    let mut stdin_exec = world.agent_kubectl(&["exec", "-i", "web-0", "--", "cat"]);
    stdin_exec
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = stdin_exec.spawn().unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"typed input\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "typed input\n");
    let env = agent_ok(&world, &["exec", "web-0", "--", "env"]);
    assert!(env.contains("MODE=demo"), "{env}");
}

#[test]
fn watch_and_follow_outputs_arrive() {
    require_root!();
    let world = World::start(WorldSpec::default()).unwrap();
    seed_pod(&world, "web-0", &["line one"]);
    let mut watch = world.agent_kubectl(&["get", "configmaps", "-w", "-o", "name"]);
    watch
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let watcher = Followed::new(watch.spawn().unwrap());
    let mut follow = world.agent_kubectl(&["logs", "-f", "web-0"]);
    follow
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let follower = Followed::new(follow.spawn().unwrap());
    // Both streams are open: the simulator serves the watch, and the log
    // follower has printed the line already there.
    // (The agent's watch: chaperone's own are open all along.)
    wait_for(
        "the agent's configmap watch to reach the simulator",
        LIMIT,
        || {
            (world
                .sim()
                .open_watches_of("system:serviceaccount:default:agent")
                > 0)
            .then_some(())
        },
    );
    follower.wait_for("line one\n", LIMIT);
    world
        .sim()
        .store()
        .create(serde_json::json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"appeared","namespace":"default"}}))
        .unwrap();
    world
        .sim()
        .store()
        .append_log("default", "web-0", None, "line two")
        .unwrap();
    watcher.wait_for("configmap/appeared", LIMIT);
    follower.wait_for("line two\n", LIMIT);
    let outputs: Vec<String> = [watcher, follower]
        .into_iter()
        .map(Followed::kill)
        .collect();
    assert!(
        outputs[0].contains("configmap/appeared"),
        "watch saw: {:?}",
        outputs[0]
    );
    assert_eq!(outputs[1], "line one\nline two\n");
}

#[test]
fn port_forward_carries_bytes_both_ways() {
    require_root!();
    let world = World::start(WorldSpec::default()).unwrap();
    seed_pod(&world, "web-0", &[]);
    // The pod's port 8080 is really an echo server on the host.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            let mut reader = stream.try_clone().unwrap();
            let mut writer = stream;
            let _ = std::io::copy(&mut reader, &mut writer);
        }
    });
    world
        .sim()
        .set_pod_port("default", "web-0", 8080, echo_addr);
    let local_port = 18080 + (std::process::id() % 1000) as u16;
    let mut pf = world.agent_kubectl(&["port-forward", "pod/web-0", &format!("{local_port}:8080")]);
    pf.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let forwarding = Followed::new(pf.spawn().unwrap());
    // kubectl says so once it listens.
    forwarding.wait_for(&format!("Forwarding from 127.0.0.1:{local_port}"), LIMIT);
    // port-forward listens on the agent's loopback: talk to it from inside.
    let mut nc = world.agent().command("bash");
    nc.args([
        "-c",
        &format!("exec 3<>/dev/tcp/127.0.0.1/{local_port}; echo ping >&3; head -c 5 <&3"),
    ]);
    let out = run_for(&mut nc, Duration::from_secs(20));
    forwarding.kill();
    let out = out.unwrap();
    assert_eq!(
        text(&out),
        "ping\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bundle_without_chaperones_ca_fails_with_a_tls_error() {
    require_root!();
    let world = World::start(WorldSpec::default()).unwrap();
    std::fs::write(world.credentials.dir.join("ca.crt"), world.sim().ca_pem()).unwrap();
    let stderr = agent_fails(&world, &["get", "pods"]);
    assert!(
        stderr.contains("certificate signed by unknown authority") || stderr.contains("x509"),
        "{stderr}"
    );
    assert!(
        world
            .sim()
            .requests()
            .iter()
            .all(|r| r.token.as_deref() != Some(world.token.as_str())),
        "nothing may reach the API server on a failed handshake"
    );
}

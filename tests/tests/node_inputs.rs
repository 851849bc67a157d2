//! A mistake in `chaperone node`'s or `chaperone detach`'s inputs changes
//! nothing on the host, and `chaperone check` with the same flags predicts
//! what `chaperone node` does. Real `chaperone` processes, real eBPF and
//! bpffs; root (skips with a clear line otherwise).

use std::{
    ffi::OsString,
    net::{Ipv4Addr, TcpListener},
    process::{Command, Output},
    time::Duration,
};

use chaperone_tests::{
    e2e::{World, WorldSpec, run_for, workspace_binary},
    require_root,
    topology::BpffsMount,
};

fn world() -> World {
    World::start(WorldSpec::default()).expect("start the e2e world")
}

/// `chaperone ARGS`, bounded in time.
fn chaperone(args: &[OsString]) -> Output {
    run_for(
        Command::new(workspace_binary("chaperone")).args(args),
        Duration::from_secs(60),
    )
    .expect("chaperone ran")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The world's node command with `flag`'s value replaced (or the flag
/// added), and the subcommand replaced by `subcommand`.
fn variant(world: &World, subcommand: &str, changes: &[(&str, OsString)]) -> Vec<OsString> {
    let mut args = world.node_command().to_vec();
    args[0] = subcommand.into();
    for (flag, value) in changes {
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = value.clone(),
            None => args.extend([OsString::from(flag), value.clone()]),
        }
    }
    args
}

fn kubectl_works(world: &World) -> bool {
    run_for(
        &mut world.agent_kubectl(&["get", "namespaces", "-o", "name"]),
        Duration::from_secs(30),
    )
    .map(|out| out.status.success())
    .unwrap_or(false)
}

/// The proxy port the world's running node agent was given.
fn proxy_port(world: &World) -> u16 {
    let args = world.node_command();
    let at = args
        .iter()
        .position(|a| a == "--proxy-port")
        .expect("the world's node has --proxy-port");
    args[at + 1].to_str().unwrap().parse().unwrap()
}

/// A free port on `ip` other than every port in `taken`. Free ports are
/// picked per address, so a port free on loopback may be the world's proxy
/// port on the veth address, which `chaperone node` rightly refuses as an
/// admin port: the test would then fail for a reason it is not about.
fn free_port_except(ip: Ipv4Addr, taken: &[u16]) -> u16 {
    loop {
        let port = TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !taken.contains(&port) {
            return port;
        }
    }
}

/// A free admin port on loopback, not the world's proxy port.
fn free_admin_port(world: &World) -> u16 {
    free_port_except(Ipv4Addr::LOCALHOST, &[proxy_port(world)])
}

/// `chaperone detach --bpffs DIR` on an ordinary directory used to delete
/// its files and the directory (`unpinned map config.json`, exit 0).
#[test]
fn detach_refuses_an_ordinary_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    std::fs::create_dir(dir.path().join("maps")).unwrap();
    std::fs::write(dir.path().join("maps").join("notes.txt"), "keep me").unwrap();
    let out = chaperone(&["detach".into(), "--bpffs".into(), dir.path().into()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not on a BPF filesystem")
            && text(&out).contains("nothing was removed"),
        "{}",
        text(&out)
    );
    assert!(dir.path().join("config.json").exists());
    assert!(dir.path().join("maps").join("notes.txt").exists());
}

/// `chaperone detach --bpffs /sys/fs/bpf` (the parent, holding other
/// programs' pins) removes nothing.
#[test]
fn detach_refuses_a_bpffs_holding_other_pins() {
    require_root!();
    let mount = BpffsMount::create().unwrap();
    std::fs::create_dir_all(mount.path.join("tc/globals")).unwrap();
    std::fs::create_dir_all(mount.path.join("maps")).unwrap();
    let out = chaperone(&["detach".into(), "--bpffs".into(), mount.path.clone().into()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("tc"),
        "names what it found: {}",
        text(&out)
    );
    assert!(mount.path.join("tc/globals").is_dir());
    assert!(mount.path.join("maps").is_dir());
}

/// `--policy DIR` holding a broken policy: the node agent used to attach
/// and pin its programs, then fail on the policy, leaving agents refused.
/// Now it refuses before it pins anything, naming the file; and a
/// directory of good policies is loaded like `policy check` reads it.
#[test]
fn a_bad_policy_directory_changes_nothing() {
    require_root!();
    let world = world();
    let fresh = BpffsMount::create().unwrap();
    let policies = world.work.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("broken.yaml"),
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: broken}\nspec:\n  rules:\n  - verbs: [get]\n    action: explode\n",
    )
    .unwrap();
    let args = variant(
        &world,
        "node",
        &[
            ("--policy", policies.clone().into()),
            ("--bpffs", fresh.path.join("chaperone").into()),
            (
                "--admin-addr",
                format!("127.0.0.1:{}", free_admin_port(&world)).into(),
            ),
        ],
    );
    let out = chaperone(&args);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("broken.yaml"), "{}", text(&out));
    assert!(text(&out).contains("nothing was changed"), "{}", text(&out));
    assert_eq!(fresh.pins(), Vec::<String>::new(), "{}", text(&out));
    assert!(kubectl_works(&world), "the running node agent still serves");

    // The same directory with a good policy: `check` loads it.
    std::fs::remove_file(policies.join("broken.yaml")).unwrap();
    let repo_policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies");
    let files = std::fs::read_dir(&repo_policies)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "yaml")
        })
        .count();
    let args = variant(&world, "check", &[("--policy", repo_policies.into())]);
    let out = chaperone(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("from {files} files")),
        "{}",
        text(&out)
    );
}

/// A node agent started beside a running one (a rolling update) with a
/// busy admin port used to re-point the shared pins to its own proxy port
/// before it failed: every agent connection then went to a dead port while
/// the old node agent still ran.
#[test]
fn a_busy_admin_port_leaves_the_running_agent_alone() {
    require_root!();
    let world = world();
    assert!(kubectl_works(&world));
    let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let args = variant(
        &world,
        "node",
        &[
            (
                "--admin-addr",
                busy.local_addr().unwrap().to_string().into(),
            ),
            (
                "--proxy-port",
                free_port_except(
                    world.netns.host_v4,
                    &[busy.local_addr().unwrap().port(), proxy_port(&world)],
                )
                .to_string()
                .into(),
            ),
        ],
    );
    let out = chaperone(&args);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("admin"), "{}", text(&out));
    assert!(
        kubectl_works(&world),
        "agents still reach the running node agent: {}",
        text(&out)
    );
}

/// `chaperone check` used to say `ready: yes` for flags `chaperone node`
/// then refused (`… is not on a BPF filesystem`). With the same flags, both
/// now agree, both ways.
#[test]
fn check_predicts_node() {
    require_root!();
    let world = world();
    let out = chaperone(&variant(&world, "check", &[]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ready:             yes"),
        "{}",
        text(&out)
    );

    let not_bpffs = tempfile::tempdir().unwrap();
    let changes = [
        ("--bpffs", not_bpffs.path().join("chaperone").into()),
        (
            "--admin-addr",
            format!("127.0.0.1:{}", free_admin_port(&world)).into(),
        ),
    ];
    let check = chaperone(&variant(&world, "check", &changes));
    assert!(!check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("not on a BPF filesystem"),
        "{}",
        text(&check)
    );
    let node = chaperone(&variant(&world, "node", &changes));
    assert!(!node.status.success(), "{}", text(&node));
    assert!(
        text(&node).contains("not on a BPF filesystem"),
        "{}",
        text(&node)
    );
    assert!(
        !not_bpffs.path().join("chaperone").exists(),
        "nothing created"
    );
}

// === logs for clusters ===

/// A log pipeline reads the node agent's stderr: with `--log-format json`
/// every line is one JSON object; in text, no ANSI colour codes when stderr
/// is not a terminal (they broke `grep approval=apr`).
#[test]
fn logs_are_json_on_request_and_never_coloured_in_a_pipe() {
    require_root!();
    let json = World::start(WorldSpec {
        node_args: vec!["--log-format".into(), "json".into()],
        ..WorldSpec::default()
    })
    .expect("start the e2e world");
    let log = json.node.log_text();
    let mut lines = 0;
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["level"].is_string(), "{line}");
        assert!(event["fields"]["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    drop(json);

    let text = world();
    // (The ready line is seen before it is kept: wait for it.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !text.node.log_text().contains("node agent ready") && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = text.node.log_text();
    assert!(log.contains("node agent ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe: {log:?}");
}

/// A `--log` filter that does not parse used to become `info` silently.
#[test]
fn a_bad_log_filter_is_refused() {
    let out = chaperone(&["--log".into(), "chaperone=verbose".into(), "check".into()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("chaperone=verbose") && text(&out).contains("not a log filter"),
        "{}",
        text(&out)
    );
}

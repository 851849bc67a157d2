//! Real kubectl, configured exactly like an in-cluster pod, inside an agent
//! namespace and cgroup, reaching the simulator only through chaperone's
//! kernel redirect and proxy. Every output must match the same command run
//! straight at the simulator. Needs root.

use std::time::Duration;

use chaperone_tests::{
    e2e::{World, WorldSpec, run_for},
    require_root,
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

#[test]
fn everyday_kubectl_works_through_chaperone_unchanged() {
    require_root!();
    let world = World::start(WorldSpec::default()).expect("start the e2e world");

    let namespaces = same_both_ways(&world, &["get", "namespaces", "-o", "name"]);
    assert!(namespaces.contains("namespace/default"), "{namespaces}");
    let version = same_both_ways(&world, &["get", "--raw", "/version"]);
    assert!(version.contains("gitVersion"), "{version}");
}

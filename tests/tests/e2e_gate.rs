//! `chaperone gate` in the agent's pod, through the kernel redirect: in a
//! cgroup the node agent has not mapped (a pod that started while no node
//! agent ran) it keeps waiting and gives up saying what to check; in the
//! agent pod's mapped cgroup its handshake is answered by chaperone's proxy
//! and it exits 0. Needs root.

use std::time::Duration;

use chaperone_tests::{
    e2e::{Backend, World, WorldSpec, run_for, workspace_binary},
    on_both_servers, require_root,
    topology::Placement,
};

on_both_servers!(the_gate_opens_only_in_a_cgroup_the_node_agent_guards);

fn the_gate_opens_only_in_a_cgroup_the_node_agent_guards(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        ..WorldSpec::default()
    })
    .unwrap();
    // chaperone's CA alone, as the webhook mounts it into the gate.
    let ca = world.work.path().join("chaperone-ca.crt");
    std::fs::write(&ca, world.node.ca_pem()).unwrap();
    let gate = |placement: Placement<'_>| {
        let mut command =
            placement.in_cluster_command(&world.credentials, workspace_binary("chaperone"));
        command
            .arg("gate")
            .arg("--ca")
            .arg(&ca)
            .args(["--timeout", "3s", "--interval", "1s"]);
        run_for(&mut command, Duration::from_secs(30)).unwrap()
    };
    let text = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // A pod whose cgroup is in no agent map yet: its connection to the
    // service address is not chaperone's, so it waits and then gives up.
    let starting = world.unlabeled_cgroup("pod-starting").unwrap();
    let out = gate(Placement {
        cgroup: &starting,
        netns: &world.netns,
    });
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not guarded yet"), "{}", text(&out));
    assert!(
        text(&out).contains("kubectl chaperone status"),
        "{}",
        text(&out)
    );

    // The agent pod, mapped by the node agent: the proxy answers.
    let out = gate(world.agent());
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        world.node.log_text()
    );
}

//! Identity end to end with a real kubectl agent through the kernel
//! redirect: impersonate mode (the API server sees chaperone's credentials
//! and impersonation headers; the agent's own token is useless without
//! chaperone; agent-sent Impersonate-* never pass), a token signed with a
//! rotated key, and the pod tracker guarding a pod by its label alone, for
//! the pod's lifetime.
//! Needs root.

use std::time::{Duration, Instant};

use chaperone_tests::{
    e2e::{Backend, World, WorldSpec, run_for},
    on_both_servers, require_root,
};

on_both_servers!(
    impersonate_mode_reoriginates_with_chaperones_credentials,
    a_policy_can_ask_for_impersonation_on_a_passthrough_node,
);

/// The admin user of the world's API server (chaperone's own credentials
/// in these worlds).
fn admin_user(world: &World) -> &'static str {
    match world.api.backend() {
        Backend::Sim => "kubernetes-admin",
        Backend::Real => "chaperone-test-admin",
    }
}

const LIMIT: Duration = Duration::from_secs(60);

fn kubectl(world: &World, args: &[&str]) -> std::process::Output {
    run_for(&mut world.agent_kubectl(args), LIMIT).unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn impersonate_mode_reoriginates_with_chaperones_credentials(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        node_args: vec![
            "--credential-mode".into(),
            "impersonate".into(),
            "--audience".into(),
            "chaperone".into(),
        ],
        token_audience: Some(vec!["chaperone".into()]),
        ..WorldSpec::default()
    })
    .unwrap();

    let out = kubectl(&world, &["get", "configmaps", "-n", "default"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        world.node.log_text()
    );
    let seen = world
        .api
        .seen("/api/v1/namespaces/default/configmaps")
        .pop()
        .expect("the list reached the API server");
    assert_eq!(
        seen.user,
        admin_user(&world),
        "upstream must carry chaperone's credentials, not the agent's token"
    );
    let (acted_as, extra) = seen.impersonated.expect("impersonation headers");
    assert_eq!(acted_as, "system:serviceaccount:default:agent");
    assert!(
        extra
            .get("authentication.kubernetes.io/pod-uid")
            .is_some_and(|v| v == std::slice::from_ref(&world.pod_uid)),
        "the pod is named in Impersonate-Extra: {extra:?}"
    );

    // The agent's token alone is refused by the API server: it is minted for
    // chaperone's audience.
    let direct = run_for(
        &mut world.direct_kubectl(&["get", "configmaps", "-n", "kube-system"]),
        LIMIT,
    )
    .unwrap();
    assert!(!direct.status.success());
    assert!(
        text(&direct).contains("Unauthorized") || text(&direct).contains("provide credentials"),
        "{}",
        text(&direct)
    );
    // kubectl's "Unauthorized" above is the API server's own answer (the
    // direct kubeconfig bypasses chaperone). The simulator also shows that
    // nothing the agent's token asked for was answered (kubectl stops at
    // its first 401, a discovery request, so there is no list to look for).
    if backend == Backend::Sim {
        let with_agent_token: Vec<_> = world
            .sim()
            .requests()
            .into_iter()
            .filter(|r| r.token.as_deref() == Some(world.token.as_str()))
            .collect();
        assert!(
            !with_agent_token.is_empty() && with_agent_token.iter().all(|r| r.status == 401),
            "the agent's own token must get nothing from the API server: {with_agent_token:#?}"
        );
    }

    // An agent asking to impersonate someone itself is refused by chaperone,
    // and nothing reaches the API server as that user.
    let out = kubectl(&world, &["--as", "system:admin", "get", "secrets", "-A"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        world.api.seen("/").iter().all(|r| r
            .impersonated
            .as_ref()
            .is_none_or(|(u, _)| u != "system:admin")),
        "an agent-supplied Impersonate-User reached the API server"
    );
}

#[test]
fn a_token_signed_with_a_rotated_key_is_accepted_after_the_jwks_refresh() {
    require_root!();
    // Unknown key ids refetch the JWKS at most once per minIntervalSeconds
    // (10 by default, so a flood of made-up kids cannot hammer the API
    // server); 1 here keeps the test short.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "identity:\n  keyRefresh:\n    minIntervalSeconds: 1\n    maxAgeSeconds: 300\n",
    )
    .unwrap();
    let world = World::start(WorldSpec {
        node_args: vec!["--config".into(), config.path().display().to_string()],
        ..WorldSpec::default()
    })
    .unwrap();
    let out = kubectl(&world, &["get", "configmaps"]);
    assert!(out.status.success(), "{}", text(&out));

    let old_kid = world.sim().signing_key_id();
    let new_kid = world.sim().rotate_signing_key().unwrap();
    assert_ne!(old_kid, new_kid);
    let token = world
        .sim()
        .mint_service_account_token(
            "default",
            "agent",
            Some(("agent-0", &world.pod_uid)),
            None,
            Duration::from_secs(3600),
        )
        .unwrap();
    std::fs::write(world.credentials.dir.join("token"), &token).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let out = kubectl(&world, &["get", "configmaps"]);
    assert!(
        out.status.success(),
        "a token with the new kid {new_kid} was refused: {}",
        text(&out)
    );
    let seen = world.sim().requests().last().cloned().unwrap();
    assert_eq!(seen.token.as_deref(), Some(token.as_str()));
}

/// Waits until kubectl's outcome is `works` (the pod tracker acts on a
/// watch event, so not at once).
fn eventually(world: &World, works: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Unguarded, nothing answers the service IP and kubectl hangs: a
        // run that does not finish in 5 s counts as failing.
        let (succeeded, said) = match run_for(
            &mut world.agent_kubectl(&["get", "configmaps"]),
            Duration::from_secs(5),
        ) {
            Ok(out) => (out.status.success(), text(&out)),
            Err(error) => (false, error.to_string()),
        };
        if succeeded == works {
            return said;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl still {} after 30 s: {said}",
            if works { "fails" } else { "works" },
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_pod_tracker_guards_a_pod_by_its_label_for_its_lifetime() {
    require_root!();
    let world = World::start(WorldSpec {
        agent_cgroup_flag: false,
        ..WorldSpec::default()
    })
    .unwrap();
    // Labeled: found by the tracker, redirected, served through chaperone.
    eventually(&world, true);

    // Unlabeled by another path (a person, a controller): still guarded,
    // since a pod once guarded stays guarded for its lifetime (its uid).
    let store = world.sim().store();
    let mut pod = store.get("pods", Some("default"), "agent-0").unwrap();
    pod["metadata"]["labels"]["chaperone.dev/intercept"] = "false".into();
    store.update(pod).unwrap();
    // The tracker reads this node's pods in order: once it has counted a
    // labeled pod created after the update (one with no cgroup here, so
    // unresolved), it has read the update too.
    world
        .api
        .create(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "after-the-update", "namespace": "default",
                "labels": {"chaperone.dev/intercept": "true"}},
            "spec": {"nodeName": "e2e-node", "automountServiceAccountToken": false,
                "containers": [{"name": "agent", "image": "agent:latest"}]},
        }))
        .unwrap();
    world.node.wait_for_metric(
        "chaperone_unresolved_pods",
        &[],
        1.0,
        Duration::from_secs(20),
    );
    eventually(&world, true);
    let before = world.sim().requests().len();
    let out = kubectl(&world, &["get", "configmaps"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !world.node.log_text().contains("no longer guarding pod"),
        "the unlabeled pod was released:\n{}",
        world.node.log_text()
    );
    assert!(world.sim().requests().len() > before);

    // Deleted: its cgroup is dropped.
    store.delete("pods", Some("default"), "agent-0").unwrap();
    eventually(&world, false);
}

fn a_policy_can_ask_for_impersonation_on_a_passthrough_node(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        policy: "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: impersonated\n\
                 spec:\n  subjects:\n    - serviceAccounts: [\"default/agent\"]\n  credentialMode: impersonate\n  \
                 defaultAction: allow\n"
            .into(),
        ..WorldSpec::default()
    })
    .unwrap();
    let out = kubectl(&world, &["get", "configmaps", "-n", "default"]);
    assert!(out.status.success(), "{}", text(&out));
    let seen = world
        .api
        .seen("/api/v1/namespaces/default/configmaps")
        .pop()
        .unwrap();
    assert_eq!(seen.user, admin_user(&world));
    assert_eq!(
        seen.impersonated.map(|(u, _)| u).as_deref(),
        Some("system:serviceaccount:default:agent")
    );
}

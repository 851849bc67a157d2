//! Identity end to end with a real kubectl agent through the kernel
//! redirect: impersonate mode (the API server sees chaperone's credentials
//! and impersonation headers; the agent's own token is useless without
//! chaperone; agent-sent Impersonate-* never pass), a token signed with a
//! rotated key, and the pod tracker guarding a pod by its label alone, for
//! the pod's lifetime.
//! Needs root.

use std::time::{Duration, Instant};

use chaperone_tests::{
    e2e::{World, WorldSpec, run_for},
    require_root,
};

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

#[test]
fn impersonate_mode_reoriginates_with_chaperones_credentials() {
    require_root!();
    let world = World::start(WorldSpec {
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
    assert!(out.status.success(), "{}", text(&out));
    let seen = world
        .sim
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.uri.starts_with("/api/v1/namespaces/default/configmaps"))
        .expect("the list reached the simulator");
    assert_eq!(
        seen.token.as_deref(),
        Some(world.sim.admin_token().as_str()),
        "upstream must carry chaperone's credentials, not the agent's token"
    );
    let acted_as = seen.impersonated.expect("impersonation headers");
    assert_eq!(acted_as.username, "system:serviceaccount:default:agent");
    assert!(
        acted_as
            .extra
            .get("authentication.kubernetes.io/pod-uid")
            .is_some_and(|v| v == std::slice::from_ref(&world.pod_uid)),
        "the pod is named in Impersonate-Extra: {:?}",
        acted_as.extra
    );

    // The agent's token alone is refused by the API server: it is minted for
    // chaperone's audience.
    let direct = run_for(
        &mut world.direct_kubectl(&["get", "configmaps", "-n", "default"]),
        LIMIT,
    )
    .unwrap();
    assert!(!direct.status.success());
    let refused = world
        .sim
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.token.as_deref() == Some(world.token.as_str()))
        .expect("the direct request reached the simulator");
    assert_eq!(refused.status, 401, "{}", text(&direct));

    // An agent asking to impersonate someone itself is refused by chaperone,
    // and nothing reaches the API server as that user.
    let before = world.sim.requests().len();
    let out = kubectl(&world, &["--as", "system:admin", "get", "secrets", "-A"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        world.sim.requests()[before..].iter().all(|r| r
            .impersonated
            .as_ref()
            .is_none_or(|u| u.username != "system:admin")),
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

    let old_kid = world.sim.signing_key_id();
    let new_kid = world.sim.rotate_signing_key().unwrap();
    assert_ne!(old_kid, new_kid);
    let token = world
        .sim
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
    let seen = world.sim.requests().last().cloned().unwrap();
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
    let store = world.sim.store();
    let mut pod = store.get("pods", Some("default"), "agent-0").unwrap();
    pod["metadata"]["labels"]["chaperone.dev/intercept"] = "false".into();
    store.update(pod).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    eventually(&world, true);
    let before = world.sim.requests().len();
    let out = kubectl(&world, &["get", "configmaps"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !world.node.log_text().contains("no longer guarding pod"),
        "the unlabeled pod was released:\n{}",
        world.node.log_text()
    );
    assert!(world.sim.requests().len() > before);

    // Deleted: its cgroup is dropped.
    store.delete("pods", Some("default"), "agent-0").unwrap();
    eventually(&world, false);
}

#[test]
fn a_policy_can_ask_for_impersonation_on_a_passthrough_node() {
    require_root!();
    let world = World::start(WorldSpec {
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
        .sim
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.uri.starts_with("/api/v1/namespaces/default/configmaps"))
        .unwrap();
    assert_eq!(
        seen.token.as_deref(),
        Some(world.sim.admin_token().as_str())
    );
    assert_eq!(
        seen.impersonated.map(|u| u.username).as_deref(),
        Some("system:serviceaccount:default:agent")
    );
}

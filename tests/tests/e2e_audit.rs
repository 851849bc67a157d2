//! The node agent's audit webhook sink, end to end: a real kubectl agent's
//! requests reach a webhook receiver as `audit.k8s.io/v1` `EventList`
//! batches, with chaperone's decision annotations, each `auditID` once;
//! and a request the agent abandons is still audited. Needs root.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use chaperone_tests::{
    e2e::{Backend, World, WorldSpec, json_receiver, run_for},
    on_both_servers, require_root,
};

on_both_servers!(
    agent_requests_reach_the_audit_webhook_with_chaperones_decisions,
    a_request_the_agent_abandons_while_held_is_still_audited,
);

const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: audited
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: no-deletes
      verbs: [delete]
      action: deny
  defaultAction: allow
"#;

fn agent_requests_reach_the_audit_webhook_with_chaperones_decisions(backend: Backend) {
    require_root!();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (port, received) = json_receiver(&runtime, 0);
    let world = World::start(WorldSpec {
        backend,
        policy: POLICY.into(),
        node_args: vec![
            "--audit-webhook".into(),
            format!("http://127.0.0.1:{port}/audit"),
            "--audit-webhook-batch-seconds".into(),
            "1".into(),
        ],
        ..WorldSpec::default()
    })
    .unwrap();
    let get = run_for(
        &mut world.agent_kubectl(&["get", "configmaps", "-n", "default"]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(get.status.success(), "{get:?}");
    let delete = run_for(
        &mut world.agent_kubectl(&["delete", "configmap", "anything", "-n", "default"]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(!delete.status.success());

    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events: Vec<serde_json::Value> = received
            .lock()
            .unwrap()
            .iter()
            .inspect(|list| {
                assert_eq!(list["kind"], "EventList");
                assert_eq!(list["apiVersion"], "audit.k8s.io/v1");
            })
            .flat_map(|list| list["items"].as_array().cloned().unwrap_or_default())
            .collect();
        let has = |verb: &str, decision: &str| {
            events.iter().any(|e| {
                e["verb"] == verb && e["annotations"]["chaperone.dev/decision"] == decision
            })
        };
        if has("list", "allow") && has("delete", "deny") {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook did not get both requests in 30 s: {events:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut seen = HashMap::new();
    for event in &events {
        assert_eq!(event["kind"], "Event");
        assert_eq!(
            event["user"]["username"],
            "system:serviceaccount:default:agent"
        );
        let id = event["auditID"].as_str().expect("auditID").to_owned();
        *seen
            .entry((id, event["stage"].as_str().unwrap_or("").to_owned()))
            .or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "an auditID/stage arrived twice: {seen:?}"
    );
    let denied = events.iter().find(|e| e["verb"] == "delete").unwrap();
    assert_eq!(denied["responseStatus"]["code"], 403);
    assert_eq!(denied["annotations"]["chaperone.dev/rule"], "no-deletes");
    assert_eq!(denied["objectRef"]["name"], "anything");
    // Every event names the process that made the request: kubectl.
    let kubectl = which_kubectl().expect("kubectl on PATH");
    for event in &events {
        assert_eq!(
            event["annotations"]["chaperone.dev/executable"], kubectl,
            "{event:#}"
        );
    }
}

/// kubectl's resolved path, as `/proc/PID/exe` shows it.
fn which_kubectl() -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .map(|p| p.display().to_string())
}

/// An agent that gives up while its request is held for approval (kubectl's
/// `--request-timeout`) still leaves a completed audit event and a session
/// record: the abandoned request, with the rule that held it and 499.
fn a_request_the_agent_abandons_while_held_is_still_audited(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        policy: r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: held
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: deletes-need-approval
      verbs: [delete]
      action: approve
      holdTimeout: 60s
  defaultAction: allow
"#
        .into(),
        ..WorldSpec::default()
    })
    .unwrap();
    let mut agent = world
        .agent_kubectl(&["delete", "configmap", "abandoned", "-n", "default"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Held: its ApprovalRequest is pending. Then the agent gives up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while world
        .api
        .list("approvalrequests.chaperone.dev", None)
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the delete was never held");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.kill().unwrap();
    agent.wait().unwrap();

    let audit_log = world.work.path().join("audit.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    let event = loop {
        let text = std::fs::read_to_string(&audit_log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|e| {
                e["verb"] == "delete"
                    && e["objectRef"]["name"] == "abandoned"
                    && e["stage"] == "ResponseComplete"
            });
        if let Some(event) = found {
            break event;
        }
        assert!(
            Instant::now() < deadline,
            "no completed audit event for the abandoned delete:\n{text}\nnode log:\n{}",
            world.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(event["responseStatus"]["code"], 499, "{event:#}");
    assert!(
        event["responseStatus"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("held for approval"),
        "{event:#}"
    );
    assert_eq!(event["annotations"]["chaperone.dev/decision"], "approve");
    assert_eq!(
        event["annotations"]["chaperone.dev/rule"],
        "deletes-need-approval"
    );

    // The agent's session recording has it too.
    let pod_dir = world.work.path().join("sessions/default/agent-0");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let recorded = std::fs::read_dir(&pod_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
            .any(|line| line.contains("\"abandoned\"") && line.contains("499"));
        if recorded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no session record of the abandoned delete under {}",
            pod_dir.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

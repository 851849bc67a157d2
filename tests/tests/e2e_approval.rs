//! Just-in-time approval seen end to end: a real kubectl agent's delete in
//! production is held by chaperone (through the kernel redirect), a person
//! at another terminal decides with `kubectl chaperone` (the plugin, run by
//! kubectl from PATH), and the held request completes or is refused. Hold
//! timeouts are a few seconds. Needs root.

use std::{
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use chaperone_tests::{
    e2e::{Backend, Person, Received, World, WorldSpec, json_receiver, run_for},
    on_both_servers, require_root,
    sim::{Authorizer, Rule, Subject},
    wait,
};

on_both_servers!(
    a_held_delete_completes_when_a_person_approves_it_from_another_terminal,
    a_denied_delete_prints_forbidden_with_the_reason,
    an_unanswered_hold_names_the_approval_and_a_retry_after_approval_succeeds,
    an_approval_expires_and_the_agent_is_told_its_id,
    a_grant_lets_the_same_rule_through_until_it_expires_or_is_revoked,
    a_pending_approval_survives_a_node_agent_restart,
    approvers_need_the_right_and_a_requester_never_approves_itself,
    an_approval_is_seen_by_another_node_agent,
    one_approval_lets_one_of_two_identical_held_requests_through,
    an_approval_releases_only_the_request_the_person_saw,
);

/// RBAC on a real server as in a cluster: the agent may do anything
/// (chaperone's policy is what guards it), alice is bound to approve and
/// deny, bob may read and write approvals' status but not approve.
fn bind_approvers_on_a_real_server(world: &World) {
    let rbac = |kind: &str, name: &str, body: Value| {
        let mut object = body;
        object["apiVersion"] = "rbac.authorization.k8s.io/v1".into();
        object["kind"] = kind.into();
        object["metadata"] = serde_json::json!({"name": name});
        world.api.create(object).unwrap();
    };
    let rule = |verbs: &[&str], resources: &[&str]| serde_json::json!({"apiGroups": ["chaperone.dev"], "resources": resources, "verbs": verbs});
    let binding = |name: &str, role: &str, subject: Value| {
        rbac(
            "ClusterRoleBinding",
            name,
            serde_json::json!({
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [subject],
            }),
        )
    };
    rbac(
        "ClusterRole",
        "e2e-approver",
        serde_json::json!({"rules": [
            rule(&["get", "list", "watch", "approve", "deny"], &["approvalrequests"]),
            rule(&["get", "update", "patch"], &["approvalrequests/status"]),
        ]}),
    );
    rbac(
        "ClusterRole",
        "e2e-bystander",
        serde_json::json!({"rules": [
            rule(&["get", "list", "watch"], &["approvalrequests"]),
            rule(&["get", "update", "patch"], &["approvalrequests/status"]),
        ]}),
    );
    let user = |name: &str| serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": name});
    binding("e2e-alice", "e2e-approver", user("alice"));
    binding("e2e-bob", "e2e-bystander", user("bob"));
    binding(
        "e2e-agent",
        "cluster-admin",
        serde_json::json!({"kind": "ServiceAccount", "name": "agent", "namespace": "default"}),
    );
}
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);
const APPROVALS: &str = "approvalrequests.chaperone.dev";
const NS: &str = "chaperone-system";

fn policy(hold: &str) -> String {
    format!(
        r#"apiVersion: chaperone.dev/v1alpha1
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
      holdTimeout: {hold}
      message: deleting in production needs a person's approval
  defaultAction: allow
"#
    )
}

fn spec(hold: &str) -> WorldSpec {
    on(Backend::Sim, hold)
}

fn on(backend: Backend, hold: &str) -> WorldSpec {
    WorldSpec {
        backend,
        policy: policy(hold),
        ..WorldSpec::deciding_approvals()
    }
}

fn seed(world: &World, deployments: &[&str]) {
    let store = &world.api;
    let _ = store.create(
        serde_json::json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod-a"}}),
    );
    for name in deployments {
        store
            .create(serde_json::json!({
                "apiVersion":"apps/v1","kind":"Deployment",
                "metadata":{"name":name,"namespace":"prod-a"},
                "spec":{"replicas":2,"selector":{"matchLabels":{"app":name}},
                    "template":{"metadata":{"labels":{"app":name}},
                        "spec":{"containers":[{"name":"app","image":"app:1"}]}}},
            }))
            .unwrap();
    }
}

fn exists(world: &World, name: &str) -> bool {
    world
        .api
        .get("deployments.apps", Some("prod-a"), name)
        .is_some()
}

fn approvals(world: &World) -> Vec<Value> {
    world.api.list(APPROVALS, Some(NS))
}

fn approval(world: &World, id: &str) -> Value {
    world
        .api
        .get(APPROVALS, Some(NS), id)
        .unwrap_or_else(|| panic!("approval {id} is gone"))
}

/// Starts `kubectl delete deployment NAME -n prod-a` as the agent.
fn start_delete(world: &World, name: &str) -> Child {
    world
        .agent_kubectl(&["delete", "deployment", name, "-n", "prod-a"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn delete(world: &World, name: &str) -> Output {
    run_for(
        &mut world.agent_kubectl(&["delete", "deployment", name, "-n", "prod-a"]),
        LIMIT,
    )
    .unwrap()
}

fn finish(child: Child) -> Output {
    let deadline = Instant::now() + LIMIT;
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the held kubectl never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The id of the pending approval for `name`, once the node created it.
fn wait_for_pending(world: &World, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = approvals(world).into_iter().find(|a| {
            a["spec"]["request"]["name"] == name
                && a["status"]["state"].as_str().unwrap_or("Pending") == "Pending"
        }) {
            return found["metadata"]["name"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no approval was requested for {name}:\n{}",
            world.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the node agent holds a request on the existing approval `id`.
fn wait_for_join(world: &World, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let joined = |log: String| {
        log.lines()
            .any(|l| l.contains(id) && l.contains("waits on an existing approval"))
    };
    while !joined(world.node.log_text()) {
        assert!(
            Instant::now() < deadline,
            "the node never held a request on {id}:\n{}",
            world.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn plugin(person: &Person, args: &[&str]) -> Output {
    let mut full = vec!["chaperone"];
    full.extend_from_slice(args);
    run_for(&mut person.kubectl(&full), LIMIT).unwrap()
}

fn a_held_delete_completes_when_a_person_approves_it_from_another_terminal(backend: Backend) {
    require_root!();
    let world = World::start(on(backend, "30s")).unwrap();
    seed(&world, &["web"]);
    let alice = world.person("alice", &[]).unwrap();

    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");
    let object = approval(&world, &id);
    assert_eq!(
        object["spec"]["requester"]["username"],
        "system:serviceaccount:default:agent"
    );
    assert_eq!(object["spec"]["requester"]["pod"]["name"], "agent-0");
    assert_eq!(object["spec"]["request"]["verb"], "delete");
    assert_eq!(object["spec"]["request"]["resource"], "deployments");
    assert_eq!(object["spec"]["request"]["apiGroup"], "apps");
    assert_eq!(object["spec"]["request"]["namespace"], "prod-a");
    assert_eq!(object["spec"]["rule"], "prod-deletes-need-approval");
    assert_eq!(object["spec"]["policy"], "agent-guard");
    assert_eq!(object["spec"]["holdSeconds"], 30);
    // The dry-run preview: what the delete would remove.
    assert_eq!(
        object["spec"]["preview"]["kind"], "Deployment",
        "{object:#}"
    );
    assert_eq!(object["spec"]["preview"]["spec"]["replicas"], 2);
    assert!(exists(&world, "web"), "held, not yet deleted");

    // The person sees it, with the plugin and with kubectl get.
    let listed = plugin(&alice, &["approvals"]);
    assert!(text(&listed).contains(&id), "{}", text(&listed));
    let table = run_for(
        &mut alice.kubectl(&["get", "approvalrequests", "-n", NS]),
        LIMIT,
    )
    .unwrap();
    let table = text(&table);
    assert!(
        table.contains("STATE") && table.contains("Pending") && table.contains("deployments"),
        "{table}"
    );

    let approved = plugin(&alice, &["approve", &id, "--reason", "planned cleanup"]);
    assert!(approved.status.success(), "{}", text(&approved));

    let out = finish(held);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("deleted"), "{}", text(&out));
    assert!(!exists(&world, "web"), "the deployment is gone");

    let object = approval(&world, &id);
    assert_eq!(object["status"]["state"], "Approved");
    assert_eq!(object["status"]["decidedBy"], "alice");
    assert_eq!(object["status"]["reason"], "planned cleanup");
    assert!(object["status"]["usedAt"].is_string(), "{object:#}");

    // Audited with the approval and the approver, and (this node has no
    // verify key: --approval-trust-unattested) that the decision was
    // trusted unattested.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit =
            std::fs::read_to_string(world.work.path().join("audit.log")).unwrap_or_default();
        let found = audit.lines().any(|l| {
            l.contains("\"verb\":\"delete\"")
                && l.contains(&format!("\"chaperone.dev/approval\":\"{id}\""))
                && l.contains("\"chaperone.dev/approved-by\":\"alice\"")
                && l.contains("\"code\":200")
        });
        let trusted = audit.lines().any(|l| {
            l.contains("\"chaperone.dev/rule\":\"approval-trusted-unattested\"")
                && l.contains(&format!("\"chaperone.dev/approval\":\"{id}\""))
                && l.contains("\"impersonatedUser\":{\"username\":\"alice\"")
        });
        if found && trusted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no audit event with the approval:\n{audit}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn a_denied_delete_prints_forbidden_with_the_reason(backend: Backend) {
    require_root!();
    let world = World::start(on(backend, "30s")).unwrap();
    seed(&world, &["web"]);
    let alice = world.person("alice", &[]).unwrap();
    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");
    let denied = plugin(&alice, &["deny", &id, "--reason", "not during the sale"]);
    assert!(denied.status.success(), "{}", text(&denied));
    let out = finish(held);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("Error from server (Forbidden): "),
        "{stderr}"
    );
    assert!(stderr.contains("not during the sale"), "{stderr}");
    assert!(
        stderr.contains(&format!("approval {id} was denied by alice")),
        "{stderr}"
    );
    assert!(exists(&world, "web"));
    assert_eq!(approval(&world, &id)["status"]["state"], "Denied");
}

fn an_unanswered_hold_names_the_approval_and_a_retry_after_approval_succeeds(backend: Backend) {
    require_root!();
    let world = World::start(on(backend, "2s")).unwrap();
    seed(&world, &["web"]);
    let started = Instant::now();
    let out = delete(&world, "web");
    let waited = started.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let ids: Vec<String> = approvals(&world)
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = &ids[0];
    assert!(
        stderr.starts_with("Error from server (Forbidden): "),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("Approval {id} is pending")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("kubectl chaperone approve {id}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("retry the same request after it is approved"),
        "{stderr}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "held for {waited:?}"
    );

    // The retry finds the same approval: no duplicate.
    let out = delete(&world, "web");
    assert!(!out.status.success());
    assert!(text(&out).contains(id.as_str()), "{}", text(&out));
    assert_eq!(approvals(&world).len(), 1);

    let alice = world.person("alice", &[]).unwrap();
    let approved = plugin(&alice, &["approve", id]);
    assert!(approved.status.success(), "{}", text(&approved));
    let out = delete(&world, "web");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!exists(&world, "web"));
}

fn an_approval_expires_and_the_agent_is_told_its_id(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        node_args: vec!["--approval-ttl".into(), "3s".into()],
        ..on(backend, "30s")
    })
    .unwrap();
    seed(&world, &["web"]);
    let out = delete(&world, "web");
    assert!(!out.status.success());
    let id = approvals(&world)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("approval {id} expired")),
        "{stderr}"
    );
    assert!(exists(&world, "web"));
    // The node marks it Expired; approving it is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while approval(&world, &id)["status"]["state"] != "Expired" {
        assert!(Instant::now() < deadline, "{:#}", approval(&world, &id));
        std::thread::sleep(Duration::from_millis(100));
    }
    let alice = world.person("alice", &[]).unwrap();
    let late = plugin(&alice, &["approve", &id]);
    assert!(!late.status.success());
    assert!(text(&late).contains("already Expired"), "{}", text(&late));
}

fn a_grant_lets_the_same_rule_through_until_it_expires_or_is_revoked(backend: Backend) {
    require_root!();
    let world = World::start(on(backend, "20s")).unwrap();
    seed(&world, &["web", "api", "db", "cache", "queue"]);
    let alice = world.person("alice", &[]).unwrap();

    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");
    let approved = plugin(
        &alice,
        &["approve", &id, "--grant", "4s", "--grant-scope", "rule"],
    );
    assert!(approved.status.success(), "{}", text(&approved));
    assert!(finish(held).status.success());

    // Within the window: through at once, no new approval.
    let out = delete(&world, "api");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!exists(&world, "api"));
    assert_eq!(approvals(&world).len(), 1);
    let grants = plugin(&alice, &["grants"]);
    assert!(text(&grants).contains(&id), "{}", text(&grants));

    // After the window (its end is in the object, which both the plugin
    // and the node read): held again.
    wait::wait_for(
        &format!("the 4 s grant {id} to expire (`kubectl chaperone grants` no longer lists it)"),
        Duration::from_secs(20),
        || (!text(&plugin(&alice, &["grants"])).contains(&id)).then_some(()),
    );
    let held = start_delete(&world, "db");
    let second = wait_for_pending(&world, "db");
    assert_ne!(second, id);
    assert!(exists(&world, "db"));

    // A new grant, revoked: held again after the revocation.
    let approved = plugin(
        &alice,
        &["approve", &second, "--grant", "1h", "--grant-scope", "rule"],
    );
    assert!(approved.status.success(), "{}", text(&approved));
    assert!(finish(held).status.success());
    let out = delete(&world, "cache");
    assert!(out.status.success(), "{}", text(&out));
    let revoked = plugin(&alice, &["revoke", &second]);
    assert!(revoked.status.success(), "{}", text(&revoked));
    let held = start_delete(&world, "queue");
    let third = wait_for_pending(&world, "queue");
    assert!(third != id && third != second);
    let denied = plugin(&alice, &["deny", &third]);
    assert!(denied.status.success(), "{}", text(&denied));
    assert!(!finish(held).status.success());
    assert!(exists(&world, "queue"));
}

fn approvers_need_the_right_and_a_requester_never_approves_itself(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        everyone_is_admin: false,
        ..on(backend, "30s")
    })
    .unwrap();
    seed(&world, &["web"]);
    // RBAC as in a cluster: the agent may do anything (chaperone's policy
    // is what guards it), alice is bound to chaperone-approver, bob may
    // read and write approvals' status but not approve.
    if backend == Backend::Real {
        bind_approvers_on_a_real_server(&world);
    } else {
        let mut rbac = Authorizer::strict();
        rbac.grant(
            Subject::ServiceAccount {
                namespace: "default".into(),
                name: "agent".into(),
            },
            vec![Rule::new(&["*"], &["*"], &["*"])],
        );
        rbac.grant(
            Subject::User("alice".into()),
            vec![
                Rule::new(
                    &["get", "list", "watch", "approve", "deny"],
                    &["chaperone.dev"],
                    &["approvalrequests"],
                ),
                Rule::new(
                    &["get", "update", "patch"],
                    &["chaperone.dev"],
                    &["approvalrequests/status"],
                ),
            ],
        );
        rbac.grant(
            Subject::User("bob".into()),
            vec![
                Rule::new(
                    &["get", "list", "watch"],
                    &["chaperone.dev"],
                    &["approvalrequests"],
                ),
                Rule::new(
                    &["get", "update", "patch"],
                    &["chaperone.dev"],
                    &["approvalrequests/status"],
                ),
            ],
        );
        world.sim().set_authorizer(rbac);
    }
    let alice = world.person("alice", &[]).unwrap();
    let bob = world.person("bob", &[]).unwrap();

    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");

    // bob has no approve right: the plugin says so.
    let out = plugin(&bob, &["approve", &id]);
    assert!(!out.status.success());
    assert!(text(&out).contains("may not approve"), "{}", text(&out));

    // bob writes the decision himself: every node checks it and refuses.
    let forged = run_for(
        &mut bob.kubectl(&[
            "patch",
            "approvalrequest",
            &id,
            "-n",
            NS,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"state":"Approved","decidedBy":"bob"}}"#,
        ]),
        LIMIT,
    )
    .unwrap();
    assert!(forged.status.success(), "{}", text(&forged));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let object = approval(&world, &id);
        if object["status"]["state"] == "Pending" && object["status"]["refusedDecision"].is_string()
        {
            assert!(
                object["status"]["refusedDecision"]
                    .as_str()
                    .unwrap()
                    .contains("bob may not approve"),
                "{object:#}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the forged decision stands: {object:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(exists(&world, "web"));

    // The requester, with its own token outside chaperone: refused by the plugin.
    let agent_home = world.work.path().join("agent-as-person");
    std::fs::create_dir_all(&agent_home).unwrap();
    let agent_person = Person {
        kubeconfig: agent_home.join("config"),
        home: agent_home,
    };
    world
        .api
        .write_kubeconfig(&agent_person.kubeconfig, &world.token)
        .unwrap();
    let out = plugin(&agent_person, &["approve", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot approve it yourself"),
        "{}",
        text(&out)
    );

    // ...and through chaperone, the agent cannot touch approvals at all.
    let out = run_for(
        &mut world.agent_kubectl(&[
            "patch",
            "approvalrequest",
            &id,
            "-n",
            NS,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"state":"Approved","decidedBy":"alice"}}"#,
        ]),
        LIMIT,
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("agents may not patch approval requests"),
        "{}",
        text(&out)
    );
    assert!(exists(&world, "web"));

    // alice may: the delete completes.
    let out = plugin(&alice, &["approve", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = finish(held);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!exists(&world, "web"));
}

fn an_approval_is_seen_by_another_node_agent(backend: Backend) {
    require_root!();
    let a = World::start(on(backend, "2s")).unwrap();
    seed(&a, &["web"]);
    let b = World::join(
        &a,
        WorldSpec {
            node_name: "e2e-node-b".into(),
            pod: "agent-1".into(),
            pod_uid: "9d2e7c1a-4b3f-4e8d-a1c2-6f5e4d3c2b1a".into(),
            ..spec("30s")
        },
    )
    .unwrap();
    // Node A holds the agent's delete and creates the approval.
    let out = delete(&a, "web");
    assert!(!out.status.success());
    let id = approvals(&a)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(approval(&a, &id)["spec"]["node"], "e2e-node");
    // The same agent's retry lands on node B, which finds A's approval and
    // holds the request until a person approves it.
    let held = start_delete(&b, "web");
    wait_for_join(&b, &id);
    let alice = a.person("alice", &[]).unwrap();
    let out = plugin(&alice, &["approve", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = finish(held);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        b.node.log_text()
    );
    assert!(!exists(&a, "web"));
    assert_eq!(approvals(&a).len(), 1, "no duplicate approval");
}

fn a_pending_approval_survives_a_node_agent_restart(backend: Backend) {
    require_root!();
    let mut world = World::start(on(backend, "2s")).unwrap();
    seed(&world, &["web"]);
    let out = delete(&world, "web");
    assert!(!out.status.success());
    let id = approvals(&world)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    world.restart_node().unwrap();
    assert_eq!(approval(&world, &id)["status"]["state"], "Pending");
    let alice = world.person("alice", &[]).unwrap();
    let out = plugin(&alice, &["approve", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = delete(&world, "web");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        world.node.log_text()
    );
    assert!(!exists(&world, "web"));
    assert_eq!(approvals(&world).len(), 1);
}

fn one_approval_lets_one_of_two_identical_held_requests_through(backend: Backend) {
    require_root!();
    let a = World::start(on(backend, "20s")).unwrap();
    seed(&a, &["web"]);
    let b = World::join(
        &a,
        WorldSpec {
            node_name: "e2e-node-b".into(),
            pod: "agent-1".into(),
            pod_uid: "9d2e7c1a-4b3f-4e8d-a1c2-6f5e4d3c2b1a".into(),
            ..spec("20s")
        },
    )
    .unwrap();
    // The same agent's identical delete, held on both nodes at once.
    let on_a = start_delete(&a, "web");
    let id = wait_for_pending(&a, "web");
    let on_b = start_delete(&b, "web");
    wait_for_join(&b, &id);
    assert_eq!(approvals(&a).len(), 1, "node B found node A's approval");
    let alice = a.person("alice", &[]).unwrap();
    let out = plugin(&alice, &["approve", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let (out_a, out_b) = (finish(on_a), finish(on_b));
    let through = [&out_a, &out_b]
        .iter()
        .filter(|o| o.status.success())
        .count();
    assert_eq!(
        through,
        1,
        "exactly one request goes through:\nA: {}\nB: {}",
        text(&out_a),
        text(&out_b)
    );
    let refused = if out_a.status.success() {
        &out_b
    } else {
        &out_a
    };
    assert!(
        text(refused).contains(&format!(
            "approval {id} already let an identical request through"
        )),
        "{}\nA: {}\nB: {}",
        text(refused),
        a.node.log_text(),
        b.node.log_text()
    );
    assert!(!exists(&a, "web"));
}

/// Production writes (create, update, patch) need a person's approval.
fn write_spec(hold: &str) -> WorldSpec {
    WorldSpec {
        policy: format!(
            r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agent-guard
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: prod-writes-need-approval
      verbs: [create, update, patch]
      namespaces: ["prod-*"]
      action: approve
      holdTimeout: {hold}
  defaultAction: allow
"#
        ),
        ..WorldSpec::deciding_approvals()
    }
}

#[test]
fn a_held_patch_previews_its_changes_masked_and_is_forwarded_unchanged_when_approved() {
    require_root!();
    let world = World::start(write_spec("30s")).unwrap();
    seed(&world, &[]);
    world
        .sim()
        .store()
        .create(serde_json::json!({
            "apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":"web","namespace":"prod-a"},
            "spec":{"replicas":2,"selector":{"matchLabels":{"app":"web"}},
                "template":{"metadata":{"labels":{"app":"web"}},
                    "spec":{"containers":[{"name":"app","image":"app:1",
                        "env":[{"name":"DB_PASSWORD","value":"hunter2-old"}]}]}}},
        }))
        .unwrap();
    let alice = world.person("alice", &[]).unwrap();
    let patch = r#"{"spec":{"replicas":5,"template":{"spec":{"containers":[{"name":"app","env":[{"name":"DB_PASSWORD","value":"n3w-s3cret"}]}]}}}}"#;
    let held = world
        .agent_kubectl(&["patch", "deployment", "web", "-n", "prod-a", "-p", patch])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_for_pending(&world, "web");
    let object = approval(&world, &id);
    let raw = object.to_string();
    assert!(
        !raw.contains("hunter2") && !raw.contains("n3w-s3cret"),
        "a secret value reached the approval: {object:#}"
    );
    let request = &object["spec"]["request"];
    assert_eq!(request["verb"], "patch");
    let summary = request["bodySummary"].as_str().unwrap();
    assert!(summary.contains(r#""replicas":5"#), "{summary}");
    assert!(summary.contains("<masked by chaperone"), "{summary}");
    assert_eq!(request["bodySha256"].as_str().unwrap().len(), 64);
    // The dry run's changes: the new replicas, and the env value masked.
    let preview = &object["spec"]["preview"];
    assert_eq!(preview["kind"], "Deployment", "{object:#}");
    let changes = preview["changes"].as_array().unwrap();
    assert!(
        changes.contains(&serde_json::json!({"path": "spec.replicas", "old": 2, "new": 5})),
        "{preview:#}"
    );
    let env = changes
        .iter()
        .find(|c| c["path"] == "spec.template.spec.containers[0].env[0].value")
        .unwrap_or_else(|| panic!("{preview:#}"));
    assert!(
        env["new"]
            .as_str()
            .unwrap()
            .starts_with("<masked by chaperone")
    );
    // Nothing changed yet.
    let stored = world
        .sim()
        .store()
        .get("deployments.apps", Some("prod-a"), "web")
        .unwrap();
    assert_eq!(stored["spec"]["replicas"], 2);

    let approved = plugin(&alice, &["approve", &id]);
    assert!(approved.status.success(), "{}", text(&approved));
    let out = finish(held);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("patched"), "{}", text(&out));
    // The body the agent sent went upstream as it was.
    let stored = world
        .sim()
        .store()
        .get("deployments.apps", Some("prod-a"), "web")
        .unwrap();
    assert_eq!(stored["spec"]["replicas"], 5);
    assert_eq!(
        stored["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"],
        "n3w-s3cret"
    );
}

#[test]
fn a_held_secret_create_previews_masked_data_and_only_the_same_body_uses_the_approval() {
    require_root!();
    let world = World::start(write_spec("2s")).unwrap();
    seed(&world, &[]);
    let create = |value: &str| {
        let literal = format!("--from-literal=password={value}");
        run_for(
            &mut world.agent_kubectl(&[
                "create", "secret", "generic", "db", "-n", "prod-a", &literal,
            ]),
            LIMIT,
        )
        .unwrap()
    };
    let out = create("hunter2-secret");
    assert!(!out.status.success());
    let found = approvals(&world);
    assert_eq!(found.len(), 1);
    let object = &found[0];
    let id = object["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(text(&out).contains(&id), "{}", text(&out));
    let raw = object.to_string();
    assert!(
        !raw.contains("hunter2") && !raw.contains("aHVudGVyMi1zZWNyZXQ"),
        "a secret value reached the approval: {object:#}"
    );
    assert!(
        object["spec"]["request"]["bodySummary"].is_string(),
        "{object:#}"
    );
    // The object the create would make, its data masked.
    let preview = &object["spec"]["preview"];
    assert_eq!(preview["kind"], "Secret", "{object:#}");
    assert_eq!(preview["metadata"]["name"], "db");
    let masked = preview["data"]["password"].as_str().unwrap();
    let decoded = base64_decode(masked);
    assert!(decoded.starts_with("<masked by chaperone"), "{decoded}");
    assert!(
        world
            .sim()
            .store()
            .get("secrets", Some("prod-a"), "db")
            .is_none()
    );

    let alice = world.person("alice", &[]).unwrap();
    let approved = plugin(&alice, &["approve", &id]);
    assert!(approved.status.success(), "{}", text(&approved));
    // A different body is a different request: it asks anew.
    let out = create("another-value");
    assert!(!out.status.success());
    assert_eq!(approvals(&world).len(), 2);
    // The approved body goes through.
    let out = create("hunter2-secret");
    assert!(out.status.success(), "{}", text(&out));
    let stored = world
        .sim()
        .store()
        .get("secrets", Some("prod-a"), "db")
        .unwrap();
    assert_eq!(
        base64_decode(stored["data"]["password"].as_str().unwrap()),
        "hunter2-secret"
    );
}

fn base64_decode(text: &str) -> String {
    use base64::Engine as _;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap(),
    )
    .unwrap()
}

/// Waits for `count` payloads.
fn payloads(received: &Received, count: usize, world: &World) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = received.lock().unwrap().clone();
        if got.len() >= count {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} notifications arrived: {got:#?}\n{}",
            got.len(),
            world.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn notify_spec(port: u16, format: &str, hold: &str) -> WorldSpec {
    WorldSpec {
        node_args: vec![
            "--notify-url".into(),
            format!("http://127.0.0.1:{port}/hook"),
            "--notify-format".into(),
            format.into(),
        ],
        ..spec(hold)
    }
}

#[test]
fn a_slack_webhook_that_fails_at_first_is_told_of_the_request_and_its_approval() {
    require_root!();
    let runtime = runtime();
    let (port, received) = json_receiver(&runtime, 2);
    let world = World::start(notify_spec(port, "slack", "30s")).unwrap();
    seed(&world, &["web", "next"]);
    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");
    let requested = payloads(&received, 1, &world).remove(0);
    let text_of = |v: &Value| v["text"].as_str().unwrap_or_default().to_owned();
    let fields = |v: &Value| -> Vec<(String, String)> {
        v["attachments"][0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["title"].as_str().unwrap().to_owned(),
                    f["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert!(
        text_of(&requested).contains(
            "system:serviceaccount:default:agent asks to delete deployments.apps \"web\""
        ),
        "{requested:#}"
    );
    assert!(
        text_of(&requested).contains(&format!("kubectl chaperone approve {id}")),
        "{requested:#}"
    );
    assert!(fields(&requested).contains(&("Approval".into(), id.clone())));
    assert!(fields(&requested).contains(&("Pod".into(), "default/agent-0".into())));

    let alice = world.person("alice", &[]).unwrap();
    let approved = plugin(&alice, &["approve", &id, "--reason", "planned cleanup"]);
    assert!(approved.status.success(), "{}", text(&approved));
    assert!(finish(held).status.success());
    let decided = payloads(&received, 2, &world).remove(1);
    assert!(
        text_of(&decided).contains(&format!("alice approved {id}")),
        "{decided:#}"
    );
    let got = fields(&decided);
    assert!(
        got.contains(&("Decision".into(), "Approved".into())),
        "{got:?}"
    );
    assert!(got.contains(&("By".into(), "alice".into())), "{got:?}");
    assert!(
        got.contains(&("Reason".into(), "planned cleanup".into())),
        "{got:?}"
    );
    // Announced once, by the node that held it: one queue posts in order,
    // so what comes next is the next request, not the decision again.
    let mut next = start_delete(&world, "next");
    let next_id = wait_for_pending(&world, "next");
    let after = payloads(&received, 3, &world).remove(2);
    assert!(
        text_of(&after).contains(&format!("kubectl chaperone approve {next_id}")),
        "{after:#}"
    );
    assert_eq!(received.lock().unwrap().len(), 3);
    let _ = next.kill();
    let _ = next.wait();
}

#[test]
fn a_json_webhook_gets_the_approval_and_who_denied_it() {
    require_root!();
    let runtime = runtime();
    let (port, received) = json_receiver(&runtime, 0);
    let world = World::start(notify_spec(port, "json", "30s")).unwrap();
    seed(&world, &["web"]);
    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");
    let requested = payloads(&received, 1, &world).remove(0);
    assert_eq!(requested["kind"], "ApprovalRequested");
    assert_eq!(requested["id"], id.as_str());
    assert_eq!(requested["approval"]["spec"]["request"]["name"], "web");
    assert_eq!(
        requested["approval"]["spec"]["preview"]["kind"],
        "Deployment"
    );
    let alice = world.person("alice", &[]).unwrap();
    let denied = plugin(&alice, &["deny", &id, "--reason", "not during the sale"]);
    assert!(denied.status.success(), "{}", text(&denied));
    assert!(!finish(held).status.success());
    let decided = payloads(&received, 2, &world).remove(1);
    assert_eq!(decided["kind"], "ApprovalDecided");
    assert_eq!(decided["id"], id.as_str());
    assert_eq!(decided["state"], "Denied");
    assert_eq!(decided["by"], "alice");
    assert_eq!(decided["reason"], "not during the sale");
}

#[test]
fn a_webhook_that_never_answers_does_not_hold_up_the_agent() {
    require_root!();
    // Accepts connections and never answers: every notification attempt
    // waits for its own timeout (10 s).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    let world = World::start(notify_spec(port, "json", "1s")).unwrap();
    seed(&world, &["web", "api"]);
    for name in ["web", "api"] {
        let started = Instant::now();
        let out = delete(&world, name);
        let waited = started.elapsed();
        assert!(!out.status.success());
        assert!(text(&out).contains("is pending"), "{}", text(&out));
        assert!(
            waited < Duration::from_secs(8),
            "the held delete took {waited:?} with a dead webhook (hold 1s)"
        );
    }
    let out = run_for(
        &mut world.agent_kubectl(&["get", "deployments", "-n", "prod-a"]),
        LIMIT,
    )
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    drop(dead);
}

/// `curl` against the node agent's admin listener: (HTTP code, JSON body).
fn admin(world: &World, method: &str, path: &str, body: &str) -> (u16, Value) {
    let out = run_for(
        std::process::Command::new("curl")
            .args(["-sS", "-X", method, "-w", "\n%{http_code}"])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .arg(format!("http://127.0.0.1:{}{path}", world.node.admin_port)),
        LIMIT,
    )
    .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap();
    (
        code.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap(),
    )
}

#[test]
fn in_local_mode_the_admin_api_approves_a_held_delete_with_the_plugins_rules() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let world = World::start(WorldSpec {
        node_args: vec!["--approval-dir".into(), dir.path().to_str().unwrap().into()],
        ..spec("30s")
    })
    .unwrap();
    seed(&world, &["web"]);
    let held = start_delete(&world, "web");
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let (code, list) = admin(&world, "GET", "/approvals", "");
        assert_eq!(code, 200, "{list:#}");
        if let Some(first) = list["items"].as_array().and_then(|items| items.first()) {
            assert_eq!(first["spec"]["request"]["name"], "web");
            break first["metadata"]["name"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "{}", world.node.log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    let approve = format!("/approvals/local/{id}/approve");
    let (code, refused) = admin(
        &world,
        "POST",
        &approve,
        r#"{"by": "system:serviceaccount:default:agent"}"#,
    );
    assert_eq!(code, 403, "{refused:#}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("cannot approve it yourself"),
        "{refused:#}"
    );
    let (code, approved) = admin(
        &world,
        "POST",
        &approve,
        r#"{"by": "alice", "reason": "planned"}"#,
    );
    assert_eq!(code, 200, "{approved:#}");
    assert_eq!(approved["status"]["decidedBy"], "alice");
    let out = finish(held);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!exists(&world, "web"));
    // The plugin in local mode sees the same decision and the same rules.
    let alice = world.person("alice", &[]).unwrap();
    let local = dir.path().to_str().unwrap();
    let again = plugin(&alice, &["--local-dir", local, "deny", &id]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("already Approved (by alice)"),
        "{}",
        text(&again)
    );
}

/// The node's audit event for a decision it judged under `rule` (an
/// approval's `chaperone.dev/rule`) naming `claimed` as the decider, once
/// the audit thread has written it (20 s at most).
fn node_audit_event(world: &World, rule: &str, claimed: &str) -> Value {
    let audit_log = world.work.path().join("audit.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&audit_log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| {
                e["annotations"]["chaperone.dev/rule"] == rule
                    && e["impersonatedUser"]["username"] == claimed
            });
        if let Some(event) = found {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no {rule} audit event naming {claimed} in {}:\n{text}",
            audit_log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node-level check of attested decisions on kube-sim, which has no
/// admission webhooks: the node holds the webhook's public key, so a
/// decision written without the webhook (the plugin straight at the API
/// server, or a hand-written status naming anyone with any groups and a
/// made-up attestation) is refused, written back as `refusedDecision`, and
/// releases nothing; the same decision signed as the webhook signs it
/// releases the held delete. (The webhook itself is tested in
/// interceptor/src/approval/attest.rs.)
#[test]
fn only_decisions_attested_by_the_webhook_release_a_held_request() {
    use chaperone::approval::{
        ApprovalRequest,
        attest::{Signer, UserInfo, attest_write},
    };
    require_root!();
    let keys = tempfile::tempdir().unwrap();
    let signer = Signer::generate();
    let public = keys.path().join("attestation.pub");
    std::fs::write(&public, signer.public_key_pem()).unwrap();
    let mut spec = spec("30s");
    spec.node_args = vec![
        "--approval-verify-key".into(),
        public.to_str().unwrap().into(),
    ];
    let world = World::start(spec).unwrap();
    seed(&world, &["web"]);
    let alice = world.person("alice", &[]).unwrap();
    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");

    let refused = |why: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let object = approval(&world, &id);
            if object["status"]["state"] == "Pending"
                && object["status"]["refusedDecision"]
                    .as_str()
                    .is_some_and(|r| r.contains(why))
            {
                return object;
            }
            assert!(
                Instant::now() < deadline,
                "the decision was not refused ({why}): {object:#}\n{}",
                world.node.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The plugin, with no webhook in the way: unattested, and the plugin
    // reports the node's refusal.
    let approved = plugin(&alice, &["approve", &id]);
    assert!(!approved.status.success(), "{}", text(&approved));
    assert!(
        text(&approved).contains("refused as a possible forgery"),
        "{}",
        text(&approved)
    );
    refused("no attestation");
    assert!(
        exists(&world, "web"),
        "an unattested approval released the delete"
    );

    // A forged status: anyone, system:masters, a made-up attestation.
    let write_status = |status: serde_json::Value| {
        let patch = serde_json::json!({ "status": status }).to_string();
        let out = run_for(
            &mut alice.kubectl(&[
                "patch",
                APPROVALS,
                &id,
                "-n",
                NS,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ]),
            LIMIT,
        )
        .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    write_status(serde_json::json!({
        "state": "Approved", "decidedBy": "anyone", "decidedByGroups": ["system:masters"],
        "attestation": {"keyId": "0000000000000000", "signature": "AAAA"},
    }));
    refused("does not trust");
    assert!(
        exists(&world, "web"),
        "a forged approval released the delete"
    );
    assert!(
        world.node.log_text().contains("approval-forgery"),
        "{}",
        world.node.log_text()
    );
    // ...and audited: who the status claimed, which approval, refused.
    let forgery = node_audit_event(&world, "approval-forgery", "anyone");
    assert_eq!(forgery["apiVersion"], "audit.k8s.io/v1", "{forgery:#}");
    assert_eq!(
        forgery["annotations"]["chaperone.dev/approval"],
        id.as_str(),
        "{forgery:#}"
    );
    assert_eq!(
        forgery["annotations"]["chaperone.dev/decision"], "deny",
        "{forgery:#}"
    );
    assert_eq!(
        forgery["impersonatedUser"]["groups"][0], "system:masters",
        "{forgery:#}"
    );
    assert_eq!(forgery["objectRef"]["subresource"], "status", "{forgery:#}");
    assert_eq!(forgery["responseStatus"]["code"], 403, "{forgery:#}");
    assert!(
        forgery["responseStatus"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not trust")),
        "{forgery:#}"
    );

    // Alice's approval as the webhook attests it.
    let stored: ApprovalRequest = serde_json::from_value(approval(&world, &id)).unwrap();
    let mut written = stored.clone();
    written.status =
        Some(serde_json::from_value(serde_json::json!({"state": "Approved"})).unwrap());
    let status = attest_write(
        &signer,
        Some(&stored),
        &written,
        &UserInfo {
            username: "alice".into(),
            groups: vec!["system:authenticated".into()],
        },
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let mut status = serde_json::to_value(&status).unwrap();
    // A merge patch: clear what the refusal left.
    status["refusedDecision"] = serde_json::Value::Null;
    write_status(status);
    let out = finish(held);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !exists(&world, "web"),
        "the attested approval released the delete"
    );
    assert_eq!(approval(&world, &id)["status"]["decidedBy"], "alice");
}

/// A node without the webhook's public key cannot tell who decided, so by
/// default it acts on no decision: a person's approval is refused with what
/// to do, and the held delete times out instead of running.
#[test]
fn a_node_without_the_verify_key_acts_on_no_decision_unless_told_to_trust() {
    require_root!();
    let mut spec = spec("4s");
    spec.node_args = vec!["--approval-trust-unattested=false".into()];
    let world = World::start(spec).unwrap();
    seed(&world, &["web"]);
    let alice = world.person("alice", &[]).unwrap();
    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");
    let _ = plugin(&alice, &["approve", &id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let object = approval(&world, &id);
        if object["status"]["refusedDecision"]
            .as_str()
            .is_some_and(|r| r.contains("no --approval-verify-key"))
        {
            assert!(
                object["status"]["refusedDecision"]
                    .as_str()
                    .unwrap()
                    .contains("--approval-trust-unattested"),
                "{object:#}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the decision was not refused: {object:#}\n{}",
            world.node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = finish(held);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        exists(&world, "web"),
        "an unattested approval released the delete"
    );
}

/// `chaperone webhook`, run as a local process and registered on the real
/// kube-apiserver with the shipped manifest's rules for approvals (only its
/// clientConfig made a loopback URL), so the API server itself calls
/// `/attest` with its authentication of each writer. A forged status
/// (claiming alice, system:masters and a made-up attestation) is rewritten
/// to the writer who really sent it, and the node refuses that writer; only
/// alice's own approval releases the held delete.
#[test]
fn on_the_real_server_the_webhook_attests_who_decided_and_forgeries_release_nothing() {
    use chaperone_tests::e2e::{ApiServer, workspace_binary};
    use std::process::Command;
    require_root!();
    chaperone_tests::require_real_api!();
    // The webhook's signing key and the nodes' public key, as
    // deploy/bootstrap-certs.sh makes them.
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = (
        keys.path().join("ed25519.key"),
        keys.path().join("ed25519.pub"),
    );
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    };
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        private.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);

    let mut spec = WorldSpec {
        everyone_is_admin: false,
        ..on(Backend::Real, "60s")
    };
    spec.node_args = vec![
        "--approval-verify-key".into(),
        public.to_str().unwrap().into(),
    ];
    let world = World::start(spec).unwrap();
    let ApiServer::Real(real) = &world.api else {
        unreachable!("a real world")
    };
    seed(&world, &["web"]);
    bind_approvers_on_a_real_server(&world);

    // The webhook, serving on loopback with a certificate the server trusts.
    let (cert, key) = real.loopback_serving_cert().unwrap();
    let (cert_path, key_path) = (keys.path().join("tls.crt"), keys.path().join("tls.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    struct Webhook(Child);
    impl Drop for Webhook {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let webhook_log = keys.path().join("webhook.log");
    let _webhook = Webhook(
        Command::new(workspace_binary("chaperone"))
            .args(["webhook", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .arg("--attestation-key")
            .arg(&private)
            .args(["--gate-image", "chaperone:test"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&webhook_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chaperone webhook never listened: {}",
            std::fs::read_to_string(&webhook_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The shipped webhook for approvals, as deploy/ has it, called by URL.
    let manifest: Value = serde_yaml::from_str(include_str!(
        "../../deploy/base/webhook/mutatingwebhookconfiguration.yaml"
    ))
    .unwrap();
    let mut hook = manifest["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "approvals.chaperone.dev")
        .expect("the shipped manifest has the approvals webhook")
        .clone();
    let path = hook["clientConfig"]["service"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    {
        use base64::Engine as _;
        hook["clientConfig"] = serde_json::json!({
            "url": format!("https://127.0.0.1:{port}{path}"),
            "caBundle": base64::engine::general_purpose::STANDARD.encode(real.ca_pem()),
        });
    }
    world
        .api
        .create(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "chaperone"},
            "webhooks": [hook],
        }))
        .unwrap();
    // The API server picks webhook configurations up from a watch: bob's
    // forgery below is repeated until the webhook has seen one.

    let held = start_delete(&world, "web");
    let id = wait_for_pending(&world, "web");
    let refused = |why: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let object = approval(&world, &id);
            if object["status"]["state"] == "Pending"
                && object["status"]["refusedDecision"]
                    .as_str()
                    .is_some_and(|r| r.contains(why))
            {
                return object;
            }
            assert!(
                Instant::now() < deadline,
                "the decision was not refused ({why}): {object:#}\n{}",
                world.node.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let forge = |person: &Person| {
        let patch = serde_json::json!({"status": {
            "state": "Approved", "decidedBy": "alice", "decidedByGroups": ["system:masters"],
            "attestation": {"keyId": "0000000000000000", "signature": "AAAA"},
        }})
        .to_string();
        let out = run_for(
            &mut person.kubectl(&[
                "patch",
                APPROVALS,
                &id,
                "-n",
                NS,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
                "-o",
                "jsonpath={.status.decidedBy}",
            ]),
            LIMIT,
        )
        .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        // The object as stored, after admission: who the webhook says
        // decided.
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // bob (may write status, may not approve) claims to be alice: the API
    // server tells the webhook it is bob, and bob may not approve.
    let bob = world.person("bob", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored_as = forge(&bob);
        if stored_as == "bob" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API server never called the webhook: the status was stored as decided by {stored_as:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    refused("bob may not approve");
    assert!(exists(&world, "web"), "bob's forgery released the delete");
    // ...and audited on the node: bob (as the webhook attested), refused.
    let refusal = node_audit_event(&world, "approval-decision-refused", "bob");
    assert_eq!(refusal["responseStatus"]["code"], 403, "{refusal:#}");
    assert_eq!(
        refusal["annotations"]["chaperone.dev/approval"], id,
        "{refusal:#}"
    );

    // The requester itself, with its own token outside chaperone.
    let agent_home = world.work.path().join("agent-as-person");
    std::fs::create_dir_all(&agent_home).unwrap();
    let agent = Person {
        kubeconfig: agent_home.join("config"),
        home: agent_home,
    };
    world
        .api
        .write_kubeconfig(&agent.kubeconfig, &world.token)
        .unwrap();
    forge(&agent);
    refused("a requester never approves itself");
    assert!(
        exists(&world, "web"),
        "the requester's forgery released the delete"
    );

    // A chaperone service account (what a node agent runs as), allowed
    // to write approvals' status as the node DaemonSet is.
    let node_token = real
        .mint_token(NS, "chaperone-node", None, None, Duration::from_secs(3600))
        .unwrap();
    real.create(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "e2e-node-writes-status"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "chaperone-node", "namespace": NS}],
    }))
    .unwrap();
    let node_home = world.work.path().join("node-as-person");
    std::fs::create_dir_all(&node_home).unwrap();
    let node = Person {
        kubeconfig: node_home.join("config"),
        home: node_home,
    };
    world
        .api
        .write_kubeconfig(&node.kubeconfig, &node_token)
        .unwrap();
    forge(&node);
    refused("one of chaperone's own service accounts");
    assert!(
        exists(&world, "web"),
        "a node's forgery released the delete"
    );

    // alice's own approval, through the plugin: attested as hers.
    let alice = world.person("alice", &[]).unwrap();
    let approved = plugin(&alice, &["approve", &id]);
    assert!(approved.status.success(), "{}", text(&approved));
    let out = finish(held);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !exists(&world, "web"),
        "alice's approval did not release the delete"
    );
    let object = approval(&world, &id);
    assert_eq!(object["status"]["decidedBy"], "alice", "{object:#}");
    assert!(
        object["status"]["attestation"]["signature"].is_string()
            && object["status"]["attestation"]["signature"] != "AAAA",
        "{object:#}"
    );
}

/// What is approved is exactly what runs: a person who approved a dry run
/// (kubectl sends a delete's `dryRun` in its DeleteOptions body) has not
/// approved the delete; a grant on one object does not cover another.
fn an_approval_releases_only_the_request_the_person_saw(backend: Backend) {
    require_root!();
    let world = World::start(on(backend, "2s")).unwrap();
    seed(&world, &["web", "api"]);
    let alice = world.person("alice", &[]).unwrap();
    let dry_run = || {
        run_for(
            &mut world.agent_kubectl(&[
                "delete",
                "deployment",
                "web",
                "-n",
                "prod-a",
                "--dry-run=server",
            ]),
            LIMIT,
        )
        .unwrap()
    };

    // The dry run is held; the person sees the query before deciding.
    let out = dry_run();
    assert!(!out.status.success(), "{}", text(&out));
    let first = approvals(&world);
    assert_eq!(first.len(), 1);
    let id = first[0]["metadata"]["name"].as_str().unwrap().to_owned();
    let request = &first[0]["spec"]["request"];
    assert_eq!(request["method"], "DELETE");
    assert_eq!(
        request["target"],
        "/apis/apps/v1/namespaces/prod-a/deployments/web"
    );
    assert!(request["bodySha256"].is_string(), "{request:#}");
    assert!(
        request["bodySummary"]
            .as_str()
            .unwrap()
            .contains("\"dryRun\":[\"All\"]"),
        "{request:#}"
    );
    let listed = plugin(&alice, &["list"]);
    assert!(text(&listed).contains("(dry run)"), "{}", text(&listed));
    let shown = plugin(&alice, &["show", &id]);
    assert!(
        text(&shown)
            .contains("Sent as:      DELETE /apis/apps/v1/namespaces/prod-a/deployments/web")
            && text(&shown).contains("dryRun")
            && text(&shown).contains("--grant-scope rule"),
        "{}",
        text(&shown)
    );
    let approved = plugin(&alice, &["approve", &id]);
    assert!(approved.status.success(), "{}", text(&approved));

    // The delete itself, not dry: held anew, the deployment stays.
    let out = delete(&world, "web");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(&id), "{}", text(&out));
    assert!(exists(&world, "web"));
    assert_eq!(approvals(&world).len(), 2);
    let second = wait_for_pending(&world, "web");
    assert_ne!(second, id);
    // The approved dry run goes through with its own approval.
    let out = dry_run();
    assert!(out.status.success(), "{}", text(&out));
    assert!(exists(&world, "web"));

    // A grant on this object (the default scope) lets the retry through
    // and covers nothing else.
    let approved = plugin(&alice, &["approve", &second, "--grant", "1h"]);
    assert!(approved.status.success(), "{}", text(&approved));
    assert!(
        text(&approved).contains("requests on deployments.apps \"web\" in namespace \"prod-a\""),
        "{}",
        text(&approved)
    );
    let out = delete(&world, "web");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!exists(&world, "web"));
    let out = delete(&world, "api");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(exists(&world, "api"));
    let grants = plugin(&alice, &["grants"]);
    assert!(
        text(&grants).contains("object delete deployments.apps"),
        "{}",
        text(&grants)
    );
}

//! Holds for a person, without root: a held delete is decided through its
//! `ApprovalRequest` in kube-sim (approved, denied, or nobody in time), and
//! a request the agent abandons while held is still audited and recorded.
//! The root suite (`e2e_approval.rs`, `e2e_audit.rs`) proves the same with
//! the `kubectl chaperone` plugin through the kernel redirect.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use chaperone_tests::{
    in_process,
    inprocess::{AgentRequest, Harness, HarnessSpec},
};
use serde_json::json;

in_process!(
    a_held_delete_completes_when_a_person_approves_it,
    a_denied_delete_is_forbidden_with_the_reason,
    an_unanswered_hold_names_the_approval_and_a_retry_after_approval_succeeds,
    an_approval_expires_and_the_agent_is_told_its_id,
    a_request_the_agent_abandons_while_held_is_still_audited,
);

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

/// The harness holding production deletes for `hold`, with the
/// Deployment `prod-a/web`.
fn harness(hold: &str) -> Harness {
    harness_with(HarnessSpec {
        policy: policy(hold),
        ..HarnessSpec::default()
    })
}

fn harness_with(spec: HarnessSpec) -> Harness {
    let h = Harness::start(spec).unwrap();
    let store = h.sim.store();
    store
        .create(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod-a"}}))
        .unwrap();
    store
        .create(json!({
            "apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":"web","namespace":"prod-a"},
            "spec":{"replicas":2,"selector":{"matchLabels":{"app":"web"}},
                "template":{"metadata":{"labels":{"app":"web"}},
                    "spec":{"containers":[{"name":"app","image":"app:1"}]}}},
        }))
        .unwrap();
    h
}

const WEB: &str = "/apis/apps/v1/namespaces/prod-a/deployments/web";

fn exists(h: &Harness) -> bool {
    h.sim
        .store()
        .get("deployments.apps", Some("prod-a"), "web")
        .is_some()
}

fn approval(h: &Harness, id: &str) -> serde_json::Value {
    h.approvals()
        .into_iter()
        .find(|a| a["metadata"]["name"] == id)
        .unwrap_or_else(|| panic!("approval {id} is gone"))
}

fn held_web(a: &serde_json::Value) -> bool {
    a["spec"]["request"]["name"] == "web"
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn a_held_delete_completes_when_a_person_approves_it() {
    let h = harness("30s");
    // A real kubectl waits on the held delete.
    let held = h
        .kubectl_command(&["delete", "deployment", "web", "-n", "prod-a"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = h.wait_for_pending(held_web);
    let object = approval(&h, &id);
    assert_eq!(object["spec"]["requester"]["username"], h.agent_user());
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
    assert!(exists(&h), "held, not yet deleted");

    h.decide(&id, true, "alice", "planned cleanup").unwrap();
    let out = h.finish(held);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("deleted"), "{}", text(&out));
    assert!(!exists(&h), "the deployment is gone");

    let object = approval(&h, &id);
    assert_eq!(object["status"]["state"], "Approved");
    assert_eq!(object["status"]["decidedBy"], "alice");
    assert!(object["status"]["usedAt"].is_string(), "{object:#}");
    let event = h.wait_for_audit("the approved delete", |e| {
        e["verb"] == "delete"
            && e["stage"] == "ResponseComplete"
            && e["annotations"]["chaperone.dev/approval"] == id.as_str()
    });
    assert_eq!(event["annotations"]["chaperone.dev/approved-by"], "alice");
    assert_eq!(event["responseStatus"]["code"], 200, "{event:#}");
}

fn a_denied_delete_is_forbidden_with_the_reason() {
    let h = harness("30s");
    let reply = h.runtime.block_on(async {
        let held = h.runtime.spawn({
            let mut conn = h.connect(true, false).await.unwrap();
            let token = h.token.clone();
            async move { conn.send(&AgentRequest::delete(WEB), &token).await }
        });
        let id = tokio::task::block_in_place(|| h.wait_for_pending(held_web));
        tokio::task::block_in_place(|| h.decide(&id, false, "alice", "not during the sale"))
            .unwrap();
        (id, held.await.unwrap().unwrap())
    });
    let (id, reply) = reply;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let message = reply.message();
    assert!(message.contains("not during the sale"), "{message}");
    assert!(
        message.contains(&format!("approval {id} was denied by alice")),
        "{message}"
    );
    assert!(exists(&h));
    assert_eq!(approval(&h, &id)["status"]["state"], "Denied");
}

/// Nobody decides within the hold: the agent is told the approval's id and
/// how to get it approved; its retry finds the same approval, and after a
/// person approves it the retry goes through.
fn an_unanswered_hold_names_the_approval_and_a_retry_after_approval_succeeds() {
    let h = harness("1s");
    let started = Instant::now();
    let reply = h.send(AgentRequest::delete(WEB));
    let waited = started.elapsed();
    assert_eq!(reply.status, 403, "{}", reply.body);
    let ids: Vec<String> = h
        .approvals()
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = &ids[0];
    let message = reply.message();
    assert!(
        message.contains(&format!("Approval {id} is pending")),
        "{message}"
    );
    assert!(
        message.contains(&format!("kubectl chaperone approve {id}")),
        "{message}"
    );
    assert!(
        message.contains("retry the same request after it is approved"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(15),
        "held for {waited:?}"
    );
    assert!(exists(&h));

    // The retry finds the same approval: no duplicate.
    let retry = h.send(AgentRequest::delete(WEB));
    assert_eq!(retry.status, 403, "{}", retry.body);
    assert!(retry.message().contains(id.as_str()), "{}", retry.body);
    assert_eq!(h.approvals().len(), 1);

    h.decide(id, true, "alice", "").unwrap();
    let approved = h.send(AgentRequest::delete(WEB));
    assert_eq!(approved.status, 200, "{}", approved.body);
    assert!(!exists(&h));
}

/// `--approval-ttl 2s`, a hold of 30 s: the approval expires before
/// anyone decides, the agent is told so with its id, and the guard marks it
/// `Expired` so nobody can approve it late.
fn an_approval_expires_and_the_agent_is_told_its_id() {
    let h = harness_with(HarnessSpec {
        policy: policy("30s"),
        approval_ttl: Duration::from_secs(2),
        ..HarnessSpec::default()
    });
    let started = Instant::now();
    let reply = h.send(AgentRequest::delete(WEB));
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "held past the approval's expiry: {:?}",
        started.elapsed()
    );
    let id = h.approvals()[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reply.message().contains(&format!("approval {id} expired")),
        "{}",
        reply.body
    );
    assert!(exists(&h));
    let deadline = Instant::now() + Duration::from_secs(10);
    while approval(&h, &id)["status"]["state"] != "Expired" {
        assert!(Instant::now() < deadline, "{:#}", approval(&h, &id));
        std::thread::sleep(Duration::from_millis(50));
    }
    let late = h.decide(&id, true, "alice", "").unwrap_err();
    assert!(format!("{late:#}").contains("already Expired"), "{late:#}");
}

/// An agent that gives up while its request is held still leaves a
/// completed audit event and a session record: the abandoned request, with
/// the rule that held it and 499.
fn a_request_the_agent_abandons_while_held_is_still_audited() {
    let h = harness("60s");
    h.runtime.block_on(async {
        let mut conn = h.connect(false, false).await.unwrap();
        let token = h.token.clone();
        let held = tokio::spawn(async move {
            let _ = conn.send(&AgentRequest::delete(WEB), &token).await;
            drop(conn);
        });
        tokio::task::block_in_place(|| h.wait_for_pending(held_web));
        // The agent goes away: its connection closes.
        held.abort();
        let _ = held.await;
    });
    let event = h.wait_for_audit("the abandoned delete", |e| {
        e["verb"] == "delete" && e["objectRef"]["name"] == "web" && e["stage"] == "ResponseComplete"
    });
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
        "prod-deletes-need-approval"
    );
    assert!(exists(&h), "an abandoned held delete is never forwarded");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h.session_records().iter().any(|r| {
        let line = r.to_string();
        line.contains("\"web\"") && line.contains("499")
    }) {
        assert!(
            Instant::now() < deadline,
            "no session record of the abandoned delete under {}",
            h.sessions_dir().display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

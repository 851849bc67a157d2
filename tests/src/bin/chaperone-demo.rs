//! `cargo xtask demo`: chaperone guarding a scripted AI agent, on this
//! machine, with real tools. An API-server simulator plays a small
//! production cluster; an agent "pod" (network namespace + kubelet-named
//! cgroup) runs real kubectl exactly as in a cluster; `chaperone node`
//! redirects its API connections in the kernel and applies a policy.
//! Needs root.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result};
use base64::Engine;
use chaperone_tests::e2e::{Person, World, WorldSpec, run_for, workspace_binary};

const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: coding-agent
spec:
  subjects:
    - serviceAccounts: ["agents/coder"]
  rules:
    - name: no-exec-in-prod
      resources: [pods/exec, pods/attach]
      namespaces: ["prod-*"]
      action: deny
      message: production pods are not for agents; read their logs instead
    - name: prod-deletes-need-approval
      verbs: [delete, deletecollection]
      namespaces: ["prod-*"]
      action: approve
      holdTimeout: 60s
    - name: secrets-masked
      resources: [secrets]
      action: mask
      record: RequestResponse
  defaultAction: allow
"#;

fn main() -> Result<()> {
    if !chaperone_tests::is_root() {
        anyhow::bail!(
            "the demo needs root: it loads eBPF programs, creates a network namespace and a cgroup"
        );
    }
    let mut step = 0;
    let mut say = |text: &str| {
        step += 1;
        println!("\n[{step}] {text}");
    };

    say("Start a simulated cluster and chaperone's node agent with the policy below");
    println!("{}", indent(POLICY));
    let world = World::start(WorldSpec {
        policy: POLICY.into(),
        namespace: "agents".into(),
        service_account: "coder".into(),
        pod: "coder-0".into(),
        ..WorldSpec::deciding_approvals()
    })
    .context("starting the simulator and chaperone node")?;
    seed(&world)?;
    println!(
        "    API server (simulated): {}\n    agent pod agents/coder-0 in netns {} and cgroup {}\n    chaperone node: proxy {}:{}, redirecting 10.96.0.1:443",
        world.sim().url(),
        world.netns.name,
        world.agent_cgroup.path.display(),
        world.netns.host_v4,
        world.node.port
    );

    say("The agent lists pods in prod-a (allowed; recorded)");
    let out = agent(&world, &["get", "pods", "-n", "prod-a"])?;
    outcome(out.contains("payments-0"), "the agent sees the pods")?;

    say("The agent reads a Secret: the values arrive masked, still valid base64");
    let out = agent(
        &world,
        &[
            "get",
            "secret",
            "db-credentials",
            "-n",
            "prod-a",
            "-o",
            "jsonpath={.data.password}",
        ],
    )?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(out.trim())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    println!("    decoded by the agent: {decoded:?}");
    outcome(
        decoded.starts_with("<masked by chaperone") && !decoded.contains("hunter2"),
        "the password never reached the agent",
    )?;

    say("The agent reads a pod's logs: the token it printed is masked");
    let out = agent(&world, &["logs", "payments-0", "-n", "prod-a"])?;
    outcome(
        out.contains("ready") && !out.contains("hunter2") && !out.contains("eyJzdWIi"),
        "the log arrived with its password and token masked",
    )?;

    say("The agent tries to exec into production: Forbidden, with what to do instead");
    let out = agent(&world, &["exec", "payments-0", "-n", "prod-a", "--", "env"])?;
    outcome(
        out.contains("Forbidden") && out.contains("no-exec-in-prod"),
        "exec refused before it reached the API server, naming the rule",
    )?;

    say("The agent deletes a production deployment: held until a person approves it");
    let args = ["delete", "deployment", "payments", "-n", "prod-a"];
    println!("    agent$ kubectl {}   (waits...)", args.join(" "));
    let held = world
        .agent_kubectl(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting the agent's delete")?;
    let id = pending_approval(&world, "payments")?;
    let survived = world
        .sim()
        .store()
        .get("deployments.apps", Some("prod-a"), "payments")
        .is_some();
    outcome(
        survived,
        "held: the production deployment is untouched while a person decides",
    )?;
    let alice = world.person("alice", &[])?;
    person(&alice, &["chaperone", "approvals"])?;
    person(
        &alice,
        &[
            "get",
            "approvalrequests",
            "-n",
            "chaperone-system",
            "-o",
            "wide",
        ],
    )?;
    let approved = person(
        &alice,
        &[
            "chaperone",
            "approve",
            &id,
            "--reason",
            "decommissioned, ticket OPS-42",
        ],
    )?;
    outcome(
        approved.contains(&format!("approved {id}")),
        "a person approved it from another terminal with kubectl chaperone",
    )?;
    let out = held.wait_with_output()?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", indent(&printed));
    let gone = world
        .sim()
        .store()
        .get("deployments.apps", Some("prod-a"), "payments")
        .is_none();
    outcome(
        out.status.success() && gone && printed.contains("deleted"),
        "the held delete completed after the approval; the deployment is gone",
    )?;

    say("The agent deploys to dev (allowed)");
    let out = agent(
        &world,
        &[
            "create",
            "deployment",
            "preview",
            "--image=web:2",
            "-n",
            "dev-a",
        ],
    )?;
    let created = world
        .sim()
        .store()
        .get("deployments.apps", Some("dev-a"), "preview")
        .is_some();
    outcome(
        created && out.contains("created"),
        "the dev deployment exists",
    )?;

    say(
        "A human replays the agent's session (`chaperone sessions`, `chaperone replay`, `chaperone verify`)",
    );
    let sessions_dir = world.work.path().join("sessions");
    let chaperone = workspace_binary("chaperone");
    // kubectl has exited; its connections' last records follow on the
    // recorder thread. Wait until no connection's recording is still open.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = run_for(
            Command::new(&chaperone)
                .args(["sessions", "--connections", "-o", "json", "--dir"])
                .arg(&sessions_dir),
            Duration::from_secs(30),
        )?;
        let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
        let open = list["items"].as_array().map_or(1, |items| {
            items.iter().filter(|c| c["chain"] == "open").count()
        });
        if open == 0 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{open} recording(s) still open 20 s after the agent's last command"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let listing = run_for(
        Command::new(&chaperone)
            .args(["sessions", "--dir"])
            .arg(&sessions_dir),
        Duration::from_secs(30),
    )?;
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    print!("{}", indent(&listing));
    outcome(
        listing.contains("agents/coder-0")
            && listing.contains("system:serviceaccount:agents:coder"),
        "every session is attributed to the pod and its service account",
    )?;
    // One row: the agent's commands, each its own connection, are one
    // agent session of its pod.
    let names = run_for(
        Command::new(&chaperone)
            .args(["sessions", "-o", "name", "--dir"])
            .arg(&sessions_dir),
        Duration::from_secs(30),
    )?;
    let names = String::from_utf8_lossy(&names.stdout).into_owned();
    let agent_sessions: Vec<&str> = names
        .lines()
        .filter_map(|l| l.strip_prefix("agentsession/"))
        .collect();
    outcome(
        agent_sessions.len() == 1 && session_files(&sessions_dir).len() > 1,
        "the agent's commands are one agent session, its connections inside",
    )?;
    let agent_session = agent_sessions
        .first()
        .context("no agent session was recorded")?
        .to_string();
    let replay = run_for(
        Command::new(&chaperone)
            .args(["replay", "--dir"])
            .arg(&sessions_dir)
            .arg(&agent_session),
        Duration::from_secs(30),
    )?;
    let replayed = String::from_utf8_lossy(&replay.stdout).into_owned();
    print!("{}", indent(&replayed));
    print!("{}", indent(&String::from_utf8_lossy(&replay.stderr)));
    outcome(
        replay.status.success()
            && replayed.contains("db-credentials")
            && replayed.contains("masked"),
        "the replay shows the Secret read and what was masked",
    )?;
    let verify = run_for(
        Command::new(&chaperone)
            .args(["verify", "--dir"])
            .arg(&sessions_dir)
            .arg(&agent_session),
        Duration::from_secs(30),
    )?;
    let verified = String::from_utf8_lossy(&verify.stdout).into_owned();
    print!("{}", indent(verified.lines().last().unwrap_or_default()));
    outcome(
        verify.status.success() && verified.contains("chain keyed with node key"),
        "every connection's hash chain verifies under the node's record key",
    )?;

    say("The node-level audit log, in the API server's own format (last 3 events)");
    let audit = std::fs::read_to_string(world.work.path().join("audit.log")).unwrap_or_default();
    outcome(
        audit
            .lines()
            .any(|l| l.contains("\"chaperone.dev/decision\":\"deny\"")),
        "the audit log holds the refusals too",
    )?;
    for line in audit
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        let event: serde_json::Value = serde_json::from_str(line)?;
        println!(
            "    {} {} {} -> {} (chaperone: {} by rule {})",
            event["stage"].as_str().unwrap_or(""),
            event["verb"].as_str().unwrap_or(""),
            event["requestURI"].as_str().unwrap_or(""),
            event["responseStatus"]["code"],
            event["annotations"]["chaperone.dev/decision"]
                .as_str()
                .unwrap_or(""),
            event["annotations"]["chaperone.dev/rule"]
                .as_str()
                .unwrap_or(""),
        );
    }

    println!("\nDone. Everything the demo created is removed.");
    Ok(())
}

/// The id of the approval the node created for deleting `name`.
fn pending_approval(world: &World, name: &str) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = world
            .sim()
            .store()
            .list("approvalrequests.chaperone.dev", Some("chaperone-system"))
            .into_iter()
            .find(|a| a["spec"]["request"]["name"] == name);
        if let Some(id) = found.and_then(|a| a["metadata"]["name"].as_str().map(str::to_owned)) {
            return Ok(id);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the demo went wrong: no approval was requested for the delete");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs kubectl as a person at another terminal and prints it.
fn person(who: &Person, args: &[&str]) -> Result<String> {
    println!("    human$ kubectl {}", args.join(" "));
    let out = run_for(&mut who.kubectl(args), Duration::from_secs(60))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", indent(&text));
    Ok(text)
}

/// Prints a step's expected outcome, or fails the demo when it did not happen.
fn outcome(happened: bool, what: &str) -> Result<()> {
    if happened {
        println!("    => {what}");
        Ok(())
    } else {
        anyhow::bail!("the demo went wrong: expected that {what}, and it did not happen")
    }
}

/// Runs kubectl as the agent and prints what it ran and saw.
fn agent(world: &World, args: &[&str]) -> Result<String> {
    println!("    agent$ kubectl {}", args.join(" "));
    let out = run_for(&mut world.agent_kubectl(args), Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{}", indent(&stdout));
    print!("{}", indent(&String::from_utf8_lossy(&out.stderr)));
    if !stdout.is_empty() && !stdout.ends_with('\n') {
        println!();
    }
    Ok(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

fn seed(world: &World) -> Result<()> {
    let store = world.sim().store();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let create = |v: serde_json::Value| {
        store
            .create(v)
            .map_err(|e| anyhow::anyhow!("seeding: {e:?}"))
    };
    for ns in ["prod-a", "dev-a"] {
        create(serde_json::json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":ns}}))?;
    }
    create(serde_json::json!({"apiVersion":"v1","kind":"Secret",
        "metadata":{"name":"db-credentials","namespace":"prod-a"},
        "data":{"password": b64("hunter2-prod-db"), "username": b64("payments")}}))?;
    create(
        serde_json::json!({"apiVersion":"apps/v1","kind":"Deployment",
        "metadata":{"name":"payments","namespace":"prod-a"},
        "spec":{"replicas":2,"selector":{"matchLabels":{"app":"payments"}},
            "template":{"metadata":{"labels":{"app":"payments"}},"spec":{"containers":[{"name":"app","image":"payments:1"}]}}}}),
    )?;
    create(serde_json::json!({"apiVersion":"v1","kind":"Pod",
        "metadata":{"name":"payments-0","namespace":"prod-a","labels":{"app":"payments"}},
        "spec":{"containers":[{"name":"app","image":"payments:1"}]}}))?;
    for line in [
        "payments starting",
        "connecting to postgres://payments:hunter2-prod-db@db:5432/payments",
        "auth header: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwYXltZW50cyJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
        "ready",
    ] {
        store
            .append_log("prod-a", "payments-0", None, line)
            .map_err(|e| anyhow::anyhow!("seeding logs: {e:?}"))?;
    }
    Ok(())
}

/// The session file in which the agent read the Secret.
fn session_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                found.push(path);
            }
        }
    }
    found
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      {l}\n")).collect()
}

//! Agents besides kubectl, each a real client run unchanged inside the agent
//! pod (in-cluster config, no kubeconfig): the official Python client, the
//! official JavaScript client (`@kubernetes/client-node` 1.x) and
//! `kubernetes-mcp-server`, the client-go MCP server AI agents drive over
//! stdio. Each reads a Secret (masked), lists Secrets (masked) and tries a
//! delete the policy denies (refused, and the Deployment survives), against
//! the simulator and the real API server. Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use chaperone_tests::{
    e2e::{Backend, World, WorldSpec},
    on_both_servers, require_root,
};
use serde_json::{Value, json};

on_both_servers!(
    the_python_client_gets_masked_secrets_and_a_denial,
    the_javascript_client_gets_masked_secrets_and_a_denial,
    an_mcp_server_agent_gets_masked_secrets_and_a_denial,
);

const LIMIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "clients-Pa55w0rd-never-seen";

const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: clients
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: no-prod-deletes
      verbs: [delete]
      namespaces: ["prod-*"]
      action: deny
      message: agents do not delete in production
    - name: secrets-masked
      resources: [secrets]
      action: mask
  defaultAction: allow
"#;

fn world(backend: Backend) -> World {
    let world = World::start(WorldSpec {
        backend,
        policy: POLICY.into(),
        ..WorldSpec::default()
    })
    .unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let api = &world.api;
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod-a"}}))
        .unwrap();
    api.create(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "db", "namespace": "default"},
        "type": "Opaque",
        "data": {"password": b64(PASSWORD)},
    }))
    .unwrap();
    api.create(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "prod-a"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]}}},
    }))
    .unwrap();
    world
}

/// Runs an installer script of `tests/` and returns what it prints (the
/// interpreter or the install directory).
fn installed(script: &str) -> PathBuf {
    let setup = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("sh").arg(&setup).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed (it installs the client on first use): {}",
        setup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs an agent program in the pod; its stdout, one JSON object a line.
fn run_agent(world: &World, program: &std::path::Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = world
        .agent()
        .in_cluster_command(&world.credentials, program);
    cmd.args(args);
    let out = chaperone_tests::e2e::run_for(&mut cmd, LIMIT).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} failed: {stdout}{}\nchaperone log:\n{}",
        program.display(),
        String::from_utf8_lossy(&out.stderr),
        world.node.log_text()
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn assert_no_password(what: &str, text: &str) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
    assert!(
        !text.contains(PASSWORD) && !text.contains(&b64),
        "{what} leaked the password:\n{text}"
    );
}

/// The steps an agent script printed: the Secret masked in the get and the
/// list, the delete refused with chaperone's message, the Deployment alive.
fn judge(world: &World, steps: &[Value]) {
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no {name} step in {steps:#?}"))
    };
    let password = step("get-secret")["data"]["password"]
        .as_str()
        .expect("the password key is still there")
        .to_owned();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&password)
        .expect("masked values stay valid base64");
    assert!(
        String::from_utf8_lossy(&decoded).contains("masked by chaperone"),
        "{}",
        String::from_utf8_lossy(&decoded)
    );
    assert!(
        step("list-secrets")["names"]
            .as_array()
            .unwrap()
            .contains(&json!("db"))
    );
    let delete = step("delete-deployment");
    assert_eq!(delete["code"], 403, "{delete}");
    assert!(
        delete["message"]
            .as_str()
            .unwrap_or_default()
            .contains("agents do not delete in production"),
        "{delete}"
    );
    assert_no_password("the agent's output", &serde_json::to_string(steps).unwrap());
    assert!(
        world
            .api
            .get("deployments.apps", Some("prod-a"), "web")
            .is_some(),
        "the denied delete must not have happened"
    );
}

fn the_python_client_gets_masked_secrets_and_a_denial(backend: Backend) {
    require_root!();
    let python = installed("python/setup.sh");
    let world = world(backend);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/agent.py");
    let steps = run_agent(
        &world,
        &python,
        &[script.to_str().unwrap(), "db", "prod-a", "web"],
    );
    judge(&world, &steps);
}

fn the_javascript_client_gets_masked_secrets_and_a_denial(backend: Backend) {
    require_root!();
    let clients = installed("node/setup.sh");
    let world = world(backend);
    // The script runs from the install directory so `import` finds the
    // client there.
    let script = clients.join("agent.mjs");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node/agent.mjs"),
        &script,
    )
    .unwrap();
    let steps = run_agent(
        &world,
        std::path::Path::new("node"),
        &[script.to_str().unwrap(), "db", "prod-a", "web"],
    );
    judge(&world, &steps);
}

/// A JSON-RPC session with an MCP server over its stdio.
struct Mcp {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    next_id: u64,
}

impl Mcp {
    fn start(mut cmd: Command) -> Mcp {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut mcp = Mcp {
            child,
            stdin,
            lines,
            next_id: 1,
        };
        mcp.call(
            "initialize",
            json!({"protocolVersion": "2025-03-26", "capabilities": {},
                   "clientInfo": {"name": "chaperone-e2e", "version": "0"}}),
        );
        mcp.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        mcp
    }

    fn send(&mut self, message: &Value) {
        writeln!(self.stdin, "{message}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Sends a request and waits for its answer (notifications skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer to {method} within {LIMIT:?}"));
            let message: Value = serde_json::from_str(&line).unwrap();
            if message["id"] == id {
                return message;
            }
        }
    }

    /// Calls a tool; its text content and whether it is an error.
    fn tool(&mut self, name: &str, arguments: Value) -> (String, bool) {
        let answer = self.call("tools/call", json!({"name": name, "arguments": arguments}));
        let result = &answer["result"];
        let text = result["content"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|part| part["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|| answer.to_string());
        (text, result["isError"] == true)
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn an_mcp_server_agent_gets_masked_secrets_and_a_denial(backend: Backend) {
    require_root!();
    let clients = installed("node/setup.sh");
    let server = clients.join(
        "node_modules/kubernetes-mcp-server-linux-amd64/bin/kubernetes-mcp-server-linux-amd64",
    );
    let world = world(backend);
    let mut cmd = world
        .agent()
        .in_cluster_command(&world.credentials, &server);
    cmd.args([
        "--cluster-provider",
        "in-cluster",
        "--disable-multi-cluster",
    ]);
    let mut mcp = Mcp::start(cmd);

    let (secret, failed) = mcp.tool(
        "resources_get",
        json!({"apiVersion": "v1", "kind": "Secret", "namespace": "default", "name": "db"}),
    );
    assert!(
        !failed,
        "{secret}\nchaperone log:\n{}",
        world.node.log_text()
    );
    assert!(secret.contains("password"), "{secret}");
    assert_no_password("resources_get of the Secret", &secret);
    let (list, failed) = mcp.tool(
        "resources_list",
        json!({"apiVersion": "v1", "kind": "Secret", "namespace": "default"}),
    );
    assert!(!failed, "{list}");
    assert!(list.contains("db"), "{list}");
    assert_no_password("resources_list of Secrets", &list);

    let (refused, failed) = mcp.tool(
        "resources_delete",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "prod-a", "name": "web"}),
    );
    assert!(failed, "the delete must fail: {refused}");
    assert!(
        refused.contains("agents do not delete in production"),
        "{refused}"
    );
    assert!(
        world
            .api
            .get("deployments.apps", Some("prod-a"), "web")
            .is_some(),
        "the denied delete must not have happened"
    );
}

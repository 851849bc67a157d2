//! The observation layer seen from a real kubectl agent through the kernel
//! redirect: exec output masked, a session replayed with its exec cast,
//! tampering detected, `/metrics` counting what was done, and the
//! `AgentPolicy` CRD hot-reloaded. Needs root.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use chaperone_tests::{
    e2e::{Backend, World, WorldSpec, run_for, workspace_binary},
    on_both_servers, prom, require_root, wait,
};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: observed
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: no-deployment-deletes
      verbs: [delete]
      apiGroups: [apps]
      resources: [deployments]
      action: deny
      message: deleting deployments needs a human
    - name: secrets-masked
      resources: [secrets]
      action: mask
      record: RequestResponse
    - name: configmaps-with-bodies
      resources: [configmaps]
      action: allow
      record: RequestResponse
  defaultAction: allow
"#;

const PASSWORD: &str = "s3cr3t-Pa55w0rd-do-not-leak";
const TOKEN_VALUE: &str = "tok_9f8e7d6c5b4a3210fedcba";
const JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpib3QifQ.U2lnbmF0dXJlRG9Ob3RMZWFrMDEyMzQ1Njc4OQ";
const JWT_SIGNATURE: &str = "U2lnbmF0dXJlRG9Ob3RMZWFrMDEyMzQ1Njc4OQ";
const JWT_PAYLOAD: &str = "eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpib3QifQ";
const DB_PASSWORD: &str = "pg-Pa55-wrd-do-not-leak";

fn secrets() -> [&'static str; 5] {
    [
        PASSWORD,
        TOKEN_VALUE,
        JWT_SIGNATURE,
        JWT_PAYLOAD,
        DB_PASSWORD,
    ]
}

fn assert_no_secret(what: &str, bytes: &str) {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for secret in secrets() {
        assert!(!bytes.contains(secret), "{what} leaked {secret}:\n{bytes}");
        assert!(
            !bytes.contains(&b64(secret)),
            "{what} leaked base64 of {secret}:\n{bytes}"
        );
    }
}

fn seed(world: &World) {
    let store = &world.api;
    store
        .create(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod-a"}}))
        .unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    store
        .create(json!({
            "apiVersion":"v1","kind":"Secret",
            "metadata":{"name":"db","namespace":"default"},
            "type":"Opaque",
            "data":{"password": b64(PASSWORD), "token": b64(TOKEN_VALUE)},
        }))
        .unwrap();
    store
        .create(json!({
            "apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":"web","namespace":"prod-a"},
            "spec":{"replicas":1,"selector":{"matchLabels":{"app":"web"}},
                "template":{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"web","image":"web:1"}]}}},
        }))
        .unwrap();
    store
        .create(json!({
            "apiVersion":"v1","kind":"Pod","metadata":{"name":"worker","namespace":"default"},
            "spec":{"containers":[{"name":"app","image":"app:1","env":[
                {"name":"API_TOKEN","value":TOKEN_VALUE},
                {"name":"SESSION_JWT","value":JWT},
                {"name":"DATABASE_URL","value":format!("postgres://app:{DB_PASSWORD}@db:5432/app")},
                {"name":"PLAIN","value":"hello-visible"},
            ]}]},
        }))
        .unwrap();
}

fn world(spec: WorldSpec) -> World {
    let world = World::start(spec).unwrap();
    seed(&world);
    world
}

fn observed_world() -> World {
    observed_world_on(Backend::Sim)
}

fn observed_world_on(backend: Backend) -> World {
    world(WorldSpec {
        backend,
        policy: POLICY.into(),
        ..WorldSpec::default()
    })
}

fn kubectl(world: &World, args: &[&str]) -> Output {
    run_for(&mut world.agent_kubectl(args), LIMIT).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kubectl ARGS` with `input` on its stdin.
fn kubectl_with_input(world: &World, args: &[&str], input: &str) -> Output {
    with_input(world.agent_kubectl(args), input)
}

/// Runs `cmd` with `input` typed on its stdin.
fn with_input(mut cmd: Command, input: &str) -> Output {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Typed a line at a time, as a person (or an agent) would.
    for line in input.split_inclusive('\n') {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stdin);
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kubectl {args:?} hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Waits for `child` (within [`LIMIT`]) and collects its output.
fn run_for_child(mut child: std::process::Child) -> Output {
    let deadline = Instant::now() + LIMIT;
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).map(|_| bytes)
    });
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = child.wait_with_output().unwrap();
    out.stdout = reader.join().unwrap().unwrap();
    out
}

/// The agent's kubectl forced to SPDY/3.1 for exec and attach, as kubectl
/// before 1.30, client-go before 1.30 and many client libraries are.
fn spdy_kubectl(world: &World, args: &[&str]) -> Command {
    let mut cmd = world.agent_kubectl(args);
    cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
    cmd
}

fn chaperone(args: &[&str], dir: &Path) -> Output {
    run_for(
        Command::new(workspace_binary("chaperone"))
            .args(args)
            .arg("--dir")
            .arg(dir),
        LIMIT,
    )
    .unwrap()
}

#[test]
fn exec_output_is_masked_and_nothing_secret_reaches_kubectl() {
    require_root!();
    let world = observed_world();
    let out = kubectl(&world, &["exec", "worker", "--", "env"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("PLAIN=hello-visible\n"), "{stdout}");
    assert!(stdout.contains("masked by chaperone"), "{stdout}");
    assert!(stdout.contains("DATABASE_URL=postgres://app:"), "{stdout}");
    assert!(stdout.contains("@db:5432/app"), "{stdout}");
    assert_no_secret("kubectl exec env", &text(&out));

    // stderr is masked as well, and exit codes survive.
    let out = kubectl(
        &world,
        &[
            "exec",
            "worker",
            "--",
            "sh",
            "-c",
            "echo $SESSION_JWT >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("masked by chaperone: jwt"), "{stderr}");
    assert_no_secret("kubectl exec sh -c (stderr)", &text(&out));

    // Without a newline, output still arrives (released when idle).
    let out = kubectl(
        &world,
        &["exec", "worker", "--", "sh", "-c", "echo -n ready"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let direct = run_for(
        &mut world.direct_kubectl(&["exec", "worker", "--", "sh", "-c", "echo -n ready"]),
        LIMIT,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ready",
        "direct: {:?}\n{}",
        String::from_utf8_lossy(&direct.stdout),
        world.node.log_text()
    );

    // The simulator really sent the secrets: the masking is chaperone's.
    let direct = run_for(
        &mut world.direct_kubectl(&["exec", "worker", "--", "env"]),
        LIMIT,
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&direct.stdout).contains(TOKEN_VALUE));
}

/// The sessions of the agent pod, oldest first, as `replay --json` gives them.
fn replays(dir: &Path) -> Vec<Value> {
    let pod_dir = dir.join("default").join("agent-0");
    let mut ids: Vec<String> = std::fs::read_dir(&pod_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl") && !n.contains(".p"))
        .map(|n| n.trim_end_matches(".jsonl").to_owned())
        .collect();
    ids.sort();
    let mut sessions: Vec<Value> = ids
        .iter()
        .map(|id| {
            let out = chaperone(&["replay", "--json", id], dir);
            assert!(out.status.success(), "{}", text(&out));
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect();
    sessions.sort_by_key(|s| s["session"]["started"].as_str().unwrap_or("").to_owned());
    sessions
}

/// The stream records of the recorded sessions, with their cast files.
fn casts(dir: &Path) -> Vec<(Value, PathBuf)> {
    replays(dir)
        .iter()
        .flat_map(|s| {
            let dir = PathBuf::from(s["dir"].as_str().unwrap());
            s["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["type"] == "stream")
                .map(move |e| (e.clone(), dir.join(e["cast"].as_str().unwrap())))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A cast's header, and its input and output text, checked to be
/// asciicast v2 with events in time order.
fn read_cast(path: &Path) -> (Value, String, String) {
    let text = std::fs::read_to_string(path).unwrap();
    assert_no_secret("a cast", &text);
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(header["width"].as_u64().unwrap() > 0);
    assert!(header["height"].as_u64().unwrap() > 0);
    let (mut input, mut output) = (String::new(), String::new());
    let mut last = 0.0;
    for line in lines {
        let event: Value = serde_json::from_str(line).unwrap();
        let event = event.as_array().expect("an event is an array");
        assert_eq!(event.len(), 3, "{line}");
        let time = event[0].as_f64().expect("time is a number");
        assert!(time >= last, "events in time order: {line}");
        last = time;
        let data = event[2].as_str().expect("data is a string");
        match event[1].as_str() {
            Some("i") => input.push_str(data),
            Some("o") => output.push_str(data),
            other => panic!("unexpected event code {other:?}"),
        }
    }
    (header, input, output)
}

fn session_file(dir: &Path, session: &Value) -> PathBuf {
    dir.join("default").join("agent-0").join(format!(
        "{}.jsonl",
        session["session"]["session"].as_str().unwrap()
    ))
}

#[test]
fn a_kubectl_session_replays_with_its_exec_cast_and_tampering_shows() {
    require_root!();
    let world = observed_world();
    assert!(kubectl(&world, &["get", "pods"]).status.success());
    assert!(
        kubectl(&world, &["get", "secret", "db", "-o", "yaml"])
            .status
            .success()
    );
    let denied = kubectl(&world, &["delete", "deployment", "web", "-n", "prod-a"]);
    assert!(!denied.status.success());
    let typed = "echo typed-marker-42\nenv\necho postgres://app:pg-Pa55-wrd-do-not-leak@db\n";
    let exec = kubectl_with_input(&world, &["exec", "-i", "worker", "--", "sh"], typed);
    assert!(exec.status.success(), "{}", text(&exec));
    let exec_out = String::from_utf8_lossy(&exec.stdout).into_owned();
    assert!(exec_out.starts_with("typed-marker-42\n"), "{exec_out}");
    assert_no_secret("kubectl exec -i sh", &text(&exec));
    // Streams and sessions are sealed when their connections close.
    let dir = world.work.path().join("sessions");
    wait::sealed_recordings(&dir, LIMIT);
    let sessions = replays(&dir);
    // The sequence, as replay tells it.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut stream: Option<(Value, PathBuf)> = None;
    for session in &sessions {
        for event in session["events"].as_array().unwrap() {
            match event["type"].as_str() {
                Some("exchange") if event["stage"] == "ResponseComplete" => {
                    let mut resource = event["resource"].as_str().unwrap_or("").to_owned();
                    if let Some(sub) = event["subresource"].as_str() {
                        resource = format!("{resource}/{sub}");
                    }
                    if !resource.is_empty() {
                        seen.push((resource, event["decision"].as_str().unwrap().to_owned()));
                    }
                }
                Some("stream") => {
                    let cast = Path::new(session["dir"].as_str().unwrap())
                        .join(event["cast"].as_str().unwrap());
                    stream = Some((event.clone(), cast));
                }
                _ => {}
            }
        }
    }
    let expected = [
        ("pods", "allow"),
        ("secrets", "mask"),
        ("deployments", "deny"),
        ("pods/exec", "allow"),
    ];
    let mut at = 0;
    for (resource, decision) in &seen {
        if at < expected.len() && (resource.as_str(), decision.as_str()) == expected[at] {
            at += 1;
        }
    }
    assert_eq!(at, expected.len(), "replay shows {seen:?}");

    // The human timeline names the same steps and the cast to play.
    let all_text: String = sessions
        .iter()
        .map(|s| {
            let id = s["session"]["session"].as_str().unwrap();
            String::from_utf8_lossy(&chaperone(&["replay", id], &dir).stdout).into_owned()
        })
        .collect();
    for needle in [
        "secrets",
        "mask",
        "deployments",
        "deny",
        "pods/exec",
        "asciinema play",
    ] {
        assert!(all_text.contains(needle), "{needle} not in:\n{all_text}");
    }
    assert!(
        all_text.contains("deleting deployments needs a human"),
        "{all_text}"
    );

    // The cast: asciicast v2, typed input and output, secrets masked.
    let (record, cast) = stream.expect("a stream record for the exec");
    let title = record["title"].as_str().unwrap();
    assert!(
        title.starts_with("exec default/worker") && title.ends_with("-- sh"),
        "{title}"
    );
    let (_header, input, output) = read_cast(&cast);
    assert!(input.contains("echo typed-marker-42\n"), "{input}");
    assert!(input.contains("env\n"), "{input}");
    assert!(output.contains("typed-marker-42\n"), "{output}");
    assert!(output.contains("masked by chaperone"), "{output}");

    // Session recordings never hold secret values either.
    for session in &sessions {
        assert_no_secret(
            "a session recording",
            &std::fs::read_to_string(session_file(&dir, session)).unwrap(),
        );
    }

    // Tampering: one byte of the denied delete's record.
    let victim = sessions
        .iter()
        .find(|s| {
            s["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["resource"] == "deployments" && e["decision"] == "deny")
        })
        .unwrap();
    let id = victim["session"]["session"].as_str().unwrap();
    let ok = chaperone(&["verify", id], &dir);
    assert!(ok.status.success(), "{}", text(&ok));
    let path = session_file(&dir, victim);
    let original = std::fs::read_to_string(&path).unwrap();
    let (line_no, line) = original
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("\"deployments\"") && l.contains("\"deny\""))
        .unwrap();
    let offset: usize = original
        .lines()
        .take(line_no)
        .map(|l| l.len() + 1)
        .sum::<usize>()
        + line.find("\"status\":403").expect("the denial's status")
        + "\"status\":40".len();
    let mut bytes = original.clone().into_bytes();
    bytes[offset] = b'4'; // 403 -> 404
    std::fs::write(&path, &bytes).unwrap();
    let broken = chaperone(&["verify", id], &dir);
    assert!(!broken.status.success(), "{}", text(&broken));
    let report = String::from_utf8_lossy(&broken.stdout).into_owned();
    assert!(
        report.contains(&format!("{}:{}:", path.display(), line_no + 1)),
        "verify names the edited record (line {}):\n{report}",
        line_no + 1
    );
    std::fs::write(&path, &original).unwrap();

    // The whole session rewritten, every hash recomputed as anyone can:
    // the node keyed the chain with its record key, so it does not verify.
    let mut prev = "0".repeat(64);
    let rewritten: String = original
        .lines()
        .map(|line| {
            let mut record: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            record.remove("hash");
            record.insert("prev".into(), Value::from(prev.clone()));
            if record.get("decision") == Some(&Value::from("deny")) {
                record.insert("decision".into(), "allow".into());
                record.insert("status".into(), 200.into());
            }
            let body = serde_json::to_string(&record).unwrap();
            prev = sha256_hex(body.as_bytes());
            format!("{},\"hash\":\"{prev}\"}}\n", &body[..body.len() - 1])
        })
        .collect();
    std::fs::write(&path, rewritten).unwrap();
    let forged = chaperone(&["verify", id], &dir);
    assert!(!forged.status.success(), "{}", text(&forged));
    let report = String::from_utf8_lossy(&forged.stdout).into_owned();
    assert!(
        report.contains(&format!("{}:1:", path.display())) && report.contains("rewritten"),
        "verify tells a session rewritten whole:\n{report}"
    );
    std::fs::write(&path, &original).unwrap();

    // The commands are one agent session of the pod, listed, verified and
    // replayed as one; its connections are each kept.
    let listed = chaperone(&["sessions", "-o", "json"], &dir);
    assert!(listed.status.success(), "{}", text(&listed));
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let agents = listed["items"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "one agent session: {listed:#}");
    let agent = &agents[0];
    assert_eq!(agent["metadata"]["namespace"], "default");
    assert_eq!(agent["pod"], "agent-0");
    assert_eq!(
        agent["connections"].as_array().unwrap().len(),
        sessions.len(),
        "{agent:#}"
    );
    let kubectl_exe = std::fs::canonicalize(which("kubectl")).unwrap();
    assert_eq!(
        agent["executables"],
        json!([kubectl_exe.display().to_string()]),
        "{agent:#}"
    );
    let name = agent["metadata"]["name"].as_str().unwrap();
    let ok = chaperone(&["verify", name], &dir);
    assert!(ok.status.success(), "{}", text(&ok));
    // The audit log, a second witness, says the same of every request.
    let audit_log = world.work.path().join("audit.log");
    let audit_log = audit_log.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let witnessed = loop {
        let out = chaperone(&["verify", name, "--audit-log", audit_log], &dir);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(witnessed.status.success(), "{}", text(&witnessed));
    assert!(
        text(&witnessed).contains("agree with 1 audit file(s)"),
        "{}",
        text(&witnessed)
    );
    let timeline = String::from_utf8_lossy(&chaperone(&["replay", name], &dir).stdout).into_owned();
    for needle in [
        "secrets",
        "deployments",
        "pods/exec",
        "asciinema play",
        "process kubectl pid",
    ] {
        assert!(timeline.contains(needle), "{needle} not in:\n{timeline}");
    }

    // The cast is inside the chain: editing what was typed shows.
    let cast_text = std::fs::read_to_string(&cast).unwrap();
    std::fs::write(
        &cast,
        cast_text.replace("typed-marker-42", "typed-marker-43"),
    )
    .unwrap();
    let broken = chaperone(&["verify", name], &dir);
    assert!(!broken.status.success(), "{}", text(&broken));
    let report = String::from_utf8_lossy(&broken.stdout).into_owned();
    assert!(
        report.contains(&format!("the cast {} does not match", cast.display())),
        "{report}"
    );
    std::fs::write(&cast, cast_text).unwrap();
    assert!(chaperone(&["verify", name], &dir).status.success());
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `program`'s path on `PATH`.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// "Only kubectl may exec", decided on the executable of the process that
/// opened the agent's connection; the audit log names that process, and,
/// with `--audit-durability spooled`, holds each forwarded request's
/// `RequestReceived` event written ahead of it.
#[test]
fn only_kubectl_may_exec_and_the_audit_log_names_the_process() {
    require_root!();
    let kubectl_exe = std::fs::canonicalize(which("kubectl")).unwrap();
    let policy = format!(
        r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: exec-by-kubectl
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: kubectl-may-exec
      resources: [pods/exec]
      executables: ["{}"]
      action: allow
    - name: nothing-else-may-exec
      resources: [pods/exec]
      action: deny
      message: only kubectl may exec
  defaultAction: allow
"#,
        kubectl_exe.display()
    );
    let world = world(WorldSpec {
        policy,
        node_args: vec!["--audit-durability".into(), "spooled".into()],
        ..WorldSpec::default()
    });
    let out = kubectl(&world, &["exec", "worker", "--", "echo", "via-kubectl"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("via-kubectl"));

    // The same request from curl, with the same token.
    let mut curl = world.agent().in_cluster_command(&world.credentials, "sh");
    curl.arg("-c").arg(
        r#"exec curl -s --cacert /var/run/secrets/kubernetes.io/serviceaccount/ca.crt -H "Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)" -X POST "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/default/pods/worker/exec?command=echo&command=via-curl&stdout=true""#,
    );
    let out = run_for(&mut curl, LIMIT).unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let status: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(status["code"], 403, "{body}");
    assert!(body.contains("only kubectl may exec"), "{body}");

    // The audit log: who exec'd with what, and the write-ahead events.
    let log = world.work.path().join("audit.log");
    let deadline = Instant::now() + LIMIT;
    let events = loop {
        let events: Vec<Value> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let execs = events
            .iter()
            .filter(|e| e["objectRef"]["subresource"] == "exec" && e["stage"] == "ResponseComplete")
            .count();
        if execs >= 2 {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "no exec events in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let exec_event = |decision: &str| {
        events
            .iter()
            .find(|e| {
                e["objectRef"]["subresource"] == "exec"
                    && e["stage"] == "ResponseComplete"
                    && e["annotations"]["chaperone.dev/decision"] == decision
            })
            .unwrap_or_else(|| panic!("no {decision} exec in {events:#?}"))
    };
    let allowed = exec_event("allow");
    assert_eq!(
        allowed["annotations"]["chaperone.dev/executable"],
        kubectl_exe.display().to_string()
    );
    assert!(
        allowed["annotations"]["chaperone.dev/process"]
            .as_str()
            .unwrap()
            .starts_with("kubectl pid "),
        "{allowed:#}"
    );
    // kubectl's parents: the shells that started it in the pod.
    assert!(
        allowed["annotations"]["chaperone.dev/parents"]
            .as_str()
            .unwrap()
            .contains("sh("),
        "{allowed:#}"
    );
    let denied = exec_event("deny");
    assert_eq!(
        denied["annotations"]["chaperone.dev/executable"],
        std::fs::canonicalize(which("curl"))
            .unwrap()
            .display()
            .to_string()
    );
    assert_eq!(
        denied["annotations"]["chaperone.dev/rule"],
        "nothing-else-may-exec"
    );
    // Written ahead: the allowed exec's RequestReceived came first; the
    // refused one was never forwarded, so it needed none.
    let id = allowed["auditID"].as_str().unwrap();
    let stages: Vec<&str> = events
        .iter()
        .filter(|e| e["auditID"] == id)
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages.first(), Some(&"RequestReceived"), "{stages:?}");
    assert!(stages.contains(&"ResponseComplete"), "{stages:?}");
    let denied_id = denied["auditID"].as_str().unwrap();
    assert!(
        !events
            .iter()
            .any(|e| e["auditID"] == denied_id && e["stage"] == "RequestReceived")
    );

    // The recording names the process too.
    let dir = world.work.path().join("sessions");
    let wide = chaperone(&["sessions", "--connections", "-o", "wide"], &dir);
    let wide = text(&wide);
    assert!(wide.contains(&kubectl_exe.display().to_string()), "{wide}");
}

/// kubectl forced to SPDY/3.1 (`KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`):
/// exec and attach output is masked as over WebSocket, typed input reaches
/// the container, and both land in asciicast v2 casts without a secret.
#[test]
fn spdy_exec_and_attach_are_masked_and_recorded() {
    require_root!();
    let world = observed_world();
    let run = |args: &[&str]| run_for(&mut spdy_kubectl(&world, args), LIMIT).unwrap();

    let out = run(&["exec", "worker", "--", "env"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("PLAIN=hello-visible\n"), "{stdout}");
    assert!(stdout.contains("masked by chaperone"), "{stdout}");
    assert!(stdout.contains("DATABASE_URL=postgres://app:"), "{stdout}");
    assert!(stdout.contains("@db:5432/app"), "{stdout}");
    assert_no_secret("SPDY kubectl exec env", &text(&out));

    let out = run(&[
        "exec",
        "worker",
        "--",
        "sh",
        "-c",
        "echo $SESSION_JWT >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("masked by chaperone: jwt"), "{stderr}");
    assert_no_secret("SPDY kubectl exec sh -c (stderr)", &text(&out));

    // A last line without newline arrives.
    let out = run(&["exec", "worker", "--", "sh", "-c", "echo -n ready"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ready");

    // Output far larger than SPDY's 64 KiB initial window goes through
    // masking and re-framing whole: `cat` echoes 2000 lines given at once.
    // (No secret in it: where an idle gap cuts a line is the network's
    // timing; the cases above mask.)
    let big: String = (0..2000)
        .map(|i| format!("{i} plain line padding-padding-padding-padding\n"))
        .collect();
    let mut child = spdy_kubectl(&world, &["exec", "-i", "worker", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = big.clone();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = run_for_child(child);
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(out.stdout == big.as_bytes(), "{}", text(&out));

    let typed = "echo typed-marker-42\nenv\necho postgres://app:pg-Pa55-wrd-do-not-leak@db\n";
    let exec = with_input(
        spdy_kubectl(&world, &["exec", "-i", "worker", "--", "sh"]),
        typed,
    );
    assert!(exec.status.success(), "{}", text(&exec));
    let exec_out = String::from_utf8_lossy(&exec.stdout).into_owned();
    assert!(exec_out.starts_with("typed-marker-42\n"), "{exec_out}");
    assert!(exec_out.contains("PLAIN=hello-visible\n"), "{exec_out}");
    assert_no_secret("SPDY kubectl exec -i sh", &text(&exec));

    // attach: the container's main process echoes what is typed.
    let attach = with_input(
        spdy_kubectl(&world, &["attach", "-i", "worker"]),
        &format!("attach-marker\npassword={PASSWORD}\n"),
    );
    assert!(attach.status.success(), "{}", text(&attach));
    let attach_out = String::from_utf8_lossy(&attach.stdout).into_owned();
    assert!(
        attach_out.contains("attach-marker\npassword=<masked by chaperone"),
        "{attach_out}"
    );
    assert_no_secret("SPDY kubectl attach -i", &text(&attach));

    // All of it went over SPDY.
    let upgrades: Vec<String> = world
        .sim()
        .requests()
        .iter()
        .filter(|r| r.uri.contains("/exec?") || r.uri.contains("/attach?"))
        .map(|r| {
            r.headers
                .iter()
                .find(|(n, _)| n == "upgrade")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(upgrades.len(), 6, "{upgrades:?}");
    assert!(upgrades.iter().all(|u| u == "SPDY/3.1"), "{upgrades:?}");

    // Streams are sealed when their connections close.
    wait::sealed_recordings(&world.work.path().join("sessions"), LIMIT);
    let casts = casts(&world.work.path().join("sessions"));
    assert_eq!(casts.len(), 6, "a cast per stream: {casts:?}");
    let cast = |start: &str, end: &str| {
        let (_, path) = casts
            .iter()
            .find(|(record, _)| {
                let title = record["title"].as_str().unwrap();
                title.starts_with(start) && title.ends_with(end)
            })
            .unwrap_or_else(|| panic!("no cast {start}...{end} in {casts:?}"));
        read_cast(path)
    };
    let (_, input, output) = cast("exec default/worker", "-- sh");
    assert!(input.contains("echo typed-marker-42\n"), "{input}");
    assert!(input.contains("env\n"), "{input}");
    assert!(input.contains("echo postgres://app:"), "{input}");
    assert!(output.contains("typed-marker-42\n"), "{output}");
    assert!(output.contains("PLAIN=hello-visible"), "{output}");
    assert!(output.contains("masked by chaperone"), "{output}");
    let (_, input, output) = cast("attach default/worker", "");
    assert!(input.contains("attach-marker\npassword="), "{input}");
    assert!(output.contains("attach-marker\n"), "{output}");
    assert!(output.contains("password=<masked by chaperone"), "{output}");
    // Every cast (read_cast checks them all for secrets).
    for (_, path) in &casts {
        read_cast(path);
    }
}

on_both_servers!(bodies_are_recorded_masked_at_request_and_response_levels);

fn bodies_are_recorded_masked_at_request_and_response_levels(backend: Backend) {
    require_root!();
    let world = observed_world_on(backend);
    let manifest = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-config\n  namespace: default\n\
         data:\n  url: postgres://app:{DB_PASSWORD}@db/app\n  greeting: hello-body\n"
    );
    let path = world.work.path().join("cm.yaml");
    std::fs::write(&path, manifest).unwrap();
    let out = kubectl(&world, &["create", "-f", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = kubectl(&world, &["get", "configmap", "app-config", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = kubectl(&world, &["get", "secret", "db", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let dir = world.work.path().join("sessions");
    wait::sealed_recordings(&dir, LIMIT);
    let events: Vec<Value> = replays(&dir)
        .iter()
        .flat_map(|s| s["events"].as_array().unwrap().clone())
        .filter(|e| e["type"] == "exchange")
        .collect();
    let create = events
        .iter()
        .find(|e| e["verb"] == "create" && e["resource"] == "configmaps")
        .expect("the create is recorded");
    assert_eq!(create["requestObject"]["data"]["greeting"], "hello-body");
    assert!(
        create["requestObject"]["data"]["url"]
            .as_str()
            .unwrap()
            .contains("masked by chaperone"),
        "{create}"
    );
    let get = events
        .iter()
        .find(|e| e["verb"] == "get" && e["resource"] == "configmaps")
        .unwrap();
    assert_eq!(get["responseObject"]["data"]["greeting"], "hello-body");
    let secret = events
        .iter()
        .find(|e| e["verb"] == "get" && e["resource"] == "secrets")
        .unwrap();
    assert_eq!(secret["responseObject"]["kind"], "Secret");

    // The audit log carries the same bodies, masked.
    let audit = std::fs::read_to_string(world.work.path().join("audit.log")).unwrap();
    let audited: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let create = audited
        .iter()
        .find(|e| {
            e["verb"] == "create"
                && e["objectRef"]["resource"] == "configmaps"
                && e["stage"] == "ResponseComplete"
        })
        .unwrap_or_else(|| panic!("no audit event for the create:\n{audit}"));
    assert_eq!(create["requestObject"]["data"]["greeting"], "hello-body");
    assert_eq!(create["responseObject"]["kind"], "ConfigMap");
    assert_no_secret("the audit log", &audit);
    for session in replays(&dir) {
        assert_no_secret(
            "a session recording",
            &std::fs::read_to_string(session_file(&dir, &session)).unwrap(),
        );
        // Every session's hash chain holds.
        let id = session["session"]["session"].as_str().unwrap();
        let verified = chaperone(&["verify", id], &dir);
        assert!(
            verified.status.success(),
            "verify {id}: {}",
            text(&verified)
        );
    }
}

fn scrape(world: &World) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", world.node.admin_port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_owned()
}

#[test]
fn metrics_parse_and_count_the_requests_made() {
    require_root!();
    let world = observed_world();
    for _ in 0..3 {
        assert!(kubectl(&world, &["get", "pods"]).status.success());
    }
    for _ in 0..2 {
        assert!(
            kubectl(&world, &["get", "secret", "db", "-o", "name"])
                .status
                .success()
        );
    }
    assert!(
        !kubectl(&world, &["delete", "deployment", "web", "-n", "prod-a"])
            .status
            .success()
    );
    assert!(
        kubectl(&world, &["exec", "worker", "--", "env"])
            .status
            .success()
    );
    // Each request is counted once its exchange is finished: wait until
    // the last one (the exec) and every one that reached the API server is.
    world.node.wait_for_metric(
        "chaperone_requests_total",
        &[("resource", "pods/exec")],
        1.0,
        LIMIT,
    );
    let forwarded = || {
        world
            .sim()
            .requests()
            .iter()
            .filter(|r| r.token.as_deref() == Some(world.token.as_str()))
            .count() as f64
    };
    wait::wait_for(
        "every request forwarded to the API server to be counted in chaperone_requests_total",
        LIMIT,
        || {
            let counted = world.node.metrics();
            let passed = counted.sum("chaperone_requests_total", &[])
                - counted.sum("chaperone_requests_total", &[("decision", "deny")]);
            (passed >= forwarded()).then_some(())
        },
    );
    let body = scrape(&world);
    let metrics = prom::parse(&body).unwrap_or_else(|e| panic!("{e:#}\n{body}"));
    let requests = "chaperone_requests_total";
    assert_eq!(
        metrics.sum(
            requests,
            &[
                ("verb", "list"),
                ("resource", "pods"),
                ("decision", "allow")
            ]
        ),
        3.0,
        "{body}"
    );
    assert_eq!(
        metrics.sum(
            requests,
            &[
                ("verb", "get"),
                ("resource", "secrets"),
                ("decision", "mask")
            ]
        ),
        2.0,
        "{body}"
    );
    assert_eq!(
        metrics.sum(
            requests,
            &[("resource", "deployments"), ("decision", "deny")]
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        metrics.sum(requests, &[("resource", "pods/exec")]),
        1.0,
        "{body}"
    );
    // Everything that was not denied reached the API server, one for one.
    let forwarded = world
        .sim()
        .requests()
        .iter()
        .filter(|r| r.token.as_deref() == Some(world.token.as_str()))
        .count() as f64;
    let total = metrics.sum(requests, &[]);
    let denied = metrics.sum(requests, &[("decision", "deny")]);
    assert_eq!(total - denied, forwarded, "{body}");
    assert_eq!(
        metrics.sum("chaperone_request_duration_seconds_count", &[]),
        total,
        "{body}"
    );
    assert!(
        metrics.sum("chaperone_masked_fields_total", &[]) >= 2.0,
        "{body}"
    );
}

fn crd_objects(policy: &str) -> Vec<Value> {
    let crd_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/base/crds/agentpolicies.chaperone.dev.yaml");
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(crd_path).unwrap()).unwrap();
    vec![crd, serde_yaml::from_str(policy).unwrap()]
}

const CRD_POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: hot
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  defaultAction: allow
"#;

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn accepted(world: &World) -> Option<Value> {
    let object = world.api.get("agentpolicies.chaperone.dev", None, "hot")?;
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

on_both_servers!(the_policy_crd_is_hot_reloaded_and_an_invalid_update_keeps_the_last_good_one);

fn the_policy_crd_is_hot_reloaded_and_an_invalid_update_keeps_the_last_good_one(backend: Backend) {
    require_root!();
    let world = world(WorldSpec {
        backend,
        policy: String::new(),
        seed: crd_objects(CRD_POLICY),
        ..WorldSpec::default()
    });
    wait_for("the policy to be accepted", || {
        accepted(&world).is_some_and(|c| c["status"] == "True")
    });
    assert!(kubectl(&world, &["get", "pods"]).status.success());

    // Deny listing pods: takes effect without a restart.
    let mut object = world
        .api
        .get("agentpolicies.chaperone.dev", None, "hot")
        .unwrap();
    object["spec"]["rules"] = json!([{
        "name": "no-pod-lists", "verbs": ["list"], "resources": ["pods"],
        "action": "deny", "message": "pods are off limits since the reload"
    }]);
    world.api.update(object).unwrap();
    wait_for("the reloaded policy to deny", || {
        let out = kubectl(&world, &["get", "pods"]);
        !out.status.success() && text(&out).contains("pods are off limits since the reload")
    });
    let in_force = accepted(&world).unwrap();
    assert_eq!(in_force["status"], "True", "{in_force}");

    // An invalid update is rejected, says why, and the last good one stays.
    // Invalid in a way the CRD's schema cannot say (the real server stores
    // it; an unknown verb it refuses itself): a rule name used twice.
    let mut object = world
        .api
        .get("agentpolicies.chaperone.dev", None, "hot")
        .unwrap();
    object["spec"]["rules"] = json!([
        {"name": "broken", "verbs": ["list"], "resources": ["pods"], "action": "allow"},
        {"name": "broken", "verbs": ["get"], "resources": ["pods"], "action": "allow"}
    ]);
    world.api.update(object).unwrap();
    wait_for("the invalid update to be reported", || {
        accepted(&world).is_some_and(|c| c["status"] == "False")
    });
    let condition = accepted(&world).unwrap();
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("rule name \"broken\" is used twice"),
        "{message}"
    );
    assert!(message.contains("stays in force"), "{message}");
    assert!(
        world.node.log_text().contains("used twice"),
        "the log says why:\n{}",
        world.node.log_text()
    );
    let out = kubectl(&world, &["get", "pods"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("pods are off limits since the reload"),
        "{}",
        text(&out)
    );
    // Other requests are still decided by the last good policy.
    assert!(kubectl(&world, &["get", "secrets"]).status.success());
}

#[test]
fn an_interactive_terminal_session_shows_its_prompt_and_is_recorded() {
    require_root!();
    interactive_terminal_session(false);
}

#[test]
fn an_interactive_terminal_session_over_spdy_shows_its_prompt_and_is_recorded() {
    require_root!();
    interactive_terminal_session(true);
}

fn interactive_terminal_session(spdy: bool) {
    let world = observed_world();
    // kubectl -it needs a terminal: `script` gives it one.
    let mut cmd = world
        .agent()
        .in_cluster_command(&world.credentials, "script");
    if spdy {
        cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
    }
    // kubectl's output and errors both reach the terminal `script` made.
    cmd.args(["-qfec", "kubectl exec -it worker -- sh", "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let terminal = wait::Followed::new(child);
    // The prompt has no newline: it shows because held output is released.
    terminal.wait_for("$ ", LIMIT);
    // Typed a key at a time, Enter as a terminal sends it.
    for key in "echo tty-marker API_TOKEN=$API_TOKEN\r".bytes() {
        stdin.write_all(&[key]).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    // The typed line echoes after the prompt; its output starts a line.
    terminal.wait_for("\ntty-marker", LIMIT);
    stdin.write_all(b"exit\r").unwrap();
    stdin.flush().unwrap();
    let (_, seen) = terminal.wait_exit(LIMIT);
    drop(stdin);
    // The prompt has no newline: it shows because held output is released.
    assert!(seen.contains("$ "), "{seen:?}");
    assert!(seen.contains("tty-marker"), "{seen:?}");
    assert_no_secret("kubectl exec -it", &seen);
    let upgrade = world
        .sim()
        .requests()
        .iter()
        .find(|r| r.uri.contains("/exec?"))
        .and_then(|r| r.headers.iter().find(|(n, _)| n == "upgrade").cloned())
        .map(|(_, v)| v.to_ascii_lowercase());
    let expected = if spdy { "spdy/3.1" } else { "websocket" };
    assert_eq!(upgrade.as_deref(), Some(expected));
    let dir = world.work.path().join("sessions");
    wait::sealed_recordings(&dir, LIMIT);
    let cast = replays(&dir)
        .iter()
        .flat_map(|s| {
            let dir = PathBuf::from(s["dir"].as_str().unwrap());
            s["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["type"] == "stream")
                .map(move |e| dir.join(e["cast"].as_str().unwrap()))
                .collect::<Vec<_>>()
        })
        .next()
        .expect("the terminal session has a cast");
    // read_cast checks the format and that no secret is in it.
    let (header, input, output) = read_cast(&cast);
    assert!(header["title"].as_str().unwrap().contains("-- sh"));
    // Typed input is recorded masked too (the assignment's value here).
    assert!(input.contains("echo tty-marker API_TOKEN="), "{input:?}");
    assert!(output.contains("$ "), "{output:?}");
    assert!(output.contains("tty-marker"), "{output:?}");
}

// Issue 24, attack 8, on both servers.
on_both_servers!(
    metrics_stay_bounded_under_made_up_resources,
    a_pod_over_its_in_flight_limit_gets_429_with_retry_after,
);

/// Token-less requests naming thousands of made-up resources (one curl,
/// keeping its connection) leave `/metrics` the size it was: label values
/// come from a fixed vocabulary, never from what a request names.
fn metrics_stay_bounded_under_made_up_resources(backend: Backend) {
    require_root!();
    let world = observed_world_on(backend);
    assert!(kubectl(&world, &["get", "pods"]).status.success());
    // kubectl's requests counted (the list of pods is its last).
    world.node.wait_for_metric(
        "chaperone_requests_total",
        &[("verb", "list"), ("resource", "pods")],
        1.0,
        LIMIT,
    );
    let counted_before = world.node.metrics().sum("chaperone_requests_total", &[]);
    let before = scrape(&world);
    let count = 3000;
    let mut curl = world.agent().in_cluster_command(&world.credentials, "curl");
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        "--cacert",
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        &format!("https://10.96.0.1/api/v1/namespaces/default/made-up-[1-{count}]"),
        "-w",
        "%{http_code}\n",
    ]);
    let out = run_for(&mut curl, Duration::from_secs(240)).unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|c| *c == "401").count(),
        count,
        "every token-less request is refused: {}",
        text(&out)
    );
    // Every refusal counted (in the fixed vocabulary) before the scrape.
    world.node.wait_for_metric(
        "chaperone_requests_total",
        &[],
        counted_before + count as f64,
        LIMIT,
    );
    let after = scrape(&world);
    let series = |body: &str| {
        body.lines()
            .filter(|l| l.starts_with("chaperone_requests_total"))
            .count()
    };
    assert!(
        series(&after) <= series(&before) + 2,
        "{} series before, {} after:\n{after}",
        series(&before),
        series(&after)
    );
    assert!(
        after.len() < before.len() + 4096,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    assert!(!after.contains("made-up"), "{after}");
}

/// One pod's requests in flight are limited (`--max-requests-per-pod`):
/// past the limit it gets a 429 `Status` with `Retry-After`, and once a
/// request ends the next one passes.
fn a_pod_over_its_in_flight_limit_gets_429_with_retry_after(backend: Backend) {
    require_root!();
    let world = world(WorldSpec {
        backend,
        policy: POLICY.into(),
        node_args: vec!["--max-requests-per-pod".into(), "1".into()],
        ..WorldSpec::default()
    });
    let curl = |args: &str| {
        let mut cmd = world.agent().in_cluster_command(&world.credentials, "sh");
        cmd.arg("-c").arg(format!(
            "sa=/var/run/secrets/kubernetes.io/serviceaccount; \
             exec curl -s --cacert $sa/ca.crt -H \"Authorization: Bearer $(cat $sa/token)\" {args}"
        ));
        cmd
    };
    // The watch holds the pod's one slot once its response has started.
    let watch = wait::Followed::new(
        curl(
            "-D - -o /dev/null 'https://10.96.0.1/api/v1/namespaces/default/configmaps?watch=true'",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    watch.wait_for(" 200", LIMIT);
    let out = run_for(
        &mut curl("-D - 'https://10.96.0.1/api/v1/namespaces/default/configmaps'"),
        LIMIT,
    )
    .unwrap();
    let said = text(&out).to_ascii_lowercase();
    assert!(said.starts_with("http/") && said.contains(" 429"), "{said}");
    assert!(said.contains("retry-after: 1"), "{said}");
    assert!(said.contains("toomanyrequests"), "{said}");
    assert!(said.contains("retryafterseconds"), "{said}");

    watch.kill();
    let mut passed = false;
    for _ in 0..50 {
        let out = run_for(
            &mut curl("-o /dev/null -w '%{http_code}' 'https://10.96.0.1/api/v1/namespaces/default/configmaps'"),
            LIMIT,
        )
        .unwrap();
        if String::from_utf8_lossy(&out.stdout) == "200" {
            passed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(passed, "the slot of the ended watch was not released");
}

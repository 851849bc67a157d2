//! The streaming subresources of the API-server simulator against the real
//! kubectl: exec, attach and port-forward over WebSocket and SPDY/3.1.
//!
//! The simulator's router lives elsewhere; this file serves what kubectl
//! asks for before streaming (version, discovery, the pod) from a small
//! plain-HTTP harness and routes `exec`, `attach` and `portforward` to
//! `chaperone_tests::sim::stream`. The harness records which protocol each
//! stream negotiated, so the tests can say what kubectl really used.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use chaperone_tests::sim::stream::{self, Body, LiveStreams, StreamTarget};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::Command,
};

const POD: &str = "web";
const NAMESPACE: &str = "default";
/// Every kubectl run ends within this, or the test fails (and kills it).
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);

/// The kubectl under test: `KUBECTL` or the one on `PATH`.
fn kubectl_binary() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string())
}

// === harness ===

#[derive(Clone, Default)]
struct Options {
    /// Answer WebSocket upgrades with 400, as an API server without the
    /// WebSocket streaming features does.
    refuse_websocket: bool,
    /// The pod's container was started with a terminal (`tty: true`), as
    /// `kubectl run -it` does; `kubectl attach` then uses one too.
    tty_container: bool,
}

struct Harness {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    /// `(subresource, protocol)` of every upgrade the simulator accepted,
    /// e.g. `("exec", "websocket v5.channel.k8s.io")`.
    negotiated: Arc<Mutex<Vec<(String, String)>>>,
    /// Stream connections the simulator is serving right now.
    live: LiveStreams,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Shared {
    target: StreamTarget,
    options: Options,
    negotiated: Arc<Mutex<Vec<(String, String)>>>,
}

impl Harness {
    async fn start(ports: BTreeMap<u16, SocketAddr>, options: Options) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let negotiated = Arc::new(Mutex::new(Vec::new()));
        let live = LiveStreams::default();
        let shared = Arc::new(Shared {
            target: StreamTarget {
                namespace: NAMESPACE.into(),
                pod: POD.into(),
                container: "app".into(),
                env: vec![
                    ("GREETING".into(), "hello from the pod".into()),
                    ("MODE".into(), "test".into()),
                ],
                ports,
                live: live.clone(),
            },
            options,
            negotiated: negotiated.clone(),
        });
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(route(req, &shared).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: agent\n  user:\n    token: test-token\n\
             contexts:\n- name: sim\n  context:\n    cluster: sim\n    user: agent\n    namespace: {NAMESPACE}\n\
             current-context: sim\n"
        );
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig).unwrap();
        Harness {
            addr,
            dir,
            negotiated,
            live,
            server,
        }
    }

    fn server_port(&self) -> u16 {
        self.addr.port()
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kubectl command against the harness (not yet started).
    fn kubectl(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(kubectl_binary());
        // Global flags first: everything after `--` is the remote command.
        cmd.arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .envs(env.iter().copied())
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl to completion with `input` on stdin.
    async fn run(&self, args: &[&str], env: &[(&str, &str)], input: Option<Vec<u8>>) -> Run {
        let mut cmd = self.kubectl(args, env);
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl runs");
        if let Some(input) = input {
            let mut stdin = child.stdin.take().unwrap();
            tokio::spawn(async move {
                let _ = stdin.write_all(&input).await;
                // Dropping stdin is kubectl's end-of-file.
            });
        }
        let output = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish in {KUBECTL_TIMEOUT:?}"))
            .unwrap();
        Run {
            code: output.status.code(),
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn negotiated(&self) -> Vec<(String, String)> {
        self.negotiated.lock().unwrap().clone()
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn json(code: u16, value: serde_json::Value) -> http::Response<Body> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(value.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

fn pod_json(target: &StreamTarget, tty: bool) -> serde_json::Value {
    let env: Vec<_> = target
        .env
        .iter()
        .map(|(name, value)| serde_json::json!({"name": name, "value": value}))
        .collect();
    let ports: Vec<_> = target
        .ports
        .keys()
        .map(|port| serde_json::json!({"containerPort": port, "protocol": "TCP"}))
        .collect();
    serde_json::json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": target.pod, "namespace": target.namespace, "uid": "8d3c5f4e-1111-4a2b-9c3d-000000000001"},
        "spec": {"containers": [{"name": target.container, "image": "busybox", "env": env, "ports": ports, "stdin": true, "tty": tty}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": target.container, "ready": true, "started": true, "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {}}}]},
    })
}

async fn route(req: http::Request<Incoming>, shared: &Shared) -> http::Response<Body> {
    let path = req.uri().path().to_string();
    let pod_path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{POD}");
    let websocket = stream::websocket::is_upgrade(&req);
    let subresource = path
        .strip_prefix(&pod_path)
        .and_then(|rest| rest.strip_prefix('/'))
        .map(str::to_string);
    let response = match (path.as_str(), subresource.as_deref()) {
        ("/version", _) => {
            return json(
                200,
                serde_json::json!({"major": "1", "minor": "32", "gitVersion": "v1.32.4", "platform": "linux/amd64"}),
            );
        }
        ("/api", _) => {
            return json(
                200,
                serde_json::json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
            );
        }
        ("/apis", _) => {
            return json(
                200,
                serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            );
        }
        ("/api/v1", _) => {
            return json(
                200,
                serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                    {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["get", "list"], "shortNames": ["po"]},
                    {"name": "pods/attach", "singularName": "", "namespaced": true, "kind": "PodAttachOptions", "verbs": ["create", "get"]},
                    {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]},
                    {"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
                ]}),
            );
        }
        (p, None) if p == pod_path => {
            return json(200, pod_json(&shared.target, shared.options.tty_container));
        }
        (_, Some(sub @ ("exec" | "attach" | "portforward")))
            if websocket && shared.options.refuse_websocket =>
        {
            let _ = sub;
            return json(
                400,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Upgrade request required", "reason": "BadRequest", "code": 400}),
            );
        }
        (_, Some("exec")) => stream::exec(req, shared.target.clone()).await,
        (_, Some("attach")) => stream::attach(req, shared.target.clone()).await,
        (_, Some("portforward")) => stream::port_forward(req, shared.target.clone()).await,
        _ => {
            return json(
                404,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("the server could not find the requested resource ({path})"), "reason": "NotFound", "code": 404}),
            );
        }
    };
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let headers = response.headers();
        let protocol = if let Some(p) = headers.get(http::header::SEC_WEBSOCKET_PROTOCOL) {
            format!("websocket {}", p.to_str().unwrap())
        } else {
            let p = headers.get(stream::spdy::PROTOCOL_HEADER).unwrap();
            format!("spdy {}", p.to_str().unwrap())
        };
        shared
            .negotiated
            .lock()
            .unwrap()
            .push((subresource.unwrap_or_default(), protocol));
    }
    response
}

const SPDY_EXEC: &[(&str, &str)] = &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")];
const SPDY_PORT_FORWARD: &[(&str, &str)] = &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")];

fn protocols(h: &Harness, sub: &str) -> Vec<String> {
    h.negotiated()
        .into_iter()
        .filter(|(s, _)| s == sub)
        .map(|(_, p)| p)
        .collect()
}

// === exec ===

async fn exec_basics(env: &[(&str, &str)]) -> Harness {
    let h = Harness::start(BTreeMap::new(), Options::default()).await;

    let run = h
        .run(&["exec", POD, "--", "echo", "hello"], env, None)
        .await;
    assert_eq!(
        (run.code, run.stdout().as_str()),
        (Some(0), "hello\n"),
        "{run:?}"
    );

    let run = h
        .run(&["exec", POD, "--", "sh", "-c", "exit 3"], env, None)
        .await;
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr.contains("command terminated with exit code 3"),
        "{run:?}"
    );

    let run = h
        .run(
            &[
                "exec",
                POD,
                "--",
                "sh",
                "-c",
                "echo to-out; echo to-err >&2; exit 0",
            ],
            env,
            None,
        )
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout(), "to-out\n");
    assert!(run.stderr.contains("to-err\n"), "{run:?}");

    let run = h.run(&["exec", POD, "--", "env"], env, None).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let out = run.stdout();
    assert!(out.contains("HOSTNAME=web\n"), "{out}");
    assert!(out.contains("GREETING=hello from the pod\n"), "{out}");

    let run = h
        .run(&["exec", POD, "--", "no-such-program"], env, None)
        .await;
    assert_eq!(run.code, Some(127), "{run:?}");
    assert!(run.stderr.contains("executable file not found"), "{run:?}");
    h
}

#[tokio::test]
async fn exec_over_websocket_echo_exit_codes_stderr_and_env() {
    let h = exec_basics(&[]).await;
    let used = protocols(&h, "exec");
    assert_eq!(used.len(), 5);
    assert!(
        used.iter().all(|p| p == "websocket v5.channel.k8s.io"),
        "{used:?}"
    );
}

#[tokio::test]
async fn exec_over_spdy_echo_exit_codes_stderr_and_env() {
    let h = exec_basics(SPDY_EXEC).await;
    let used = protocols(&h, "exec");
    assert_eq!(used.len(), 5);
    assert!(
        used.iter().all(|p| p == "spdy v4.channel.k8s.io"),
        "{used:?}"
    );
}

/// 1 MiB of not-quite-text through `kubectl exec -i -- cat`: every byte comes
/// back, in order, and kubectl's end-of-file on stdin ends `cat`.
async fn cat_round_trip(env: &[(&str, &str)]) -> Harness {
    let h = Harness::start(BTreeMap::new(), Options::default()).await;
    let input: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8 | 1).collect();
    let run = h
        .run(&["exec", "-i", POD, "--", "cat"], env, Some(input.clone()))
        .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout.len(), input.len());
    assert!(run.stdout == input, "the echoed bytes differ");

    let run = h
        .run(
            &["exec", "-i", POD, "--", "sh"],
            env,
            Some(b"echo first\nprintenv MODE\nexit 7\necho never\n".to_vec()),
        )
        .await;
    assert_eq!(run.code, Some(7), "{run:?}");
    assert_eq!(run.stdout(), "first\ntest\n");
    h
}

#[tokio::test]
async fn exec_stdin_over_websocket_half_closes_and_carries_a_mebibyte() {
    let h = cat_round_trip(&[]).await;
    assert!(
        protocols(&h, "exec")
            .iter()
            .all(|p| p == "websocket v5.channel.k8s.io")
    );
}

#[tokio::test]
async fn exec_stdin_over_spdy_half_closes_and_carries_a_mebibyte() {
    let h = cat_round_trip(SPDY_EXEC).await;
    assert!(
        protocols(&h, "exec")
            .iter()
            .all(|p| p == "spdy v4.channel.k8s.io")
    );
}

#[tokio::test]
async fn kubectl_falls_back_to_spdy_when_the_websocket_upgrade_is_refused() {
    let h = Harness::start(
        BTreeMap::new(),
        Options {
            refuse_websocket: true,
            ..Options::default()
        },
    )
    .await;
    let run = h
        .run(&["exec", POD, "--", "echo", "fallback"], &[], None)
        .await;
    assert_eq!(
        (run.code, run.stdout().as_str()),
        (Some(0), "fallback\n"),
        "{run:?}"
    );
    assert_eq!(protocols(&h, "exec"), ["spdy v4.channel.k8s.io"]);
}

// === exec with a terminal ===

/// Reads `from` into `seen` until it contains `wanted`.
async fn expect_output(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    seen: &mut Vec<u8>,
    wanted: &str,
) {
    let found = tokio::time::timeout(KUBECTL_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            if String::from_utf8_lossy(seen).contains(wanted) {
                return true;
            }
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "waited for {wanted:?}, saw {:?}",
        String::from_utf8_lossy(seen)
    );
}

/// `kubectl exec -it POD -- sh` in a pseudo terminal (util-linux `script`):
/// a prompt, typed commands echoed back, their output, Ctrl-C interrupting
/// a `sleep`, and `exit 4` as kubectl's exit code.
async fn interactive_shell(env: &[(&str, &str)]) -> Harness {
    let h = Harness::start(BTreeMap::new(), Options::default()).await;
    let kubectl = format!(
        "{} --cache-dir {} exec -it {POD} -- sh",
        kubectl_binary(),
        h.dir.path().join("cache").display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &kubectl, "/dev/null"])
        .env("KUBECONFIG", h.kubeconfig())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("script runs");
    let mut keyboard = child.stdin.take().unwrap();
    let mut screen = child.stdout.take().unwrap();
    let mut seen = Vec::new();

    expect_output(&mut screen, &mut seen, "$ ").await;
    keyboard.write_all(b"echo hi\r").await.unwrap();
    expect_output(&mut screen, &mut seen, "echo hi\r\nhi\r\n$ ").await;
    keyboard.write_all(b"printenv GREETING\r").await.unwrap();
    expect_output(&mut screen, &mut seen, "hello from the pod\r\n$ ").await;
    // Ctrl-C reaches the remote terminal (kubectl's is raw) and interrupts.
    keyboard.write_all(b"sleep 100\r").await.unwrap();
    expect_output(&mut screen, &mut seen, "sleep 100\r\n").await;
    keyboard.write_all(b"\x03").await.unwrap();
    expect_output(&mut screen, &mut seen, "^C\r\n$ ").await;
    keyboard.write_all(b"echo $?\r").await.unwrap();
    expect_output(&mut screen, &mut seen, "echo $?\r\n130\r\n$ ").await;
    keyboard.write_all(b"exit 4\r").await.unwrap();
    let status = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait())
        .await
        .expect("kubectl exits after `exit`")
        .unwrap();
    let mut rest = Vec::new();
    let _ = screen.read_to_end(&mut rest).await;
    seen.extend_from_slice(&rest);
    assert_eq!(
        status.code(),
        Some(4),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    h
}

#[tokio::test]
async fn exec_with_a_terminal_over_websocket_runs_an_interactive_shell() {
    let h = interactive_shell(&[]).await;
    assert_eq!(protocols(&h, "exec"), ["websocket v5.channel.k8s.io"]);
}

#[tokio::test]
async fn exec_with_a_terminal_over_spdy_runs_an_interactive_shell() {
    let h = interactive_shell(SPDY_EXEC).await;
    assert_eq!(protocols(&h, "exec"), ["spdy v4.channel.k8s.io"]);
}

// === attach ===

async fn attach_echoes_stdin(env: &[(&str, &str)]) -> Harness {
    let h = Harness::start(BTreeMap::new(), Options::default()).await;
    let run = h
        .run(
            &["attach", "-i", POD],
            env,
            Some(b"line one\nline two\n".to_vec()),
        )
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout(), "line one\nline two\n", "{run:?}");
    h
}

#[tokio::test]
async fn attach_over_websocket_echoes_stdin_until_it_closes() {
    let h = attach_echoes_stdin(&[]).await;
    assert_eq!(protocols(&h, "attach"), ["websocket v5.channel.k8s.io"]);
}

#[tokio::test]
async fn attach_over_spdy_echoes_stdin_until_it_closes() {
    let h = attach_echoes_stdin(SPDY_EXEC).await;
    assert_eq!(protocols(&h, "attach"), ["spdy v4.channel.k8s.io"]);
}

/// `kubectl attach -it` to a container started with a terminal, in a
/// pseudo terminal: typed lines are echoed by the terminal and again by the
/// main process, and Ctrl-D (end-of-file on the terminal) ends it.
async fn attach_with_a_terminal(env: &[(&str, &str)]) -> Harness {
    let h = Harness::start(
        BTreeMap::new(),
        Options {
            tty_container: true,
            ..Options::default()
        },
    )
    .await;
    let kubectl = format!(
        "{} --cache-dir {} attach -it {POD}",
        kubectl_binary(),
        h.dir.path().join("cache").display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &kubectl, "/dev/null"])
        .env("KUBECONFIG", h.kubeconfig())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("script runs");
    let mut keyboard = child.stdin.take().unwrap();
    let mut screen = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    expect_output(&mut screen, &mut seen, "try pressing enter").await;
    // kubectl has connected once the negotiation is recorded.
    tokio::time::timeout(KUBECTL_TIMEOUT, async {
        while protocols(&h, "attach").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("kubectl attaches");
    keyboard.write_all(b"hello\r").await.unwrap();
    expect_output(&mut screen, &mut seen, "hello\r\nhello\r\n").await;
    keyboard.write_all(b"\x04").await.unwrap();
    let status = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait())
        .await
        .expect("kubectl exits when the main process ends")
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    h
}

#[tokio::test]
async fn attach_with_a_terminal_over_websocket() {
    let h = attach_with_a_terminal(&[]).await;
    assert_eq!(protocols(&h, "attach"), ["websocket v5.channel.k8s.io"]);
}

#[tokio::test]
async fn attach_with_a_terminal_over_spdy() {
    let h = attach_with_a_terminal(SPDY_EXEC).await;
    assert_eq!(protocols(&h, "attach"), ["spdy v4.channel.k8s.io"]);
}

// === port-forward ===

/// A TCP echo server standing in for the pod's port.
async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            connections.spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kubectl port-forward pod/web LOCAL:80` to a local echo server: bytes
/// round-trip on two connections in turn, and closing our sending side
/// reaches the pod's port and comes back as end-of-file.
async fn port_forward_round_trip(env: &[(&str, &str)]) -> Harness {
    let (echo, echo_task) = echo_server().await;
    let h = Harness::start(BTreeMap::from([(80, echo)]), Options::default()).await;
    let local = free_port();
    let mut child = h
        .kubectl(
            &[
                "port-forward",
                &format!("pod/{POD}"),
                &format!("{local}:80"),
            ],
            env,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    expect_output(
        &mut stdout,
        &mut seen,
        &format!("Forwarding from 127.0.0.1:{local} -> 80"),
    )
    .await;

    for round in 0..2u8 {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8 ^ round).collect();
        let mut tcp = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
        let (mut r, mut w) = tcp.split();
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let receive = async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) =
            tokio::time::timeout(KUBECTL_TIMEOUT, async { tokio::join!(send, receive) })
                .await
                .expect("the echo comes back and ends");
        assert_eq!(back.len(), payload.len(), "round {round}");
        assert!(back == payload, "round {round}: the echoed bytes differ");
    }
    child.kill().await.unwrap();
    echo_task.abort();
    h
}

#[tokio::test]
async fn port_forward_over_websocket_tunnel_round_trips_bytes() {
    let h = port_forward_round_trip(&[]).await;
    assert_eq!(
        protocols(&h, "portforward"),
        ["websocket SPDY/3.1+portforward.k8s.io"]
    );
}

#[tokio::test]
async fn port_forward_over_spdy_round_trips_bytes() {
    let h = port_forward_round_trip(SPDY_PORT_FORWARD).await;
    assert_eq!(protocols(&h, "portforward"), ["spdy portforward.k8s.io"]);
}

// === clients that go away ===

/// Waits until the simulator runs `n` stream tasks.
async fn live_becomes(h: &Harness, n: usize) {
    let reached = tokio::time::timeout(Duration::from_secs(10), async {
        while h.live.count() != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{} stream tasks are alive, expected {n}",
        h.live.count()
    );
}

/// kubectl killed in the middle of a stream: the simulator's connection
/// task ends and takes the process (a `sleep`, a `cat` waiting for input)
/// with it.
async fn killed_client(args: &[&str], env: &[(&str, &str)], ports: BTreeMap<u16, SocketAddr>) {
    let h = Harness::start(ports, Options::default()).await;
    let mut child = h
        .kubectl(args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    // The connection and the process.
    live_becomes(&h, 2).await;
    child.kill().await.unwrap();
    live_becomes(&h, 0).await;
}

#[tokio::test]
async fn a_killed_kubectl_ends_exec_sleep_over_websocket() {
    killed_client(&["exec", POD, "--", "sleep", "1000"], &[], BTreeMap::new()).await;
}

#[tokio::test]
async fn a_killed_kubectl_ends_exec_cat_over_spdy() {
    killed_client(
        &["exec", "-i", POD, "--", "cat"],
        SPDY_EXEC,
        BTreeMap::new(),
    )
    .await;
}

/// kubectl port-forward killed while a forwarded connection is open: the
/// session and the forward to the pod's port both end.
#[tokio::test]
async fn a_killed_kubectl_ends_port_forward_sessions_and_open_forwards() {
    let (echo, echo_task) = echo_server().await;
    for env in [&[][..], SPDY_PORT_FORWARD] {
        let h = Harness::start(BTreeMap::from([(80, echo)]), Options::default()).await;
        let local = free_port();
        let mut child = h
            .kubectl(
                &[
                    "port-forward",
                    &format!("pod/{POD}"),
                    &format!("{local}:80"),
                ],
                env,
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut stdout = child.stdout.take().unwrap();
        expect_output(&mut stdout, &mut Vec::new(), "Forwarding from").await;
        let mut tcp = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
        tcp.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(KUBECTL_TIMEOUT, tcp.read_exact(&mut back))
            .await
            .expect("the echo comes back")
            .unwrap();
        assert_eq!(&back, b"ping");
        // The session and the forward.
        live_becomes(&h, 2).await;
        child.kill().await.unwrap();
        live_becomes(&h, 0).await;
    }
    echo_task.abort();
}

// === older and base64 channel protocols (no kubectl speaks them by default) ===

/// Runs `echo hi` over WebSocket with `protocol` from a raw client; returns
/// the messages the simulator sent, in order, as `(channel, payload)`.
async fn raw_websocket_exec(protocol: &str) -> (String, Vec<(u8, Vec<u8>)>) {
    use base64::Engine;
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    let h = Harness::start(BTreeMap::new(), Options::default()).await;
    let port = h.server_port();
    let url = format!(
        "ws://127.0.0.1:{port}/api/v1/namespaces/{NAMESPACE}/pods/{POD}/exec?command=echo&command=hi&stdout=true&stderr=true"
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let mut messages = Vec::new();
    let base64 = protocol.contains("base64");
    while let Some(Ok(message)) = tokio::time::timeout(KUBECTL_TIMEOUT, ws.next())
        .await
        .unwrap()
    {
        match message {
            Message::Binary(data) if !base64 => messages.push((data[0], data[1..].to_vec())),
            Message::Text(text) if base64 => {
                let bytes = text.as_bytes();
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(&bytes[1..])
                    .unwrap();
                messages.push((bytes[0] - b'0', payload));
            }
            Message::Close(_) => break,
            other => panic!("unexpected message {other:?}"),
        }
    }
    (chosen, messages)
}

#[tokio::test]
async fn v4_and_base64_channel_protocols_frame_output_and_status() {
    let success = br#"{"metadata":{},"status":"Success"}"#.to_vec();
    for protocol in [
        "v4.channel.k8s.io",
        "v4.base64.channel.k8s.io",
        "v5.base64.channel.k8s.io",
    ] {
        let (chosen, messages) = raw_websocket_exec(protocol).await;
        assert_eq!(chosen, protocol);
        assert_eq!(
            messages,
            [(1, vec![]), (1, b"hi\n".to_vec()), (3, success.clone())],
            "{protocol}"
        );
    }
}

/// A pod port nothing listens on: kubectl reports the kubelet's error for
/// that connection, and the local connection is closed.
#[tokio::test]
async fn port_forward_to_a_closed_port_reports_the_error() {
    for env in [&[][..], SPDY_PORT_FORWARD] {
        let h = Harness::start(BTreeMap::new(), Options::default()).await;
        let local = free_port();
        let mut child = h
            .kubectl(
                &[
                    "port-forward",
                    &format!("pod/{POD}"),
                    &format!("{local}:81"),
                ],
                env,
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        expect_output(&mut stdout, &mut Vec::new(), "Forwarding from").await;
        let mut tcp = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
        let _ = tcp.write_all(b"hello?").await;
        let mut back = Vec::new();
        let closed = tokio::time::timeout(KUBECTL_TIMEOUT, tcp.read_to_end(&mut back)).await;
        assert!(closed.is_ok(), "the local connection is closed");
        assert!(back.is_empty());
        expect_output(
            &mut stderr,
            &mut Vec::new(),
            "error forwarding port 81 to pod web",
        )
        .await;
        let _ = child.kill().await;
    }
}

/// client-go's WebSocket executor pings every few seconds and drops a
/// connection whose pongs stop: pings are answered while a command runs.
#[tokio::test]
async fn websocket_pings_are_answered_while_a_command_runs() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    let h = Harness::start(BTreeMap::new(), Options::default()).await;
    let port = h.server_port();
    let url = format!(
        "ws://127.0.0.1:{port}/api/v1/namespaces/{NAMESPACE}/pods/{POD}/exec?command=sleep&command=1&stdout=true"
    );
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v5.channel.k8s.io".parse().unwrap(),
    );
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    // The "ready" message on stdout.
    let ready = tokio::time::timeout(KUBECTL_TIMEOUT, ws.next())
        .await
        .unwrap();
    assert_eq!(ready.unwrap().unwrap(), Message::binary(vec![1]));
    ws.send(Message::Ping(b"beat".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_millis(900), ws.next())
        .await
        .expect("a pong before the command ends");
    assert_eq!(
        pong.unwrap().unwrap(),
        Message::Pong(b"beat".to_vec().into())
    );
    let status = tokio::time::timeout(KUBECTL_TIMEOUT, ws.next())
        .await
        .unwrap();
    let mut expected = vec![3];
    expected.extend_from_slice(br#"{"metadata":{},"status":"Success"}"#);
    assert_eq!(status.unwrap().unwrap(), Message::binary(expected));
}

/// Two pod ports in one kubectl, several connections at once on each: the
/// error/data stream pairs are matched by requestID, never crossed.
#[tokio::test]
async fn port_forward_serves_two_ports_and_concurrent_connections() {
    let (echo_a, task_a) = echo_server().await;
    let (echo_b, task_b) = echo_server().await;
    for env in [&[][..], SPDY_PORT_FORWARD] {
        let h = Harness::start(
            BTreeMap::from([(80, echo_a), (81, echo_b)]),
            Options::default(),
        )
        .await;
        let (local_a, local_b) = (free_port(), free_port());
        let mut child = h
            .kubectl(
                &[
                    "port-forward",
                    &format!("pod/{POD}"),
                    &format!("{local_a}:80"),
                    &format!("{local_b}:81"),
                ],
                env,
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        expect_output(
            &mut stdout,
            &mut seen,
            &format!("127.0.0.1:{local_b} -> 81"),
        )
        .await;
        expect_output(
            &mut stdout,
            &mut seen,
            &format!("127.0.0.1:{local_a} -> 80"),
        )
        .await;

        let mut connections = tokio::task::JoinSet::new();
        for i in 0..6u8 {
            let local = if i % 2 == 0 { local_a } else { local_b };
            connections.spawn(async move {
                let payload: Vec<u8> = (0..20_000u32)
                    .map(|n| (n as u8).wrapping_mul(i + 1))
                    .collect();
                let mut tcp = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
                let (mut r, mut w) = tcp.split();
                let send = async {
                    w.write_all(&payload).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut back = Vec::new();
                let (_, read) = tokio::join!(send, r.read_to_end(&mut back));
                read.unwrap();
                back == payload
            });
        }
        let all = tokio::time::timeout(KUBECTL_TIMEOUT, connections.join_all())
            .await
            .expect("every connection completes");
        assert_eq!(all, [true; 6]);
        child.kill().await.unwrap();
    }
    task_a.abort();
    task_b.abort();
}

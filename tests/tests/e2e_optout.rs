//! In a namespace labeled `chaperone.dev/intercept=true`, a pod labeled
//! `chaperone.dev/intercept=false` is left alone: the webhook gives it no
//! CA and the node agent does not intercept it. So an agent must not be able
//! to make such a pod, directly or through any workload whose controller
//! would make it from a pod template. A real kubectl in the agent pod tries
//! every way an agent would, through the kernel redirect, against kube-sim
//! and the real kube-apiserver v1.20.2 (which serves every built-in kind
//! with a template: `batch/v1` Jobs, `batch/v1beta1` CronJobs,
//! ReplicationControllers, PodTemplates; kube-sim serves the `apps` group
//! and pods). Ordinary workload writes keep working. Needs root.

use std::time::Duration;

use chaperone_tests::{
    e2e::{ALLOW_ALL, Backend, World, WorldSpec, run_for},
    on_both_servers, require_root,
};
use serde_json::{Value, json};

on_both_servers!(an_agent_cannot_start_pods_that_opt_out);

const LIMIT: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "default";

/// A built-in kind with a pod template.
struct Kind {
    api_version: &'static str,
    kind: &'static str,
    /// As kubectl and [`chaperone_tests::e2e::ApiServer::get`] name it.
    resource: &'static str,
    /// The JSON pointer of its pod template.
    template: &'static str,
    /// Served by kube-sim (the real server serves them all).
    on_sim: bool,
}

const KINDS: &[Kind] = &[
    Kind {
        api_version: "apps/v1",
        kind: "Deployment",
        resource: "deployments.apps",
        template: "/spec/template",
        on_sim: true,
    },
    Kind {
        api_version: "apps/v1",
        kind: "ReplicaSet",
        resource: "replicasets.apps",
        template: "/spec/template",
        on_sim: true,
    },
    Kind {
        api_version: "apps/v1",
        kind: "StatefulSet",
        resource: "statefulsets.apps",
        template: "/spec/template",
        on_sim: true,
    },
    Kind {
        api_version: "apps/v1",
        kind: "DaemonSet",
        resource: "daemonsets.apps",
        template: "/spec/template",
        on_sim: true,
    },
    Kind {
        api_version: "batch/v1",
        kind: "Job",
        resource: "jobs.batch",
        template: "/spec/template",
        on_sim: false,
    },
    Kind {
        api_version: "batch/v1beta1",
        kind: "CronJob",
        resource: "cronjobs.batch",
        template: "/spec/jobTemplate/spec/template",
        on_sim: false,
    },
    Kind {
        api_version: "v1",
        kind: "ReplicationController",
        resource: "replicationcontrollers",
        template: "/spec/template",
        on_sim: false,
    },
    Kind {
        api_version: "v1",
        kind: "PodTemplate",
        resource: "podtemplates",
        template: "/template",
        on_sim: false,
    },
];

impl Kind {
    /// A valid object of this kind named `name` whose pod template carries
    /// `labels` besides `app: NAME`.
    fn object(&self, name: &str, labels: Value) -> Value {
        let mut template_labels = json!({"app": name});
        for (k, v) in labels.as_object().expect("labels") {
            template_labels[k] = v.clone();
        }
        let template = json!({
            "metadata": {"labels": template_labels},
            "spec": {"restartPolicy": if self.kind == "Job" || self.kind == "CronJob" { "Never" } else { "Always" },
                "containers": [{"name": "c", "image": "busybox"}]},
        });
        let selector = json!({"matchLabels": {"app": name}});
        let spec = match self.kind {
            "Deployment" | "ReplicaSet" | "DaemonSet" => {
                json!({"selector": selector, "template": template})
            }
            "StatefulSet" => {
                json!({"serviceName": name, "selector": selector, "template": template})
            }
            "Job" => json!({"template": template}),
            "CronJob" => json!({"schedule": "*/5 * * * *",
                "jobTemplate": {"spec": {"template": template}}}),
            "ReplicationController" => json!({"selector": {"app": name}, "template": template}),
            "PodTemplate" => {
                return json!({"apiVersion": self.api_version, "kind": self.kind,
                    "metadata": {"name": name, "namespace": NAMESPACE}, "template": template});
            }
            other => unreachable!("{other}"),
        };
        json!({"apiVersion": self.api_version, "kind": self.kind,
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec})
    }

    /// Its collection's path in `NAMESPACE`.
    fn collection(&self) -> String {
        let plural = self.resource.split('.').next().unwrap();
        if self.api_version == "v1" {
            format!("/api/v1/namespaces/{NAMESPACE}/{plural}")
        } else {
            format!("/apis/{}/namespaces/{NAMESPACE}/{plural}", self.api_version)
        }
    }

    /// The stored object's pod-template labels.
    fn stored_template_labels(&self, world: &World, name: &str) -> Option<Value> {
        let stored = world.api.get(self.resource, Some(NAMESPACE), name)?;
        Some(
            stored
                .pointer(&format!("{}/metadata/labels", self.template))
                .cloned()
                .unwrap_or(Value::Null),
        )
    }

    /// A merge patch putting `metadata` at the template.
    fn template_patch(&self, metadata: Value) -> String {
        let mut patch = json!({});
        let mut at = &mut patch;
        for step in self.template.split('/').skip(1) {
            at = &mut at[step];
        }
        *at = json!({"metadata": metadata});
        patch.to_string()
    }
}

fn kubectl(world: &World, args: &[&str]) -> std::process::Output {
    run_for(&mut world.agent_kubectl(args), LIMIT).unwrap()
}

fn all_bytes(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// kubectl failed with chaperone's refusal: Forbidden, naming the key and
/// what to do.
fn assert_refused(args: &[&str], out: &std::process::Output) {
    let said = all_bytes(out);
    assert!(!out.status.success(), "kubectl {args:?} succeeded: {said}");
    assert!(
        said.contains("Forbidden")
            && said.contains("chaperone.dev/intercept")
            && said.contains("ask a cluster admin")
            && !said.contains("cannot read"),
        "kubectl {args:?}: {said}"
    );
}

fn an_agent_cannot_start_pods_that_opt_out(backend: Backend) {
    require_root!();
    let world = World::start(WorldSpec {
        backend,
        policy: ALLOW_ALL.into(),
        ..WorldSpec::default()
    })
    .unwrap();
    // The agent's namespace is labeled: every pod in it is guarded unless
    // it opts out.
    let mut ns = world.api.get("namespaces", None, NAMESPACE).unwrap();
    ns["metadata"]["labels"]["chaperone.dev/intercept"] = "true".into();
    ns["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("managedFields");
    world.api.update(ns).unwrap();

    let file = |name: &str, object: &Value| {
        let path = world.work.path().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(object).unwrap()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let opt_out = json!({"chaperone.dev/intercept": "false"});
    let kinds: Vec<&Kind> = KINDS
        .iter()
        .filter(|k| backend == Backend::Real || k.on_sim)
        .collect();
    let mut tried = 0;
    for kind in &kinds {
        let lower = kind.kind.to_ascii_lowercase();
        // New objects carrying the opt-out: create, client-side apply,
        // server-side apply, a server-side dry run.
        let off_name = format!("off-{lower}");
        let off = file(
            &format!("{off_name}.json"),
            &kind.object(&off_name, opt_out.clone()),
        );
        let annotated = format!("annotated-{lower}");
        let mut annotated_object = kind.object(&annotated, json!({}));
        *annotated_object
            .pointer_mut(&format!("{}/metadata", kind.template))
            .unwrap() = json!({"labels": {"app": annotated},
                "annotations": {"chaperone.dev/intercept": "false"}});
        let annotated_file = file(&format!("{annotated}.json"), &annotated_object);
        for args in [
            vec!["create", "-f", &off],
            vec!["apply", "-f", &off],
            vec!["apply", "--server-side", "-f", &off],
            vec!["apply", "--dry-run=server", "-f", &off],
            vec!["create", "-f", &annotated_file],
        ] {
            assert_refused(&args, &kubectl(&world, &args));
            tried += 1;
        }
        assert!(
            world
                .api
                .get(kind.resource, Some(NAMESPACE), &off_name)
                .is_none(),
            "{off_name} was stored"
        );

        // An object the agent did not write, changed to opt out: every
        // patch type and a replace.
        let name = format!("admin-{lower}");
        world.api.create(kind.object(&name, json!({}))).unwrap();
        let replaced = file(
            &format!("{name}-off.json"),
            &kind.object(&name, opt_out.clone()),
        );
        let json_patch = json!([{"op": "add",
            "path": format!("{}/metadata/labels/chaperone.dev~1intercept", kind.template),
            "value": "false"}])
        .to_string();
        let merge = kind.template_patch(json!({"labels": opt_out}));
        let target = format!("{}/{name}", kind.resource);
        let mut attempts = vec![
            vec!["patch", &target, "--type=merge", "-p", &merge],
            vec!["patch", &target, "--type=json", "-p", &json_patch],
            vec!["replace", "-f", &replaced],
            vec![
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                &replaced,
            ],
        ];
        if backend == Backend::Real || kind.api_version == "apps/v1" {
            // Strategic merge patch: built-in kinds (kube-sim: apps).
            attempts.push(vec!["patch", &target, "-p", &merge]);
        }
        for args in attempts {
            assert_refused(&args, &kubectl(&world, &args));
            tried += 1;
        }
        let labels = kind
            .stored_template_labels(&world, &name)
            .unwrap_or_else(|| panic!("{name} is gone"));
        assert_eq!(labels["app"], name.as_str(), "{name}: {labels}");
        assert!(
            labels["chaperone.dev/intercept"].is_null(),
            "{name}'s template opts out: {labels}"
        );
    }

    if backend == Backend::Real {
        tried += protobuf_as_the_real_server_writes_it(&world, &kinds);
        tried += a_key_named_twice_on_the_real_server(&world);
    }

    // A pod made directly: kubectl run, and a manifest with generateName.
    let pod = file(
        "pod.json",
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "tool-", "namespace": NAMESPACE,
                "labels": {"chaperone.dev/intercept": "false"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
    );
    for args in [
        vec![
            "run",
            "tool",
            "--image=busybox",
            "--labels=chaperone.dev/intercept=false",
        ],
        vec!["create", "-f", &pod],
    ] {
        assert_refused(&args, &kubectl(&world, &args));
        tried += 1;
    }
    let opted_out: Vec<String> = world
        .api
        .list("pods", Some(NAMESPACE))
        .iter()
        .filter(|p| p["metadata"]["labels"]["chaperone.dev/intercept"] == "false")
        .map(|p| p["metadata"]["name"].to_string())
        .collect();
    assert!(opted_out.is_empty(), "pods opting out: {opted_out:?}");
    eprintln!("{tried} attempts refused on {backend:?}");

    // Workloads without the key, and the everyday changes to them, work.
    let fine = file(
        "fine.json",
        &KINDS[0].object("fine", json!({"tier": "web"})),
    );
    let mut everyday = vec![
        vec!["apply", "-f", fine.as_str()],
        vec!["create", "deployment", "made", "--image=busybox"],
        vec!["set", "image", "deployment/admin-deployment", "c=busybox:2"],
        vec!["rollout", "restart", "deployment/admin-deployment"],
        vec![
            "label",
            "deployment/admin-deployment",
            "chaperone.dev/intercept=false",
        ],
    ];
    if backend == Backend::Real {
        // Typed clients send protobuf: read, not refused for its form.
        // (kubectl 1.32's `create cronjob` asks for batch/v1, which 1.20
        // does not serve.)
        everyday.push(vec!["create", "job", "made", "--image=busybox"]);
    }
    for args in everyday {
        let out = kubectl(&world, &args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            all_bytes(&out)
        );
    }
    assert!(
        world
            .api
            .get("deployments.apps", Some(NAMESPACE), "fine")
            .is_some()
    );
    let admin = world
        .api
        .get("deployments.apps", Some(NAMESPACE), "admin-deployment")
        .unwrap();
    assert_eq!(
        admin["spec"]["template"]["spec"]["containers"][0]["image"], "busybox:2",
        "{admin}"
    );
    assert!(
        admin["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .is_string(),
        "{admin}"
    );
    assert!(
        admin["spec"]["template"]["metadata"]["labels"]["chaperone.dev/intercept"].is_null(),
        "{admin}"
    );
}

/// The real server's own protobuf encoding of each kind, replayed by the
/// agent as a create (what a typed client sends): with the opt-out in the
/// template it is refused for the label (chaperone read the field the
/// server reads), without it it is forwarded. Returns the refusals.
fn protobuf_as_the_real_server_writes_it(world: &World, kinds: &[&Kind]) -> usize {
    const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
    let ca = world.work.path().join("cluster-ca.crt");
    std::fs::write(&ca, world.api.ca_pem()).unwrap();
    let admin_auth = format!("Authorization: Bearer {}", world.api.admin_token());
    let fetch = |kind: &Kind, name: &str| {
        let file = world.work.path().join(format!("{name}.pb"));
        let url = format!("{}{}/{name}", world.api.url(), kind.collection());
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sSf", "--cacert", ca.to_str().unwrap(), "-H", &admin_auth])
            .args(["-H", &format!("Accept: {PROTOBUF}"), "-o"])
            .arg(&file)
            .arg(&url);
        let out = run_for(&mut curl, LIMIT).unwrap();
        assert!(out.status.success(), "GET {url}: {}", all_bytes(&out));
        assert!(std::fs::read(&file).unwrap().starts_with(b"k8s\0"));
        file
    };
    let agent_post = |kind: &Kind, file: &std::path::Path| {
        let url = format!(
            "https://{}:{}{}",
            world.credentials.service_host,
            world.credentials.service_port,
            kind.collection()
        );
        let auth = format!("Authorization: Bearer {}", world.token);
        let mut cmd = world.agent().in_cluster_command(&world.credentials, "curl");
        cmd.args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "-H",
            &auth,
            "-H",
            &format!("Content-Type: {PROTOBUF}"),
            "-w",
            "\n%{http_code}",
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(&url);
        let out = run_for(&mut cmd, LIMIT).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_owned())
    };
    let mut refused = 0;
    for kind in kinds {
        let lower = kind.kind.to_ascii_lowercase();
        let off = format!("pb-off-{lower}");
        world
            .api
            .create(kind.object(&off, json!({"chaperone.dev/intercept": "false"})))
            .unwrap();
        let off_file = fetch(kind, &off);
        let fine = format!("pb-fine-{lower}");
        world.api.create(kind.object(&fine, json!({}))).unwrap();
        let fine_file = fetch(kind, &fine);

        let (code, body) = agent_post(kind, &off_file);
        assert_eq!(code, 403, "{off} in protobuf: {body}");
        assert!(
            body.contains("chaperone.dev/intercept")
                && body.contains(r#"to \"false\""#)
                && !body.contains("cannot read"),
            "{off} in protobuf: {body}"
        );
        refused += 1;
        // Forwarded: the server answers it exists (or that a stored
        // object's resourceVersion may not be created), not chaperone.
        let (code, body) = agent_post(kind, &fine_file);
        assert!(
            code != 403 && !body.contains("chaperone"),
            "{fine} in protobuf: {code} {body}"
        );
    }
    refused
}

/// A JSON body naming `spec` twice: the real server's decoder merges both
/// (the first's template labels survive), so it stores a template that
/// opts out; chaperone refuses the body rather than judge one of them.
fn a_key_named_twice_on_the_real_server(world: &World) -> usize {
    let body = r#"{"apiVersion":"apps/v1","kind":"Deployment",
        "metadata":{"name":"twice","namespace":"default"},
        "spec":{"template":{"metadata":{"labels":{"app":"twice","chaperone.dev/intercept":"false"}}}},
        "spec":{"selector":{"matchLabels":{"app":"twice"}},
            "template":{"spec":{"containers":[{"name":"c","image":"busybox"}]}}}}"#;
    let file = world.work.path().join("twice.json");
    std::fs::write(&file, body).unwrap();
    let collection = "/apis/apps/v1/namespaces/default/deployments";
    let post = |mut cmd: std::process::Command, auth: String, url: String, ca: &str| {
        cmd.args(["-sS", "--max-time", "10", "--cacert", ca, "-H", &auth])
            .args([
                "-H",
                "Content-Type: application/json",
                "-w",
                "\n%{http_code}",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(url);
        let out = run_for(&mut cmd, LIMIT).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_owned())
    };

    // Through chaperone, as the agent: refused, nothing stored.
    let (code, said) = post(
        world.agent().in_cluster_command(&world.credentials, "curl"),
        format!("Authorization: Bearer {}", world.token),
        format!(
            "https://{}:{}{collection}",
            world.credentials.service_host, world.credentials.service_port
        ),
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
    );
    assert_eq!(code, 403, "{said}");
    assert!(said.contains("appears twice"), "{said}");
    assert!(
        world
            .api
            .get("deployments.apps", Some(NAMESPACE), "twice")
            .is_none()
    );

    // Straight to the server, as an admin: what it would have stored.
    let ca = world.work.path().join("cluster-ca.crt");
    std::fs::write(&ca, world.api.ca_pem()).unwrap();
    let (code, said) = post(
        std::process::Command::new("curl"),
        format!("Authorization: Bearer {}", world.api.admin_token()),
        format!("{}{collection}", world.api.url()),
        ca.to_str().unwrap(),
    );
    assert_eq!(code, 201, "{said}");
    let stored = world
        .api
        .get("deployments.apps", Some(NAMESPACE), "twice")
        .unwrap();
    assert_eq!(
        stored["spec"]["template"]["metadata"]["labels"]["chaperone.dev/intercept"], "false",
        "the server merged the two specs: {stored}"
    );
    1
}

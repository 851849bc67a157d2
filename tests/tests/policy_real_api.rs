//! `chaperone policy` against the real kube-apiserver v1.20.2: resource
//! names resolve as the server's discovery says (and the built-in table is
//! that discovery), and `policy check` accepts and rejects the same
//! AgentPolicy documents the server does.
//!
//! Needs the real server (`cargo xtask kube`; skips without it, fails
//! under CI).

use std::process::{Command, Output};

use chaperone::policy::resources::{self, ResourceTable};
use chaperone_tests::{e2e::workspace_binary, real_api::RealApiServer, require_real_api};

const CRD: &str = include_str!("../../deploy/base/crds/agentpolicies.chaperone.dev.yaml");

fn server() -> &'static RealApiServer {
    let server = RealApiServer::shared().expect("the real API server starts");
    server
        .install_crds(CRD)
        .expect("install the AgentPolicy CRD");
    server
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn chaperone(args: &[&str]) -> Output {
    Command::new(workspace_binary("chaperone"))
        .args(args)
        .output()
        .expect("run chaperone")
}

fn discovered(server: &RealApiServer) -> ResourceTable {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(resources::discover(Some(server.admin_kubeconfig()), None))
        .expect("discovery")
}

/// The built-in table is what the real server's discovery says, resource
/// for resource, so `policy explain` without a cluster resolves names as
/// kubectl against a 1.20 cluster does.
#[test]
fn the_built_in_resource_table_is_the_real_servers() {
    require_real_api!();
    let real = discovered(server());
    let real: Vec<_> = real
        .resources
        .into_iter()
        .filter(|r| r.group != "chaperone.dev")
        .collect();
    let built_in = ResourceTable::built_in().resources;
    if built_in != real {
        let lines: Vec<String> = real
            .iter()
            .map(|r| {
                format!(
                    "    ({:?}, {:?}, {:?}, {:?}, {:?}, {}, {:?}),",
                    r.group,
                    r.version,
                    r.name,
                    r.kind,
                    r.short_names.join(" "),
                    r.namespaced,
                    r.subresources.join(" ")
                )
            })
            .collect();
        panic!(
            "the built-in table (policy/resources.rs BUILT_IN) differs from the real server's \
             discovery; singular names that are not the kind in lower case: {:?}; the table \
             as discovered:\n{}",
            real.iter()
                .filter(|r| r.singular != r.kind.to_ascii_lowercase())
                .map(|r| &r.name)
                .collect::<Vec<_>>(),
            lines.join("\n")
        );
    }
}

/// With a kubeconfig, names resolve through the cluster's own discovery,
/// custom resources included.
#[test]
fn explain_resolves_names_through_the_clusters_discovery() {
    require_real_api!();
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: p}\n\
         spec:\n  subjects: [{users: [bot]}]\n  defaultAction: allow\n  rules:\n\
         \x20   - {name: no-policies, apiGroups: [chaperone.dev], resources: [agentpolicies], action: deny}\n\
         \x20   - {name: no-deploy-delete, verbs: [delete], apiGroups: [apps], resources: [deployments], action: deny}\n",
    )
    .unwrap();
    let kubeconfig = server.admin_kubeconfig().to_str().unwrap();
    let file = policy.to_str().unwrap();
    for (args, rule) in [
        (&["get", "apol"][..], "no-policies"),
        (&["delete", "agentpolicy", "p"][..], "no-policies"),
        (&["delete", "deploy", "web"][..], "no-deploy-delete"),
    ] {
        let mut all = vec![
            "policy",
            "explain",
            "--kubeconfig",
            kubeconfig,
            "-f",
            file,
            "--as",
            "bot",
        ];
        all.extend(args);
        let out = chaperone(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("decision: deny by policy \"p\" rule \"{rule}\"")),
            "{args:?}: {}",
            describe(&out)
        );
    }
    // Without -n, the context's namespace, as for kubectl.
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(server.admin_kubeconfig()).unwrap()).unwrap();
    config["contexts"][0]["context"]["namespace"] = "team-a".into();
    let with_namespace = dir.path().join("kubeconfig");
    std::fs::write(&with_namespace, serde_yaml::to_string(&config).unwrap()).unwrap();
    let out = chaperone(&[
        "policy",
        "explain",
        "--kubeconfig",
        with_namespace.to_str().unwrap(),
        "-f",
        file,
        "--as",
        "bot",
        "get",
        "deploy",
        "web",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["request"]["path"], "/apis/apps/v1/namespaces/team-a/deployments/web",
        "{json}"
    );
    let out = chaperone(&[
        "policy",
        "explain",
        "--kubeconfig",
        kubeconfig,
        "-f",
        file,
        "--as",
        "bot",
        "get",
        "frobnicators",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the server doesn't have a resource type \"frobnicators\"")
            && stderr.contains(&server.url()),
        "{}",
        describe(&out)
    );
}

/// What `policy check` and the real API server do with one document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Both accept it.
    Accepted,
    /// Both reject it.
    Rejected,
    /// `policy check` rejects what a 1.20 schema cannot express; the node
    /// agent reports the same on the policy's Accepted condition.
    OnlyCheckRejects,
}

/// Issue 28: one source of truth. Every document is accepted by both
/// `policy check` and the real kube-apiserver, or rejected by both, apart
/// from the listed checks a 1.20 CRD schema cannot express.
#[test]
fn policy_check_and_the_real_server_accept_and_reject_the_same_documents() {
    use Verdict::*;
    require_real_api!();
    let server = server();
    let cases: &[(&str, &str, Verdict)] = &[
        ("minimal", "rules: [{action: allow}]", Accepted),
        (
            "no-default-action",
            "rules: [{verbs: [get], action: allow}]",
            Accepted,
        ),
        (
            "hold-with-unit",
            "rules: [{action: approve, holdTimeout: 1h30m}]",
            Accepted,
        ),
        (
            "non-resource",
            "rules: [{nonResourceURLs: [/version], verbs: [get], action: allow}]",
            Accepted,
        ),
        (
            "globs",
            "rules: [{resources: ['*', 'pods/*', '*/scale'], verbs: ['*'], action: deny}]",
            Accepted,
        ),
        (
            "hold-bare-number",
            "rules: [{action: approve, holdTimeout: 60}]",
            Rejected,
        ),
        (
            "hold-bare-string",
            "rules: [{action: approve, holdTimeout: \"60\"}]",
            Rejected,
        ),
        (
            "hold-milliseconds",
            "rules: [{action: approve, holdTimeout: 500ms}]",
            Rejected,
        ),
        ("wrong-action", "rules: [{action: allwo}]", Rejected),
        ("rules-not-a-list", "rules: {action: allow}", Rejected),
        ("rule-without-action", "rules: [{verbs: [get]}]", Rejected),
        (
            "wrong-record",
            "rules: [{action: allow, record: Everything}]",
            Rejected,
        ),
        ("wrong-default-action", "defaultAction: permit", Rejected),
        ("wrong-credential-mode", "credentialMode: sudo", Rejected),
        ("dry-run-string", "dryRun: \"yes\"", Rejected),
        (
            "unknown-verb",
            "rules: [{verbs: [frobnicate], action: allow}]",
            Rejected,
        ),
        (
            "bad-resource",
            "rules: [{resources: [pods/], action: allow}]",
            Rejected,
        ),
        (
            "bad-url",
            "rules: [{nonResourceURLs: [version], action: allow}]",
            Rejected,
        ),
        ("no-subjects", "SUBJECTS:", Rejected),
        ("empty-subjects", "SUBJECTS: []", Rejected),
        ("empty-subject", "SUBJECTS: [{}]", Rejected),
        (
            "sa-without-namespace",
            "SUBJECTS: [{serviceAccounts: [bot]}]",
            Rejected,
        ),
        ("empty-user", "SUBJECTS: [{users: [\"\"]}]", Rejected),
        (
            "bad-operator",
            "SUBJECTS: [{podLabels: {matchExpressions: [{key: a, operator: Equals}]}}]",
            Rejected,
        ),
        ("NAME:Bad_Name", "rules: [{action: allow}]", Rejected),
        // The API server prunes a field its schema does not declare (the
        // policy silently loses it); `policy check` says so instead.
        (
            "misspelt-field",
            "rules: [{action: allow, recrod: Request}]",
            OnlyCheckRejects,
        ),
        (
            "hold-on-deny",
            "rules: [{action: deny, holdTimeout: 5m}]",
            OnlyCheckRejects,
        ),
        (
            "duplicate-rule-names",
            "rules: [{name: a, action: allow}, {name: a, action: deny}]",
            OnlyCheckRejects,
        ),
        (
            "url-rule-with-resources",
            "rules: [{nonResourceURLs: [/version], resources: [pods], action: allow}]",
            OnlyCheckRejects,
        ),
        (
            "resource-verb-on-url",
            "rules: [{nonResourceURLs: [/version], verbs: [list], action: allow}]",
            OnlyCheckRejects,
        ),
        (
            "in-without-values",
            "SUBJECTS: [{podLabels: {matchExpressions: [{key: a, operator: In}]}}]",
            OnlyCheckRejects,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut disagreements = Vec::new();
    for (i, (case, spec, expected)) in cases.iter().enumerate() {
        let (name, case) = match case.strip_prefix("NAME:") {
            Some(name) => (name.to_owned(), name),
            None => (format!("check-{i}-{case}"), *case),
        };
        let subjects = match spec.strip_prefix("SUBJECTS:") {
            Some(rest) if rest.trim().is_empty() => String::new(),
            Some(rest) => format!("  subjects:{rest}\n"),
            None => format!("  subjects: [{{users: [bot]}}]\n  {spec}\n"),
        };
        let text = format!(
            "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n{subjects}"
        );
        let text = if subjects.is_empty() {
            text.replace("spec:\n", "spec: {rules: [{action: allow}]}\n")
        } else {
            text
        };
        let file = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&file, &text).unwrap();
        let check = chaperone(&["policy", "check", file.to_str().unwrap()]);
        let object: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let created = server.create(object);
        let verdict = match (check.status.success(), &created) {
            (true, Ok(_)) => Accepted,
            (false, Err(_)) => Rejected,
            (false, Ok(_)) => OnlyCheckRejects,
            (true, Err(e)) => {
                disagreements.push(format!(
                    "{case}: policy check accepts, the server rejects: {e:#}\n{text}"
                ));
                continue;
            }
        };
        if verdict != *expected {
            disagreements.push(format!(
                "{case}: expected {expected:?}, got {verdict:?}\n{text}--- policy check:\n{}\n--- server: {:?}",
                describe(&check),
                created.as_ref().map(|_| "created").map_err(|e| format!("{e:#}"))
            ));
        }
        if case == "misspelt-field"
            && let Ok(stored) = &created
        {
            assert_eq!(
                stored["spec"]["rules"][0].get("recrod"),
                None,
                "the server prunes the unknown field: {stored}"
            );
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} documents:\n{}",
        disagreements.len(),
        cases.len(),
        disagreements.join("\n\n")
    );
}

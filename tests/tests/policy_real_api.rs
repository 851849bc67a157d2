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

//! `chaperone policy …`: validate policy files, explain decisions, print
//! the CRD.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::identity::{Caller, PodRef};
use crate::request::RequestInfo;

use super::store::{PolicyStore, check_text, policy_files};
use super::{PolicyInput, deny};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate AgentPolicy files (several YAML documents per file are fine,
    /// directories are read for *.yaml and *.yml). Prints FILE:LINE and the
    /// field path of every problem; exits 1 if there is any.
    Check {
        /// Policy files or directories.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Show which policy and rule decide a request, and why earlier rules
    /// did not match.
    ///
    /// Example: chaperone policy explain -f deploy/policies --as
    /// system:serviceaccount:agents:coder delete deployments.apps web -n prod-a
    Explain(Box<ExplainArgs>),
    /// Print the AgentPolicy CustomResourceDefinition as YAML.
    Crd,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Policy files or directories.
    #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The caller's user name, e.g. system:serviceaccount:NS:NAME.
    #[arg(long = "as", value_name = "USER")]
    pub user: String,
    /// A group of the caller (repeatable). Service accounts also get
    /// system:serviceaccounts, system:serviceaccounts:NS and
    /// system:authenticated, as the API server gives them.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// A label of the caller's pod, KEY=VALUE (repeatable).
    #[arg(long = "pod-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub pod_labels: Vec<(String, String)>,
    /// A label of the caller's namespace, KEY=VALUE (repeatable).
    #[arg(long = "namespace-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub namespace_labels: Vec<(String, String)>,
    /// The request's namespace.
    #[arg(short = 'n', long = "namespace", value_name = "NS")]
    pub namespace: Option<String>,
    /// The subresource (exec, log, status, scale, ...).
    #[arg(long, value_name = "SUBRESOURCE")]
    pub subresource: Option<String>,
    /// The exec command and its arguments; put it last.
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG")]
    pub command: Vec<String>,
    /// The verb: get, list, watch, create, update, patch, delete,
    /// deletecollection, proxy (or the HTTP method for a URL).
    pub verb: String,
    /// RESOURCE[.GROUP][/SUBRESOURCE] as kubectl names it (pods,
    /// deployments.apps, pods/exec), or a non-resource URL path (/version).
    pub resource: String,
    /// The object's name.
    pub name: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("\"{s}\" is not KEY=VALUE"))
}

/// Runs a `chaperone policy` subcommand, printing to stdout and stderr.
pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    run_to(cmd, &mut std::io::stdout(), &mut std::io::stderr())
}

/// [`run`] with the output streams given (for tests).
pub fn run_to(
    cmd: PolicyCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { files } => check(&files, out, err),
        PolicyCommand::Explain(args) => explain(&args, out),
        PolicyCommand::Crd => {
            out.write_all(crd_yaml()?.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The CRD as deployed (`deploy/base/crds/`), ready for `kubectl apply -f -`:
/// one manifest for both ways of installing. A unit test keeps its schema's
/// fields those of the Rust types.
pub const CRD_YAML: &str =
    include_str!("../../../deploy/base/crds/agentpolicies.chaperone.dev.yaml");

pub fn crd_yaml() -> anyhow::Result<String> {
    Ok(CRD_YAML.to_owned())
}

fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        files
            .extend(policy_files(path).with_context(|| format!("cannot read {}", path.display()))?);
    }
    Ok(files)
}

fn check(paths: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut all = Vec::new();
    for file in expand(paths)? {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                writeln!(err, "{}: cannot read: {e}", file.display())?;
                failed = true;
                continue;
            }
        };
        let (ok, errors) = check_text(&file.display().to_string(), &text);
        for line in &errors {
            writeln!(err, "{line}")?;
        }
        if errors.is_empty() {
            let names: Vec<&str> = ok
                .iter()
                .filter_map(|p| p.metadata.name.as_deref())
                .collect();
            writeln!(
                out,
                "{}: ok ({} {}: {})",
                file.display(),
                names.len(),
                if names.len() == 1 {
                    "policy"
                } else {
                    "policies"
                },
                names.join(", ")
            )?;
        }
        failed |= !errors.is_empty();
        all.extend(ok);
    }
    // Clashes between files (duplicate names).
    if let Err(errors) = super::PolicySet::compile(&all) {
        for e in errors {
            writeln!(err, "policy \"{}\": {e}", e.policy)?;
        }
        failed = true;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn explain(args: &ExplainArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let store = PolicyStore::new();
    store
        .load_files(&expand(&args.files)?)
        .context("the policy files are invalid (run `chaperone policy check` on them)")?;
    let set = store.snapshot();

    let caller = caller(args);
    let request = request(args);
    let namespace_labels: BTreeMap<String, String> =
        args.namespace_labels.iter().cloned().collect();
    let mut input = PolicyInput::new(&request, &caller);
    if !args.namespace_labels.is_empty() {
        input = input.with_namespace_labels(&namespace_labels);
    }
    let explanation = set.explain(&input);
    write!(out, "{explanation}")?;
    let decision = &explanation.decision;
    if decision.refuses() {
        let status = deny::refusal_status(&set, &input, decision);
        writeln!(
            out,
            "the agent sees: Error from server (Forbidden): {}",
            status.message
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn caller(args: &ExplainArgs) -> Caller {
    let mut caller = Caller {
        username: args.user.clone(),
        groups: args.groups.clone(),
        ..Caller::default()
    };
    let service_account = caller
        .service_account()
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()));
    if let Some((ns, name)) = &service_account {
        for group in [
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".to_owned(),
        ] {
            if !caller.groups.contains(&group) {
                caller.groups.push(group);
            }
        }
        if !args.pod_labels.is_empty() {
            caller.pod = Some(PodRef {
                namespace: ns.clone(),
                name: "explain".into(),
                service_account: name.clone(),
                labels: args.pod_labels.iter().cloned().collect(),
                ..PodRef::default()
            });
        }
    }
    caller
}

fn request(args: &ExplainArgs) -> RequestInfo {
    let verb = args.verb.to_ascii_lowercase();
    if args.resource.starts_with('/') {
        return RequestInfo {
            is_resource_request: false,
            path: args.resource.clone(),
            verb,
            ..RequestInfo::default()
        };
    }
    let (resource, inline_sub) = match args.resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (args.resource.as_str(), None),
    };
    let (resource, group) = match resource.split_once('.') {
        Some((r, g)) => (r, g),
        None => (resource, ""),
    };
    let subresource = args
        .subresource
        .as_deref()
        .or(inline_sub)
        .unwrap_or("")
        .to_owned();
    let name = args.name.clone().unwrap_or_default();
    let namespace = args.namespace.clone().unwrap_or_else(|| {
        if resource == "namespaces" {
            name.clone()
        } else {
            String::new()
        }
    });
    let (prefix, version) = if group.is_empty() {
        ("api", "v1".to_owned())
    } else {
        ("apis", "v1".to_owned())
    };
    let mut path = format!("/{prefix}");
    if !group.is_empty() {
        path.push('/');
        path.push_str(group);
    }
    path.push('/');
    path.push_str(&version);
    if !namespace.is_empty() && resource != "namespaces" {
        path.push_str(&format!("/namespaces/{namespace}"));
    }
    path.push('/');
    path.push_str(resource);
    for part in [&name, &subresource] {
        if !part.is_empty() {
            path.push('/');
            path.push_str(part);
        }
    }
    let mut parts: Vec<String> = vec![resource.to_owned()];
    parts.extend(
        [name.clone(), subresource.clone()]
            .into_iter()
            .filter(|p| !p.is_empty()),
    );
    RequestInfo {
        is_resource_request: true,
        path,
        verb,
        api_prefix: prefix.to_owned(),
        api_group: group.to_owned(),
        api_version: version,
        namespace,
        resource: resource.to_owned(),
        subresource,
        name,
        parts,
        command: args.command.clone(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn examples() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies")
    }

    fn run_args(args: &[&str]) -> (ExitCode, String, String) {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
        let Command::Policy(cmd) = cli.command else {
            panic!("not a policy command")
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_to(cmd, &mut out, &mut err).unwrap();
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn check_accepts_the_examples() {
        let dir = examples();
        let (code, out, err) = run_args(&["chaperone", "policy", "check", dir.to_str().unwrap()]);
        assert_eq!(code, ExitCode::SUCCESS, "{err}");
        assert!(
            out.contains("deploy-dev-approve-prod.yaml: ok (1 policy: deployer-agent)"),
            "{out}"
        );
        assert_eq!(out.lines().count(), 3, "{out}");
    }

    #[test]
    fn check_reports_file_line_and_field_and_exits_1() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(
            &file,
            "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: p\nspec:\n  \
             subjects:\n    - users: [bot]\n  rules:\n    - name: a\n      action: allow\n    - name: b\n      \
             action: deny\n    - name: c\n      action: allwo\n---\napiVersion: chaperone.dev/v1alpha1\n\
             kind: AgentPolicy\nmetadata: {name: q}\nspec:\n  subjects: [{serviceAccounts: [bot]}]\n",
        )
        .unwrap();
        let (code, out, err) = run_args(&["chaperone", "policy", "check", file.to_str().unwrap()]);
        assert_eq!(code, ExitCode::FAILURE);
        assert_eq!(out, "");
        let path = file.display();
        assert_eq!(
            err,
            format!(
                "{path}:14: spec.rules[2].action: unknown action \"allwo\", expected one of allow, deny, mask, approve\n\
                 {path}:16: policy \"q\": spec.subjects[0].serviceAccounts[0]: \"bot\" is not NAMESPACE/NAME; write e.g. \"agents/bot\" or \"*/bot\"\n"
            )
        );
    }

    #[test]
    fn explain_prints_the_deciding_rule_and_what_the_agent_sees() {
        let dir = examples();
        let (code, out, _) = run_args(&[
            "chaperone",
            "policy",
            "explain",
            "-f",
            dir.to_str().unwrap(),
            "--as",
            "system:serviceaccount:agents:reader",
            "create",
            "pods",
            "web-0",
            "-n",
            "prod-a",
            "--subresource",
            "exec",
            "--command",
            "sh",
            "-c",
            "rm -rf /",
        ]);
        assert_eq!(code, ExitCode::SUCCESS);
        for line in [
            "decision: deny by policy \"no-exec-in-production\" rule \"no-exec-in-prod\"",
            "policy \"read-only-agent\": selects this caller",
            "  skip  rule \"no-proxy\": resource \"pods/exec\" does not match \"*/proxy\"",
            "  no rule matches: default action deny",
            "the agent sees: Error from server (Forbidden): chaperone: policy \"no-exec-in-production\" \
             rule \"no-exec-in-prod\" denies create on pods/exec \"web-0\" in namespace \"prod-a\": \
             production pods are not for agents; read their logs instead; this agent may not use \
             pods/exec here at all; ask a human to run it",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn explain_selects_by_pod_label_and_reads_resource_dot_group() {
        let dir = examples();
        let (_, out, _) = run_args(&[
            "chaperone",
            "policy",
            "explain",
            "-f",
            dir.to_str().unwrap(),
            "--as",
            "system:serviceaccount:ci-7:default",
            "--pod-label",
            "chaperone.dev/role=deployer",
            "patch",
            "deployments.apps",
            "web",
            "-n",
            "dev-3",
        ]);
        assert!(
            out.starts_with(
                "decision: allow by policy \"deployer-agent\" rule \"deploy-to-dev\", record Request\n"
            ),
            "{out}"
        );
        let (_, out, _) = run_args(&[
            "chaperone",
            "policy",
            "explain",
            "-f",
            dir.to_str().unwrap(),
            "--as",
            "alice",
            "get",
            "/version",
        ]);
        assert!(
            out.starts_with("decision: deny (no policy selects this caller)"),
            "{out}"
        );
    }

    #[test]
    fn crd_prints_the_custom_resource_definition() {
        let (code, out, _) = run_args(&["chaperone", "policy", "crd"]);
        assert_eq!(code, ExitCode::SUCCESS);
        assert!(out.contains("name: agentpolicies.chaperone.dev"), "{out}");
        assert!(out.contains("scope: Cluster"), "{out}");
    }
}

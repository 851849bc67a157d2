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

use super::evaluate::{NON_RESOURCE_VERBS, RESOURCE_VERBS};
use super::resources::{self, Resolved, ResourceTable};
use super::store::{PolicyStore, check_text, clash_lines, policy_files};
use super::{Action, Explanation, PolicyInput, deny};

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
#[command(after_help = EXPLAIN_HELP)]
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
    /// The request's namespace (for a namespaced resource; unless set, the
    /// kubeconfig context's with --kubeconfig/--context, else `default`, as
    /// for kubectl).
    #[arg(short = 'n', long = "namespace", value_name = "NS")]
    pub namespace: Option<String>,
    /// The request is across all namespaces (list, watch, deletecollection).
    #[arg(short = 'A', long = "all-namespaces", conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// The subresource (exec, log, status, scale, ...).
    #[arg(long, value_name = "SUBRESOURCE")]
    pub subresource: Option<String>,
    /// Resolve resource names through this cluster's discovery (as kubectl
    /// does) instead of the built-in table of Kubernetes 1.20 resources.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context whose cluster resolves resource names
    /// (implies discovery, from $KUBECONFIG or ~/.kube/config unless
    /// --kubeconfig is given).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Output format: text (the trace) or json.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ExplainOutput::Text)]
    pub output: ExplainOutput,
    /// The exec command and its arguments; put it last.
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG")]
    pub command: Vec<String>,
    /// The verb: get, list, watch, create, update, patch, delete,
    /// deletecollection, proxy; for a non-resource URL the HTTP method
    /// (get, head, post, put, patch, delete, options).
    pub verb: String,
    /// RESOURCE[.VERSION][.GROUP][/SUBRESOURCE] as kubectl names it (pods,
    /// po, deploy, deployments.apps, pods/exec), or a non-resource URL path
    /// (/version).
    pub resource: String,
    /// The object's name.
    pub name: Option<String>,
}

/// How `policy explain` prints its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExplainOutput {
    Text,
    Json,
}

const EXPLAIN_HELP: &str = "\
Exit status, like `kubectl auth can-i` (0 yes, 1 no), with the other
decisions told apart (for a dry-run policy: what is enforced):
  0  allow
  1  deny
  2  the question is wrong: an unknown verb or resource, invalid policy
     files, a cluster that cannot be reached
  3  approve: the request is held until a person approves it
  4  mask: allowed, with secret values masked in the response

Examples:
  chaperone policy explain -f deploy/policies --as system:serviceaccount:agents:coder \\
      delete deploy web -n prod-a
  chaperone policy explain -f policies/ --kubeconfig ~/.kube/config --as bot get apol -o json";

/// Exit status of `policy explain` when the request is denied.
pub const EXIT_DENY: u8 = 1;
/// Exit status of `policy explain` when it cannot answer the question.
pub const EXIT_USAGE: u8 = 2;
/// Exit status of `policy explain` when a person must approve the request.
pub const EXIT_APPROVE: u8 = 3;
/// Exit status of `policy explain` when the response is masked.
pub const EXIT_MASK: u8 = 4;

/// A `--pod-label` or `--namespace-label` without `=`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not KEY=VALUE")]
pub struct LabelError(String);

fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| LabelError(s.to_owned()))
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
        PolicyCommand::Explain(args) => match explain(&args, out) {
            Ok(code) => Ok(code),
            Err(error) => {
                writeln!(err, "error: {error:#}")?;
                Ok(ExitCode::from(EXIT_USAGE))
            }
        },
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
    let mut sources = Vec::new();
    for path in paths {
        if path.is_dir() && policy_files(path).is_ok_and(|f| f.is_empty()) {
            writeln!(
                err,
                "{}: no policy files (*.yaml, *.yml) in this directory",
                path.display()
            )?;
            failed = true;
        }
    }
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
        sources.push((file.display().to_string(), text));
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
        for line in clash_lines(&sources, errors) {
            writeln!(err, "{line}")?;
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
    let verb = args.verb.to_ascii_lowercase();
    // Every input is checked before anything is evaluated.
    let request = if args.resource.starts_with('/') {
        if !NON_RESOURCE_VERBS.contains(&verb.as_str()) {
            anyhow::bail!(
                "unknown verb \"{}\" for the non-resource URL {}; expected an HTTP method: {}",
                args.verb,
                args.resource,
                NON_RESOURCE_VERBS.join(", ")
            );
        }
        RequestInfo {
            is_resource_request: false,
            path: args.resource.clone(),
            verb,
            ..RequestInfo::default()
        }
    } else {
        if !RESOURCE_VERBS.contains(&verb.as_str()) {
            anyhow::bail!(
                "unknown verb \"{}\"; expected one of {} (for a non-resource URL such as \
                 /version, the HTTP method)",
                args.verb,
                RESOURCE_VERBS.join(", ")
            );
        }
        let table = resource_table(args)?;
        let (resource, inline_sub) = match args.resource.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (args.resource.as_str(), None),
        };
        let subresource = match (args.subresource.as_deref(), inline_sub) {
            (Some(a), Some(b)) if a != b => anyhow::bail!(
                "the subresource is given twice, as {b} in {} and as --subresource {a}; \
                 give it once",
                args.resource
            ),
            (a, b) => a.or(b).unwrap_or(""),
        };
        let resolved = table.resolve(resource, subresource)?;
        request(args, verb, &resolved, &table.default_namespace)
    };

    let store = PolicyStore::new();
    store
        .load_files(&expand(&args.files)?)
        .context("the policy files are invalid (run `chaperone policy check` on them)")?;
    let set = store.snapshot();
    let caller = caller(args);
    let namespace_labels: BTreeMap<String, String> =
        args.namespace_labels.iter().cloned().collect();
    let mut input = PolicyInput::new(&request, &caller);
    if !args.namespace_labels.is_empty() {
        input = input.with_namespace_labels(&namespace_labels);
    }
    let explanation = set.explain(&input);
    let decision = &explanation.decision;
    let agent_sees = decision
        .refuses()
        .then(|| deny::refusal_status(&set, &input, decision).message);
    match args.output {
        ExplainOutput::Text => {
            write!(out, "{explanation}")?;
            writeln!(out, "request: {} {}", request.verb, request.path)?;
            if let Some(message) = &agent_sees {
                writeln!(
                    out,
                    "the agent sees: Error from server (Forbidden): {message}"
                )?;
            }
        }
        ExplainOutput::Json => {
            let json = explanation_json(&explanation, &request, agent_sees.as_deref());
            serde_json::to_writer_pretty(&mut *out, &json)?;
            writeln!(out)?;
        }
    }
    Ok(ExitCode::from(exit_status(decision.enforce)))
}

/// The exit status for what is enforced (see [`EXPLAIN_HELP`]).
pub fn exit_status(enforced: Action) -> u8 {
    match enforced {
        Action::Allow => 0,
        Action::Deny => EXIT_DENY,
        Action::Approve => EXIT_APPROVE,
        Action::Mask => EXIT_MASK,
    }
}

/// Resource names from the cluster's discovery when one is named, else
/// the built-in table.
fn resource_table(args: &ExplainArgs) -> anyhow::Result<ResourceTable> {
    if args.kubeconfig.is_none() && args.context.is_none() {
        return Ok(ResourceTable::built_in());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(resources::discover(
            args.kubeconfig.as_deref(),
            args.context.as_deref(),
        ))
}

fn explanation_json(
    explanation: &Explanation,
    request: &RequestInfo,
    agent_sees: Option<&str>,
) -> serde_json::Value {
    let d = &explanation.decision;
    serde_json::json!({
        "decision": {
            "action": d.action,
            "enforced": d.enforce,
            "dryRun": d.dry_run,
            "policy": (!d.policy.is_empty()).then(|| d.policy.to_string()),
            "rule": d.rule.to_string(),
            "record": d.record,
            "message": d.message.as_deref(),
            "holdTimeoutSeconds": d.hold_timeout.map(|t| t.as_secs()),
        },
        "exitStatus": exit_status(d.enforce),
        "request": {
            "verb": request.verb,
            "resourceRequest": request.is_resource_request,
            "path": request.path,
            "apiGroup": request.api_group,
            "apiVersion": request.api_version,
            "resource": request.resource,
            "subresource": request.subresource,
            "namespace": request.namespace,
            "name": request.name,
        },
        "policies": explanation.policies.iter().map(|p| serde_json::json!({
            "name": p.name,
            "generation": p.generation,
            "dryRun": p.dry_run,
            "selected": p.selected,
            "rules": p.rules.iter().map(|r| serde_json::json!({
                "name": r.name,
                "matched": r.matched,
                "reason": r.reason,
            })).collect::<Vec<_>>(),
            "decidedBy": p.outcome.as_ref().map(|(rule, action)| serde_json::json!({
                "rule": rule,
                "action": action,
            })),
        })).collect::<Vec<_>>(),
        "agentSees": agent_sees,
    })
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

/// The request as the API server reads it (its RequestInfo), for a resolved
/// resource.
fn request(
    args: &ExplainArgs,
    verb: String,
    resolved: &Resolved,
    default_namespace: &str,
) -> RequestInfo {
    let api = &resolved.resource;
    let resource = api.name.clone();
    let subresource = resolved.subresource.clone();
    let name = args.name.clone().unwrap_or_default();
    let namespace = if resource == "namespaces" && api.group.is_empty() {
        // The API server reads a namespace's own name as its namespace.
        name.clone()
    } else if !api.namespaced || args.all_namespaces {
        String::new()
    } else {
        args.namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_owned())
    };
    let prefix = if api.group.is_empty() { "api" } else { "apis" };
    let mut path = format!("/{prefix}");
    if !api.group.is_empty() {
        path.push('/');
        path.push_str(&api.group);
    }
    path.push('/');
    path.push_str(&api.version);
    if !namespace.is_empty() && resource != "namespaces" {
        path.push_str(&format!("/namespaces/{namespace}"));
    }
    path.push('/');
    path.push_str(&resource);
    for part in [&name, &subresource] {
        if !part.is_empty() {
            path.push('/');
            path.push_str(part);
        }
    }
    let mut parts: Vec<String> = vec![resource.clone()];
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
        api_group: api.group.clone(),
        api_version: api.version.clone(),
        namespace,
        resource,
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
                "{path}:14:15: spec.rules[2].action: unknown action \"allwo\", expected one of allow, deny, mask, approve\n\
                 {path}:20:33: spec.subjects[0].serviceAccounts[0]: \"bot\" is not NAMESPACE/NAME; write e.g. \"agents/bot\" or \"*/bot\"\n"
            )
        );
    }

    fn check_one(text: &str) -> (ExitCode, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = run_args(&["chaperone", "policy", "check", file.to_str().unwrap()]);
        let path = file.display().to_string();
        (
            code,
            out.replace(&path, "p.yaml"),
            err.replace(&path, "p.yaml"),
        )
    }

    const HEAD: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: p\nspec:\n  subjects: [{users: [bot]}]\n  rules:\n";

    #[test]
    fn check_refuses_an_empty_file_or_directory() {
        // Issue 28: an empty file was `ok (0 policies)`.
        for text in ["", "# nothing yet\n", "---\n---\n"] {
            let (code, out, err) = check_one(text);
            assert_eq!(code, ExitCode::FAILURE, "{text:?}: {out}");
            assert_eq!(out, "");
            assert!(
                err.starts_with("p.yaml: no AgentPolicy in this file"),
                "{err}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let (code, _, err) =
            run_args(&["chaperone", "policy", "check", dir.path().to_str().unwrap()]);
        assert_eq!(code, ExitCode::FAILURE);
        assert!(
            err.contains("no policy files (*.yaml, *.yml) in this directory"),
            "{err}"
        );
        // The node refuses to start on one as well.
        let empty = dir.path().join("empty.yaml");
        std::fs::write(&empty, "").unwrap();
        assert!(PolicyStore::new().load_files(&[&empty]).is_err());
    }

    #[test]
    fn check_wants_a_hold_timeout_with_its_unit_as_the_crd_does() {
        // Issue 28: `holdTimeout: 60` passed `policy check`, the CRD refused it.
        for (value, message) in [
            (
                "60",
                "p.yaml:8:47: spec.rules[0].holdTimeout: invalid type: number `60`, expected a duration with its unit, e.g. \"60s\", \"5m\" or \"1h30m\"",
            ),
            (
                "\"60\"",
                "p.yaml:8:47: spec.rules[0].holdTimeout: \"60\" is not a duration with its unit; write e.g. \"60s\", \"5m\" or \"1h30m\"",
            ),
            (
                "500ms",
                "p.yaml:8:47: spec.rules[0].holdTimeout: \"500ms\" is not a duration with its unit; write e.g. \"60s\"",
            ),
        ] {
            let (code, _, err) = check_one(&format!(
                "{HEAD}    - {{name: a, action: approve, holdTimeout: {value}}}\n"
            ));
            assert_eq!(code, ExitCode::FAILURE, "{value}");
            assert!(err.starts_with(message), "{value}: {err}");
        }
        let (code, out, err) = check_one(&format!(
            "{HEAD}    - {{name: a, action: approve, holdTimeout: 1h30m}}\n"
        ));
        assert_eq!(code, ExitCode::SUCCESS, "{err}");
        assert!(out.ends_with("ok (1 policy: p)\n"), "{out}");
    }

    #[test]
    fn check_reports_every_problem_at_its_own_line_and_column() {
        // Issue 28: semantic errors pointed at line 1 (the document start).
        let (code, _, err) = check_one(&format!(
            "{HEAD}    - name: a\n      action: allow\n    - name: b\n      action: deny\n      holdTimeout: 5m\n    - name: a\n      action: deny\n"
        ));
        assert_eq!(code, ExitCode::FAILURE);
        assert_eq!(
            err,
            "p.yaml:12:20: policy \"p\": spec.rules[1].holdTimeout: holdTimeout applies to action approve only, this rule's action is deny; remove it\n\
             p.yaml:13:13: policy \"p\": spec.rules[2].name: rule name \"a\" is used twice; rule names must be unique in a policy\n"
        );
        // Every schema violation of a document, not only the first.
        let (_, _, err) = check_one(&format!(
            "{HEAD}    - {{verbs: [fetch], action: allow, recrod: Request}}\n  dryRun: \"yes\"\n"
        ));
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 3, "{err}");
        assert!(
            lines[0].starts_with("p.yaml:8:16: spec.rules[0].verbs[0]: unknown verb \"fetch\""),
            "{err}"
        );
        assert!(
            lines[1].starts_with("p.yaml:8:47: spec.rules[0].recrod: unknown field `recrod`"),
            "{err}"
        );
        assert!(
            lines[2].starts_with(
                "p.yaml:9:11: spec.dryRun: invalid type: string \"yes\", expected a boolean"
            ),
            "{err}"
        );
        // A name used twice, at its second use.
        let (_, _, err) = check_one(&format!(
            "{HEAD}    - {{action: allow}}\n---\n{HEAD}    - {{action: deny}}\n"
        ));
        assert_eq!(
            err,
            "p.yaml:13:9: policy \"p\": metadata.name: a second policy is named \"p\"; policy names \
             must be unique (first at p.yaml:4:9)\n"
        );
        // A name the API server would refuse.
        let (_, _, err) = check_one(&HEAD.replace("name: p", "name: My_Policy"));
        assert!(
            err.starts_with("p.yaml:4:9: metadata.name: \"My_Policy\" is not a valid name"),
            "{err}"
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
        assert_eq!(code, ExitCode::from(EXIT_DENY));
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
        let (code, out, _) = run_args(&[
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
        assert_eq!(code, ExitCode::SUCCESS);
        let (code, out, _) = run_args(&[
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
        assert_eq!(code, ExitCode::from(EXIT_DENY));
    }

    /// One policy for the explain tests: `bot` may do anything but delete
    /// deployments (apps), must get approval to delete services, and sees
    /// secrets masked.
    fn explain_policy() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: p}\n\
             spec:\n  subjects: [{users: [bot]}]\n  defaultAction: allow\n  rules:\n\
             \x20   - {name: no-deploy-delete, verbs: [delete], apiGroups: [apps], resources: [deployments], action: deny}\n\
             \x20   - {name: svc-delete, verbs: [delete], apiGroups: [\"\"], resources: [services], action: approve}\n\
             \x20   - {name: secrets, apiGroups: [\"\"], resources: [secrets], action: mask}\n\
             \x20   - {name: core-events, apiGroups: [\"\"], resources: [events], action: deny}\n\
             \x20   - {name: logs, resources: [pods/log], namespaces: [default], action: deny}\n",
        )
        .unwrap();
        dir
    }

    fn explain_as_bot(dir: &tempfile::TempDir, request: &[&str]) -> (ExitCode, String, String) {
        let mut args = vec![
            "chaperone",
            "policy",
            "explain",
            "-f",
            dir.path().to_str().unwrap(),
            "--as",
            "bot",
        ];
        args.extend(request);
        run_args(&args)
    }

    #[test]
    fn explain_reads_resources_as_kubectl_does() {
        let dir = explain_policy();
        // Issue 28: `deployments` without `.apps`, as kubectl users type it,
        // was read as the core group and allowed.
        for resource in [
            "deployments",
            "deploy",
            "deployment",
            "Deployment",
            "deployments.apps",
            "deployments.v1.apps",
        ] {
            let (code, out, err) = explain_as_bot(&dir, &["delete", resource, "web", "-n", "prod"]);
            assert!(
                out.starts_with("decision: deny by policy \"p\" rule \"no-deploy-delete\""),
                "{resource}: {out}{err}"
            );
            assert_eq!(code, ExitCode::from(EXIT_DENY), "{resource}");
        }
        for (request, rule) in [
            (&["delete", "svc", "web"][..], "svc-delete"),
            (&["get", "secret", "s"][..], "secrets"),
            (&["list", "ev"][..], "core-events"),
            (&["get", "po/log", "web"][..], "logs"),
            (&["get", "po", "web", "--subresource", "log"][..], "logs"),
        ] {
            let (_, out, err) = explain_as_bot(&dir, request);
            assert!(
                out.contains(&format!("rule \"{rule}\"")),
                "{request:?}: {out}{err}"
            );
        }
        // `events.k8s.io` events are not the core group's.
        let (code, out, _) = explain_as_bot(&dir, &["list", "events.events.k8s.io"]);
        assert_eq!(code, ExitCode::SUCCESS, "{out}");
        // A namespaced request without -n is in `default`, as for kubectl;
        // -A is across all namespaces; a cluster-scoped resource has none.
        let (code, _, _) = explain_as_bot(&dir, &["get", "pods/log", "web", "-n", "other"]);
        assert_eq!(code, ExitCode::SUCCESS);
        let (_, out, _) = explain_as_bot(&dir, &["list", "deploy", "-A", "-o", "json"]);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["request"]["namespace"], "", "{json}");
        assert_eq!(
            json["request"]["path"], "/apis/apps/v1/deployments",
            "{json}"
        );
        let (_, out, _) = explain_as_bot(&dir, &["get", "no", "n1", "-n", "x", "-o", "json"]);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["request"]["path"], "/api/v1/nodes/n1", "{json}");
    }

    #[test]
    fn explain_refuses_unknown_verbs_and_resources_with_exit_2() {
        let dir = explain_policy();
        for (request, expected) in [
            (
                &["frobnicate", "pods"][..],
                "unknown verb \"frobnicate\"; expected one of get, list, watch",
            ),
            (&["exec", "pods", "web"][..], "unknown verb \"exec\""),
            (
                &["get", "deploymnets"][..],
                "the server doesn't have a resource type \"deploymnets\"",
            ),
            (
                &["get", "deployments.extensions"][..],
                "resource type \"deployments.extensions\"",
            ),
            (
                &["get", "pods/exc", "web"][..],
                "pods has no subresource \"exc\"; it has attach, binding, eviction, exec",
            ),
            (
                &["fetch", "/version"][..],
                "unknown verb \"fetch\" for the non-resource URL /version",
            ),
        ] {
            let (code, out, err) = explain_as_bot(&dir, request);
            assert_eq!(code, ExitCode::from(EXIT_USAGE), "{request:?}: {out}{err}");
            assert_eq!(out, "", "{request:?}");
            assert!(
                err.starts_with("error: ") && err.contains(expected),
                "{request:?}: {err}"
            );
        }
        let (_, _, err) = explain_as_bot(&dir, &["get", "deploymnets"]);
        assert!(err.contains("did you mean deployments.apps?"), "{err}");
        // Invalid policy files cannot answer either.
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("p.yaml"), "kind: Nope\n").unwrap();
        let (code, _, err) = explain_as_bot(&bad, &["get", "pods"]);
        assert_eq!(code, ExitCode::from(EXIT_USAGE), "{err}");
    }

    #[test]
    fn explain_exit_status_tells_the_decisions_apart() {
        let dir = explain_policy();
        for (request, code) in [
            (&["get", "pods"][..], 0),
            (&["delete", "deploy", "web"][..], EXIT_DENY),
            (&["delete", "svc", "web"][..], EXIT_APPROVE),
            (&["get", "secrets", "s"][..], EXIT_MASK),
        ] {
            let (got, out, _) = explain_as_bot(&dir, request);
            assert_eq!(got, ExitCode::from(code), "{request:?}: {out}");
        }
    }

    #[test]
    fn explain_prints_json() {
        let dir = explain_policy();
        let (code, out, _) = explain_as_bot(
            &dir,
            &["delete", "deploy", "web", "-n", "prod", "-o", "json"],
        );
        assert_eq!(code, ExitCode::from(EXIT_DENY));
        let json: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(json["decision"]["action"], "deny");
        assert_eq!(json["decision"]["enforced"], "deny");
        assert_eq!(json["decision"]["policy"], "p");
        assert_eq!(json["decision"]["rule"], "no-deploy-delete");
        assert_eq!(json["exitStatus"], 1);
        assert_eq!(json["request"]["apiGroup"], "apps");
        assert_eq!(
            json["request"]["path"],
            "/apis/apps/v1/namespaces/prod/deployments/web"
        );
        assert_eq!(json["policies"][0]["decidedBy"]["rule"], "no-deploy-delete");
        assert_eq!(json["policies"][0]["rules"][0]["matched"], true);
        assert!(
            json["agentSees"]
                .as_str()
                .unwrap()
                .contains("denies delete on deployments.apps \"web\""),
            "{json}"
        );
        let (code, out, _) = explain_as_bot(&dir, &["get", "pods", "-o", "json"]);
        assert_eq!(code, ExitCode::SUCCESS);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["decision"]["action"], "allow");
        assert_eq!(json["agentSees"], serde_json::Value::Null);
    }

    #[test]
    fn crd_prints_the_custom_resource_definition() {
        let (code, out, _) = run_args(&["chaperone", "policy", "crd"]);
        assert_eq!(code, ExitCode::SUCCESS);
        assert!(out.contains("name: agentpolicies.chaperone.dev"), "{out}");
        assert!(out.contains("scope: Cluster"), "{out}");
    }
}

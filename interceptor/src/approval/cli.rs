//! `kubectl chaperone`: the approvers' kubectl plugin (the
//! `kubectl-chaperone` binary). It talks to the API server with the
//! approver's own kubeconfig (`--kubeconfig`, `--context`, as kubectl
//! reads them); who they are is what the API server says
//! (SelfSubjectReview, Kubernetes 1.28+; on older servers what their
//! credentials name, see [`super::whoami`]), and their right to decide is checked up front
//! (SelfSubjectAccessReview) and again by every node agent
//! (SubjectAccessReview) before a held request moves.
//!
//! Lists follow kubectl's conventions ([`crate::kubectl`]): `-n`, `-A`,
//! `-o json|yaml|wide|name`, JSON and YAML as the `List` kubectl prints.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::{
    authentication::v1::SelfSubjectReview,
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::{ApprovalRequest, DEFAULT_NAMESPACE, LocalStore, Ruling, State, format_time};
use crate::kubectl::{self, Cluster, KubeconfigArgs, Output};

const ROOT_EXAMPLES: &str = "\
Examples:
  # What waits for you, then decide
  kubectl chaperone list
  kubectl chaperone show apr-1a2b3c4d
  kubectl chaperone approve apr-1a2b3c4d --reason 'planned cleanup'

  # Is chaperone working in this cluster?
  kubectl chaperone status

  # Another cluster, another approvals namespace
  kubectl chaperone --context prod -n guard-system list";

/// Approve or deny requests chaperone holds for a human, manage
/// just-in-time grants, and check chaperone's install.
///
/// Uses your kubeconfig as kubectl does (`--kubeconfig`, `--context`).
/// Approvals live in the node agents' approval namespace (`-n`, default
/// `chaperone-system`).
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-chaperone",
    bin_name = "kubectl chaperone",
    version,
    after_help = ROOT_EXAMPLES
)]
pub struct PluginCli {
    #[command(flatten)]
    pub cluster: KubeconfigArgs,

    /// The namespace approvals live in (the node agents'
    /// --approval-namespace).
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "CHAPERONE_APPROVAL_NAMESPACE",
        default_value = DEFAULT_NAMESPACE
    )]
    pub namespace: String,

    /// Local mode: the node agent's --approval-dir instead of the cluster
    /// (`--local-dir` is the older spelling).
    #[arg(
        long = "approval-dir",
        visible_alias = "local-dir",
        global = true,
        env = "CHAPERONE_APPROVAL_DIR",
        value_name = "DIR"
    )]
    pub local_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// List approvals: pending ones by default, the most urgent first.
    #[command(
        visible_alias = "approvals",
        after_help = "\
Examples:
  # Pending approvals in chaperone-system
  kubectl chaperone list

  # Everything, in every namespace, as kubectl would print it
  kubectl chaperone list -A --state all -o json

  # Keep watching for new ones
  kubectl chaperone list -w"
    )]
    List(ListArgs),
    /// Show one approval: who asked, exactly what, the preview, the
    /// decision.
    #[command(after_help = "\
Examples:
  kubectl chaperone show apr-1a2b3c4d
  kubectl chaperone show apr-1a2b3c4d -o yaml")]
    Show {
        /// The approval's name (`apr-...`).
        id: String,
        #[arg(
            short,
            long,
            value_enum,
            default_value = "table",
            hide_default_value = true
        )]
        output: Output,
    },
    /// Let a held request through (and optionally open a grant).
    #[command(after_help = "\
Examples:
  kubectl chaperone approve apr-1a2b3c4d --reason 'planned cleanup'

  # Also let the same caller repeat requests on the same object for 15 minutes
  kubectl chaperone approve apr-1a2b3c4d --grant 15m

  # ... or anything the same rule holds, for an hour
  kubectl chaperone approve apr-1a2b3c4d --grant 1h --grant-scope rule")]
    Approve {
        /// The approval's name (`apr-...`).
        id: String,
        /// Why (recorded on the approval and in the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// Also let the same caller repeat requests the same rule holds for
        /// this long without a new approval (`15m`, `1h`).
        #[arg(long, value_name = "DURATION")]
        grant: Option<String>,
        /// What the grant covers: requests on the same object (the
        /// default), or every request the same rule holds.
        #[arg(long, value_enum, value_name = "SCOPE", requires = "grant")]
        grant_scope: Option<super::GrantScope>,
    },
    /// Refuse a held request; the agent is told the reason.
    #[command(after_help = "\
Examples:
  kubectl chaperone deny apr-1a2b3c4d --reason 'not during the sale'")]
    Deny {
        /// The approval's name (`apr-...`).
        id: String,
        /// Why (the agent is told).
        #[arg(long)]
        reason: Option<String>,
    },
    /// List the just-in-time grants in force.
    #[command(after_help = "\
Examples:
  kubectl chaperone grants
  kubectl chaperone grants -A -o yaml")]
    Grants {
        /// Grants in every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(
            short,
            long,
            value_enum,
            default_value = "table",
            hide_default_value = true
        )]
        output: Output,
    },
    /// End a grant now.
    #[command(after_help = "\
Examples:
  kubectl chaperone revoke apr-1a2b3c4d")]
    Revoke {
        /// The approval whose grant ends.
        id: String,
    },
    /// Check chaperone's install: CRDs, webhook and its CA bundle, node
    /// agents, policies, and which agent pods are guarded (exit 1 if any
    /// check fails). Components are looked for in -n's namespace.
    #[command(after_help = "\
Examples:
  kubectl chaperone status
  kubectl chaperone status -o json | jq '.pods'")]
    Status {
        /// json for the whole report; the default is a checklist.
        #[arg(
            short,
            long,
            value_enum,
            default_value = "table",
            hide_default_value = true
        )]
        output: Output,
    },
    /// Print the plugin's version.
    #[command(after_help = "\
Examples:
  kubectl chaperone version")]
    Version,
    /// Print a shell completion script for `kubectl-chaperone`.
    #[command(after_help = "\
Examples:
  # bash, for this shell
  source <(kubectl-chaperone completion bash)

  # zsh, for every shell
  kubectl-chaperone completion zsh > \"${fpath[1]}/_kubectl-chaperone\"")]
    Completion {
        /// bash, zsh, fish, powershell or elvish.
        shell: clap_complete::Shell,
    },
}

/// `kubectl chaperone list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Approvals in every namespace (the NAMESPACE column says where).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Which approvals: pending (not yet decided nor expired), approved,
    /// denied, expired, or all.
    #[arg(long, value_enum, default_value = "pending")]
    pub state: StateFilter,
    /// Keep printing changes.
    #[arg(short, long)]
    pub watch: bool,
    #[arg(
        short,
        long,
        value_enum,
        default_value = "table",
        hide_default_value = true
    )]
    pub output: Output,
}

/// `--state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    Pending,
    Approved,
    Denied,
    Expired,
    All,
}

impl StateFilter {
    fn admits(self, approval: &ApprovalRequest, now: OffsetDateTime) -> bool {
        let state = effective_state(approval, now);
        match self {
            StateFilter::All => true,
            StateFilter::Pending => state == State::Pending,
            StateFilter::Approved => state == State::Approved,
            StateFilter::Denied => state == State::Denied,
            StateFilter::Expired => state == State::Expired,
        }
    }
}

/// Pending past its expiry reads as expired, before the sweep writes it.
fn effective_state(approval: &ApprovalRequest, now: OffsetDateTime) -> State {
    if approval.state() == State::Pending && approval.is_expired(now) {
        State::Expired
    } else {
        approval.state()
    }
}

pub fn main() -> ExitCode {
    let cli = PluginCli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_with_code(cli, &mut std::io::stdout())) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Who is deciding.
struct Approver {
    username: String,
    groups: Vec<String>,
}

enum Place {
    Cluster {
        cluster: Box<Cluster>,
        namespace: String,
    },
    Local(LocalStore),
}

fn approval_resource() -> ApiResource {
    ApiResource::erase::<ApprovalRequest>(&())
}

impl Place {
    fn where_(&self) -> String {
        match self {
            Place::Cluster { namespace, .. } => format!("in namespace {namespace:?}"),
            Place::Local(local) => format!("in {}", local.dir.display()),
        }
    }

    fn explain(&self, error: kube::Error, doing: &str) -> anyhow::Error {
        match self {
            Place::Cluster { cluster, .. } => kubectl::explain(error, &cluster.server, doing),
            Place::Local(_) => anyhow!("{doing}: {error}"),
        }
    }

    fn typed(&self) -> Option<Api<ApprovalRequest>> {
        match self {
            Place::Cluster { cluster, namespace } => {
                Some(Api::namespaced(cluster.client.clone(), namespace))
            }
            Place::Local(_) => None,
        }
    }

    async fn get(&self, id: &str) -> Result<ApprovalRequest> {
        Ok(serde_json::from_value(self.get_raw(id).await?)?)
    }

    /// The object as stored (every field, as `kubectl get -o json` shows it).
    async fn get_raw(&self, id: &str) -> Result<Value> {
        match self {
            Place::Cluster { cluster, namespace } => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(cluster.client.clone(), namespace, &approval_resource());
                let request = kube::core::Request::new(api.resource_url())
                    .get(id, &Default::default())
                    .map_err(kube::Error::BuildRequest)?;
                match cluster.client.request::<Value>(request).await {
                    Ok(object) => Ok(with_type(object)),
                    Err(error) if kubectl::is_not_found(&error) => bail!(
                        "approval {id} not found in namespace {namespace:?} on the server {}: \
                         `kubectl chaperone list -A --state all` shows every approval and \
                         where it is (-n must be the node agents' --approval-namespace)",
                        cluster.server
                    ),
                    Err(error) => {
                        Err(self
                            .explain(error, &format!("reading approval {id} {}", self.where_())))
                    }
                }
            }
            Place::Local(local) => {
                let object = local.read(id)?;
                Ok(with_type(serde_json::to_value(object)?))
            }
        }
    }

    /// Every approval here (or in every namespace), as stored.
    async fn list_raw(&self, all_namespaces: bool) -> Result<Vec<Value>> {
        match self {
            Place::Cluster { cluster, namespace } => {
                let api: Api<DynamicObject> = if all_namespaces {
                    Api::all_with(cluster.client.clone(), &approval_resource())
                } else {
                    Api::namespaced_with(cluster.client.clone(), namespace, &approval_resource())
                };
                let doing = if all_namespaces {
                    "listing approvalrequests.chaperone.dev in all namespaces".to_owned()
                } else {
                    format!("listing approvalrequests.chaperone.dev in namespace {namespace:?}")
                };
                // The objects as the server sent them, every field kept.
                let request = kube::core::Request::new(api.resource_url())
                    .list(&Default::default())
                    .map_err(kube::Error::BuildRequest)?;
                let list = cluster
                    .client
                    .request::<Value>(request)
                    .await
                    .map_err(|e| self.explain(e, &doing))?;
                Ok(list["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(with_type)
                    .collect())
            }
            Place::Local(local) => local
                .list()?
                .into_iter()
                .map(|o| Ok(with_type(serde_json::to_value(o)?)))
                .collect(),
        }
    }

    async fn patch_status(&self, id: &str, status: Value) -> Result<()> {
        match self {
            Place::Cluster { .. } => {
                let api = self.typed().expect("cluster");
                api.patch_status(
                    id,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "status": status })),
                )
                .await
                .map_err(|e| self.explain(e, &format!("updating approval {id}")))?;
                Ok(())
            }
            Place::Local(local) => Ok(local.patch_status(id, &status)?),
        }
    }

    async fn whoami(&self) -> Result<Approver> {
        match self {
            Place::Local(_) => {
                let user = std::env::var("SUDO_USER")
                    .or_else(|_| std::env::var("USER"))
                    .unwrap_or_else(|_| format!("uid-{}", nix::unistd::getuid()));
                Ok(Approver {
                    username: format!("local:{user}"),
                    groups: Vec::new(),
                })
            }
            Place::Cluster { cluster, .. } => {
                let client = &cluster.client;
                // Kubernetes < 1.28 has no SelfSubjectReview, and its RBAC
                // answers 403 rather than 404 to those who may not create
                // the missing resource: ask discovery instead of guessing
                // from the error.
                let served = client
                    .list_api_group_resources("authentication.k8s.io/v1")
                    .await
                    .map_err(|e| {
                        self.explain(e, "asking which authentication APIs the server serves")
                    })?
                    .resources
                    .iter()
                    .any(|r| r.name == "selfsubjectreviews");
                if !served {
                    let who = super::whoami::from_credentials(&cluster.auth)?;
                    return Ok(Approver {
                        username: who.username,
                        groups: who.groups,
                    });
                }
                let api: Api<SelfSubjectReview> = Api::all(client.clone());
                let review = api
                    .create(&PostParams::default(), &SelfSubjectReview::default())
                    .await
                    .map_err(|e| {
                        self.explain(e, "asking the server who you are (SelfSubjectReview)")
                    })?;
                let user = review
                    .status
                    .and_then(|s| s.user_info)
                    .context("the SelfSubjectReview did not say who you are")?;
                Ok(Approver {
                    username: user.username.unwrap_or_default(),
                    groups: user.groups.unwrap_or_default(),
                })
            }
        }
    }

    /// Whether the API server lets the caller `verb` this approval.
    async fn may(&self, verb: &str, approval: &ApprovalRequest) -> Result<bool> {
        match self {
            Place::Local(_) => Ok(true),
            Place::Cluster { cluster, .. } => {
                let api: Api<SelfSubjectAccessReview> = Api::all(cluster.client.clone());
                let review = SelfSubjectAccessReview {
                    spec: SelfSubjectAccessReviewSpec {
                        resource_attributes: Some(ResourceAttributes {
                            group: Some("chaperone.dev".into()),
                            resource: Some("approvalrequests".into()),
                            verb: Some(verb.into()),
                            namespace: Some(approval.namespace().to_owned()),
                            name: Some(approval.name().to_owned()),
                            ..ResourceAttributes::default()
                        }),
                        ..SelfSubjectAccessReviewSpec::default()
                    },
                    ..SelfSubjectAccessReview::default()
                };
                let answer = api
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| {
                        self.explain(e, "checking your rights (SelfSubjectAccessReview)")
                    })?;
                Ok(answer.status.is_some_and(|s| s.allowed))
            }
        }
    }
}

/// List items from a server lack `apiVersion` and `kind` for built-in
/// types (custom resources carry them); kubectl adds them, and so do we.
/// It leaves out `metadata.managedFields` (`--show-managed-fields`
/// is off by default), and so do we.
fn with_type(mut object: Value) -> Value {
    if let Some(metadata) = object["metadata"].as_object_mut() {
        metadata.remove("managedFields");
    }
    if let Some(map) = object.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| json!("chaperone.dev/v1alpha1"));
        map.entry("kind")
            .or_insert_with(|| json!("ApprovalRequest"));
    }
    object
}

fn typed(object: &Value) -> Result<ApprovalRequest> {
    serde_json::from_value(object.clone()).with_context(|| {
        format!(
            "approval {} is not an ApprovalRequest this plugin can read (is the plugin \
             older than the node agents?)",
            object["metadata"]["name"].as_str().unwrap_or("?")
        )
    })
}

/// Runs one command; `Ok(code)` is the exit code (non-zero for a failed
/// `status`).
pub async fn run_with_code(cli: PluginCli, out: &mut dyn Write) -> Result<ExitCode> {
    match &cli.command {
        PluginCommand::Version => {
            crate::usage::print_version("kubectl-chaperone", out)?;
            return Ok(ExitCode::SUCCESS);
        }
        PluginCommand::Completion { shell } => {
            crate::usage::print_completion::<PluginCli>(*shell, "kubectl-chaperone", out)?;
            return Ok(ExitCode::SUCCESS);
        }
        PluginCommand::Status { output } => {
            if cli.local_dir.is_some() {
                bail!("status checks a cluster; --local-dir has none");
            }
            let cluster = cli.cluster.connect().await?;
            let report = crate::status::check(&cluster, &cli.namespace).await?;
            match output {
                Output::Json | Output::Yaml => {
                    kubectl::print_object(&serde_json::to_value(&report)?, *output, out)?
                }
                _ => crate::status::print(&report, out)?,
            }
            return Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        _ => {}
    }
    run(cli, out).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn run(cli: PluginCli, out: &mut dyn Write) -> Result<()> {
    let place = match &cli.local_dir {
        Some(dir) => Place::Local(LocalStore::new(dir)?),
        None => Place::Cluster {
            cluster: Box::new(cli.cluster.connect().await?),
            namespace: cli.namespace.clone(),
        },
    };
    match cli.command {
        PluginCommand::Approve {
            id,
            reason,
            grant,
            grant_scope,
        } => {
            let grant = grant.map(|g| (g, grant_scope.unwrap_or(super::GrantScope::Object)));
            decide(&place, &id, State::Approved, reason, grant, out).await
        }
        PluginCommand::Deny { id, reason } => {
            decide(&place, &id, State::Denied, reason, None, out).await
        }
        PluginCommand::List(args) => list(&place, &args, out).await,
        PluginCommand::Show { id, output } => {
            let object = place.get_raw(&id).await?;
            match output {
                Output::Json | Output::Yaml => kubectl::print_object(&object, output, out),
                Output::Name => Ok(writeln!(out, "{}", kubectl::resource_name(&object))?),
                Output::Table | Output::Wide => {
                    show(&typed(&object)?, &place, OffsetDateTime::now_utc(), out)
                }
            }
        }
        PluginCommand::Grants {
            all_namespaces,
            output,
        } => {
            let now = OffsetDateTime::now_utc();
            let mut grants = Vec::new();
            for object in place.list_raw(all_namespaces).await? {
                let approval = typed(&object)?;
                if approval.grant_until().is_some_and(|u| u > now) {
                    grants.push((object, approval));
                }
            }
            grants.sort_by_key(|(_, a)| a.grant_until());
            match output {
                Output::Json | Output::Yaml => kubectl::print_object(
                    &kubectl::list_object(grants.into_iter().map(|(o, _)| o).collect()),
                    output,
                    out,
                ),
                Output::Name => {
                    for (object, _) in &grants {
                        writeln!(out, "{}", kubectl::resource_name(object))?;
                    }
                    Ok(())
                }
                Output::Table | Output::Wide => {
                    if grants.is_empty() {
                        writeln!(out, "No grants in force {}.", place.where_())?;
                        return Ok(());
                    }
                    let mut header =
                        vec!["NAME", "REQUESTER", "RULE", "SCOPE", "UNTIL", "GRANTED BY"];
                    if all_namespaces {
                        header.insert(0, "NAMESPACE");
                    }
                    let rows: Vec<Vec<String>> = grants
                        .iter()
                        .map(|(_, approval)| {
                            let status = approval.status.clone().unwrap_or_default();
                            let mut row = vec![
                                approval.name().to_owned(),
                                approval.spec.requester.username.clone(),
                                format!("{}/{}", approval.spec.policy, approval.spec.rule),
                                match approval.grant_scope() {
                                    super::GrantScope::Object => {
                                        format!("object {}", approval.spec.request.describe())
                                    }
                                    super::GrantScope::Rule => "rule".to_owned(),
                                },
                                approval
                                    .grant_until()
                                    .map(kubectl::timestamp)
                                    .unwrap_or_default(),
                                status.decided_by.unwrap_or_default(),
                            ];
                            if all_namespaces {
                                row.insert(0, approval.namespace().to_owned());
                            }
                            row
                        })
                        .collect();
                    kubectl::print_table(&header, &rows, out)
                }
            }
        }
        PluginCommand::Revoke { id } => {
            let approval = place.get(&id).await?;
            let now = OffsetDateTime::now_utc();
            if approval.grant_until().is_none_or(|u| u <= now) {
                bail!(
                    "approval {id} has no grant in force (kubectl chaperone grants lists those that do)"
                );
            }
            let me = place.whoami().await?;
            place
                .patch_status(
                    &id,
                    json!({"revokedBy": me.username, "grantExpiresAt": format_time(now)}),
                )
                .await?;
            writeln!(out, "revoked the grant of {id}")?;
            Ok(())
        }
        PluginCommand::Version
        | PluginCommand::Completion { .. }
        | PluginCommand::Status { .. } => Ok(()),
    }
}

async fn list(place: &Place, args: &ListArgs, out: &mut dyn Write) -> Result<()> {
    if args.all_namespaces && matches!(place, Place::Local(_)) {
        bail!("-A lists namespaces of a cluster; --local-dir has one directory");
    }
    let now = OffsetDateTime::now_utc();
    let mut shown = Vec::new();
    for object in place.list_raw(args.all_namespaces).await? {
        let approval = typed(&object)?;
        if args.state.admits(&approval, now) {
            shown.push((object, approval));
        }
    }
    let table = Table {
        namespaces: args.all_namespaces,
        wide: args.output == Output::Wide,
    };
    match args.output {
        Output::Json | Output::Yaml => kubectl::print_object(
            &kubectl::list_object(shown.into_iter().map(|(o, _)| o).collect()),
            args.output,
            out,
        )?,
        Output::Name => {
            for (object, _) in &shown {
                writeln!(out, "{}", kubectl::resource_name(object))?;
            }
        }
        Output::Table | Output::Wide => {
            // The most urgent first: pending before decided, soonest
            // expiry first (JSON, YAML and names keep the server's order,
            // as kubectl does).
            shown.sort_by_key(|(_, a)| {
                (
                    effective_state(a, now) != State::Pending,
                    a.expires_at(),
                    a.namespace().to_owned(),
                    a.name().to_owned(),
                )
            });
            if shown.is_empty() && !args.watch {
                let which = match args.state {
                    StateFilter::All => String::new(),
                    other => format!("{} ", format!("{other:?}").to_lowercase()),
                };
                let where_ = if args.all_namespaces {
                    "in any namespace".to_owned()
                } else {
                    place.where_()
                };
                writeln!(out, "No {which}approvals {where_}.")?;
            } else {
                let rows: Vec<_> = shown.iter().map(|(_, a)| table.row(a, now)).collect();
                kubectl::print_table(&table.header(), &rows, out)?;
            }
        }
    }
    if !args.watch {
        return Ok(());
    }
    let Place::Cluster { cluster, namespace } = place else {
        bail!("--watch needs the cluster (not --local-dir)");
    };
    let api: Api<DynamicObject> = if args.all_namespaces {
        Api::all_with(cluster.client.clone(), &approval_resource())
    } else {
        Api::namespaced_with(cluster.client.clone(), namespace, &approval_resource())
    };
    let mut events = watcher(api, watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let object = event.map_err(|e| {
            anyhow!(
                "watching approvals on the server {}: {e}: is the server still up?",
                cluster.server
            )
        })?;
        let object = with_type(serde_json::to_value(object)?);
        let approval = typed(&object)?;
        let now = OffsetDateTime::now_utc();
        if !args.state.admits(&approval, now) {
            continue;
        }
        match args.output {
            Output::Json | Output::Yaml => kubectl::print_object(&object, args.output, out)?,
            Output::Name => writeln!(out, "{}", kubectl::resource_name(&object))?,
            Output::Table | Output::Wide => {
                writeln!(out, "{}", table.row(&approval, now).join("   "))?;
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// The columns of `list`.
struct Table {
    namespaces: bool,
    wide: bool,
}

impl Table {
    fn header(&self) -> Vec<&'static str> {
        let mut header = vec!["NAME", "STATE", "REQUESTER", "REQUEST", "EXPIRES", "AGE"];
        if self.namespaces {
            header.insert(0, "NAMESPACE");
        }
        if self.wide {
            header.extend(["RULE", "NODE", "DECIDED BY"]);
        }
        header
    }

    fn row(&self, approval: &ApprovalRequest, now: OffsetDateTime) -> Vec<String> {
        let expires = match approval.expires_at() {
            Some(at) if at > now && effective_state(approval, now) == State::Pending => {
                format!(
                    "in {}",
                    kubectl::human_duration((at - now).try_into().unwrap_or_default())
                )
            }
            _ => "-".to_owned(),
        };
        let mut row = vec![
            approval.name().to_owned(),
            effective_state(approval, now).to_string(),
            approval.spec.requester.username.clone(),
            request_text(approval),
            expires,
            kubectl::age(created(approval), now),
        ];
        if self.namespaces {
            row.insert(0, approval.namespace().to_owned());
        }
        if self.wide {
            let status = approval.status.clone().unwrap_or_default();
            row.extend([
                format!("{}/{}", approval.spec.policy, approval.spec.rule),
                approval.spec.node.clone().unwrap_or_else(|| "-".into()),
                status.decided_by.unwrap_or_else(|| "-".into()),
            ]);
        }
        row
    }
}

/// What was asked, with the query it carries (`?dryRun=All`): a person
/// approves exactly that.
fn request_text(approval: &ApprovalRequest) -> String {
    let request = &approval.spec.request;
    let mut text = request.describe();
    if !request.query().is_empty() {
        text.push_str(&format!(" ?{}", request.query()));
    }
    // kubectl sends a delete's dry run in its body (DeleteOptions).
    if request
        .body_summary
        .as_deref()
        .is_some_and(|b| b.contains("\"dryRun\""))
        && !request.query().contains("dryRun")
    {
        text.push_str(" (dry run)");
    }
    text
}

fn created(approval: &ApprovalRequest) -> Option<OffsetDateTime> {
    let at = approval.metadata.creation_timestamp.as_ref()?;
    OffsetDateTime::from_unix_timestamp(at.0.as_second()).ok()
}

/// `kubectl chaperone show ID`: what an approver needs to decide.
fn show(
    approval: &ApprovalRequest,
    place: &Place,
    now: OffsetDateTime,
    out: &mut dyn Write,
) -> Result<()> {
    let spec = &approval.spec;
    let status = approval.status.clone().unwrap_or_default();
    let mut field = |name: &str, value: String| writeln!(out, "{:<14}{value}", format!("{name}:"));
    field("Name", approval.name().to_owned())?;
    field("Namespace", approval.namespace().to_owned())?;
    field("State", effective_state(approval, now).to_string())?;
    let pod = spec
        .requester
        .pod
        .as_ref()
        .map(|p| format!(" (pod {}/{})", p.namespace, p.name))
        .unwrap_or_default();
    field("Requester", format!("{}{pod}", spec.requester.username))?;
    if !spec.requester.groups.is_empty() {
        field("Groups", spec.requester.groups.join(", "))?;
    }
    field("Request", spec.request.describe())?;
    if !spec.request.target.is_empty() {
        field(
            "Sent as",
            format!("{} {}", spec.request.method, spec.request.target),
        )?;
        if !spec.request.query().is_empty() {
            field("Query", spec.request.query().to_owned())?;
        }
    }
    if let Some(sha) = &spec.request.body_sha256 {
        field("Body SHA-256", sha.clone())?;
    }
    field("Rule", format!("{}/{}", spec.policy, spec.rule))?;
    if let Some(node) = &spec.node {
        field("Node", node.clone())?;
    }
    if let Some(at) = created(approval) {
        field(
            "Created",
            format!(
                "{} ({} ago)",
                kubectl::timestamp(at),
                kubectl::age(Some(at), now)
            ),
        )?;
    }
    if let Some(at) = approval.expires_at() {
        field("Expires", kubectl::timestamp(at))?;
    }
    if let Some(by) = &status.decided_by {
        field("Decided by", by.clone())?;
    }
    if let Some(at) = &status.decided_at {
        field("Decided at", kubectl::restamp(at))?;
    }
    if let Some(reason) = &status.reason {
        field("Reason", reason.clone())?;
    }
    if let Some(until) = approval.grant_until() {
        field(
            "Grant",
            format!(
                "{} until {}: {}",
                status.grant.clone().unwrap_or_default(),
                kubectl::timestamp(until),
                approval.grant_scope().describe(approval)
            ),
        )?;
    }
    if let Some(at) = &status.used_at {
        field("Used at", kubectl::restamp(at))?;
    }
    if let Some(why) = &status.refused_decision {
        field("Refused", why.clone())?;
    }
    if let Some(summary) = &spec.request.body_summary {
        writeln!(out, "Body:")?;
        for line in summary.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    if let Some(preview) = &spec.preview {
        writeln!(out, "Preview (the API server's dryRun=All answer):")?;
        for line in serde_yaml::to_string(preview)?.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    if effective_state(approval, now) == State::Pending {
        let flags = match place {
            Place::Cluster { namespace, .. } if namespace != DEFAULT_NAMESPACE => {
                format!(" -n {namespace}")
            }
            Place::Local(local) => format!(" --local-dir {}", local.dir.display()),
            _ => String::new(),
        };
        writeln!(
            out,
            "Decide with:  kubectl chaperone{flags} approve {id}   or   kubectl chaperone{flags} deny {id} --reason TEXT",
            id = approval.name()
        )?;
        writeln!(
            out,
            "A grant:      --grant 15m lets through {} too; with --grant-scope rule, {}",
            super::GrantScope::Object.describe(approval),
            super::GrantScope::Rule.describe(approval)
        )?;
    }
    Ok(())
}

async fn decide(
    place: &Place,
    id: &str,
    state: State,
    reason: Option<String>,
    grant: Option<(String, super::GrantScope)>,
    out: &mut dyn Write,
) -> Result<()> {
    let me = place.whoami().await?;
    let decision = Ruling {
        state,
        by: me.username,
        groups: me.groups,
        reason,
        grant: grant.as_ref().map(|(g, _)| g.clone()),
        grant_scope: grant.as_ref().map(|(_, s)| *s),
    };
    let verb = decision.verb();
    // The same rules (and, locally, the same code) as the admin API.
    let approval = match place {
        Place::Local(local) => local.decide(id, &decision)?,
        Place::Cluster { .. } => {
            let approval = place.get(id).await?;
            let status = decision.status_for(&approval, OffsetDateTime::now_utc())?;
            if !place.may(verb, &approval).await? {
                bail!(
                    "you ({}) may not {verb} approvals in namespace {}: that needs the verb {verb} on \
                     approvalrequests.chaperone.dev (the ClusterRole chaperone-approver)",
                    decision.by,
                    approval.namespace()
                );
            }
            place.patch_status(id, status).await?;
            approval
        }
    };
    let what = approval.spec.request.describe();
    match state {
        State::Approved => writeln!(
            out,
            "approved {id} ({what}, requested by {})",
            approval.spec.requester.username
        )?,
        _ => writeln!(
            out,
            "denied {id} ({what}, requested by {})",
            approval.spec.requester.username
        )?,
    }
    if let Some((grant, scope)) = grant {
        writeln!(
            out,
            "granted {} for {grant}: {} (kubectl chaperone revoke {id} ends it)",
            approval.spec.requester.username,
            scope.describe(&approval)
        )?;
    }
    // A node refuses a decision it cannot verify; say so rather than leave
    // the approver believing it worked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Ok(after) = place.get(id).await
        && let Some(why) = after
            .status
            .as_ref()
            .and_then(|s| s.refused_decision.clone())
        && after.state() == State::Pending
    {
        bail!("chaperone refused the decision: {why}");
    }
    Ok(())
}

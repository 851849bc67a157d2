//! `kubectl chaperone`: the approvers' kubectl plugin (the
//! `kubectl-chaperone` binary). It talks to the API server with the
//! approver's own kubeconfig; who they are is what the API server says
//! (SelfSubjectReview, Kubernetes 1.28+; on older servers what their
//! credentials name, see [`super::whoami`]), and their right to decide is checked up front
//! (SelfSubjectAccessReview) and again by every node agent
//! (SubjectAccessReview) before a held request moves.

use std::{io::Write, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::{
    authentication::v1::SelfSubjectReview,
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use time::OffsetDateTime;

use super::{ApprovalRequest, DEFAULT_NAMESPACE, Decision, LocalStore, State, format_time};

/// Approve or deny requests chaperone holds for a human, and manage
/// just-in-time grants.
#[derive(Debug, Parser)]
#[command(name = "kubectl-chaperone", bin_name = "kubectl chaperone", version)]
pub struct PluginCli {
    /// The namespace approvals live in (the node agents' --approval-namespace).
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "CHAPERONE_APPROVAL_NAMESPACE",
        default_value = DEFAULT_NAMESPACE
    )]
    pub namespace: String,

    /// Local mode: the node agent's --approval-dir instead of the cluster.
    #[arg(long, global = true, env = "CHAPERONE_APPROVAL_DIR")]
    pub local_dir: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Let a held request through (and optionally open a grant).
    Approve {
        id: String,
        /// Why (recorded on the approval and in the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// Also let the same caller repeat requests the same rule holds for
        /// this long without a new approval (`15m`, `1h`).
        #[arg(long)]
        grant: Option<String>,
    },
    /// Refuse a held request; the agent is told the reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List approvals (pending first).
    Approvals {
        /// Keep printing changes.
        #[arg(short, long)]
        watch: bool,
        /// Show decided and expired ones too.
        #[arg(short = 'A', long)]
        all: bool,
    },
    /// List the just-in-time grants in force.
    Grants,
    /// End a grant now.
    Revoke { id: String },
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
    match runtime.block_on(run(cli, &mut std::io::stdout())) {
        Ok(()) => ExitCode::SUCCESS,
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
        client: kube::Client,
        api: Box<Api<ApprovalRequest>>,
        /// The kubeconfig user, for servers without SelfSubjectReview.
        auth: Box<kube::config::AuthInfo>,
    },
    Local(LocalStore),
}

impl Place {
    async fn get(&self, id: &str) -> Result<ApprovalRequest> {
        match self {
            Place::Cluster { api, .. } => api.get(id).await.with_context(|| {
                format!("no approval {id} (is -n the namespace the node agents use?)")
            }),
            Place::Local(local) => local.read(id).map_err(anyhow::Error::msg),
        }
    }

    async fn list(&self) -> Result<Vec<ApprovalRequest>> {
        match self {
            Place::Cluster { api, .. } => Ok(api.list(&Default::default()).await?.items),
            Place::Local(local) => local.list().map_err(anyhow::Error::msg),
        }
    }

    async fn patch_status(&self, id: &str, status: serde_json::Value) -> Result<()> {
        match self {
            Place::Cluster { api, .. } => {
                api.patch_status(
                    id,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "status": status })),
                )
                .await
                .with_context(|| format!("updating approval {id}"))?;
                Ok(())
            }
            Place::Local(local) => local.patch_status(id, &status).map_err(anyhow::Error::msg),
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
            Place::Cluster { client, auth, .. } => {
                // Kubernetes < 1.28 has no SelfSubjectReview, and its RBAC
                // answers 403 rather than 404 to those who may not create
                // the missing resource: ask discovery instead of guessing
                // from the error.
                let served = client
                    .list_api_group_resources("authentication.k8s.io/v1")
                    .await
                    .context("asking the API server which authentication APIs it serves")?
                    .resources
                    .iter()
                    .any(|r| r.name == "selfsubjectreviews");
                if !served {
                    let who = super::whoami::from_credentials(auth)?;
                    return Ok(Approver {
                        username: who.username,
                        groups: who.groups,
                    });
                }
                let api: Api<SelfSubjectReview> = Api::all(client.clone());
                let review = api
                    .create(&PostParams::default(), &SelfSubjectReview::default())
                    .await
                    .context("asking the API server who you are (SelfSubjectReview)")?;
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
            Place::Cluster { client, .. } => {
                let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
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
                    .context("checking your rights (SelfSubjectAccessReview)")?;
                Ok(answer.status.is_some_and(|s| s.allowed))
            }
        }
    }
}

pub async fn run(cli: PluginCli, out: &mut dyn Write) -> Result<()> {
    let place = match &cli.local_dir {
        Some(dir) => Place::Local(LocalStore::new(dir)?),
        None => {
            let config = kube::Config::infer()
                .await
                .context("no usable kubeconfig (set KUBECONFIG)")?;
            let auth = Box::new(config.auth_info.clone());
            let client =
                kube::Client::try_from(config).context("no usable kubeconfig (set KUBECONFIG)")?;
            let api = Box::new(Api::namespaced(client.clone(), &cli.namespace));
            Place::Cluster { client, api, auth }
        }
    };
    match cli.command {
        PluginCommand::Approve { id, reason, grant } => {
            decide(&place, &id, State::Approved, reason, grant, out).await
        }
        PluginCommand::Deny { id, reason } => {
            decide(&place, &id, State::Denied, reason, None, out).await
        }
        PluginCommand::Approvals { watch, all } => {
            let approvals = place.list().await?;
            print_table(&approvals, all, out)?;
            if watch {
                let Place::Cluster { api, .. } = &place else {
                    bail!("--watch needs the cluster (not --local-dir)");
                };
                let mut events = watcher((**api).clone(), watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Some(event) = events.next().await {
                    let approval = event?;
                    writeln!(out, "{}", row(&approval, OffsetDateTime::now_utc()))?;
                    out.flush()?;
                }
            }
            Ok(())
        }
        PluginCommand::Grants => {
            let now = OffsetDateTime::now_utc();
            let grants: Vec<_> = place
                .list()
                .await?
                .into_iter()
                .filter(|a| a.grant_until().is_some_and(|u| u > now))
                .collect();
            if grants.is_empty() {
                writeln!(out, "No grants in force.")?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<13} {:<44} {:<32} {:<22} GRANTED BY",
                "ID", "REQUESTER", "RULE", "UNTIL"
            )?;
            for approval in grants {
                let status = approval.status.clone().unwrap_or_default();
                writeln!(
                    out,
                    "{:<13} {:<44} {:<32} {:<22} {}",
                    approval.name(),
                    approval.spec.requester.username,
                    format!("{}/{}", approval.spec.policy, approval.spec.rule),
                    status.grant_expires_at.unwrap_or_default(),
                    status.decided_by.unwrap_or_default()
                )?;
            }
            Ok(())
        }
        PluginCommand::Revoke { id } => {
            let approval = place.get(&id).await?;
            let now = OffsetDateTime::now_utc();
            if approval.grant_until().is_none_or(|u| u <= now) {
                bail!("approval {id} has no grant in force");
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
    }
}

async fn decide(
    place: &Place,
    id: &str,
    state: State,
    reason: Option<String>,
    grant: Option<String>,
    out: &mut dyn Write,
) -> Result<()> {
    let me = place.whoami().await?;
    let decision = Decision {
        state,
        by: me.username,
        groups: me.groups,
        reason,
        grant: grant.clone(),
        // What grants always covered; the plugin names scopes next.
        grant_scope: grant.as_ref().map(|_| super::GrantScope::Rule),
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
    if let Some(grant) = grant {
        writeln!(
            out,
            "granted {} the rule {}/{} for {grant} (kubectl chaperone revoke {id} ends it)",
            approval.spec.requester.username, approval.spec.policy, approval.spec.rule
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

fn print_table(approvals: &[ApprovalRequest], all: bool, out: &mut dyn Write) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let mut shown: Vec<_> = approvals
        .iter()
        .filter(|a| all || (a.state() == State::Pending && !a.is_expired(now)))
        .collect();
    shown.sort_by_key(|a| (a.state() != State::Pending, a.spec.expires_at.clone()));
    if shown.is_empty() {
        writeln!(out, "No {}approvals.", if all { "" } else { "pending " })?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<13} {:<8} {:<44} {:<9} REQUEST",
        "ID", "STATE", "REQUESTER", "EXPIRES"
    )?;
    for approval in shown {
        writeln!(out, "{}", row(approval, now))?;
    }
    Ok(())
}

fn row(approval: &ApprovalRequest, now: OffsetDateTime) -> String {
    let state = if approval.state() == State::Pending && approval.is_expired(now) {
        State::Expired
    } else {
        approval.state()
    };
    let expires = approval
        .expires_at()
        .map(|at| {
            let left = (at - now).whole_seconds();
            if left <= 0 {
                "-".to_owned()
            } else if left < 120 {
                format!("{left}s")
            } else {
                format!("{}m", left / 60)
            }
        })
        .unwrap_or_default();
    format!(
        "{:<13} {:<8} {:<44} {:<9} {} ({}/{})",
        approval.name(),
        state.to_string(),
        approval.spec.requester.username,
        expires,
        approval.spec.request.describe(),
        approval.spec.policy,
        approval.spec.rule
    )
}

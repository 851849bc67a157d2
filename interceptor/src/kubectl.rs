//! kubectl's conventions, for chaperone's commands that talk to a cluster
//! or list things: `--kubeconfig` and `--context` read the way kubectl
//! reads them, `-o json|yaml|wide|name` with JSON and YAML as a Kubernetes
//! `List` (what `kubectl get -o json` prints, so either output feeds
//! `kubectl apply -f -`), timestamps in one form (RFC 3339, UTC, `Z`),
//! ages as kubectl prints them, and errors that name the server and say
//! what to do.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

/// Which cluster, as kubectl's flags of the same names choose it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeconfigArgs {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config,
    /// then the pod's service account).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context (default: its current-context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
}

/// A connection to the API server the kubeconfig names.
pub struct Cluster {
    pub client: kube::Client,
    /// The server's URL, for messages.
    pub server: String,
    /// The kubeconfig user (who the plugin is, on servers that cannot say).
    pub auth: AuthInfo,
}

impl KubeconfigArgs {
    /// Reads the kubeconfig as kubectl would and builds a client. Nothing
    /// is sent yet.
    pub async fn connect(&self) -> Result<Cluster> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| {
                        format!(
                            "using --kubeconfig {}{}",
                            path.display(),
                            context_hint(&self.context)
                        )
                    })?
            }
            (None, Some(_)) => {
                kube::Config::from_kubeconfig(&options)
                    .await
                    .with_context(|| {
                        format!(
                            "using the kubeconfig ($KUBECONFIG or ~/.kube/config){}",
                            context_hint(&self.context)
                        )
                    })?
            }
            (None, None) => kube::Config::infer().await.context(
                "no kubeconfig: set KUBECONFIG or pass --kubeconfig FILE (or run in a pod \
                 with a service account)",
            )?,
        };
        let server = config.cluster_url.to_string();
        let server = server.trim_end_matches('/').to_owned();
        let auth = config.auth_info.clone();
        let client = kube::Client::try_from(config)
            .with_context(|| format!("building a client for the server {server}"))?;
        Ok(Cluster {
            client,
            server,
            auth,
        })
    }
}

fn context_hint(context: &Option<String>) -> String {
    match context {
        Some(name) => {
            format!(" with --context {name} (kubectl config get-contexts lists the contexts)")
        }
        None => String::new(),
    }
}

// === errors ===

/// What went wrong talking to the API server, in kubectl's words, naming
/// the server and what to check. `doing` says what was asked
/// (`listing approvalrequests.chaperone.dev in namespace "x"`).
pub fn explain(error: kube::Error, server: &str, doing: &str) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) => match status.code {
            401 => anyhow::anyhow!(
                "You must be logged in to the server {server} (Unauthorized) while {doing}: \
                 the kubeconfig's credentials were refused; check the user of the context \
                 (kubectl config view --minify) or log in again"
            ),
            403 => anyhow::anyhow!(
                "{} (Forbidden, server {server}) while {doing}: ask a cluster administrator \
                 for the right, or use --context for a user that has it",
                status.message.trim()
            ),
            404 if is_resource_missing(status) => anyhow::anyhow!(
                "the server {server} does not serve the resource while {doing}: \
                 {}. Is chaperone installed there (kubectl apply -k deploy/)?",
                missing_resource_message(status)
            ),
            code => anyhow::anyhow!(
                "{} ({}, server {server}) while {doing}",
                status.message.trim(),
                if status.reason.is_empty() || status.reason == "Failed to parse error data" {
                    format!("HTTP {code}")
                } else {
                    status.reason.clone()
                }
            ),
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            let cause = root_cause(&error);
            let hint = if cause.contains("certificate") || cause.contains("Certificate") {
                "the server's certificate is not signed by the kubeconfig's \
                 certificate-authority; check the context's cluster"
            } else {
                "is the API server up, and is this the cluster you meant \
                 (--context, --kubeconfig)?"
            };
            anyhow::anyhow!(
                "Unable to connect to the server {server} while {doing}: {cause}: {hint}"
            )
        }
        _ => anyhow::anyhow!("{doing} on the server {server}: {}", root_cause(&error)),
    }
}

/// A 404 for a resource the server does not serve (no CRD), rather than
/// for an object that does not exist.
pub fn is_resource_missing(status: &kube::core::Status) -> bool {
    status.code == 404 && status.details.as_ref().is_none_or(|d| d.name.is_empty())
}

/// A 404 for an object that does not exist (the resource is served).
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404 && !is_resource_missing(status))
}

fn missing_resource_message(status: &kube::core::Status) -> String {
    let message = status.message.trim();
    if message.is_empty() || message.contains("404 page not found") {
        "the server could not find the requested resource".to_owned()
    } else {
        message.to_owned()
    }
}

/// The innermost message of an error chain, without the wrappers that
/// repeat it (`client error (Connect)`).
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !text.is_empty() {
            deepest = text;
        }
        source = inner.source();
    }
    deepest
}

// === output ===

/// `-o`: kubectl's output formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table (the default).
    #[default]
    #[value(hide = true)]
    Table,
    /// A table with more columns.
    Wide,
    /// JSON; lists as a `List`, like `kubectl get -o json`.
    Json,
    /// YAML; lists as a `List`, like `kubectl get -o yaml`.
    Yaml,
    /// `kind.group/name` per line, like `kubectl get -o name`.
    Name,
}

/// The `List` kubectl prints for `get -o json|yaml` of several objects.
pub fn list_object(items: Vec<Value>) -> Value {
    sorted(json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    }))
}

/// Prints one object or a `List` as JSON (kubectl's: keys sorted, four
/// spaces) or YAML (keys sorted).
pub fn print_object(value: &Value, format: Output, out: &mut dyn Write) -> Result<()> {
    let value = sorted(value.clone());
    match format {
        Output::Yaml => {
            out.write_all(serde_yaml::to_string(&value)?.as_bytes())?;
        }
        _ => {
            let mut bytes = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, formatter);
            serde::Serialize::serialize(&value, &mut serializer)?;
            bytes.push(b'\n');
            out.write_all(&bytes)?;
        }
    }
    Ok(())
}

/// `kind.group/name`, as `kubectl get -o name` prints an object.
pub fn resource_name(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
    let group = object["apiVersion"]
        .as_str()
        .and_then(|v| v.rsplit_once('/'))
        .map(|(group, _)| group)
        .unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if group.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}.{group}/{name}")
    }
}

/// Keys sorted at every level, as kubectl prints them.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sorted(v)))
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Rows padded into columns three spaces apart, as kubectl prints tables.
pub fn print_table(header: &[&str], rows: &[Vec<String>], out: &mut dyn Write) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths[i] + 3 - cell.chars().count();
                text.push_str(&" ".repeat(pad));
            }
        }
        text
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

// === time ===

/// The one form chaperone prints an instant in: RFC 3339, UTC, `Z`.
pub fn timestamp(at: OffsetDateTime) -> String {
    crate::approval::format_time(at.to_offset(time::UtcOffset::UTC))
}

/// A stored RFC 3339 time in [`timestamp`]'s form (as stored if it does
/// not parse).
pub fn restamp(text: &str) -> String {
    crate::approval::parse_time(text)
        .map(timestamp)
        .unwrap_or_else(|| text.to_owned())
}

/// A duration as kubectl prints an AGE (`45s`, `3m12s`, `5h`, `2d3h`).
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else {
        format!("{}y", days / 365)
    }
}

/// How long ago `at` was, as an AGE column (`<unknown>` without a time).
pub fn age(at: Option<OffsetDateTime>, now: OffsetDateTime) -> String {
    match at {
        Some(at) => human_duration((now - at).try_into().unwrap_or(Duration::ZERO)),
        None => "<unknown>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        for (seconds, text) in [
            (5, "5s"),
            (119, "119s"),
            (192, "3m12s"),
            (600, "10m"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (20 * 3600, "20h"),
            (3 * 86400 + 3600, "3d1h"),
            (40 * 86400, "40d"),
            (800 * 86400, "2y"),
        ] {
            assert_eq!(human_duration(Duration::from_secs(seconds)), text);
        }
    }

    #[test]
    fn json_is_printed_as_kubectl_prints_it() {
        let list = list_object(vec![json!({"metadata": {"name": "a"}, "kind": "X"})]);
        let mut out = Vec::new();
        print_object(&list, Output::Json, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("{\n    \"apiVersion\": \"v1\",\n    \"items\": ["),
            "{text}"
        );
        assert!(text.contains("\"kind\": \"List\""), "{text}");
    }

    #[test]
    fn names_carry_the_group() {
        let object = json!({"apiVersion": "chaperone.dev/v1alpha1", "kind": "ApprovalRequest", "metadata": {"name": "apr-1"}});
        assert_eq!(
            resource_name(&object),
            "approvalrequest.chaperone.dev/apr-1"
        );
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        assert_eq!(resource_name(&pod), "pod/p");
    }

    #[test]
    fn timestamps_are_utc_with_z() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000)
            .unwrap()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(timestamp(at), "2027-01-15T08:00:00Z");
        assert_eq!(restamp("2027-01-15T10:00:00+02:00"), "2027-01-15T08:00:00Z");
    }
}

//! The `AgentPolicy` resource (`chaperone.dev/v1alpha1`) as written by
//! people: serde types for YAML files (local mode) and the custom resource
//! (cluster mode). [`super::compile`] turns a spec into matchers.
//!
//! `AgentPolicy` is **cluster-scoped**. A policy decides what agents may do
//! anywhere in the cluster, so writing one needs cluster-level RBAC: an agent
//! (or a namespace admin) that can create objects in its own namespace can
//! never write or weaken the policy that guards it.

use std::collections::BTreeMap;
use std::fmt;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::schema::{FieldPath, Segment};
use super::{Action, RecordLevel};

/// What agents matched by `subjects` may do, as ordered rules.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaperone.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    plural = "agentpolicies",
    singular = "agentpolicy",
    shortname = "apol",
    category = "chaperone",
    status = "AgentPolicyStatus",
    derive = "PartialEq",
    doc = "What AI agents may do through chaperone: subjects, ordered rules, a default.",
    printcolumn = r#"{"name":"Default","type":"string","jsonPath":".spec.defaultAction"}"#,
    printcolumn = r#"{"name":"DryRun","type":"boolean","jsonPath":".spec.dryRun"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentPolicySpec {
    /// Who this policy applies to. A caller is selected when any entry
    /// matches; within one entry, every field that is set must match.
    pub subjects: Vec<Subject>,
    /// Ordered rules; the first rule that matches a request decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// The action when no rule matches. When left out, the policy abstains
    /// on requests none of its rules match, and the other policies that
    /// select the caller decide (if none does: deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<Action>,
    /// The record level when no rule matches: `Metadata` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_record: Option<RecordLevel>,
    /// The message for the agent when the default denies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_message: Option<String>,
    /// Record what this policy would deny, hold or mask, but enforce nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// How chaperone re-originates the agent's requests.
    #[serde(default, skip_serializing_if = "CredentialMode::is_default")]
    pub credential_mode: CredentialMode,
}

/// One way to select callers. Fields that are set must all match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    /// `NAMESPACE/NAME` globs, e.g. `agents/coder-*` or `ci-*/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// The caller's namespace (its pod's, else its service account's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<NamespaceSubject>,
    /// User name globs (a service account's user name is
    /// `system:serviceaccount:NS:NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Group globs; the caller matches when any of its groups matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Labels of the caller's kernel-attested pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<LabelSelector>,
}

/// Namespaces by name glob and/or by label selector (both must match when
/// both are set).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSubject {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One rule. A list that is left out (or empty) matches anything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Shown in decisions, denials, records and `policy explain`;
    /// `rules[N]` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Kubernetes verbs (`get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`, `proxy`), or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verbs: Vec<String>,
    /// API group globs; `""` is the core group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    /// `resource` or `resource/subresource` globs as RBAC writes them:
    /// `pods` (not its subresources), `pods/exec`, `pods/*`, `*/scale`, `*`
    /// (everything).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    /// Namespace globs. A rule that is not `allow` also matches list, watch
    /// and deletecollection across all namespaces, so listing everything
    /// cannot get around it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Object name globs. A rule that is not `allow` also matches list,
    /// watch and deletecollection without a name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Non-resource URL globs (`/version`, `/apis*`, `/healthz`). A rule with
    /// these matches only non-resource requests; any other rule only
    /// resource requests.
    #[serde(
        default,
        rename = "nonResourceURLs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub non_resource_urls: Vec<String>,
    /// For `pods/exec`: globs matched against the command line (words joined
    /// with spaces), its first word, and that word's base name. A rule with
    /// commands matches only requests that carry a command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// Globs matched against the executable path of the process that
    /// opened the agent's connection (`/proc/PID/exe`, read by chaperone
    /// when it accepted the connection): `/usr/bin/kubectl`. A rule with
    /// executables matches only requests whose process chaperone could
    /// read, so a connection that did not come through the redirect (or
    /// whose process exited at once) never matches it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executables: Vec<String>,
    pub action: Action,
    /// How much to record: `Metadata` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordLevel>,
    /// Told to the agent when this rule denies or holds a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For `approve`: how long a request is held waiting for a human
    /// (`30s`, `5m`, `1h`); 60 seconds unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_timeout: Option<String>,
}

pub use crate::identity::CredentialMode;

impl CredentialMode {
    fn is_default(&self) -> bool {
        *self == CredentialMode::Passthrough
    }
}

/// What chaperone says about a policy object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation in force (the last one accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_generation: Option<i64>,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339.
    #[serde(default)]
    pub last_transition_time: String,
}

// === impl Deserialize with messages that name the choices ===

/// Deserializes a closed set of words with an error that names them all,
/// e.g. `unknown action "allwo", expected one of allow, deny, mask, approve`.
/// The error is raised while the scalar is visited, so serde_yaml reports
/// the scalar's own line and field path.
fn one_of<'de, D, T: Copy>(
    deserializer: D,
    what: &'static str,
    choices: &'static [(&'static str, T)],
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Words<T: 'static> {
        what: &'static str,
        choices: &'static [(&'static str, T)],
    }
    impl<T: Copy> serde::de::Visitor<'_> for Words<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a {}", self.what)
        }
        fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<T, E> {
            self.choices
                .iter()
                .find(|(name, _)| *name == word)
                .map(|(_, value)| *value)
                .ok_or_else(|| {
                    let names: Vec<&str> = self.choices.iter().map(|(name, _)| *name).collect();
                    E::custom(format!(
                        "unknown {} \"{word}\", expected one of {}",
                        self.what,
                        names.join(", ")
                    ))
                })
        }
    }
    deserializer.deserialize_str(Words { what, choices })
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        one_of(
            deserializer,
            "action",
            &[
                ("allow", Action::Allow),
                ("deny", Action::Deny),
                ("mask", Action::Mask),
                ("approve", Action::Approve),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for RecordLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        one_of(
            deserializer,
            "record level",
            &[
                ("None", RecordLevel::None),
                ("Metadata", RecordLevel::Metadata),
                ("Request", RecordLevel::Request),
                ("RequestResponse", RecordLevel::RequestResponse),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for CredentialMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        one_of(
            deserializer,
            "credential mode",
            &[
                ("passthrough", CredentialMode::Passthrough),
                ("impersonate", CredentialMode::Impersonate),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for SelectorOperator {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        one_of(
            deserializer,
            "operator",
            &[
                ("In", SelectorOperator::In),
                ("NotIn", SelectorOperator::NotIn),
                ("Exists", SelectorOperator::Exists),
                ("DoesNotExist", SelectorOperator::DoesNotExist),
            ],
        )
    }
}

impl fmt::Display for SelectorOperator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

// === files ===

/// One `AgentPolicy` document of a YAML file, where it starts.
#[derive(Clone, Debug)]
pub struct PolicyDocument {
    pub policy: AgentPolicy,
    /// 1-based index of the document in its file.
    pub index: usize,
    /// 1-based line where the document starts.
    pub line: usize,
}

/// A problem of a YAML document, where it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct DocumentError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    pub message: String,
}

const API_VERSION: &str = "chaperone.dev/v1alpha1";
const KIND: &str = "AgentPolicy";

/// Reads every document of a (multi-document) YAML text as an `AgentPolicy`.
/// Empty documents are skipped. Each document yields its own result (its
/// first problem), so one bad document does not hide the others' errors.
pub fn parse_documents(text: &str) -> Vec<Result<PolicyDocument, DocumentError>> {
    check_documents(text)
        .into_iter()
        .map(|d| d.map_err(|mut errors| errors.swap_remove(0)))
        .collect()
}

/// [`parse_documents`] with every problem of each document: the CRD's
/// schema ([`super::schema`]) runs first, as the API server would run it,
/// then the document is read into the Rust types.
pub(crate) fn check_documents(text: &str) -> Vec<Result<PolicyDocument, Vec<DocumentError>>> {
    let starts = document_start_lines(text);
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let start = starts.get(i).copied().unwrap_or(1);
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(value) => value,
            Err(error) => {
                out.push(Err(vec![yaml_error(&error)]));
                // After a syntax error the rest of the stream is unreliable.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        out.push(check_document(text, i, start, value));
    }
    out
}

fn check_document(
    text: &str,
    i: usize,
    start: usize,
    value: serde_yaml::Value,
) -> Result<PolicyDocument, Vec<DocumentError>> {
    let at_start = |message: String| DocumentError {
        line: Some(start),
        column: None,
        message,
    };
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let kind = value.get("kind").and_then(|v| v.as_str());
    if api_version != Some(API_VERSION) || kind != Some(KIND) {
        return Err(vec![at_start(format!(
            "document {} is not an AgentPolicy: expected apiVersion: {API_VERSION} and \
             kind: {KIND}, found apiVersion: {} and kind: {}",
            i + 1,
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        ))]);
    }
    let located = |path: &FieldPath, message: String| {
        let (line, column) = locate(text, i, path).unwrap_or((start, 0));
        DocumentError {
            line: Some(line),
            column: (column > 0).then_some(column),
            message: if path.0.is_empty() {
                message
            } else {
                format!("{path}: {message}")
            },
        }
    };
    let mut errors = Vec::new();
    match value.get("metadata").and_then(|m| m.get("name")) {
        None => errors.push(at_start(format!(
            "document {}: metadata.name is required",
            i + 1
        ))),
        Some(name) => {
            let why = match name.as_str() {
                None => Err("metadata.name is not a string".to_owned()),
                Some(name) => super::schema::check_name(name).map_err(|e| e.to_string()),
            };
            if let Err(why) = why {
                errors.push(located(&FieldPath::parse("metadata.name"), why));
            }
        }
    }
    match serde_json::to_value(&value) {
        Ok(json) => {
            for e in super::schema::validate(super::schema::agent_policy_schema(), &json) {
                errors.push(located(&e.path, e.message));
            }
        }
        Err(e) => errors.push(at_start(format!("not a JSON-compatible document: {e}"))),
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // Deserialize again from the text of this document so errors carry
    // line numbers (a `Value` has none).
    let document = serde_yaml::Deserializer::from_str(text)
        .nth(i)
        .expect("the document was just read");
    let policy = AgentPolicy::deserialize(document).map_err(|e| vec![yaml_error(&e)])?;
    Ok(PolicyDocument {
        policy,
        index: i + 1,
        line: start,
    })
}

/// The line and column (1-based) where the node at `path` of the `i`th
/// document starts; for a path that is not there, its nearest ancestor.
pub(crate) fn locate(text: &str, i: usize, path: &FieldPath) -> Option<(usize, usize)> {
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

    const HERE: &str = "\u{0}chaperone: here";

    /// Walks down `path`; at its end (or where it stops existing) fails
    /// with [`HERE`], which serde_yaml marks with the node's position.
    struct Probe<'p>(&'p [Segment]);

    impl<'de> DeserializeSeed<'de> for Probe<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Probe<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("anything")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            if let Some((Segment::Key(want), rest)) = self.0.split_first() {
                while let Some(key) = map.next_key::<String>()? {
                    if &key == want {
                        return map.next_value_seed(Probe(rest));
                    }
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Err(serde::de::Error::custom(HERE))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            if let Some((Segment::Index(want), rest)) = self.0.split_first() {
                for _ in 0..*want {
                    if seq.next_element::<IgnoredAny>()?.is_none() {
                        return Err(serde::de::Error::custom(HERE));
                    }
                }
                if seq.next_element_seed(Probe(rest))?.is_some() {
                    return Ok(());
                }
            }
            Err(serde::de::Error::custom(HERE))
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
            Err(E::custom(HERE))
        }
    }

    let document = serde_yaml::Deserializer::from_str(text).nth(i)?;
    let error = Probe(&path.0).deserialize(document).err()?;
    if !error.to_string().contains(HERE) {
        return None;
    }
    error.location().map(|l| (l.line(), l.column()))
}

fn yaml_error(error: &serde_yaml::Error) -> DocumentError {
    let line = error.location().map(|l| l.line());
    // serde_yaml appends " at line L column C"; the line is reported apart.
    let mut message = error.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    DocumentError {
        line,
        column: error.location().map(|l| l.column()),
        message,
    }
}

/// The first content line (1-based) of each YAML document, splitting at
/// `---` lines as the YAML stream does; leading blank lines and comments
/// before the first `---` are not a document.
fn document_start_lines(text: &str) -> Vec<usize> {
    // (line where the segment starts, its first content line)
    let mut segments: Vec<(usize, Option<usize>)> = vec![(1, None)];
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if let Some(rest) = line.strip_prefix("---") {
            segments.push((line_no, None));
            // `--- key: value` puts content on the marker line itself.
            let rest = rest.trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                segments.last_mut().expect("just pushed").1 = Some(line_no);
            }
            continue;
        }
        let trimmed = line.trim();
        let segment = segments.last_mut().expect("never empty");
        if segment.1.is_none() && !trimmed.is_empty() && !trimmed.starts_with('#') {
            segment.1 = Some(line_no);
        }
    }
    if segments.len() > 1 && segments[0].1.is_none() {
        segments.remove(0);
    }
    segments
        .into_iter()
        .map(|(start, content)| content.unwrap_or(start))
        .collect()
}

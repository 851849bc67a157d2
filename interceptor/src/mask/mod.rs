//! Masking of secrets in what agents receive.
//!
//! [`MaskRules`] (configuration, from the policy/config YAML) compile once
//! into a [`Masker`], cheap to clone and share. Per request the proxy asks:
//!
//! 1. Before sending upstream: [`Masker::target`]. When it is `Some`, drop
//!    `Accept-Encoding` (the API server gzips large responses; masking
//!    reads identity bodies, and a gzipped one is refused as not JSON).
//!    When it is a JSON target ([`Target::is_json`]), rewrite the Accept
//!    header with [`negotiate_accept`]; a [`NotAcceptable`] becomes its 406
//!    [`NotAcceptable::status`] and the request is not sent.
//! 2. On the response head: [`Masker::plan`] with the response content type.
//!    `Ok(None)`: forward unchanged. `Ok(Some(mask))`: drop `Content-Length`
//!    (sizes change) and pass every body chunk through
//!    [`ResponseMask::push`], then [`ResponseMask::finish`] at the end of the
//!    body. `Err(e)`: answer [`MaskError::status`] (502) instead of the body.
//! 3. A [`MaskError`] from `push` or `finish` means the rest of the body
//!    cannot be masked: stop forwarding (answer 502 when nothing has been
//!    sent yet, otherwise reset the stream). Never forward the raw rest.
//! 4. Watches need nothing special: each event is forwarded as soon as its
//!    bytes have been pushed (only a string being masked is held back).
//!    Logs are forwarded a line at a time. For exec/attach, create one
//!    [`Masker::exec_output`] per output stream (stdout, stderr, or the
//!    tty stream) and push each frame's payload; call
//!    [`ResponseMask::flush`] when the upstream goes idle so an interactive
//!    prompt without a newline still shows.
//! 5. [`ResponseMask::stats`] afterwards: counts for metrics and the audit
//!    annotation [`AUDIT_ANNOTATION`] ([`MaskStats::annotation`]).
//!
//! What is masked:
//! - Secrets: every `data` and `stringData` value, and inside the
//!   `kubectl.kubernetes.io/last-applied-configuration` annotation the same
//!   values (the annotation stays valid JSON; one that does not parse is
//!   replaced whole). In get, list (`items[*]`), watch events (`object`) and
//!   Table rows (`rows[*].object`, metadata-only or full).
//! - ConfigMaps: pattern rules on `data` values and on decoded `binaryData`.
//! - Pods, pod templates, ReplicationControllers, Deployments, ReplicaSets,
//!   StatefulSets, DaemonSets, Jobs, CronJobs: container `env[*].value`
//!   (whole when the name looks sensitive, pattern rules otherwise).
//! - Logs and exec/attach output: pattern rules per line, PEM blocks across
//!   lines.
//!
//! The markers are described in [`marker`]. Bytes that are not masked are
//! forwarded unchanged, byte for byte.

mod accept;
mod json;
mod lines;
pub mod marker;
mod patterns;
mod scan;
mod schema;
mod transform;
pub mod writeback;

use std::collections::BTreeSet;
use std::sync::Arc;

use regex::bytes::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::kstatus::Status;
use crate::request::RequestInfo;

pub use accept::{NotAcceptable, negotiate_accept};
pub use transform::response_transform;

use json::{Framing, JsonMask};
use lines::LineMask;
use patterns::Patterns;
use schema::Schema;

/// The audit annotation that reports what was masked in a response.
pub const AUDIT_ANNOTATION: &str = "chaperone.dev/masked";

/// Names of the built-in pattern rules, in the order they apply.
pub fn builtin_pattern_names() -> impl Iterator<Item = &'static str> {
    patterns::BUILTIN.iter().map(|(name, _)| *name)
}

// === MaskRules ===

/// What to mask, as written in configuration (camelCase YAML/JSON):
///
/// ```yaml
/// secrets: true          # Secret data/stringData and last-applied
/// configMaps: true       # pattern rules on ConfigMap data
/// env: true              # container env values in pods and workloads
/// logs: true             # pattern rules on pods/log
/// exec: true             # pattern rules on exec/attach output
/// builtins: []           # built-in rules to use; empty: all of them
/// disable: [bearer-token]
/// patterns:
///   - name: internal-token
///     regex: 'itk_[A-Za-z0-9]{32}'
/// sensitiveEnvNames: '(?i)passw|secret|token'
/// maxValueBytes: 2097152
/// maxLineBytes: 65536
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MaskRules {
    pub secrets: bool,
    pub config_maps: bool,
    pub env: bool,
    pub logs: bool,
    pub exec: bool,
    /// Built-in rules to use ([`builtin_pattern_names`]); empty means all.
    pub builtins: Vec<String>,
    /// Built-in rules to leave out.
    pub disable: Vec<String>,
    /// Extra rules. A capture group named `secret` limits the replacement
    /// to that group.
    pub patterns: Vec<PatternRule>,
    /// Env vars whose name matches this regex have their value masked
    /// whole. `None`: the built-in list (password, secret, token, keys,
    /// credentials, auth).
    pub sensitive_env_names: Option<String>,
    /// Largest string value read for masking (ConfigMap values, env values,
    /// the last-applied annotation); a longer one is replaced whole.
    pub max_value_bytes: usize,
    /// Longest log or exec line held back before it is forwarded in pieces.
    pub max_line_bytes: usize,
}

/// A named regex rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternRule {
    pub name: String,
    pub regex: String,
}

impl Default for MaskRules {
    fn default() -> Self {
        Self {
            secrets: true,
            config_maps: true,
            env: true,
            logs: true,
            exec: true,
            builtins: Vec::new(),
            disable: Vec::new(),
            patterns: Vec::new(),
            sensitive_env_names: None,
            max_value_bytes: 2 << 20,
            max_line_bytes: 64 << 10,
        }
    }
}

/// Invalid masking configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaskConfigError {
    #[error(
        "unknown built-in mask pattern {0:?}; the built-ins are: pem-private-key, aws-access-key-id, \
         aws-secret-access-key, gcp-api-key, azure-account-key, github-token, slack-token, jwt, \
         bearer-token, password-in-url, password-assignment"
    )]
    UnknownBuiltin(String),
    #[error("mask pattern {name:?} is not a valid regex: {reason}")]
    Pattern { name: String, reason: String },
    #[error("sensitiveEnvNames is not a valid regex: {0}")]
    EnvNames(String),
    #[error("mask limit {name} is {value}; it must be at least {min}")]
    Limit {
        name: &'static str,
        value: usize,
        min: usize,
    },
}

// === Masker ===

/// Bounds on what masking holds in memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_value_bytes: usize,
    pub max_line_bytes: usize,
    /// Tail of an over-long line kept for the next piece.
    pub carry_bytes: usize,
}

pub(crate) struct Compiled {
    rules: MaskRules,
    schema: Schema,
    patterns: Patterns,
    env_names: Regex,
    limits: Limits,
    /// Whether the PEM rule is on (PEM blocks across log lines).
    pem_blocks: bool,
}

/// The compiled rules; clone freely (an `Arc` inside).
#[derive(Clone)]
pub struct Masker {
    compiled: Arc<Compiled>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("rules", &self.compiled.rules)
            .finish_non_exhaustive()
    }
}

/// What kind of response a request gets, as far as masking goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Secrets: `data`/`stringData` values and last-applied.
    Secret,
    /// ConfigMaps: pattern rules on `data`/`binaryData` and last-applied.
    ConfigMap,
    /// Pods, pod templates and workloads: container env values.
    Workload,
    /// `pods/log`: pattern rules per line.
    PodLog,
    /// `pods/exec`, `pods/attach` output streams: pattern rules.
    ExecOutput,
}

impl Target {
    /// Whether the response is JSON (and the Accept header must be
    /// negotiated with [`negotiate_accept`]).
    pub fn is_json(self) -> bool {
        matches!(self, Self::Secret | Self::ConfigMap | Self::Workload)
    }
}

impl Masker {
    pub fn new(rules: &MaskRules) -> Result<Self, MaskConfigError> {
        const MIN_VALUE: usize = 1 << 10;
        const MIN_LINE: usize = 1 << 10;
        if rules.max_value_bytes < MIN_VALUE {
            return Err(MaskConfigError::Limit {
                name: "maxValueBytes",
                value: rules.max_value_bytes,
                min: MIN_VALUE,
            });
        }
        if rules.max_line_bytes < MIN_LINE {
            return Err(MaskConfigError::Limit {
                name: "maxLineBytes",
                value: rules.max_line_bytes,
                min: MIN_LINE,
            });
        }
        let patterns = Patterns::compile(&rules.builtins, &rules.disable, &rules.patterns)?;
        let env_names = RegexBuilder::new(
            rules
                .sensitive_env_names
                .as_deref()
                .unwrap_or(patterns::SENSITIVE_ENV_NAMES),
        )
        .build()
        .map_err(|e| MaskConfigError::EnvNames(e.to_string()))?;
        let pem_blocks = (0..patterns.len()).any(|i| patterns.rule_name(i) == "pem-private-key");
        let limits = Limits {
            max_value_bytes: rules.max_value_bytes,
            max_line_bytes: rules.max_line_bytes,
            carry_bytes: (rules.max_line_bytes / 4).min(4 << 10),
        };
        Ok(Self {
            compiled: Arc::new(Compiled {
                rules: rules.clone(),
                schema: Schema::kubernetes(),
                patterns,
                env_names,
                limits,
                pem_blocks,
            }),
        })
    }

    /// Which masking the response to `request` needs, if any. Decided on the
    /// request alone, so the proxy can negotiate Accept before sending it.
    pub fn target(&self, request: &RequestInfo) -> Option<Target> {
        if !request.is_resource_request {
            return None;
        }
        let rules = &self.compiled.rules;
        let object = matches!(
            request.subresource.as_str(),
            "" | "status" | "ephemeralcontainers"
        );
        let target = match (
            request.api_group.as_str(),
            request.resource.as_str(),
            request.subresource.as_str(),
        ) {
            ("", "secrets", "") => Target::Secret,
            ("", "configmaps", "") => Target::ConfigMap,
            ("", "pods", "log") => Target::PodLog,
            ("", "pods", "exec" | "attach") => Target::ExecOutput,
            ("", "pods" | "podtemplates" | "replicationcontrollers", _)
            | ("apps", "deployments" | "replicasets" | "statefulsets" | "daemonsets", _)
            | ("batch", "jobs" | "cronjobs", _)
                if object =>
            {
                Target::Workload
            }
            _ => return None,
        };
        let enabled = match target {
            Target::Secret => rules.secrets,
            Target::ConfigMap => rules.config_maps,
            Target::Workload => rules.env,
            Target::PodLog => rules.logs,
            Target::ExecOutput => rules.exec,
        };
        enabled.then_some(target)
    }

    /// The transform for the response to `request`, given the response's
    /// `Content-Type`. `Ok(None)`: nothing to mask. `Err`: the response
    /// must be masked but is not JSON (protobuf, YAML, ...): refuse it with
    /// [`MaskError::status`].
    pub fn plan(
        &self,
        request: &RequestInfo,
        content_type: Option<&str>,
    ) -> Result<Option<ResponseMask>, MaskError> {
        let Some(target) = self.target(request) else {
            return Ok(None);
        };
        if target.is_json() {
            if let Some(content_type) = content_type
                && !is_json(content_type)
            {
                return Err(MaskError::UnsupportedContentType {
                    content_type: content_type.to_owned(),
                });
            }
            let framing = if request.verb == "watch" {
                Framing::Stream
            } else {
                Framing::Single
            };
            return Ok(Some(self.json(target, framing)));
        }
        Ok(Some(ResponseMask {
            target,
            inner: Inner::Lines(LineMask::new(Arc::clone(&self.compiled))),
        }))
    }

    /// A transform for one JSON response (`watch`: a stream of events).
    pub fn json_response(&self, target: Target, watch: bool) -> Option<ResponseMask> {
        let framing = if watch {
            Framing::Stream
        } else {
            Framing::Single
        };
        target.is_json().then(|| self.json(target, framing))
    }

    /// A transform for one exec/attach output stream (stdout, stderr, tty).
    pub fn exec_output(&self) -> ResponseMask {
        ResponseMask {
            target: Target::ExecOutput,
            inner: Inner::Lines(LineMask::new(Arc::clone(&self.compiled))),
        }
    }

    /// Pattern rules on one text, for callers holding a whole value (for
    /// example a request body recorded for audit). `None` when nothing matched.
    pub fn mask_text(&self, text: &[u8]) -> Option<Vec<u8>> {
        let mut hits = Vec::new();
        self.compiled.patterns.hits(text, &mut hits);
        if hits.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(text.len());
        self.compiled.patterns.write_masked(text, &hits, &mut out);
        Some(out)
    }

    fn json(&self, target: Target, framing: Framing) -> ResponseMask {
        let roots = self.compiled.schema.roots;
        let root = match target {
            Target::Secret => roots.secret,
            Target::ConfigMap => roots.config_map,
            _ => roots.workload,
        };
        ResponseMask {
            target,
            inner: Inner::Json(Box::new(JsonMask::new(
                Arc::clone(&self.compiled),
                root,
                framing,
            ))),
        }
    }
}

fn is_json(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
}

// === ResponseMask ===

/// The streaming transform of one response body (or one exec stream).
pub struct ResponseMask {
    target: Target,
    inner: Inner,
}

enum Inner {
    Json(Box<JsonMask>),
    Lines(LineMask),
}

impl std::fmt::Debug for ResponseMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseMask")
            .field("target", &self.target)
            .field("stats", self.stats())
            .finish_non_exhaustive()
    }
}

impl ResponseMask {
    pub fn target(&self) -> Target {
        self.target
    }

    /// Masks one chunk of the body, appending what may be forwarded to `out`
    /// (possibly nothing yet: a value or line being read is held back).
    /// After an error every further call fails the same way.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        match &mut self.inner {
            Inner::Json(json) => json.push(chunk, out),
            Inner::Lines(lines) => {
                lines.push(chunk, out);
                Ok(())
            }
        }
    }

    /// Text streams: forwards the held-back partial line (masked). Call when
    /// the upstream is idle. JSON: nothing to do.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if let Inner::Lines(lines) = &mut self.inner {
            lines.flush(out);
        }
    }

    /// Text streams: whether a partial line is held back, waiting for its
    /// end or a [`ResponseMask::flush`].
    pub fn holds_back(&self) -> bool {
        match &self.inner {
            Inner::Lines(lines) => lines.holds_back(),
            Inner::Json(_) => false,
        }
    }

    /// The end of the body: appends what was held back. An error means the
    /// body ended in the middle of a JSON document.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        match &mut self.inner {
            Inner::Json(json) => json.finish(out),
            Inner::Lines(lines) => {
                lines.finish(out);
                Ok(())
            }
        }
    }

    pub fn stats(&self) -> &MaskStats {
        match &self.inner {
            Inner::Json(json) => json.stats(),
            Inner::Lines(lines) => lines.stats(),
        }
    }
}

// === MaskStats ===

/// Most field names kept in [`MaskStats::fields`].
pub const MAX_FIELDS: usize = 32;

/// What a transform masked so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaskStats {
    /// Values replaced (a Secret value, a ConfigMap value or log line with
    /// at least one pattern hit, an env value).
    pub values_masked: u64,
    /// Pattern rule hits, inside those values.
    pub pattern_matches: u64,
    /// Values over the size limit, replaced whole.
    pub oversized_values: u64,
    /// Log/exec lines dropped inside PEM private key blocks.
    pub lines_dropped: u64,
    /// Which fields were masked (`data.password`, `env.DB_PASSWORD`,
    /// `metadata.annotations.kubectl.kubernetes.io/last-applied-configuration`,
    /// or for text the rule names), at most [`MAX_FIELDS`].
    pub fields: BTreeSet<String>,
    /// More distinct fields were masked than `fields` holds.
    pub fields_truncated: bool,
}

impl MaskStats {
    pub fn is_empty(&self) -> bool {
        self.values_masked == 0 && self.lines_dropped == 0
    }

    /// The value of the [`AUDIT_ANNOTATION`], `None` when nothing was masked:
    /// `values=3 patterns=0 fields=data.password,data.url,...`.
    pub fn annotation(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let mut value = format!(
            "values={} patterns={}",
            self.values_masked, self.pattern_matches
        );
        if self.oversized_values > 0 {
            value.push_str(&format!(" oversized={}", self.oversized_values));
        }
        if self.lines_dropped > 0 {
            value.push_str(&format!(" pemLines={}", self.lines_dropped));
        }
        if !self.fields.is_empty() {
            value.push_str(" fields=");
            value.push_str(&self.fields.iter().cloned().collect::<Vec<_>>().join(","));
            if self.fields_truncated {
                value.push_str(",...");
            }
        }
        Some(value)
    }

    pub(crate) fn wants_field(&self) -> bool {
        !self.fields_truncated
    }

    pub(crate) fn add_field(&mut self, field: &str) {
        if self.fields.contains(field) {
            return;
        }
        if self.fields.len() < MAX_FIELDS {
            self.fields.insert(field.to_owned());
        } else {
            self.fields_truncated = true;
        }
    }

    /// Adds the counts of an embedded document.
    pub(crate) fn add_counts(&mut self, nested: &MaskStats) {
        self.values_masked += nested.values_masked;
        self.pattern_matches += nested.pattern_matches;
        self.oversized_values += nested.oversized_values;
        self.lines_dropped += nested.lines_dropped;
    }

    /// Adds the fields of an embedded document found at `prefix`, as
    /// `prefix[field]`.
    pub(crate) fn merge_fields(&mut self, nested: &MaskStats, prefix: &str) {
        let mut field = String::new();
        for nested_field in &nested.fields {
            field.clear();
            field.push_str(prefix);
            field.push('[');
            field.push_str(nested_field);
            field.push(']');
            self.add_field(&field);
        }
        self.fields_truncated |= nested.fields_truncated;
    }

    /// Zeroes the counts for the next embedded document, keeping the fields
    /// seen so far (they are merged into the response's fields, which only
    /// grow).
    pub(crate) fn reset_counts(&mut self) {
        self.values_masked = 0;
        self.pattern_matches = 0;
        self.oversized_values = 0;
        self.lines_dropped = 0;
    }
}

// === MaskError ===

/// A response that must be masked and cannot be: the proxy answers
/// [`MaskError::status`] (502) and never forwards the raw body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error(
        "the API server's response is not valid JSON at byte {offset} ({reason}); \
         chaperone must mask it and does not forward what it cannot read"
    )]
    InvalidJson { offset: u64, reason: &'static str },
    #[error(
        "the API server's response nests JSON deeper than {limit} levels at byte {offset}; \
         chaperone must mask it and does not forward what it cannot read"
    )]
    TooDeep { offset: u64, limit: usize },
    #[error(
        "the API server's response ended in the middle of a JSON document after {offset} bytes; \
         the rest was not forwarded"
    )]
    Truncated { offset: u64 },
    #[error(
        "the API server answered {content_type:?}, but chaperone masks this resource and can \
         only read JSON; retry with Accept: application/json"
    )]
    UnsupportedContentType { content_type: String },
}

impl MaskError {
    /// The Kubernetes `Status` (502) for the client.
    pub fn status(&self) -> Status {
        Status::bad_gateway(self.to_string())
    }
}

#[cfg(test)]
mod tests;

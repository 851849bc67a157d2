//! Policies compiled into matchers, and their evaluation. Compilation
//! validates everything a schema cannot (patterns, selectors, durations,
//! rule shapes) and reports it with the field path; evaluation then only
//! compares strings and never allocates, apart from cloning `Arc`s into the
//! [`Decision`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use super::glob::Glob;
use super::spec::{AgentPolicy, CredentialMode, LabelSelector, SelectorOperator, Subject};
use super::{Action, Decision, PolicyInput, RecordLevel};

/// Verbs a resource request can carry.
pub(crate) const RESOURCE_VERBS: [&str; 9] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
];
/// Verbs a non-resource request can carry (lowercased HTTP methods).
const NON_RESOURCE_VERBS: [&str; 7] = ["get", "head", "post", "put", "patch", "delete", "options"];
/// Verbs that may act on many objects at once, across names and, without a
/// namespace, across namespaces.
const COLLECTION_VERBS: [&str; 3] = ["list", "watch", "deletecollection"];
/// How long an `approve` rule holds a request unless it says otherwise.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(60);

/// A policy that failed to compile: which policy, where, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    pub policy: String,
    /// Field path, e.g. `spec.rules[2].holdTimeout`.
    pub path: String,
    pub message: String,
}

// === compiled types ===

/// What a matched rule (or a default) decides.
#[derive(Debug)]
struct Outcome {
    action: Action,
    record: RecordLevel,
    rule: Arc<str>,
    message: Option<Arc<str>>,
    hold_timeout: Option<Duration>,
}

#[derive(Debug)]
struct CompiledPolicy {
    name: Arc<str>,
    generation: Option<i64>,
    dry_run: bool,
    credential_mode: CredentialMode,
    subjects: Vec<CompiledSubject>,
    rules: Vec<CompiledRule>,
    /// `None`: the policy abstains where no rule matches.
    default: Option<Outcome>,
}

#[derive(Debug, Default)]
struct CompiledSubject {
    service_accounts: Vec<(Glob, Glob)>,
    namespace_names: Vec<Glob>,
    namespace_selector: Option<Selector>,
    users: Vec<Glob>,
    groups: Vec<Glob>,
    pod_labels: Option<Selector>,
}

#[derive(Debug)]
struct Selector {
    match_labels: Vec<(Box<str>, Box<str>)>,
    expressions: Vec<(Box<str>, SelectorOperator, Vec<Box<str>>)>,
}

#[derive(Debug)]
struct CompiledRule {
    /// `None`: any verb. Bits of [`RESOURCE_VERBS`], or for a non-resource
    /// rule of [`NON_RESOURCE_VERBS`].
    verbs: Option<u16>,
    /// The verbs as written, for `policy explain`.
    verb_names: Vec<Box<str>>,
    api_groups: Option<Vec<Glob>>,
    resources: Option<Vec<ResourcePattern>>,
    namespaces: Option<Vec<Glob>>,
    names: Option<Vec<Glob>>,
    /// `Some`: a non-resource rule.
    urls: Option<Vec<Glob>>,
    commands: Option<Vec<Glob>>,
    /// Globs on the calling process's executable (`Rule::executables`).
    executables: Option<Vec<Glob>>,
    outcome: Outcome,
}

#[derive(Debug)]
struct ResourcePattern {
    source: Box<str>,
    /// `*`: every resource and subresource.
    everything: bool,
    resource: Glob,
    /// `None`: only the resource itself, no subresource.
    subresource: Option<Glob>,
}

/// Why a rule did not match a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mismatch {
    ResourceRuleOnNonResource,
    NonResourceRuleOnResource,
    Verb,
    ApiGroup,
    Resource,
    Namespace,
    Name,
    Url,
    NoCommand,
    Command,
    NoProcess,
    Executable,
}

// === compile ===

struct Compiler<'a> {
    policy: &'a str,
    errors: Vec<PolicyError>,
}

impl Compiler<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError {
            policy: self.policy.to_owned(),
            path: path.into(),
            message: message.into(),
        });
    }

    fn globs(list: &[String]) -> Option<Vec<Glob>> {
        (!list.is_empty()).then(|| list.iter().map(|p| Glob::new(p)).collect())
    }

    fn selector(&mut self, path: &str, selector: &LabelSelector) -> Selector {
        let mut expressions = Vec::new();
        for (i, req) in selector.match_expressions.iter().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            match req.operator {
                SelectorOperator::In | SelectorOperator::NotIn if req.values.is_empty() => self
                    .error(
                        format!("{at}.values"),
                        format!(
                            "operator {} needs at least one value; list the values of \"{}\" to match",
                            req.operator, req.key
                        ),
                    ),
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !req.values.is_empty() =>
                {
                    self.error(
                        format!("{at}.values"),
                        format!(
                            "operator {} takes no values; remove them or use In/NotIn",
                            req.operator
                        ),
                    )
                }
                _ => {}
            }
            if req.key.is_empty() {
                self.error(format!("{at}.key"), "the label key is empty");
            }
            expressions.push((
                req.key.as_str().into(),
                req.operator,
                req.values.iter().map(|v| v.as_str().into()).collect(),
            ));
        }
        Selector {
            match_labels: selector
                .match_labels
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            expressions,
        }
    }

    fn subject(&mut self, i: usize, subject: &Subject) -> CompiledSubject {
        let path = format!("spec.subjects[{i}]");
        if subject == &Subject::default() {
            self.error(
                &path,
                "this subject selects nobody; set serviceAccounts, namespaces, users, groups or podLabels",
            );
        }
        let mut service_accounts = Vec::new();
        for (j, pattern) in subject.service_accounts.iter().enumerate() {
            match pattern.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    service_accounts.push((Glob::new(ns), Glob::new(name)));
                }
                _ => self.error(
                    format!("{path}.serviceAccounts[{j}]"),
                    format!(
                        "\"{pattern}\" is not NAMESPACE/NAME; write e.g. \"agents/{}\" or \"*/{}\"",
                        pattern.trim_matches('/'),
                        pattern.trim_matches('/')
                    ),
                ),
            }
        }
        let mut compiled = CompiledSubject {
            service_accounts,
            users: Self::globs(&subject.users).unwrap_or_default(),
            groups: Self::globs(&subject.groups).unwrap_or_default(),
            ..CompiledSubject::default()
        };
        if let Some(ns) = &subject.namespaces {
            if ns.names.is_empty() && ns.selector.is_none() {
                self.error(
                    format!("{path}.namespaces"),
                    "set names, selector or both (an empty namespaces entry selects nobody)",
                );
            }
            compiled.namespace_names = Self::globs(&ns.names).unwrap_or_default();
            compiled.namespace_selector = ns
                .selector
                .as_ref()
                .map(|s| self.selector(&format!("{path}.namespaces.selector"), s));
        }
        compiled.pod_labels = subject
            .pod_labels
            .as_ref()
            .map(|s| self.selector(&format!("{path}.podLabels"), s));
        compiled
    }

    fn rule(
        &mut self,
        i: usize,
        rule: &super::spec::Rule,
        names: &mut BTreeSet<String>,
    ) -> CompiledRule {
        let path = format!("spec.rules[{i}]");
        let name = rule.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
        if rule.name.as_deref() == Some("default") {
            self.error(
                format!("{path}.name"),
                "\"default\" names the policy's default; choose another rule name",
            );
        }
        if !names.insert(name.clone()) {
            self.error(
                format!("{path}.name"),
                format!(
                    "rule name \"{name}\" is used twice; rule names must be unique in a policy"
                ),
            );
        }
        let non_resource = !rule.non_resource_urls.is_empty();
        let allowed_verbs: &[&str] = if non_resource {
            &NON_RESOURCE_VERBS
        } else {
            &RESOURCE_VERBS
        };
        for (j, verb) in rule.verbs.iter().enumerate() {
            if verb != "*" && !allowed_verbs.contains(&verb.as_str()) {
                self.error(
                    format!("{path}.verbs[{j}]"),
                    format!(
                        "unknown verb \"{verb}\", expected one of {}{}",
                        allowed_verbs.join(", "),
                        if non_resource {
                            " (the lowercased HTTP method of a non-resource request)"
                        } else {
                            ", or *"
                        }
                    ),
                );
            }
        }
        if non_resource {
            for (field, set) in [
                ("apiGroups", !rule.api_groups.is_empty()),
                ("resources", !rule.resources.is_empty()),
                ("namespaces", !rule.namespaces.is_empty()),
                ("names", !rule.names.is_empty()),
                ("commands", !rule.commands.is_empty()),
            ] {
                if set {
                    self.error(
                        format!("{path}.{field}"),
                        format!(
                            "a rule with nonResourceURLs matches only non-resource requests and cannot have {field}; split it into two rules"
                        ),
                    );
                }
            }
            for (j, url) in rule.non_resource_urls.iter().enumerate() {
                if !url.starts_with('/') && url != "*" {
                    self.error(
                        format!("{path}.nonResourceURLs[{j}]"),
                        format!("\"{url}\" is not a URL path; write e.g. \"/{url}\""),
                    );
                }
            }
        }
        let mut resources = Vec::new();
        for (j, pattern) in rule.resources.iter().enumerate() {
            let (resource, subresource) = match pattern.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (pattern.as_str(), None),
            };
            if resource.is_empty() || subresource.is_some_and(|s| s.is_empty() || s.contains('/')) {
                self.error(
                    format!("{path}.resources[{j}]"),
                    format!(
                        "\"{pattern}\" is not RESOURCE or RESOURCE/SUBRESOURCE (e.g. pods, pods/exec, pods/*, *)"
                    ),
                );
                continue;
            }
            resources.push(ResourcePattern {
                source: pattern.as_str().into(),
                everything: pattern == "*",
                resource: Glob::new(resource),
                subresource: subresource.map(Glob::new),
            });
        }
        let hold_timeout = match (&rule.hold_timeout, rule.action) {
            (None, Action::Approve) => Some(DEFAULT_HOLD_TIMEOUT),
            (None, _) => None,
            (Some(text), Action::Approve) => match parse_duration(text) {
                Ok(d) => Some(d),
                Err(why) => {
                    self.error(format!("{path}.holdTimeout"), why);
                    None
                }
            },
            (Some(_), action) => {
                self.error(
                    format!("{path}.holdTimeout"),
                    format!("holdTimeout applies to action approve only, this rule's action is {action}; remove it"),
                );
                None
            }
        };
        CompiledRule {
            verbs: (!rule.verbs.is_empty() && !rule.verbs.iter().any(|v| v == "*")).then(|| {
                rule.verbs
                    .iter()
                    .fold(0, |mask, verb| mask | verb_bit(allowed_verbs, verb))
            }),
            verb_names: rule.verbs.iter().map(|v| v.as_str().into()).collect(),
            api_groups: Self::globs(&rule.api_groups),
            resources: (!resources.is_empty()).then_some(resources),
            namespaces: Self::globs(&rule.namespaces),
            names: Self::globs(&rule.names),
            urls: Self::globs(&rule.non_resource_urls),
            commands: Self::globs(&rule.commands),
            executables: Self::globs(&rule.executables),
            outcome: Outcome {
                action: rule.action,
                record: rule.record.unwrap_or_default(),
                rule: name.into(),
                message: rule.message.as_deref().map(Arc::from),
                hold_timeout,
            },
        }
    }
}

/// `30s`, `5m`, `1h30m`, `90` (seconds): Go-style durations, whole units.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("\"{text}\" is not a duration; write e.g. \"30s\", \"5m\" or \"1h30m\"");
    let text = text.trim();
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

impl CompiledPolicy {
    fn compile(policy: &AgentPolicy) -> Result<CompiledPolicy, Vec<PolicyError>> {
        let name = policy.metadata.name.clone().unwrap_or_default();
        let mut c = Compiler {
            policy: &name,
            errors: Vec::new(),
        };
        if name.is_empty() {
            c.error("metadata.name", "a policy needs a name");
        }
        let spec = &policy.spec;
        if spec.subjects.is_empty() {
            c.error(
                "spec.subjects",
                "no subjects: this policy would select nobody; add e.g. `- serviceAccounts: [\"agents/*\"]`",
            );
        }
        let subjects = spec
            .subjects
            .iter()
            .enumerate()
            .map(|(i, s)| c.subject(i, s))
            .collect();
        let mut names = BTreeSet::new();
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| c.rule(i, r, &mut names))
            .collect();
        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        Ok(CompiledPolicy {
            name: name.as_str().into(),
            generation: policy.metadata.generation,
            dry_run: spec.dry_run,
            credential_mode: spec.credential_mode,
            subjects,
            rules,
            default: spec.default_action.map(|action| Outcome {
                action,
                record: spec.default_record.unwrap_or_default(),
                rule: "default".into(),
                message: spec.default_message.as_deref().map(Arc::from),
                hold_timeout: (action == Action::Approve).then_some(DEFAULT_HOLD_TIMEOUT),
            }),
        })
    }
}

// === matching ===

fn any_glob(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|g| g.matches(text))
}

impl Selector {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(&**k).is_some_and(|have| **have == **v))
            && self.expressions.iter().all(|(key, op, values)| {
                let have = labels.get(&**key);
                match op {
                    SelectorOperator::In => have.is_some_and(|h| values.iter().any(|v| **v == **h)),
                    SelectorOperator::NotIn => {
                        have.is_none_or(|h| values.iter().all(|v| **v != **h))
                    }
                    SelectorOperator::Exists => have.is_some(),
                    SelectorOperator::DoesNotExist => have.is_none(),
                }
            })
    }
}

impl CompiledSubject {
    fn matches(&self, input: &PolicyInput<'_>) -> bool {
        let caller = input.caller;
        if !self.service_accounts.is_empty() {
            let sa = caller.service_account().or_else(|| {
                caller
                    .pod
                    .as_ref()
                    .filter(|p| !p.service_account.is_empty())
                    .map(|p| (p.namespace.as_str(), p.service_account.as_str()))
            });
            let Some((ns, name)) = sa else { return false };
            if !self
                .service_accounts
                .iter()
                .any(|(ns_glob, name_glob)| ns_glob.matches(ns) && name_glob.matches(name))
            {
                return false;
            }
        }
        if !self.namespace_names.is_empty() || self.namespace_selector.is_some() {
            let Some(ns) = input.caller_namespace() else {
                return false;
            };
            if !self.namespace_names.is_empty() && !any_glob(&self.namespace_names, ns) {
                return false;
            }
            if let Some(selector) = &self.namespace_selector {
                match input.namespace_labels {
                    Some(labels) if selector.matches(labels) => {}
                    _ => return false,
                }
            }
        }
        if !self.users.is_empty() && !any_glob(&self.users, &caller.username) {
            return false;
        }
        if !self.groups.is_empty() && !caller.groups.iter().any(|g| any_glob(&self.groups, g)) {
            return false;
        }
        if let Some(selector) = &self.pod_labels {
            match &caller.pod {
                Some(pod) if selector.matches(&pod.labels) => {}
                _ => return false,
            }
        }
        true
    }
}

impl CompiledPolicy {
    fn selects(&self, input: &PolicyInput<'_>) -> bool {
        self.subjects.iter().any(|s| s.matches(input))
    }

    /// The first matching rule, or `None` for the default.
    fn first_match(&self, request: &Prepared<'_, '_>) -> Option<&CompiledRule> {
        self.rules.iter().find(|r| r.check(request).is_ok())
    }
}

impl ResourcePattern {
    fn matches(&self, resource: &str, subresource: &str) -> bool {
        if self.everything {
            return true;
        }
        match &self.subresource {
            None => subresource.is_empty() && self.resource.matches(resource),
            Some(sub) => {
                !subresource.is_empty()
                    && self.resource.matches(resource)
                    && sub.matches(subresource)
            }
        }
    }
}

impl CompiledRule {
    fn check(&self, prepared: &Prepared<'_, '_>) -> Result<(), Mismatch> {
        let input = prepared.input;
        let req = input.request;
        let verb = prepared.verb;
        match (&self.urls, req.is_resource_request) {
            (Some(_), true) => return Err(Mismatch::NonResourceRuleOnResource),
            (None, false) => return Err(Mismatch::ResourceRuleOnNonResource),
            _ => {}
        }
        if let Some(verbs) = self.verbs
            && verbs & prepared.verb_bit == 0
        {
            return Err(Mismatch::Verb);
        }
        if let Some(urls) = &self.urls {
            return if any_glob(urls, &req.path) {
                Ok(())
            } else {
                Err(Mismatch::Url)
            };
        }
        if let Some(groups) = &self.api_groups
            && !any_glob(groups, &req.api_group)
        {
            return Err(Mismatch::ApiGroup);
        }
        if let Some(resources) = &self.resources
            && !resources
                .iter()
                .any(|r| r.matches(&req.resource, &req.subresource))
        {
            return Err(Mismatch::Resource);
        }
        // A restrictive rule also catches requests that may reach many
        // objects: listing across all namespaces, or without a name.
        let wide = self.outcome.action != Action::Allow && COLLECTION_VERBS.contains(&verb);
        if let Some(namespaces) = &self.namespaces
            && !(wide && req.namespace.is_empty())
            && !any_glob(namespaces, &req.namespace)
        {
            return Err(Mismatch::Namespace);
        }
        if let Some(names) = &self.names
            && !(wide && req.name.is_empty())
            && !any_glob(names, &req.name)
        {
            return Err(Mismatch::Name);
        }
        if let Some(commands) = &self.commands {
            let argv = match input.exec_command {
                Some(argv) if !argv.is_empty() => argv,
                _ => return Err(Mismatch::NoCommand),
            };
            let first = argv[0].as_str();
            let base = first.rsplit('/').next().unwrap_or(first);
            if !commands
                .iter()
                .any(|g| g.matches(first) || g.matches(base) || g.matches_words(argv))
            {
                return Err(Mismatch::Command);
            }
        }
        if let Some(executables) = &self.executables {
            let executable = match &input.caller.process {
                Some(process) if !process.executable.is_empty() => process.executable.as_str(),
                _ => return Err(Mismatch::NoProcess),
            };
            if !any_glob(executables, executable) {
                return Err(Mismatch::Executable);
            }
        }
        Ok(())
    }

    /// Says why [`Self::check`] failed, in words for `policy explain`.
    fn describe(&self, mismatch: Mismatch, input: &PolicyInput<'_>) -> String {
        let req = input.request;
        let list = |globs: &Option<Vec<Glob>>| -> String {
            globs
                .iter()
                .flatten()
                .map(|g| format!("\"{g}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match mismatch {
            Mismatch::ResourceRuleOnNonResource => format!(
                "{} is a non-resource URL; this rule matches resource requests (use nonResourceURLs)",
                req.path
            ),
            Mismatch::NonResourceRuleOnResource => {
                "this rule matches non-resource URLs only; the request is a resource request".into()
            }
            Mismatch::Verb => format!(
                "verb \"{}\" is not one of {}",
                effective_verb(req),
                self.verb_names
                    .iter()
                    .map(|v| format!("\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Mismatch::Url => format!("path \"{}\" does not match {}", req.path, list(&self.urls)),
            Mismatch::ApiGroup => format!(
                "API group \"{}\" does not match {}",
                req.api_group,
                list(&self.api_groups)
            ),
            Mismatch::Resource => format!(
                "resource \"{}\" does not match {}",
                req.resource_path(),
                self.resources
                    .iter()
                    .flatten()
                    .map(|r| format!("\"{}\"", r.source))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Mismatch::Namespace => {
                if req.namespace.is_empty() {
                    format!(
                        "the request is not in a namespace; namespaces are {}",
                        list(&self.namespaces)
                    )
                } else {
                    format!(
                        "namespace \"{}\" does not match {}",
                        req.namespace,
                        list(&self.namespaces)
                    )
                }
            }
            Mismatch::Name => {
                if req.name.is_empty() {
                    format!(
                        "the request names no object; names are {}",
                        list(&self.names)
                    )
                } else {
                    format!("name \"{}\" does not match {}", req.name, list(&self.names))
                }
            }
            Mismatch::NoCommand => format!(
                "the request carries no exec command; commands are {}",
                list(&self.commands)
            ),
            Mismatch::Command => format!(
                "command \"{}\" does not match {}",
                input.exec_command.unwrap_or_default().join(" "),
                list(&self.commands)
            ),
            Mismatch::NoProcess => format!(
                "chaperone does not know the executable of the calling process; executables are {}",
                list(&self.executables)
            ),
            Mismatch::Executable => format!(
                "executable \"{}\" does not match {}",
                input
                    .caller
                    .process
                    .as_ref()
                    .map_or("", |p| p.executable.as_str()),
                list(&self.executables)
            ),
        }
    }
}

/// What every rule looks at, computed once per evaluation.
struct Prepared<'i, 'a> {
    input: &'i PolicyInput<'a>,
    /// The verb policy matches on ([`effective_verb`]).
    verb: &'a str,
    /// Its bit in the verb table of the request's kind (0: no such verb).
    verb_bit: u16,
}

impl<'i, 'a> Prepared<'i, 'a> {
    fn new(input: &'i PolicyInput<'a>) -> Self {
        let verb = effective_verb(input.request);
        let table: &[&str] = if input.request.is_resource_request {
            &RESOURCE_VERBS
        } else {
            &NON_RESOURCE_VERBS
        };
        Prepared {
            input,
            verb,
            verb_bit: verb_bit(table, verb),
        }
    }
}

fn verb_bit(table: &[&str], verb: &str) -> u16 {
    table.iter().position(|v| *v == verb).map_or(0, |i| 1 << i)
}

/// The verb policy matches on. Exec, attach and port-forward over
/// WebSocket arrive as GET, but they run commands and open tunnels: the API
/// server authorizes them as `create` too, and so does policy.
fn effective_verb(req: &crate::request::RequestInfo) -> &str {
    if req.verb == "get"
        && req.resource == "pods"
        && matches!(req.subresource.as_str(), "exec" | "attach" | "portforward")
    {
        "create"
    } else {
        &req.verb
    }
}

// === the set ===

/// The compiled policies in force, sorted by name, plus the decision for
/// callers no policy selects.
#[derive(Debug)]
pub struct PolicySet {
    policies: Vec<CompiledPolicy>,
    unmatched: Outcome,
    /// The empty policy name of the unmatched decision, allocated once.
    no_policy: Arc<str>,
    uses_namespace_labels: bool,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::new()
    }
}

/// One evaluated policy: the policy and its rule (or default) that decided.
#[derive(Clone, Copy)]
struct Hit<'p> {
    policy: &'p CompiledPolicy,
    outcome: &'p Outcome,
    /// A rule matched (rather than the policy's default).
    explicit: bool,
}

impl Hit<'_> {
    /// Ordering key: the more restrictive action; on equal actions an
    /// explicit rule (its message is the more specific) over a default.
    fn weight(&self) -> (u8, bool) {
        (self.outcome.action.restrictiveness(), self.explicit)
    }
}

/// The most restrictive hit so far, and the highest record level asked.
#[derive(Default)]
struct Tally<'p> {
    winner: Option<Hit<'p>>,
    record: RecordLevel,
}

impl<'p> Tally<'p> {
    fn add(&mut self, hit: Hit<'p>) {
        self.record = match self.winner {
            None => hit.outcome.record,
            Some(_) => self.record.max(hit.outcome.record),
        };
        // Policies come sorted by name: on a tie the earlier one stays.
        if self.winner.is_none_or(|best| hit.weight() > best.weight()) {
            self.winner = Some(hit);
        }
    }

    fn winner(&self) -> Option<(Hit<'p>, RecordLevel)> {
        self.winner.map(|hit| (hit, self.record))
    }
}

impl PolicySet {
    /// An empty set: every caller gets the unmatched decision (`deny`).
    pub fn new() -> PolicySet {
        PolicySet {
            policies: Vec::new(),
            unmatched: Outcome {
                action: Action::Deny,
                record: RecordLevel::Metadata,
                rule: "default".into(),
                message: Some(
                    "no AgentPolicy selects this agent; ask a platform admin to write one for its service account"
                        .into(),
                ),
                hold_timeout: None,
            },
            no_policy: "".into(),
            uses_namespace_labels: false,
        }
    }

    /// Compiles policies; every error of every policy is reported. Names
    /// must be unique.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a AgentPolicy>,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let mut compiled = Vec::new();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for policy in policies {
            let name = policy.metadata.name.clone().unwrap_or_default();
            if !name.is_empty() && !seen.insert(name.clone()) {
                errors.push(PolicyError {
                    policy: name.clone(),
                    path: "metadata.name".into(),
                    message: format!(
                        "a second policy is named \"{name}\"; policy names must be unique"
                    ),
                });
                continue;
            }
            match CompiledPolicy::compile(policy) {
                Ok(p) => compiled.push(p),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(PolicySet::from_compiled(compiled))
    }

    fn from_compiled(mut policies: Vec<CompiledPolicy>) -> PolicySet {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let uses_namespace_labels = policies
            .iter()
            .flat_map(|p| &p.subjects)
            .any(|s| s.namespace_selector.is_some());
        PolicySet {
            policies,
            uses_namespace_labels,
            ..PolicySet::new()
        }
    }

    /// Sets the decision for callers no policy selects.
    pub fn with_unmatched(mut self, action: Action, record: RecordLevel) -> PolicySet {
        self.unmatched.action = action;
        self.unmatched.record = record;
        if action == Action::Allow {
            self.unmatched.message = None;
        }
        self
    }

    /// The decision for callers no policy selects.
    pub fn unmatched(&self) -> Action {
        self.unmatched.action
    }

    /// Names of the policies in force, sorted.
    pub fn policy_names(&self) -> impl Iterator<Item = &str> {
        self.policies.iter().map(|p| &*p.name)
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether any policy selects subjects by namespace labels, so the
    /// proxy must look them up for [`PolicyInput::namespace_labels`].
    pub fn uses_namespace_labels(&self) -> bool {
        self.uses_namespace_labels
    }

    /// The credential mode for a caller: `impersonate` if any enforcing
    /// policy that selects it says so.
    pub fn credential_mode(&self, input: &PolicyInput<'_>) -> CredentialMode {
        if self.policies.iter().any(|p| {
            !p.dry_run && p.credential_mode == CredentialMode::Impersonate && p.selects(input)
        }) {
            CredentialMode::Impersonate
        } else {
            CredentialMode::Passthrough
        }
    }

    fn tally<'p>(&'p self, input: &PolicyInput<'_>) -> (Tally<'p>, Tally<'p>) {
        let prepared = Prepared::new(input);
        let mut enforcing = Tally::default();
        let mut dry = Tally::default();
        for policy in &self.policies {
            if !policy.selects(input) {
                continue;
            }
            let tally = if policy.dry_run {
                &mut dry
            } else {
                &mut enforcing
            };
            let (outcome, explicit) = match policy.first_match(&prepared) {
                Some(rule) => (&rule.outcome, true),
                None => match &policy.default {
                    Some(default) => (default, false),
                    None => continue,
                },
            };
            tally.add(Hit {
                policy,
                outcome,
                explicit,
            });
        }
        (enforcing, dry)
    }

    /// Decides one request. Never allocates.
    pub fn evaluate(&self, input: &PolicyInput<'_>) -> Decision {
        let (enforcing, dry) = self.tally(input);
        let enforced = enforcing.winner();
        let would = dry.winner();
        match (enforced, would) {
            (None, None) => decision(&self.unmatched, &self.no_policy, self.unmatched.record),
            (Some((hit, record)), None) => decision(hit.outcome, &hit.policy.name, record),
            (Some((hit, record)), Some((dry_hit, _)))
                if dry_hit.outcome.action.restrictiveness()
                    <= hit.outcome.action.restrictiveness() =>
            {
                decision(hit.outcome, &hit.policy.name, record)
            }
            (enforced, Some((dry_hit, dry_record))) => {
                let (enforce, enforced_record) = enforced
                    .map(|(hit, record)| (hit.outcome.action, record))
                    .unwrap_or((Action::Allow, RecordLevel::None));
                let mut d = decision(
                    dry_hit.outcome,
                    &dry_hit.policy.name,
                    dry_record.max(enforced_record),
                );
                d.enforce = enforce;
                d.dry_run = true;
                if dry_hit.outcome.action != Action::Allow {
                    d.record = d.record.max(RecordLevel::Metadata);
                }
                d
            }
        }
    }

    /// Whether the enforced decision for `input` lets it through because of a
    /// rule that names `resource` literally in its `resources` (`resource`
    /// or `resource/...`, never a glob such as `*`): the explicit grant the
    /// protect stage asks for before an agent may write `AgentPolicy`
    /// objects.
    pub fn grants_explicitly(&self, input: &PolicyInput<'_>, resource: &str) -> bool {
        let (enforcing, _) = self.tally(input);
        let Some((hit, _)) = enforcing.winner() else {
            return false;
        };
        if !hit.explicit || hit.outcome.action == Action::Deny {
            return false;
        }
        let prepared = Prepared::new(input);
        hit.policy.first_match(&prepared).is_some_and(|rule| {
            rule.resources.iter().flatten().any(|pattern| {
                let source = &*pattern.source;
                source == resource
                    || source
                        .strip_prefix(resource)
                        .is_some_and(|rest| rest.starts_with('/') && !rest.contains('*'))
            })
        })
    }

    /// The verbs (of the nine resource verbs) this caller may use on the same
    /// resource, namespace and name: for denial messages. Allocates; call it
    /// only when refusing.
    pub fn allowed_verbs(&self, input: &PolicyInput<'_>) -> Vec<&'static str> {
        let mut request = input.request.clone();
        RESOURCE_VERBS
            .iter()
            .copied()
            .filter(|verb| {
                request.verb = (*verb).to_owned();
                let probe = PolicyInput {
                    request: &request,
                    ..*input
                };
                let d = self.evaluate(&probe);
                !d.refuses()
            })
            .collect()
    }

    /// Evaluates like [`Self::evaluate`] and says why, policy by policy
    /// and rule by rule, for `chaperone policy explain`.
    pub fn explain(&self, input: &PolicyInput<'_>) -> Explanation {
        let prepared = Prepared::new(input);
        let mut policies = Vec::new();
        for policy in &self.policies {
            let mut trace = PolicyTrace {
                name: policy.name.to_string(),
                generation: policy.generation,
                dry_run: policy.dry_run,
                selected: policy.selects(input),
                rules: Vec::new(),
                outcome: None,
            };
            if trace.selected {
                for rule in &policy.rules {
                    match rule.check(&prepared) {
                        Ok(()) => {
                            trace.rules.push(RuleTrace {
                                name: rule.outcome.rule.to_string(),
                                matched: true,
                                reason: format!("matches; action {}", rule.outcome.action),
                            });
                            trace.outcome =
                                Some((rule.outcome.rule.to_string(), rule.outcome.action));
                            break;
                        }
                        Err(m) => trace.rules.push(RuleTrace {
                            name: rule.outcome.rule.to_string(),
                            matched: false,
                            reason: rule.describe(m, input),
                        }),
                    }
                }
                if trace.outcome.is_none() {
                    trace.outcome = policy
                        .default
                        .as_ref()
                        .map(|d| ("default".into(), d.action));
                }
            }
            policies.push(trace);
        }
        Explanation {
            decision: self.evaluate(input),
            policies,
        }
    }
}

fn decision(outcome: &Outcome, policy: &Arc<str>, record: RecordLevel) -> Decision {
    Decision {
        action: outcome.action,
        enforce: outcome.action,
        record,
        policy: policy.clone(),
        rule: outcome.rule.clone(),
        message: outcome.message.clone(),
        dry_run: false,
        hold_timeout: outcome.hold_timeout,
    }
}

/// Why a request got its decision.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub decision: Decision,
    /// Every policy in force, sorted by name.
    pub policies: Vec<PolicyTrace>,
}

#[derive(Clone, Debug)]
pub struct PolicyTrace {
    pub name: String,
    pub generation: Option<i64>,
    pub dry_run: bool,
    /// Whether the policy's subjects select the caller.
    pub selected: bool,
    /// The rules tried in order, up to and including the first match.
    pub rules: Vec<RuleTrace>,
    /// The rule (or `default`) that decided within this policy; `None` when
    /// the policy does not select the caller or abstains (no rule matched
    /// and it has no `defaultAction`).
    pub outcome: Option<(String, Action)>,
}

#[derive(Clone, Debug)]
pub struct RuleTrace {
    pub name: String,
    pub matched: bool,
    pub reason: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        let mut line = String::new();
        if d.policy.is_empty() {
            let _ = write!(
                line,
                "decision: {} (no policy selects this caller)",
                d.action
            );
        } else {
            let _ = write!(
                line,
                "decision: {} by policy \"{}\" rule \"{}\"",
                d.action, d.policy, d.rule
            );
        }
        if d.dry_run {
            let _ = write!(line, " (dry run: enforced {})", d.enforce);
        }
        let _ = write!(line, ", record {}", d.record);
        if let Some(t) = d.hold_timeout {
            let _ = write!(line, ", hold {}s", t.as_secs());
        }
        writeln!(f, "{line}")?;
        if let Some(message) = &d.message {
            writeln!(f, "message: {message}")?;
        }
        for p in &self.policies {
            let dry = if p.dry_run { " (dry run)" } else { "" };
            if !p.selected {
                writeln!(f, "policy \"{}\"{dry}: does not select this caller", p.name)?;
                continue;
            }
            writeln!(f, "policy \"{}\"{dry}: selects this caller", p.name)?;
            for r in &p.rules {
                let mark = if r.matched { "MATCH" } else { "skip " };
                writeln!(f, "  {mark} rule \"{}\": {}", r.name, r.reason)?;
            }
            match &p.outcome {
                Some((rule, action)) if rule == "default" => {
                    writeln!(f, "  no rule matches: default action {action}")?;
                }
                None => writeln!(
                    f,
                    "  no rule matches and there is no defaultAction: this policy abstains"
                )?,
                Some(_) => {}
            }
        }
        Ok(())
    }
}

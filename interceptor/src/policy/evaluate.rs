//! Compiled policies and their evaluation: the matchers that
//! [`super::compile`] builds, and the questions the proxy asks of them.
//! Evaluation only compares strings and never allocates, apart from cloning
//! `Arc`s into the [`Decision`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::glob::Glob;
use super::spec::{CredentialMode, SelectorOperator};
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
pub(super) const NON_RESOURCE_VERBS: [&str; 7] =
    ["get", "head", "post", "put", "patch", "delete", "options"];
/// Verbs that may act on many objects at once, across names and, without a
/// namespace, across namespaces.
const COLLECTION_VERBS: [&str; 3] = ["list", "watch", "deletecollection"];
/// How long an `approve` rule holds a request unless it says otherwise.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(60);

// === compiled types ===

/// What a matched rule (or a default) decides.
#[derive(Debug)]
pub(super) struct Effect {
    pub(super) action: Action,
    pub(super) record: RecordLevel,
    pub(super) rule: Arc<str>,
    pub(super) message: Option<Arc<str>>,
    pub(super) hold_timeout: Option<Duration>,
}

#[derive(Debug)]
pub(super) struct CompiledPolicy {
    pub(super) name: Arc<str>,
    pub(super) generation: Option<i64>,
    pub(super) dry_run: bool,
    pub(super) credential_mode: CredentialMode,
    pub(super) subjects: Vec<CompiledSubject>,
    pub(super) rules: Vec<CompiledRule>,
    /// `None`: the policy abstains where no rule matches.
    pub(super) default: Option<Effect>,
}

#[derive(Debug, Default)]
pub(super) struct CompiledSubject {
    pub(super) service_accounts: Vec<(Glob, Glob)>,
    pub(super) namespace_names: Vec<Glob>,
    pub(super) namespace_selector: Option<Selector>,
    pub(super) users: Vec<Glob>,
    pub(super) groups: Vec<Glob>,
    pub(super) pod_labels: Option<Selector>,
}

#[derive(Debug)]
pub(super) struct Selector {
    pub(super) match_labels: Vec<(Box<str>, Box<str>)>,
    pub(super) expressions: Vec<(Box<str>, SelectorOperator, Vec<Box<str>>)>,
}

#[derive(Debug)]
pub(super) struct CompiledRule {
    /// `None`: any verb. Bits of [`RESOURCE_VERBS`], or for a non-resource
    /// rule of [`NON_RESOURCE_VERBS`].
    pub(super) verbs: Option<u16>,
    /// The verbs as written, for `policy explain`.
    pub(super) verb_names: Vec<Box<str>>,
    pub(super) api_groups: Option<Vec<Glob>>,
    pub(super) resources: Option<Vec<ResourcePattern>>,
    pub(super) namespaces: Option<Vec<Glob>>,
    pub(super) names: Option<Vec<Glob>>,
    /// `Some`: a non-resource rule.
    pub(super) urls: Option<Vec<Glob>>,
    pub(super) commands: Option<Vec<Glob>>,
    /// Globs on the calling process's executable (`Rule::executables`).
    pub(super) executables: Option<Vec<Glob>>,
    pub(super) outcome: Effect,
}

#[derive(Debug)]
pub(super) struct ResourcePattern {
    pub(super) source: Box<str>,
    /// `*`: every resource and subresource.
    pub(super) everything: bool,
    pub(super) resource: Glob,
    /// `None`: only the resource itself, no subresource.
    pub(super) subresource: Option<Glob>,
}

/// Why a rule did not match a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mismatch {
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
    pub(super) fn selects(&self, input: &PolicyInput<'_>) -> bool {
        self.subjects.iter().any(|s| s.matches(input))
    }

    /// The first matching rule, or `None` for the default.
    pub(super) fn first_match(&self, request: &Prepared<'_, '_>) -> Option<&CompiledRule> {
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
    pub(super) fn check(&self, prepared: &Prepared<'_, '_>) -> Result<(), Mismatch> {
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
}

/// What every rule looks at, computed once per evaluation.
pub(super) struct Prepared<'i, 'a> {
    pub(super) input: &'i PolicyInput<'a>,
    /// The verb policy matches on ([`effective_verb`]).
    verb: &'a str,
    /// Its bit in the verb table of the request's kind (0: no such verb).
    verb_bit: u16,
}

impl<'i, 'a> Prepared<'i, 'a> {
    pub(super) fn new(input: &'i PolicyInput<'a>) -> Self {
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

pub(super) fn verb_bit(table: &[&str], verb: &str) -> u16 {
    table.iter().position(|v| *v == verb).map_or(0, |i| 1 << i)
}

/// The verb policy matches on. Exec, attach and port-forward over
/// WebSocket arrive as GET, but they run commands and open tunnels: the API
/// server authorizes them as `create` too, and so does policy.
pub(super) fn effective_verb(req: &crate::request::RequestInfo) -> &str {
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
    pub(super) policies: Vec<CompiledPolicy>,
    unmatched: Effect,
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
    outcome: &'p Effect,
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
            unmatched: Effect {
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

    pub(super) fn from_compiled(mut policies: Vec<CompiledPolicy>) -> PolicySet {
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
}

fn decision(outcome: &Effect, policy: &Arc<str>, record: RecordLevel) -> Decision {
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

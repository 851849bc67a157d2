//! Policy matching tables, precedence, dry-run, the store and the example
//! policies in deploy/policies.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::Method;

use super::*;
use crate::identity::{Caller, PodRef};
use crate::request::RequestInfo;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies")
}

fn set_from(yaml: &str) -> PolicySet {
    let policies: Vec<AgentPolicy> = parse_documents(yaml)
        .into_iter()
        .map(|d| d.expect("valid document").policy)
        .collect();
    PolicySet::compile(&policies).unwrap_or_else(|e| panic!("compile: {e:?}"))
}

/// The compiler's own errors, for documents read without the CRD's schema
/// (objects from the API server have passed it; the compiler checks again
/// what it relies on).
fn compile_errors(yaml: &str) -> Vec<String> {
    let policies: Vec<AgentPolicy> = serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("an AgentPolicy"))
        .collect();
    match PolicySet::compile(&policies) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn examples() -> Arc<PolicySet> {
    let store = PolicyStore::new();
    store
        .load_files(&store::policy_files(&examples_dir()).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    store.snapshot()
}

fn sa(ns: &str, name: &str) -> Caller {
    Caller {
        username: format!("system:serviceaccount:{ns}:{name}"),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ],
        pod: Some(PodRef {
            namespace: ns.into(),
            name: format!("{name}-pod"),
            uid: "uid-1".into(),
            service_account: name.into(),
            labels: BTreeMap::new(),
        }),
        ..Caller::default()
    }
}

fn req(method: &str, url: &str) -> RequestInfo {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    RequestInfo::parse(&method, path, query)
}

fn decide(set: &PolicySet, caller: &Caller, method: &str, url: &str) -> Decision {
    let request = req(method, url);
    set.evaluate(&PolicyInput::new(&request, caller))
}

/// `(action, rule)` for compact tables.
fn outcome(set: &PolicySet, caller: &Caller, method: &str, url: &str) -> (Action, String) {
    let d = decide(set, caller, method, url);
    (d.action, d.rule.to_string())
}

const ONE_POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: p
spec:
  subjects:
    - serviceAccounts: ["agents/*"]
  rules:
    - name: discovery
      nonResourceURLs: ["/api", "/apis", "/apis/*", "/version"]
      verbs: [get]
      action: allow
    - name: exec-destructive
      resources: [pods/exec]
      commands: ["rm *", "*mkfs*", "sh"]
      action: deny
    - name: exec-any
      resources: ["pods/*"]
      verbs: [create]
      action: approve
      holdTimeout: 90s
    - name: scale
      resources: ["*/scale"]
      action: allow
    - name: web-only
      apiGroups: [apps]
      resources: [deployments]
      names: ["web-?"]
      verbs: [delete]
      action: allow
    - name: no-prod-delete
      verbs: [delete, deletecollection]
      namespaces: ["prod-*"]
      action: deny
      message: ask the on-call human.
    - name: secrets
      resources: [secrets]
      action: mask
      record: RequestResponse
    - name: pods
      apiGroups: [""]
      resources: [pods]
      action: allow
  defaultAction: deny
"#;

#[test]
fn rules_match_verbs_groups_resources_and_subresources() {
    let set = set_from(ONE_POLICY);
    let agent = sa("agents", "coder");
    #[rustfmt::skip]
    let table = [
        ("GET", "/api/v1/namespaces/dev/pods", Action::Allow, "pods"),
        ("GET", "/api/v1/namespaces/dev/pods/web-0", Action::Allow, "pods"),
        ("GET", "/api/v1/namespaces/dev/pods/web-0/log", Action::Deny, "default"),
        // `pods` is the resource only; `pods/*` its subresources
        ("POST", "/api/v1/namespaces/dev/pods/web-0/portforward", Action::Approve, "exec-any"),
        ("POST", "/api/v1/namespaces/dev/pods/web-0/exec?command=ls", Action::Approve, "exec-any"),
        // WebSocket exec arrives as GET and counts as create
        ("GET", "/api/v1/namespaces/dev/pods/web-0/exec?command=ls", Action::Approve, "exec-any"),
        ("PUT", "/apis/apps/v1/namespaces/dev/deployments/web/scale", Action::Allow, "scale"),
        ("PATCH", "/apis/apps/v1/namespaces/prod-a/statefulsets/db/scale", Action::Allow, "scale"),
        // api group: pods in another group are not core pods
        ("GET", "/apis/metrics.k8s.io/v1beta1/namespaces/dev/pods", Action::Deny, "default"),
        // names with globs
        ("DELETE", "/apis/apps/v1/namespaces/prod-a/deployments/web-1", Action::Allow, "web-only"),
        ("DELETE", "/apis/apps/v1/namespaces/prod-a/deployments/web-10", Action::Deny, "no-prod-delete"),
        ("DELETE", "/apis/apps/v1/namespaces/dev/deployments/api", Action::Deny, "default"),
        ("DELETE", "/api/v1/namespaces/prod-b/configmaps", Action::Deny, "no-prod-delete"),
        ("GET", "/api/v1/namespaces/dev/secrets/token", Action::Mask, "secrets"),
        // a non-resource URL matches only nonResourceURLs rules
        ("GET", "/version", Action::Allow, "discovery"),
        ("GET", "/apis/apps", Action::Allow, "discovery"),
        ("GET", "/healthz", Action::Deny, "default"),
        ("POST", "/version", Action::Deny, "default"),
    ];
    for (method, url, action, rule) in table {
        assert_eq!(
            outcome(&set, &agent, method, url),
            (action, rule.to_owned()),
            "{method} {url}"
        );
    }
}

#[test]
fn exec_commands_match_the_line_the_first_word_or_its_base_name() {
    let set = set_from(ONE_POLICY);
    let agent = sa("agents", "coder");
    let exec = "/api/v1/namespaces/dev/pods/web-0/exec";
    for (query, rule) in [
        ("command=rm&command=-rf&command=%2Fdata", "exec-destructive"),
        ("command=%2Fbin%2Fsh", "exec-destructive"),
        ("command=sh&command=-c&command=echo+hi", "exec-destructive"),
        ("command=mkfs.ext4&command=%2Fdev%2Fsda", "exec-destructive"),
        ("command=ls&command=-l", "exec-any"),
        ("command=rmdir&command=x", "exec-any"),
        // no command: a rule with commands does not match
        ("container=app", "exec-any"),
    ] {
        let url = format!("{exec}?{query}");
        assert_eq!(outcome(&set, &agent, "POST", &url).1, rule, "{query}");
    }
}

#[test]
fn the_first_matching_rule_wins_and_carries_its_details() {
    let set = set_from(ONE_POLICY);
    let agent = sa("agents", "coder");
    let d = decide(
        &set,
        &agent,
        "POST",
        "/api/v1/namespaces/dev/pods/web-0/attach",
    );
    assert_eq!(d.action, Action::Approve);
    assert_eq!(d.hold_timeout, Some(Duration::from_secs(90)));
    assert!(d.refuses(), "approve never allows by itself");
    let d = decide(&set, &agent, "DELETE", "/api/v1/namespaces/prod-a/pods/x");
    assert_eq!(&*d.policy, "p");
    assert_eq!(&*d.rule, "no-prod-delete");
    assert_eq!(d.message.as_deref(), Some("ask the on-call human."));
    assert_eq!(d.record, RecordLevel::Metadata);
    let d = decide(&set, &agent, "GET", "/api/v1/namespaces/dev/secrets");
    assert_eq!(d.record, RecordLevel::RequestResponse);
}

#[test]
fn restrictive_rules_also_catch_requests_across_namespaces_and_names() {
    let set = set_from(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: p}
spec:
  subjects: [{users: ["*"]}]
  rules:
    - {name: prod-secrets, resources: [secrets], namespaces: ["prod-*"], action: deny}
    - {name: db-secret, resources: [secrets], names: [db], action: mask}
    - {name: dev-pods, resources: [pods], namespaces: ["dev-*"], action: allow}
    - {name: rest, action: allow}
"#,
    );
    let agent = sa("agents", "coder");
    for (url, rule) in [
        ("/api/v1/namespaces/prod-a/secrets", "prod-secrets"),
        // listing every namespace would include prod-*: the deny applies
        ("/api/v1/secrets", "prod-secrets"),
        ("/api/v1/secrets?watch=1", "prod-secrets"),
        // listing without a name would include "db": the mask applies
        ("/api/v1/namespaces/dev/secrets", "db-secret"),
        ("/api/v1/namespaces/dev/secrets/db", "db-secret"),
        ("/api/v1/namespaces/dev/secrets/other", "rest"),
        // an allow restricted to dev-* never grants all namespaces
        ("/api/v1/namespaces/dev-1/pods", "dev-pods"),
    ] {
        assert_eq!(outcome(&set, &agent, "GET", url).1, rule, "{url}");
    }
    let d = decide(&set, &agent, "GET", "/api/v1/pods");
    assert_eq!(&*d.rule, "rest");
}

#[test]
fn subjects_select_by_service_account_namespace_user_group_and_pod_labels() {
    let set = set_from(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: by-sa}
spec:
  subjects: [{serviceAccounts: ["agents/coder-*"]}]
  defaultAction: allow
---
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: by-namespace}
spec:
  subjects:
    - namespaces:
        names: ["ci-*"]
        selector: {matchLabels: {tier: agents}}
  defaultAction: mask
---
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: by-user-and-group}
spec:
  subjects:
    - users: ["alice"]
    - groups: ["ai-*"]
  defaultAction: approve
---
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: by-pod-labels}
spec:
  subjects:
    - namespaces: {names: [jobs]}
      podLabels:
        matchLabels: {app: runner}
        matchExpressions:
          - {key: env, operator: NotIn, values: [prod]}
          - {key: team, operator: Exists}
  defaultAction: allow
  defaultRecord: RequestResponse
"#,
    );
    assert!(set.uses_namespace_labels());
    let url = "/api/v1/namespaces/x/configmaps";
    let policy = |caller: &Caller, labels: Option<&BTreeMap<String, String>>| {
        let request = req("GET", url);
        let mut input = PolicyInput::new(&request, caller);
        if let Some(labels) = labels {
            input = input.with_namespace_labels(labels);
        }
        set.evaluate(&input).policy.to_string()
    };
    assert_eq!(policy(&sa("agents", "coder-1"), None), "by-sa");
    assert_eq!(policy(&sa("agents", "reviewer"), None), "");
    assert_eq!(policy(&sa("other", "coder-1"), None), "");

    let agents: BTreeMap<String, String> = [("tier".into(), "agents".into())].into();
    let humans: BTreeMap<String, String> = [("tier".into(), "humans".into())].into();
    assert_eq!(policy(&sa("ci-7", "runner"), Some(&agents)), "by-namespace");
    // both the name and the selector must match; no labels known: no match
    assert_eq!(policy(&sa("ci-7", "runner"), Some(&humans)), "");
    assert_eq!(policy(&sa("ci-7", "runner"), None), "");
    assert_eq!(policy(&sa("dev", "runner"), Some(&agents)), "");

    let alice = Caller {
        username: "alice".into(),
        ..Caller::default()
    };
    assert_eq!(policy(&alice, None), "by-user-and-group");
    let bot = Caller {
        username: "bob".into(),
        groups: vec!["ai-coders".into()],
        ..Caller::default()
    };
    assert_eq!(policy(&bot, None), "by-user-and-group");

    let runner = |labels: &[(&str, &str)]| {
        let mut caller = sa("jobs", "default");
        caller.pod.as_mut().unwrap().labels = labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        caller
    };
    let selected = runner(&[("app", "runner"), ("team", "a")]);
    assert_eq!(policy(&selected, None), "by-pod-labels");
    let request = req("GET", url);
    assert_eq!(
        set.evaluate(&PolicyInput::new(&request, &selected)).record,
        RecordLevel::RequestResponse
    );
    assert_eq!(policy(&runner(&[("app", "runner")]), None), "");
    assert_eq!(
        policy(
            &runner(&[("app", "runner"), ("team", "a"), ("env", "prod")]),
            None
        ),
        ""
    );
    // a caller without a kernel-attested pod has no pod labels
    let mut no_pod = selected.clone();
    no_pod.pod = None;
    assert_eq!(policy(&no_pod, None), "");
}

const TWO_POLICIES: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: b-team}
spec:
  subjects: [{serviceAccounts: ["agents/*"]}]
  rules:
    - {name: team-read, verbs: [get, list, watch], action: allow, record: None}
    - {name: team-delete, verbs: [delete], action: allow}
    - {name: team-secrets, resources: [secrets], action: mask}
  defaultAction: deny
---
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: a-baseline}
spec:
  subjects: [{groups: ["system:serviceaccounts"]}]
  rules:
    - {name: no-prod-delete, verbs: [delete], namespaces: ["prod-*"], action: deny}
    - {name: record-configmaps, resources: [configmaps], action: allow, record: RequestResponse}
    - {name: secrets-allowed, resources: [secrets], action: allow}
"#;

#[test]
fn the_most_restrictive_policy_wins_and_abstaining_policies_do_not_count() {
    let set = set_from(TWO_POLICIES);
    let agent = sa("agents", "coder");
    // the baseline's explicit deny beats the team's allow
    assert_eq!(
        outcome(&set, &agent, "DELETE", "/api/v1/namespaces/prod-a/pods/x"),
        (Action::Deny, "no-prod-delete".into())
    );
    // the baseline abstains (no rule, no default): the team's allow stands
    assert_eq!(
        outcome(&set, &agent, "DELETE", "/api/v1/namespaces/dev/pods/x"),
        (Action::Allow, "team-delete".into())
    );
    // mask (team) is more restrictive than allow (baseline)
    let d = decide(&set, &agent, "POST", "/api/v1/namespaces/dev/secrets");
    assert_eq!((d.action, &*d.policy), (Action::Mask, "b-team"));
    // the record level is the highest either asks for
    let d = decide(&set, &agent, "GET", "/api/v1/namespaces/dev/configmaps");
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.record, RecordLevel::RequestResponse);
    // on a tie the policy whose name sorts first speaks
    assert_eq!(&*d.policy, "a-baseline");
    // a caller only the baseline selects, where it abstains: unmatched, denied
    let stranger = sa("elsewhere", "x");
    let d = decide(&set, &stranger, "GET", "/api/v1/namespaces/dev/pods");
    assert_eq!(
        (d.action, &*d.policy, &*d.rule),
        (Action::Deny, "", "default")
    );
    assert!(
        d.message
            .unwrap()
            .contains("no AgentPolicy selects this agent")
    );
    // and the unmatched decision is configurable
    let open = set_from(TWO_POLICIES).with_unmatched(Action::Allow, RecordLevel::Request);
    let d = decide(&open, &stranger, "GET", "/api/v1/namespaces/dev/pods");
    assert_eq!((d.action, d.record), (Action::Allow, RecordLevel::Request));
}

#[test]
fn dry_run_policies_record_what_they_would_do_and_enforce_nothing() {
    let yaml = format!(
        "{TWO_POLICIES}\n---\n{}",
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: c-trial}
spec:
  dryRun: true
  subjects: [{serviceAccounts: ["agents/*"]}]
  rules:
    - {name: no-deletes, verbs: [delete], action: deny, record: None}
    - {name: trial-mask, resources: [configmaps], action: mask}
  defaultAction: allow
"#
    );
    let set = set_from(&yaml);
    let agent = sa("agents", "coder");
    // would deny, is allowed, and is recorded
    let d = decide(&set, &agent, "DELETE", "/api/v1/namespaces/dev/pods/x");
    assert_eq!(
        (d.action, d.enforce, d.dry_run),
        (Action::Deny, Action::Allow, true)
    );
    assert_eq!((&*d.policy, &*d.rule), ("c-trial", "no-deletes"));
    assert!(!d.refuses());
    assert!(d.record >= RecordLevel::Metadata);
    // an enforcing deny is enforced whatever a dry-run policy says
    let d = decide(&set, &agent, "DELETE", "/api/v1/namespaces/prod-a/pods/x");
    assert_eq!(
        (d.action, d.enforce, d.dry_run),
        (Action::Deny, Action::Deny, false)
    );
    // would mask, enforced allow
    let d = decide(&set, &agent, "GET", "/api/v1/namespaces/dev/configmaps");
    assert_eq!(
        (d.action, d.enforce, d.dry_run),
        (Action::Mask, Action::Allow, true)
    );
    // a dry-run allow changes nothing
    let d = decide(&set, &agent, "GET", "/api/v1/namespaces/dev/pods");
    assert_eq!(
        (d.action, d.dry_run, &*d.policy),
        (Action::Allow, false, "b-team")
    );
    // a caller only a dry-run policy decides for is allowed, with the record
    let trial_only = set_from(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: trial}
spec:
  dryRun: true
  subjects: [{users: ["*"]}]
  rules: [{name: nothing, action: deny}]
"#,
    );
    let d = decide(&trial_only, &agent, "GET", "/api/v1/pods");
    assert_eq!(
        (d.action, d.enforce, d.dry_run),
        (Action::Deny, Action::Allow, true)
    );
}

#[test]
fn compile_errors_name_the_field_and_say_what_to_write() {
    let errors = compile_errors(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: bad}
spec:
  subjects:
    - serviceAccounts: ["coder"]
    - {}
    - podLabels:
        matchExpressions: [{key: env, operator: In}]
  rules:
    - {name: r, verbs: [gett], action: allow}
    - {name: r, action: deny, holdTimeout: 5m}
    - {action: approve, holdTimeout: soon}
    - {nonResourceURLs: [version], resources: [pods], action: allow}
    - {resources: ["pods/exec/x"], action: deny}
    - {name: default, action: deny}
"#,
    );
    let expected = [
        "spec.subjects[0].serviceAccounts[0]: \"coder\" is not NAMESPACE/NAME",
        "spec.subjects[1]: this subject selects nobody",
        "spec.subjects[2].podLabels.matchExpressions[0].values: operator In needs at least one value",
        "spec.rules[0].verbs[0]: unknown verb \"gett\", expected one of get, list, watch",
        "spec.rules[1].name: rule name \"r\" is used twice",
        "spec.rules[1].holdTimeout: holdTimeout applies to action approve only",
        "spec.rules[2].holdTimeout: \"soon\" is not a duration",
        "spec.rules[3].resources: a rule with nonResourceURLs matches only non-resource requests",
        "spec.rules[3].nonResourceURLs[0]: \"version\" is not a URL path; write e.g. \"/version\"",
        "spec.rules[4].resources[0]: \"pods/exec/x\" is not RESOURCE or RESOURCE/SUBRESOURCE",
        "spec.rules[5].name: \"default\" names the policy's default",
    ];
    for want in expected {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    assert!(compile_errors(
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: x}\nspec: {subjects: []}\n"
    )[0]
        .starts_with("spec.subjects: no subjects"));
}

#[test]
fn yaml_errors_carry_the_line_and_the_field_path() {
    let text = "\
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: typo
spec:
  subjects:
    - users: [alice]
  rules:
    - name: a
      action: allow
    - name: b
      action: deny
    - name: c
      action: allwo
---
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: second}
spec:
  subjects: [{users: [bob]}]
  rules:
    - {verb: [get], action: allow}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-a-policy}
";
    let docs = parse_documents(text);
    assert_eq!(docs.len(), 3);
    let first = docs[0].as_ref().unwrap_err();
    assert_eq!(first.line, Some(14));
    assert_eq!(
        first.message,
        "spec.rules[2].action: unknown action \"allwo\", expected one of allow, deny, mask, approve"
    );
    let second = docs[1].as_ref().unwrap_err();
    assert_eq!(second.line, Some(22));
    assert!(
        second
            .message
            .starts_with("spec.rules[0].verb: unknown field `verb`, expected one of"),
        "{}",
        second.message
    );
    let third = docs[2].as_ref().unwrap_err();
    assert_eq!(third.line, Some(24));
    assert!(
        third.message.contains("is not an AgentPolicy"),
        "{}",
        third.message
    );
}

#[test]
fn the_crd_is_cluster_scoped_with_a_status_subresource_and_a_schema() {
    use kube::CustomResourceExt;
    let crd = AgentPolicy::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("agentpolicies.chaperone.dev")
    );
    assert_eq!(crd.spec.group, "chaperone.dev");
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.kind, "AgentPolicy");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let schema = serde_json::to_value(&version.schema).unwrap();
    let action = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]["items"]["properties"]
        ["action"];
    assert_eq!(
        action["enum"],
        serde_json::json!(["allow", "deny", "mask", "approve"]),
        "{action}"
    );
    // What `chaperone policy crd` prints is the deployed manifest, and its
    // hand-written schema has exactly the fields of the Rust types (a field
    // missing there would be pruned by a real API server).
    let deployed: serde_json::Value = serde_yaml::from_str(&cli::crd_yaml().unwrap()).unwrap();
    assert_eq!(deployed["spec"]["scope"], "Cluster");
    assert_eq!(
        crate::crd_schema::of_crd(&deployed),
        crate::crd_schema::of_crd(&serde_json::to_value(&crd).unwrap()),
        "deploy/base/crds/agentpolicies.chaperone.dev.yaml and AgentPolicySpec disagree"
    );
}

// === the store ===

fn policy_yaml(name: &str, generation: i64, action: &str) -> AgentPolicy {
    let text = format!(
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {{name: {name}, generation: {generation}}}\n\
         spec:\n  subjects: [{{users: [\"*\"]}}]\n  rules: [{{name: all, action: {action}}}]\n"
    );
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn an_invalid_update_keeps_the_last_good_version() {
    let store = PolicyStore::new();
    let agent = sa("agents", "coder");
    let request = req("GET", "/api/v1/namespaces/dev/pods");
    let input = PolicyInput::new(&request, &agent);
    assert_eq!(store.evaluate(&input).action, Action::Deny);

    let v1 = store.apply(&policy_yaml("p", 1, "allow"));
    assert_eq!(v1.result, Ok(()));
    assert_eq!(v1.active_generation, Some(1));
    assert_eq!(store.evaluate(&input).action, Action::Allow);

    let mut broken = policy_yaml("p", 2, "deny");
    broken.spec.rules[0].hold_timeout = Some("5m".into());
    let v2 = store.apply(&broken);
    assert!(
        v2.result
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("holdTimeout"),
        "{v2:?}"
    );
    assert_eq!(v2.active_generation, Some(1));
    assert_eq!(store.evaluate(&input).action, Action::Allow, "v1 stays");

    let v3 = store.apply(&policy_yaml("p", 3, "mask"));
    assert_eq!(v3.result, Ok(()));
    assert_eq!(store.evaluate(&input).action, Action::Mask);

    // a relist without "p" removes it; a new invalid policy is not in force
    let mut invalid = policy_yaml("q", 1, "allow");
    invalid.spec.subjects.clear();
    let outcomes = store.replace_all(&[invalid]);
    assert!(outcomes[0].result.is_err());
    assert_eq!(outcomes[0].active_generation, None);
    assert!(store.snapshot().is_empty());
    assert_eq!(store.evaluate(&input).action, Action::Deny);

    store.apply(&policy_yaml("r", 1, "allow"));
    store.remove("r");
    assert!(store.snapshot().is_empty());
}

#[test]
fn loading_files_is_all_or_nothing_and_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&good, ONE_POLICY).unwrap();
    std::fs::write(
        &bad,
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: p}\nspec:\n  subjects: [{users: [x]}]\n  rules: [{action: maybe}]\n",
    )
    .unwrap();
    let store = PolicyStore::new();
    assert_eq!(store.load_files(&[&good]).unwrap(), 1);
    let error = store.load_files(&[&good, &bad]).unwrap_err().to_string();
    assert!(
        error.contains("bad.yaml:6:20: spec.rules[0].action: unknown action \"maybe\""),
        "{error}"
    );
    assert_eq!(store.snapshot().policy_names().collect::<Vec<_>>(), ["p"]);
    // the same name twice across files
    let error = store.load_files(&[&good, &good]).unwrap_err().to_string();
    assert!(error.contains("a second policy is named \"p\""), "{error}");
    let missing = store
        .load_files(&[dir.path().join("nope.yaml")])
        .unwrap_err();
    assert!(missing.to_string().contains("cannot read the policy file"));
}

// === the examples in deploy/policies ===

#[test]
fn example_read_only_agent_reads_with_secrets_masked_and_writes_nothing() {
    let set = examples();
    let reader = sa("agents", "reader");
    #[rustfmt::skip]
    let table = [
        ("GET", "/api", Action::Allow, "discovery"),
        ("GET", "/apis/apps/v1", Action::Allow, "discovery"),
        ("GET", "/api/v1/namespaces/prod-a/pods", Action::Allow, "read"),
        ("GET", "/api/v1/namespaces/prod-a/pods/web-0/log", Action::Allow, "read"),
        ("GET", "/apis/apps/v1/deployments?watch=true", Action::Allow, "read"),
        ("GET", "/api/v1/namespaces/dev/secrets/db", Action::Mask, "secrets-masked"),
        ("GET", "/api/v1/secrets", Action::Mask, "secrets-masked"),
        ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", Action::Allow, "self-review"),
        ("GET", "/api/v1/namespaces/dev/services/web:80/proxy/", Action::Deny, "no-proxy"),
        ("DELETE", "/api/v1/namespaces/dev/pods/web-0", Action::Deny, "default"),
        ("PATCH", "/apis/apps/v1/namespaces/dev/deployments/web", Action::Deny, "default"),
        ("GET", "/api/v1/namespaces/dev/pods/web-0/exec?command=ls", Action::Deny, "default"),
        ("POST", "/api/v1/namespaces/prod-a/pods/web-0/exec?command=ls", Action::Deny, "no-exec-in-prod"),
    ];
    for (method, url, action, rule) in table {
        assert_eq!(
            outcome(&set, &reader, method, url),
            (action, rule.to_owned()),
            "{method} {url}"
        );
    }
}

#[test]
fn example_deployer_deploys_to_dev_and_needs_approval_to_delete_in_prod() {
    let set = examples();
    let deployer = sa("agents", "deployer");
    #[rustfmt::skip]
    let table = [
        ("POST", "/apis/apps/v1/namespaces/dev-1/deployments", Action::Allow, "deploy-to-dev"),
        ("PATCH", "/apis/apps/v1/namespaces/dev-1/deployments/web", Action::Allow, "deploy-to-dev"),
        ("PUT", "/apis/apps/v1/namespaces/dev-1/deployments/web/scale", Action::Allow, "deploy-to-dev"),
        ("DELETE", "/api/v1/namespaces/dev-1/services/web", Action::Allow, "deploy-to-dev"),
        ("DELETE", "/apis/apps/v1/namespaces/prod-a/deployments/web", Action::Approve, "prod-delete-needs-approval"),
        ("DELETE", "/api/v1/namespaces/prod-a/pods", Action::Approve, "prod-delete-needs-approval"),
        ("PATCH", "/apis/apps/v1/namespaces/prod-a/deployments/web", Action::Deny, "no-prod-changes"),
        ("POST", "/api/v1/namespaces/staging/configmaps", Action::Deny, "default"),
        ("GET", "/api/v1/namespaces/prod-a/secrets", Action::Mask, "secrets-masked"),
        ("GET", "/apis/apps/v1/namespaces/prod-a/deployments", Action::Allow, "read"),
        // the baseline forbids destructive commands everywhere, even in dev
        ("POST", "/api/v1/namespaces/dev-1/pods/web-0/exec?command=rm&command=-rf&command=%2F", Action::Deny, "no-destructive-commands"),
    ];
    for (method, url, action, rule) in table {
        assert_eq!(
            outcome(&set, &deployer, method, url),
            (action, rule.to_owned()),
            "{method} {url}"
        );
    }
    let d = decide(
        &set,
        &deployer,
        "DELETE",
        "/apis/apps/v1/namespaces/prod-a/deployments/web",
    );
    assert_eq!(d.hold_timeout, Some(Duration::from_secs(600)));
    assert_eq!(d.record, RecordLevel::RequestResponse);

    // CI runners are selected by namespace and pod label together
    let mut runner = sa("ci-42", "default");
    runner
        .pod
        .as_mut()
        .unwrap()
        .labels
        .insert("chaperone.dev/role".into(), "deployer".into());
    assert_eq!(
        outcome(
            &set,
            &runner,
            "POST",
            "/apis/apps/v1/namespaces/dev-x/deployments"
        )
        .0,
        Action::Allow
    );
    runner.pod.as_mut().unwrap().labels.clear();
    assert_eq!(
        outcome(
            &set,
            &runner,
            "POST",
            "/apis/apps/v1/namespaces/dev-x/deployments"
        )
        .0,
        Action::Deny
    );
}

#[test]
fn example_no_exec_into_production_pods() {
    let set = examples();
    let reader = sa("agents", "reader");
    for (url, action, rule) in [
        (
            "/api/v1/namespaces/prod-a/pods/web-0/exec?command=sh",
            Action::Deny,
            "no-exec-in-prod",
        ),
        (
            "/api/v1/namespaces/prod-a/pods/web-0/attach",
            Action::Deny,
            "no-exec-in-prod",
        ),
        (
            "/api/v1/namespaces/prod-a/pods/web-0/portforward",
            Action::Deny,
            "no-exec-in-prod",
        ),
        // WebSocket exec arrives as GET: still no exec
        (
            "/api/v1/namespaces/prod-b/pods/web-0/exec?command=ls",
            Action::Deny,
            "no-exec-in-prod",
        ),
    ] {
        let method = if url.contains("prod-b") {
            "GET"
        } else {
            "POST"
        };
        assert_eq!(
            outcome(&set, &reader, method, url),
            (action, rule.to_owned()),
            "{url}"
        );
    }
    // the deployer too, whichever of its denials speaks
    let deployer = sa("agents", "deployer");
    let d = decide(
        &set,
        &deployer,
        "POST",
        "/api/v1/namespaces/prod-a/pods/web-0/exec?command=ls",
    );
    assert_eq!(d.action, Action::Deny);
    // in dev, exec is the deployer's own policy's call: it has no exec rule
    // (its default denies)
    let d = decide(
        &set,
        &deployer,
        "POST",
        "/api/v1/namespaces/dev-1/pods/web-0/exec?command=ls",
    );
    assert_eq!((d.action, &*d.rule), (Action::Deny, "default"));
}

#[test]
fn denials_are_forbidden_statuses_that_say_what_the_agent_may_do() {
    let set = examples();
    let deployer = sa("agents", "deployer");
    let request = req("PATCH", "/apis/apps/v1/namespaces/prod-a/deployments/web");
    let input = PolicyInput::new(&request, &deployer);
    let decision = set.evaluate(&input);
    let status = deny::refusal_status(&set, &input, &decision);
    assert_eq!((status.code, status.reason), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "chaperone: policy \"deployer-agent\" rule \"no-prod-changes\" denies patch on \
         deployments.apps \"web\" in namespace \"prod-a\": production changes go through the \
         release pipeline, not through agents; this agent may get, list and watch here; ask a \
         human to run it"
    );
    let json = status.to_json();
    assert_eq!(json["details"]["name"], "web");
    assert_eq!(json["details"]["group"], "apps");
    assert_eq!(json["details"]["kind"], "deployments");
    assert_eq!(json["details"]["causes"][0]["reason"], deny::RULE_CAUSE);
    assert_eq!(
        json["details"]["causes"][0]["message"],
        "policy \"deployer-agent\" rule \"no-prod-changes\""
    );

    // approve refuses, saying approval is required
    let request = req("DELETE", "/apis/apps/v1/namespaces/prod-a/deployments/web");
    let input = PolicyInput::new(&request, &deployer);
    let decision = set.evaluate(&input);
    assert!(decision.refuses());
    let status = deny::refusal_status(&set, &input, &decision);
    assert_eq!(status.code, 403);
    assert!(
        status.message.starts_with(
            "chaperone: approval required: policy \"deployer-agent\" rule \
             \"prod-delete-needs-approval\" holds delete on deployments.apps \"web\" in namespace \
             \"prod-a\" for a human's approval"
        ),
        "{}",
        status.message
    );

    // nothing allowed at all, and the unmatched caller
    let stranger = sa("elsewhere", "bot");
    let request = req("DELETE", "/api/v1/namespaces/x/pods/p");
    let input = PolicyInput::new(&request, &stranger);
    let decision = set.evaluate(&input);
    let status = deny::refusal_status(&set, &input, &decision);
    assert!(
        status.message.starts_with(
            "chaperone: no AgentPolicy selects this agent (system:serviceaccount:elsewhere:bot), \
             so delete on pods \"p\" in namespace \"x\" is denied: no AgentPolicy selects this agent"
        ),
        "{}",
        status.message
    );
    assert!(
        status
            .message
            .ends_with("this agent may not use pods here at all; ask a human to run it"),
        "{}",
        status.message
    );
}

#[test]
fn explain_says_which_rule_decides_and_why_earlier_ones_did_not() {
    let set = examples();
    let deployer = sa("agents", "deployer");
    let request = req("PATCH", "/apis/apps/v1/namespaces/prod-a/deployments/web");
    let text = set
        .explain(&PolicyInput::new(&request, &deployer))
        .to_string();
    for line in [
        "decision: deny by policy \"deployer-agent\" rule \"no-prod-changes\", record Request",
        "policy \"deployer-agent\": selects this caller",
        "  skip  rule \"discovery\": this rule matches non-resource URLs only",
        "  skip  rule \"secrets-masked\": verb \"patch\" is not one of \"get\", \"list\", \"watch\"",
        "  skip  rule \"deploy-to-dev\": namespace \"prod-a\" does not match \"dev-*\"",
        "  skip  rule \"prod-delete-needs-approval\": verb \"patch\" is not one of \"delete\", \"deletecollection\"",
        "  MATCH rule \"no-prod-changes\": matches; action deny",
        "policy \"no-exec-in-production\": selects this caller",
        "  skip  rule \"no-exec-in-prod\": resource \"deployments\" does not match \"pods/exec\", \"pods/attach\", \"pods/portforward\"",
        "  no rule matches and there is no defaultAction: this policy abstains",
        "policy \"read-only-agent\": does not select this caller",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn only_a_rule_naming_agentpolicies_grants_writing_them() {
    let wildcard = set_from(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: everything}
spec:
  subjects: [{serviceAccounts: ["agents/*"]}]
  rules:
    - name: all
      resources: ["*"]
      action: allow
  defaultAction: allow
"#,
    );
    let named = set_from(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: policy-admin}
spec:
  subjects: [{serviceAccounts: ["agents/*"]}]
  rules:
    - name: edit-policies
      apiGroups: [chaperone.dev]
      resources: [agentpolicies]
      verbs: [create, update, patch]
      action: allow
  defaultAction: allow
"#,
    );
    let caller = sa("agents", "coder");
    let patch = req("PATCH", "/apis/chaperone.dev/v1alpha1/agentpolicies/coder");
    let delete = req("DELETE", "/apis/chaperone.dev/v1alpha1/agentpolicies/coder");
    let input = |r| PolicyInput::new(r, &caller);
    assert!(!wildcard.grants_explicitly(&input(&patch), "agentpolicies"));
    assert!(named.grants_explicitly(&input(&patch), "agentpolicies"));
    // The default allows delete, but no rule names it.
    assert!(!named.grants_explicitly(&input(&delete), "agentpolicies"));
}

// === one source of truth: the CRD's schema and its documented defaults ===

#[test]
fn the_crd_documents_the_defaults_the_code_applies() {
    let schema = schema::agent_policy_schema();
    let spec = &schema["properties"]["spec"]["properties"];
    let rule = &spec["rules"]["items"]["properties"];
    let says = |node: &serde_json::Value, words: &str| {
        let description = node["description"].as_str().unwrap_or_default();
        assert!(
            description.contains(words),
            "the CRD should say {words:?}: {description}"
        );
    };
    // A missing defaultAction abstains (issue 28: the CRD said it denied).
    says(&spec["defaultAction"], "abstains");
    says(&spec["defaultAction"], "denied");
    says(
        &rule["holdTimeout"],
        &format!("{}s when left out", DEFAULT_HOLD_TIMEOUT.as_secs()),
    );
    says(
        &rule["record"],
        &format!("{} when left out", RecordLevel::default()),
    );
    says(
        &spec["defaultRecord"],
        &format!("{} when left out", RecordLevel::default()),
    );
    says(&spec["dryRun"], "false when left out");
    says(&spec["credentialMode"], "passthrough (when left out)");
    assert_eq!(CredentialMode::default(), CredentialMode::Passthrough);

    // And the code does what the CRD says: a policy without defaultAction
    // abstains where no rule matches; when no policy decides, deny.
    let only_reads = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\n\
         metadata: {name: reads}\nspec:\n  subjects: [{users: [\"*\"]}]\n\
         \x20 rules: [{name: read, verbs: [get], action: allow}]\n";
    let agent = sa("agents", "coder");
    let delete = req("DELETE", "/api/v1/namespaces/dev/pods/p");
    let input = PolicyInput::new(&delete, &agent);
    let set = set_from(only_reads);
    let explanation = set.explain(&input);
    assert_eq!(explanation.policies[0].outcome, None, "abstains");
    assert_eq!(explanation.decision.action, Action::Deny);
    assert!(explanation.decision.policy.is_empty(), "the unmatched deny");
    let with_default = format!(
        "{only_reads}---\napiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\n\
         metadata: {{name: rest}}\nspec:\n  subjects: [{{users: [\"*\"]}}]\n  defaultAction: allow\n"
    );
    assert_eq!(
        set_from(&with_default).evaluate(&input).action,
        Action::Allow
    );
}

#[test]
fn the_validator_runs_the_deployed_crds_schema() {
    // The schema `policy check` runs is the one `policy crd` prints and
    // deploy/ installs, not a copy.
    let deployed: serde_json::Value = serde_yaml::from_str(&cli::crd_yaml().unwrap()).unwrap();
    assert_eq!(
        schema::agent_policy_schema(),
        &deployed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    );
    let errors = schema::validate(
        schema::agent_policy_schema(),
        &serde_json::json!({
            "apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "x"},
            "spec": {"subjects": [{}], "rules": [{"resources": ["pods/"], "action": "allow"}]},
        }),
    );
    let got: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect();
    assert_eq!(
        got,
        [
            "spec.subjects[0]: this subject selects nobody; set serviceAccounts, namespaces, users, groups or podLabels",
            "spec.rules[0].resources[0]: \"pods/\" is not RESOURCE or RESOURCE/SUBRESOURCE (e.g. pods, pods/exec, pods/*, *)",
        ]
    );
}

/// "Only kubectl may exec": the executable of the calling process, read
/// from `/proc` when the connection was accepted, picks the rule.
#[test]
fn executables_match_the_calling_process() {
    let set = set_from(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata: {name: exec-by-kubectl}
spec:
  subjects: [{serviceAccounts: ["agents/*"]}]
  defaultAction: allow
  rules:
    - name: kubectl-may-exec
      resources: ["pods/exec"]
      executables: ["/usr/bin/kubectl", "/usr/local/bin/kubectl"]
      action: allow
    - name: nothing-else-may-exec
      resources: ["pods/exec"]
      action: deny
"#,
    );
    let exec = "/api/v1/namespaces/dev/pods/web-0/exec?command=ls";
    let from = |executable: Option<&str>| {
        let mut caller = sa("agents", "coder");
        caller.process = executable.map(|exe| crate::identity::ProcessInfo {
            pid: 42,
            command: exe.rsplit('/').next().unwrap().to_owned(),
            executable: exe.to_owned(),
            ..Default::default()
        });
        caller
    };
    for (executable, action, rule) in [
        (Some("/usr/bin/kubectl"), Action::Allow, "kubectl-may-exec"),
        (
            Some("/usr/local/bin/kubectl"),
            Action::Allow,
            "kubectl-may-exec",
        ),
        // A copy elsewhere, a look-alike name, a script interpreter.
        (Some("/tmp/kubectl"), Action::Deny, "nothing-else-may-exec"),
        (
            Some("/usr/bin/kubectl2"),
            Action::Deny,
            "nothing-else-may-exec",
        ),
        (
            Some("/usr/bin/python3"),
            Action::Deny,
            "nothing-else-may-exec",
        ),
        // The process is unknown (not redirected, or gone, or unreadable).
        (None, Action::Deny, "nothing-else-may-exec"),
        (Some(""), Action::Deny, "nothing-else-may-exec"),
    ] {
        assert_eq!(
            outcome(&set, &from(executable), "POST", exec),
            (action, rule.to_owned()),
            "{executable:?}"
        );
    }
    // `policy explain` says why the allow did not match.
    let request = req("POST", exec);
    let python = from(Some("/usr/bin/python3"));
    let text = set
        .explain(&PolicyInput::new(&request, &python))
        .to_string();
    assert!(
        text.contains(
            "skip  rule \"kubectl-may-exec\": executable \"/usr/bin/python3\" does not match \"/usr/bin/kubectl\", \"/usr/local/bin/kubectl\""
        ),
        "{text}"
    );
    let unknown = from(None);
    let text = set
        .explain(&PolicyInput::new(&request, &unknown))
        .to_string();
    assert!(
        text.contains("chaperone does not know the executable of the calling process"),
        "{text}"
    );
}

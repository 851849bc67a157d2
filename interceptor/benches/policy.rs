//! Policy evaluation cost: ns per decision on a 100-rule policy, for a
//! request the last rule matches and for one that falls to the default.
//!
//! `cargo bench -p chaperone --bench policy`

use std::hint::black_box;

use chaperone::identity::{Caller, PodRef};
use chaperone::policy::{AgentPolicy, PolicyInput, PolicySet, PolicyStore, parse_documents};
use chaperone::request::RequestInfo;
use criterion::{Criterion, criterion_group, criterion_main};

/// 99 rules that a typical request gets past at different checks (verbs,
/// groups, resources, namespaces, names), then one that matches it.
fn hundred_rule_policy() -> String {
    let mut yaml = String::from(
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: big}\nspec:\n  \
         subjects:\n    - serviceAccounts: [\"agents/coder-*\"]\n    - groups: [\"ai-*\"]\n  rules:\n",
    );
    for i in 0..99 {
        let rule = match i % 5 {
            0 => format!(
                "{{name: r{i}, verbs: [create, update], resources: [\"res{i}\"], action: deny}}"
            ),
            1 => format!("{{name: r{i}, apiGroups: [\"group{i}.example.com\"], action: deny}}"),
            2 => {
                format!("{{name: r{i}, resources: [\"res{i}\", \"res{i}/status\"], action: mask}}")
            }
            3 => format!(
                "{{name: r{i}, apiGroups: [apps], resources: [deployments], namespaces: [\"team-{i}-*\"], action: allow}}"
            ),
            _ => format!(
                "{{name: r{i}, apiGroups: [apps], resources: [deployments], names: [\"svc-{i}-?\"], verbs: [get], action: deny}}"
            ),
        };
        yaml.push_str(&format!("    - {rule}\n"));
    }
    yaml.push_str(
        "    - {name: last, verbs: [patch], apiGroups: [apps], resources: [deployments], \
         namespaces: [\"dev-*\"], action: allow}\n  defaultAction: deny\n",
    );
    yaml
}

fn set() -> PolicySet {
    let policies: Vec<AgentPolicy> = parse_documents(&hundred_rule_policy())
        .into_iter()
        .map(|d| d.expect("valid").policy)
        .collect();
    PolicySet::compile(&policies).expect("compiles")
}

fn caller() -> Caller {
    Caller {
        username: "system:serviceaccount:agents:coder-1".into(),
        groups: vec![
            "system:serviceaccounts".into(),
            "system:authenticated".into(),
        ],
        pod: Some(PodRef {
            namespace: "agents".into(),
            name: "coder-1-abc".into(),
            service_account: "coder-1".into(),
            ..PodRef::default()
        }),
        ..Caller::default()
    }
}

fn bench(c: &mut Criterion) {
    let set = set();
    let caller = caller();
    let late = RequestInfo::parse(
        &http::Method::PATCH,
        "/apis/apps/v1/namespaces/dev-7/deployments/web",
        None,
    );
    let default = RequestInfo::parse(
        &http::Method::DELETE,
        "/apis/apps/v1/namespaces/prod-1/deployments/web",
        None,
    );
    let late_input = PolicyInput::new(&late, &caller);
    let default_input = PolicyInput::new(&default, &caller);
    assert_eq!(&*set.evaluate(&late_input).rule, "last");
    assert_eq!(&*set.evaluate(&default_input).rule, "default");

    let mut group = c.benchmark_group("policy/100-rules");
    group.bench_function("late-rule", |b| {
        b.iter(|| set.evaluate(black_box(&late_input)))
    });
    group.bench_function("default", |b| {
        b.iter(|| set.evaluate(black_box(&default_input)))
    });
    let store = PolicyStore::new();
    store.replace_all(
        &parse_documents(&hundred_rule_policy())
            .into_iter()
            .map(|d| d.expect("valid").policy)
            .collect::<Vec<_>>(),
    );
    group.bench_function("late-rule-via-store", |b| {
        b.iter(|| store.evaluate(black_box(&late_input)))
    });
    group.finish();

    c.bench_function("request/parse-exec", |b| {
        b.iter(|| {
            RequestInfo::parse(
                black_box(&http::Method::POST),
                black_box("/api/v1/namespaces/dev/pods/web-0/exec"),
                black_box(Some(
                    "command=sh&command=-c&command=ls&container=app&stdin=true",
                )),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

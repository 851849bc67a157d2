//! Policy evaluation must not allocate per request: a counting global
//! allocator proves it for every kind of decision.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use chaperone::identity::{Caller, PodRef};
use chaperone::policy::{PolicyInput, PolicyStore, policy_files};
use chaperone::request::RequestInfo;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn sa(ns: &str, name: &str, labels: &[(&str, &str)]) -> Caller {
    Caller {
        username: format!("system:serviceaccount:{ns}:{name}"),
        groups: vec![
            "system:serviceaccounts".into(),
            "system:authenticated".into(),
        ],
        pod: Some(PodRef {
            namespace: ns.into(),
            name: format!("{name}-0"),
            service_account: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..PodRef::default()
        }),
        ..Caller::default()
    }
}

#[test]
fn evaluating_the_example_policies_never_allocates() {
    let store = PolicyStore::new();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies");
    store.load_files(&policy_files(&dir).unwrap()).unwrap();
    let set = store.snapshot();

    let callers = [
        sa("agents", "reader", &[]),
        sa("agents", "deployer", &[]),
        sa("ci-1", "default", &[("chaperone.dev/role", "deployer")]),
        sa("nobody", "x", &[]),
    ];
    let requests: Vec<RequestInfo> = [
        ("GET", "/version", None),
        ("GET", "/api/v1/namespaces/dev/secrets/db", None),
        ("GET", "/api/v1/secrets", Some("watch=1")),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/dev-1/deployments/web",
            None,
        ),
        (
            "DELETE",
            "/apis/apps/v1/namespaces/prod-a/deployments/web",
            None,
        ),
        (
            "POST",
            "/api/v1/namespaces/prod-a/pods/web-0/exec",
            Some("command=sh"),
        ),
        (
            "POST",
            "/api/v1/namespaces/dev-1/pods/web-0/exec",
            Some("command=rm&command=-rf&command=%2Fdata"),
        ),
        (
            "GET",
            "/api/v1/namespaces/dev-1/services/web:80/proxy/",
            None,
        ),
    ]
    .iter()
    .map(|(m, p, q)| RequestInfo::parse(&http::Method::from_bytes(m.as_bytes()).unwrap(), p, *q))
    .collect();

    let mut decisions = Vec::with_capacity(callers.len() * requests.len() * 2);
    // warm up lazily initialized state (thread-locals, arc-swap debts)
    for caller in &callers {
        decisions.push(store.evaluate(&PolicyInput::new(&requests[0], caller)));
    }
    decisions.clear();

    let n = allocations_during(|| {
        for caller in &callers {
            for request in &requests {
                let input = PolicyInput::new(request, caller);
                decisions.push(set.evaluate(&input));
                decisions.push(store.evaluate(&input));
            }
        }
    });
    assert_eq!(n, 0, "evaluation allocated {n} times");
    // the decisions are real ones
    assert!(decisions.iter().any(|d| d.dry_run || d.refuses()));
    assert!(decisions.iter().any(|d| !d.refuses()));
}

//! Smoke.
use chaperone_tests::{in_process, inprocess::{Harness, HarnessSpec}};

in_process!(smoke);

fn smoke() {
    let h = Harness::start(HarnessSpec::default()).unwrap();
    let reply = h.get("/api/v1/namespaces/default/configmaps");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let out = h.kubectl(&["get", "pods", "-o", "name"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

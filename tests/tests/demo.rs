//! `cargo xtask demo` tells the whole story: this runs the same binary and
//! checks that its transcript shows every step's outcome. Needs root (the
//! demo loads eBPF programs); skips otherwise.

use std::process::Command;

use chaperone_tests::require_root;

#[test]
fn the_demo_runs_to_completion_and_tells_each_outcome() {
    require_root!();
    let out = Command::new(env!("CARGO_BIN_EXE_chaperone-demo"))
        .output()
        .expect("run chaperone-demo");
    let transcript = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{transcript}\n{errors}",
        out.status
    );
    for expected in [
        "agent$ kubectl get pods -n prod-a",
        "=> the agent sees the pods",
        "decoded by the agent: \"<masked by chaperone",
        "=> the password never reached the agent",
        "Bearer <masked by chaperone: jwt>",
        "Error from server (Forbidden)",
        "no-exec-in-prod",
        "=> held: the production deployment is untouched while a person decides",
        "human$ kubectl chaperone approve apr-",
        "=> a person approved it from another terminal with kubectl chaperone",
        "deployment.apps \"payments\" deleted",
        "=> the held delete completed after the approval; the deployment is gone",
        "deployment.apps/preview created",
        "=> every session is attributed to the pod and its service account",
        "=> the agent's commands are one agent session, its connections inside",
        "=> the replay shows the Secret read and what was masked",
        "=> every connection's hash chain verifies under the node's record key",
        "=> the audit log holds the refusals too",
        "Done.",
    ] {
        assert!(
            transcript.contains(expected),
            "the transcript lacks {expected:?}:\n{transcript}"
        );
    }
    for secret in ["hunter2-prod-db", "eyJzdWIiOiJwYXltZW50cyJ9"] {
        assert!(
            !transcript.contains(secret),
            "the transcript leaks {secret:?}:\n{transcript}"
        );
    }
}

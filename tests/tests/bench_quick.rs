//! `cargo xtask bench --quick` proves the harness works: the simulator,
//! chaperone, nginx and the Go peer start, the same client runs against
//! each, CPU and memory are read, instructions per GET are counted under
//! callgrind, the report is written with the targets marked, and every
//! request chaperone saw is in its audit log. No performance thresholds:
//! these are debug builds on a shared machine. Needs root (chaperone
//! attaches its eBPF programs), nginx and valgrind (`cargo xtask setup`
//! installs them); skips otherwise. The Go peer runs when the kube cache
//! holds Go (`cargo xtask kube` or `cargo xtask bench` installs it).

use std::process::Command;

use chaperone_tests::{
    bench::{
        callgrind::valgrind,
        setup::{go_toolchain, nginx_binary},
    },
    e2e::workspace_binary,
    require_root,
};

#[test]
fn the_quick_bench_measures_every_target_and_loses_no_audit_event() {
    require_root!();
    if nginx_binary().is_none() || valgrind().is_none() {
        eprintln!(
            "SKIPPED {}: nginx or valgrind is not installed and could not be (`cargo xtask \
             setup` installs the Debian packages)",
            module_path!()
        );
        return;
    }
    let go = go_toolchain().is_some();
    let chaperone = workspace_binary("chaperone");
    let bin_dir = chaperone.parent().expect("target dir").to_path_buf();
    let out = tempfile::tempdir().expect("temp dir");
    let run = Command::new(env!("CARGO_BIN_EXE_chaperone-bench"))
        .arg("--quick")
        .args(["--seconds", "2", "--rate", "10", "--concurrency", "4"])
        // Debug builds are slow under valgrind: short counted runs.
        .args(["--callgrind-requests", "5"])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out-dir")
        .arg(out.path())
        .output()
        .expect("run chaperone-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "chaperone-bench --quick failed ({}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("latest.json")).expect("latest.json written"),
    )
    .expect("latest.json is JSON");
    let markdown = std::fs::read_to_string(out.path().join("latest.md")).expect("latest.md");
    assert!(
        markdown.contains("| chaperone (full pipeline) |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("### GET secret alone, open loop at 50 req/s"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| direct over HTTP/1.1 (context) |"),
        "{markdown}"
    );
    let runs = report["runs"].as_array().expect("runs");
    let targets: &[&str] = if go {
        &["direct", "chaperone", "nginx", "go-peer"]
    } else {
        &["direct", "chaperone", "nginx"]
    };
    if go {
        assert!(
            markdown.contains("| Go httputil.ReverseProxy |"),
            "{markdown}"
        );
    }
    for &target in targets {
        let h1 = target == "direct";
        for (open_loop, get_alone, http1) in [
            (true, false, false),
            (false, false, false),
            (true, true, false),
            (true, true, h1),
        ] {
            let run = runs
                .iter()
                .find(|r| {
                    r["target"] == target
                        && r["open_loop"] == open_loop
                        && r["get_alone"] == get_alone
                        && r["http1"] == http1
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no {target} run (open loop {open_loop}, get alone {get_alone}, http1 {http1}):\n{stdout}"
                    )
                });
            assert!(
                run["load"]["requests"].as_u64().unwrap_or(0) > 0,
                "{target} answered nothing:\n{stdout}"
            );
            assert_eq!(run["load"]["errors"], 0, "{target} errors:\n{stdout}");
        }
    }
    // The second chaperone (`--upstream-http1-connections 0`) runs the
    // get-alone runs only, and the report shows its row beside the default.
    let upstream_http2: Vec<_> = runs
        .iter()
        .filter(|r| r["target"] == "chaperone-upstream-http2")
        .collect();
    assert!(
        !upstream_http2.is_empty() && upstream_http2.iter().all(|r| r["get_alone"] == true),
        "chaperone HTTP/2-only runs: {upstream_http2:?}\n{stdout}"
    );
    for run in &upstream_http2 {
        assert!(
            run["load"]["requests"].as_u64().unwrap_or(0) > 0,
            "{stdout}"
        );
        assert_eq!(run["load"]["errors"], 0, "HTTP/2-only errors:\n{stdout}");
    }
    assert!(
        markdown.contains("| chaperone, HTTP/2 upstream only |"),
        "{markdown}"
    );
    let get_alone = runs
        .iter()
        .find(|r| r["get_alone"] == true)
        .expect("a get-alone run");
    let ops = get_alone["load"]["ops"].as_array().expect("ops");
    assert!(
        ops.iter()
            .all(|o| o["op"] == "get-secret" || o["count"] == 0),
        "a get-alone run sent other operations: {ops:?}"
    );
    // Memory per idle connection and per idle watch, through every proxy:
    // each one asked for opened, and holding them grew the proxy's RSS.
    let idle = report["idle"].as_array().expect("idle rows");
    let proxies: &[&str] = if go {
        &["chaperone", "nginx", "go-peer"]
    } else {
        &["chaperone", "nginx"]
    };
    for &target in proxies {
        for kind in ["connection", "watch"] {
            let row = idle
                .iter()
                .find(|r| r["target"] == target && r["kind"] == kind)
                .unwrap_or_else(|| panic!("no idle {kind} row for {target}:\n{stdout}"));
            assert_eq!(
                row["open"], row["asked"],
                "{target} {kind}s: {row}\n{stdout}"
            );
            assert!(
                row["rss_kib"].as_u64() > row["baseline_kib"].as_u64(),
                "{target}: holding idle {kind}s did not grow its RSS: {row}"
            );
        }
    }
    assert!(
        markdown.contains("### Memory per idle connection and per idle watch"),
        "{markdown}"
    );
    // Many agents, each its own pod-bound token: every watch opened, every
    // GET answered, chaperone's CPU and RSS read over the window.
    let agents = &report["agents"];
    assert_eq!(
        agents["watches_open"], agents["watches_asked"],
        "{agents}\n{stdout}"
    );
    assert!(agents["requests"].as_u64().unwrap_or(0) > 0, "{agents}");
    assert_eq!(agents["errors"], 0, "{agents}\n{stdout}");
    assert!(
        agents["vcpu"].as_f64().unwrap_or(0.0) > 0.0 && agents["rss_kib"].as_u64().unwrap_or(0) > 0,
        "{agents}"
    );
    assert!(
        markdown.contains("pods × 10 watches × 1 req/s: CPU"),
        "{markdown}"
    );
    // The kubectl session ran through both and its ratio is marked.
    let session = &report["session"];
    assert!(
        session["ratio"].as_f64().unwrap_or(0.0) > 0.0
            && session["chaperone_seconds"][0].as_f64().unwrap_or(0.0) > 0.0,
        "{session}\n{stdout}"
    );
    assert!(markdown.contains("| whole kubectl session ("), "{markdown}");
    assert_eq!(report["audit"]["lost"], 0, "audit events lost:\n{stdout}");

    // The big Secret list ran directly and through chaperone, every list
    // answered, and chaperone masked it: what the lister received through
    // chaperone is a small fraction of the upstream's list.
    let big = &report["big_list"];
    let upstream_bytes = big["list_bytes_upstream"].as_u64().unwrap_or(0);
    assert!(upstream_bytes >= 5_000_000, "{big}\n{stdout}");
    for (i, target) in ["direct", "chaperone"].iter().enumerate() {
        let row = &big["rows"][i];
        assert_eq!(row["target"], *target, "{big}");
        assert!(
            row["lists"].as_u64().unwrap_or(0) > 0,
            "{target}: {row}\n{stdout}"
        );
        assert_eq!(row["list_errors"], 0, "{target}: {row}\n{stdout}");
        assert_eq!(row["get_beside"]["errors"], 0, "{target}: {row}\n{stdout}");
    }
    let masked = big["rows"][1]["list_bytes_received"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        masked < upstream_bytes / 100,
        "chaperone passed {masked} of the list's {upstream_bytes} bytes: not masked?\n{stdout}"
    );
    assert!(
        markdown.contains("Secret list beside other agents' GETs"),
        "{markdown}"
    );

    // Instructions per GET under callgrind: chaperone and nginx each
    // counted over two runs, the long one with more requests, and the
    // ratio marked against the target.
    let counted = report["instructions"].as_array().expect("instructions");
    for label in [
        "chaperone (full pipeline)",
        "nginx (TLS reverse proxy, 1 worker)",
    ] {
        let row = counted
            .iter()
            .find(|i| i["target"] == label && i["op"] == "get-secret")
            .unwrap_or_else(|| panic!("no callgrind count for {label}:\n{stdout}"));
        let (short, long) = (row["requests"][0].as_u64(), row["requests"][1].as_u64());
        assert!(
            short.unwrap_or(0) > 0 && long > short,
            "{label}: requests {short:?} then {long:?}\n{stdout}"
        );
        assert!(
            row["per_request"].as_f64().unwrap_or(0.0) > 10_000.0,
            "{label}: a proxied GET over TLS costs more than 10k instructions: {row}"
        );
    }
    assert!(
        markdown.contains("| instructions per GET, full pipeline |"),
        "{markdown}"
    );
    assert!(markdown.contains("### Targets (issue 26)"), "{markdown}");
}

//! Masking as an agent sees it: real API server responses in, what kubectl
//! would receive out.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::*;

// === helpers ===

/// A response captured from a real kube-apiserver, kept in the repository
/// (`tests/fixtures/kube-apiserver-v1.20.2/`).
fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/kube-apiserver-v1.20.2")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

fn request(verb: &str, group: &str, resource: &str, subresource: &str) -> RequestInfo {
    RequestInfo {
        is_resource_request: true,
        verb: verb.into(),
        api_group: group.into(),
        resource: resource.into(),
        subresource: subresource.into(),
        namespace: "prod-a".into(),
        ..RequestInfo::default()
    }
}

fn masker() -> Masker {
    Masker::new(&MaskRules::default()).unwrap()
}

fn plan(masker: &Masker, verb: &str, resource: &str, subresource: &str) -> ResponseMask {
    let group = match resource {
        "deployments" | "statefulsets" => "apps",
        "cronjobs" | "jobs" => "batch",
        _ => "",
    };
    masker
        .plan(
            &request(verb, group, resource, subresource),
            Some("application/json"),
        )
        .unwrap()
        .expect("a masked resource")
}

/// Runs `input` through a fresh transform, cut at `splits`.
fn run_split(
    masker: &Masker,
    verb: &str,
    resource: &str,
    subresource: &str,
    input: &[u8],
    splits: &[usize],
) -> Result<(Vec<u8>, MaskStats), MaskError> {
    let mut mask = plan(masker, verb, resource, subresource);
    let mut out = Vec::new();
    let mut at = 0;
    for &split in splits.iter().chain([&input.len()]) {
        mask.push(&input[at..split], &mut out)?;
        at = split;
    }
    mask.finish(&mut out)?;
    Ok((out, mask.stats().clone()))
}

fn run(verb: &str, resource: &str, input: &[u8]) -> (Vec<u8>, MaskStats) {
    run_split(&masker(), verb, resource, "", input, &[]).unwrap()
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    memchr::memmem::find(haystack, needle.as_bytes()).is_some()
}

/// The secret values of the fixtures, decoded and as the API server sends
/// them: none of these may reach an agent.
const FIXTURE_SECRETS: &[&str] = &[
    "hunter2-s3cr3t",
    "aHVudGVyMi1zM2NyM3Q=",
    "aHVudGVyMi1zM2NyM3Q",
    "postgres://app:hunter2-s3cr3t@db:5432/app",
    "cG9zdGdyZXM6Ly9hcHA6aHVudGVyMi1zM2NyM3RAZGI6NTQzMi9hcHA=",
    "YWJj",
    "hunter2",
];

fn assert_no_fixture_secret(out: &[u8]) {
    for secret in FIXTURE_SECRETS {
        assert!(
            !contains(out, secret),
            "{secret:?} leaked in:\n{}",
            String::from_utf8_lossy(out)
        );
    }
}

fn decode(value: &Value) -> String {
    String::from_utf8(STANDARD.decode(value.as_str().unwrap()).unwrap()).unwrap()
}

// === Secrets, from the real API server's responses ===

#[test]
fn secret_get_masks_values_and_the_last_applied_annotation() {
    let input = fixture("secret-get.body");
    let (out, stats) = run("get", "secrets", &input);
    assert_no_fixture_secret(&out);

    let got: Value = serde_json::from_slice(&out).expect("valid JSON");
    assert_eq!(
        decode(&got["data"]["password"]),
        "<masked by chaperone: 14 bytes>"
    );
    assert_eq!(
        decode(&got["data"]["url"]),
        "<masked by chaperone: 41 bytes>"
    );

    let applied =
        got["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap();
    let applied: Value = serde_json::from_str(applied).expect("annotation is still JSON");
    assert_eq!(
        applied["stringData"]["password"],
        "<masked by chaperone: 14 bytes>"
    );
    assert_eq!(
        applied["stringData"]["url"],
        "<masked by chaperone: 41 bytes>"
    );
    assert_eq!(applied["metadata"]["name"], "db");

    // Everything else is what the API server sent.
    let mut expected: Value = serde_json::from_slice(&input).unwrap();
    expected["data"] = got["data"].clone();
    expected["metadata"]["annotations"] = got["metadata"]["annotations"].clone();
    assert_eq!(got, expected);

    assert_eq!(stats.values_masked, 4);
    assert!(stats.fields.contains("data.password"), "{stats:?}");
    let annotation = stats.annotation().unwrap();
    assert!(annotation.starts_with("values=4 "), "{annotation}");
    assert!(
        annotation.contains("last-applied-configuration[stringData.url]"),
        "{annotation}"
    );
}

#[test]
fn secret_list_table_and_watch_fixtures_leak_nothing_and_stay_kubectl_readable() {
    let (out, stats) = run("list", "secrets", &fixture("secret-list.body"));
    assert_no_fixture_secret(&out);
    let list: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        decode(&list["items"][0]["data"]["password"]),
        "<masked by chaperone: 14 bytes>"
    );
    assert_eq!(stats.values_masked, 4);

    let (out, stats) = run("list", "secrets", &fixture("secret-list-table.body"));
    assert_no_fixture_secret(&out);
    let table: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        table["rows"][0]["cells"][2], 2,
        "the Data column (a count) is kept"
    );
    let applied = table["rows"][0]["object"]["metadata"]["annotations"]
        ["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .unwrap();
    assert!(serde_json::from_str::<Value>(applied).is_ok());
    assert_eq!(stats.values_masked, 2);

    let input = fixture("secret-watch.body");
    let (out, stats) = run("watch", "secrets", &input);
    assert_no_fixture_secret(&out);
    assert_eq!(stats.values_masked, 3);
    let events: Vec<Value> = out
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("each event is one JSON line"))
        .collect();
    assert_eq!(events.len(), 3);
    for (event, kind) in events.iter().zip(["ADDED", "MODIFIED", "DELETED"]) {
        assert_eq!(event["type"], kind);
        assert_eq!(
            decode(&event["object"]["data"]["token"]),
            "<masked by chaperone: 3 bytes>"
        );
    }
    // Framing kept: one event per line, as the API server wrote them.
    assert_eq!(
        out.iter().filter(|&&b| b == b'\n').count(),
        input.iter().filter(|&&b| b == b'\n').count()
    );
}

#[test]
fn every_split_point_gives_the_same_output() {
    let masker = masker();
    for (name, verb) in [
        ("secret-get.body", "get"),
        ("secret-list.body", "list"),
        ("secret-list-table.body", "list"),
        ("secret-watch.body", "watch"),
    ] {
        let input = fixture(name);
        let (whole, stats) = run_split(&masker, verb, "secrets", "", &input, &[]).unwrap();
        for split in 0..=input.len() {
            let (out, split_stats) =
                run_split(&masker, verb, "secrets", "", &input, &[split]).unwrap();
            assert_eq!(text(&out), text(&whole), "{name} split at {split}");
            assert_eq!(split_stats, stats);
        }
        // Byte by byte.
        let every: Vec<usize> = (1..input.len()).collect();
        let (out, _) = run_split(&masker, verb, "secrets", "", &input, &every).unwrap();
        assert_eq!(out, whole, "{name} byte by byte");
    }
}

#[test]
fn a_secret_without_values_is_forwarded_byte_for_byte() {
    let status_403 = fixture("status-403.body");
    let bodies: [&[u8]; 3] = [
        br#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"empty","namespace":"a","labels":{"x":"y"},"annotations":{"note":"password=not-looked-at"}},"type":"Opaque"}"#,
        b"{\n  \"kind\": \"Secret\",\n  \"data\": {},\n  \"metadata\": {\"name\": \"e\\u0041\"},\n  \"x\": [1, -2.5e3, true, false, null, \"s\"]\n}\n",
        // A Status (the API server's 403) passes through a Secret transform.
        &status_403,
    ];
    for body in bodies {
        let (out, stats) = run("get", "secrets", body);
        assert_eq!(text(&out), text(body));
        assert!(stats.is_empty());
        assert_eq!(stats.annotation(), None);
    }
}

#[test]
fn table_rows_with_full_objects_and_watches_of_tables_are_masked() {
    let body = br#"{"kind":"Table","apiVersion":"meta.k8s.io/v1","rows":[{"cells":["db"],"object":{"kind":"Secret","metadata":{"name":"db"},"data":{"k":"c2VjcmV0LXZhbHVl"}}}]}"#;
    let (out, _) = run("list", "secrets", body);
    assert!(!contains(&out, "c2VjcmV0LXZhbHVl"));
    let watch = [br#"{"type":"ADDED","object":"#.as_slice(), body, b"}\n"].concat();
    let (out, stats) = run("watch", "secrets", &watch);
    assert!(!contains(&out, "c2VjcmV0LXZhbHVl"));
    assert_eq!(stats.values_masked, 1);
}

#[test]
fn string_data_escapes_and_nested_values_are_masked() {
    let body = br#"{"kind":"Secret","stringData":{"a":"caf\u00e9 \"quoted\"","b":null},"data":{"esc":"YWJj\/Q==","pad":"YWJjZA\u003d\u003d","deep":{"x":["c2VjcmV0"]}}}"#;
    let (out, stats) = run("get", "secrets", body);
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got["stringData"]["a"], "<masked by chaperone: 14 bytes>");
    assert_eq!(got["stringData"]["b"], Value::Null);
    assert_eq!(
        decode(&got["data"]["esc"]),
        "<masked by chaperone: 4 bytes>"
    );
    assert_eq!(
        decode(&got["data"]["pad"]),
        "<masked by chaperone: 4 bytes>"
    );
    assert!(!contains(&out, "c2VjcmV0"));
    assert_eq!(stats.values_masked, 4);
}

#[test]
fn protobuf_is_refused_never_forwarded() {
    let masker = masker();
    let get = request("get", "", "secrets", "");
    let err = masker
        .plan(&get, Some("application/vnd.kubernetes.protobuf"))
        .unwrap_err();
    assert_eq!(err.status().code, 502);
    assert!(err.to_string().contains("application/json"), "{err}");

    // Mislabelled protobuf is refused by the parser.
    let mut mask = masker
        .plan(&get, Some("application/json"))
        .unwrap()
        .unwrap();
    let mut out = Vec::new();
    let err = mask
        .push(&fixture("secret-get-protobuf.body"), &mut out)
        .unwrap_err();
    assert!(
        matches!(err, MaskError::InvalidJson { offset: 0, .. }),
        "{err:?}"
    );
    assert!(out.is_empty());
    assert!(mask.push(b"{}", &mut out).is_err(), "errors are sticky");
    assert!(mask.finish(&mut out).is_err());
}

#[test]
fn a_truncated_or_broken_body_is_an_error_and_never_leaks_the_value_in_flight() {
    let masker = masker();
    let input = fixture("secret-get.body");
    let end = input
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap()
        + 1;
    for cut in 1..end {
        let mut mask = plan(&masker, "get", "secrets", "");
        let mut out = Vec::new();
        mask.push(&input[..cut], &mut out).unwrap();
        let err = mask.finish(&mut out).unwrap_err();
        assert!(matches!(err, MaskError::Truncated { .. }), "{err:?}");
        for secret in ["aHVu", "cG9z", "hunter", "s3cr3t"] {
            assert!(!contains(&out, secret), "cut at {cut} leaked {secret}");
        }
    }
    for broken in [
        &br#"{"data":{"a":"x"}"#[..],
        br#"{"data":{"a":"x"}}}"#,
        br#"{"data" {"a":"x"}}"#,
        br#"{"data":["a":"x"]}"#,
        br#"{"data":{"a":"\q"}}"#,
        br#"{"data":{"a":tru}}"#,
        br#"{"a":1} {"b":2}"#,
        b"[",
    ] {
        let result = run_split(&masker, "get", "secrets", "", broken, &[]);
        assert!(result.is_err(), "{} was accepted", text(broken));
    }
    let deep = "[".repeat(json::MAX_DEPTH + 1);
    let err = run_split(&masker, "get", "secrets", "", deep.as_bytes(), &[]).unwrap_err();
    assert!(matches!(err, MaskError::TooDeep { .. }));
    // An empty body has nothing to leak.
    assert!(run_split(&masker, "get", "secrets", "", b"", &[]).is_ok());
}

#[test]
fn huge_secret_values_are_masked_without_being_buffered() {
    let value = "QUJD".repeat(1 << 20); // 4 MiB of base64, 3 MiB decoded
    let body = format!(r#"{{"kind":"Secret","data":{{"big":"{value}"}}}}"#);
    let (out, stats) = run("get", "secrets", body.as_bytes());
    assert!(out.len() < 200);
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        decode(&got["data"]["big"]),
        "<masked by chaperone: 3145728 bytes>"
    );
    assert_eq!(stats.oversized_values, 0);
}

#[test]
fn oversized_values_that_must_be_read_are_replaced_whole() {
    let rules = MaskRules {
        max_value_bytes: 4096,
        ..MaskRules::default()
    };
    let masker = Masker::new(&rules).unwrap();
    let value = "harmless text ".repeat(1000);
    let body = format!(r#"{{"kind":"ConfigMap","data":{{"big":"{value}","small":"ok"}}}}"#);
    let (out, stats) = run_split(&masker, "get", "configmaps", "", body.as_bytes(), &[]).unwrap();
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        got["data"]["big"],
        format!("<masked by chaperone: {} bytes>", value.len())
    );
    assert_eq!(got["data"]["small"], "ok");
    assert_eq!(stats.oversized_values, 1);
}

// === ConfigMaps and env values: pattern rules ===

const PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAsecretkeymaterial\nZm9vYmFy\n-----END RSA PRIVATE KEY-----\n";

#[test]
fn configmap_values_are_pattern_masked_and_the_rest_is_byte_identical() {
    let clean = br#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"app","annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"data\":{\"mode\":\"fast\"}}\n"}},"data":{"mode":"fast","url":"https://example.com/x"},"binaryData":{"b":"AAEC"}}"#;
    let (out, stats) = run("get", "configmaps", clean);
    assert_eq!(text(&out), text(clean));
    assert!(stats.is_empty());

    let pem_json = serde_json::to_string(PEM).unwrap();
    let applied = serde_json::to_string(r#"{"data":{"db":"password=hunter2"}}"#).unwrap();
    let binary = STANDARD.encode("token: abcdef123456");
    let body = format!(
        r#"{{"kind":"ConfigMap","metadata":{{"annotations":{{"kubectl.kubernetes.io/last-applied-configuration":{applied}}}}},"data":{{"key.pem":{pem_json},"db":"password=hunter2","dsn":"postgres://app:s3cr3t@db/app","mode":"fast"}},"binaryData":{{"b":"{binary}"}}}}"#
    );
    let (out, stats) = run("get", "configmaps", body.as_bytes());
    for secret in [
        "hunter2",
        "s3cr3t",
        "secretkeymaterial",
        "Zm9vYmFy",
        "abcdef123456",
        &binary,
    ] {
        assert!(!contains(&out, secret), "{secret} leaked: {}", text(&out));
    }
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        got["data"]["key.pem"],
        "<masked by chaperone: pem-private-key>\n"
    );
    assert_eq!(
        got["data"]["db"],
        "password=<masked by chaperone: password-assignment>"
    );
    assert_eq!(
        got["data"]["dsn"],
        "postgres://app:<masked by chaperone: password-in-url>@db/app"
    );
    assert_eq!(got["data"]["mode"], "fast");
    assert_eq!(
        decode(&got["binaryData"]["b"]),
        "token: <masked by chaperone: password-assignment>"
    );
    let applied =
        got["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap();
    let applied: Value = serde_json::from_str(applied).unwrap();
    assert_eq!(
        applied["data"]["db"],
        "password=<masked by chaperone: password-assignment>"
    );
    assert_eq!(stats.values_masked, 5);
}

#[test]
fn env_values_in_pods_and_workloads_are_masked() {
    let containers = r#"[{"name":"app","image":"x","env":[{"name":"DB_PASSWORD","value":"plain-value"},{"name":"DSN","value":"mysql://u:pw-in-url@h/db"},{"name":"MODE","value":"fast"},{"name":"FROM","valueFrom":{"secretKeyRef":{"name":"s","key":"k"}}}]}]"#;
    let pod = format!(
        r#"{{"kind":"Pod","spec":{{"containers":{containers},"initContainers":{containers}}},"status":{{}}}}"#
    );
    let deployment = format!(
        r#"{{"kind":"Deployment","spec":{{"replicas":1,"template":{{"metadata":{{}},"spec":{{"containers":{containers}}}}}}}}}"#
    );
    let cronjob = format!(
        r#"{{"kind":"CronJob","spec":{{"jobTemplate":{{"spec":{{"template":{{"spec":{{"containers":{containers}}}}}}}}}}}}}"#
    );
    for (resource, body, values) in [
        ("pods", pod, 4),
        ("deployments", deployment, 2),
        ("cronjobs", cronjob, 2),
    ] {
        let (out, stats) = run("get", resource, body.as_bytes());
        assert!(!contains(&out, "plain-value"), "{resource}: {}", text(&out));
        assert!(!contains(&out, "pw-in-url"), "{resource}");
        assert!(
            contains(&out, r#"{"name":"MODE","value":"fast"}"#),
            "{resource}"
        );
        assert!(
            contains(&out, r#""value":"<masked by chaperone: 11 bytes>""#),
            "{resource}"
        );
        assert!(serde_json::from_slice::<Value>(&out).is_ok());
        assert_eq!(stats.values_masked, values, "{resource}");
        assert!(stats.fields.contains("env.DB_PASSWORD"), "{stats:?}");
    }
}

// === Logs and exec output ===

fn stream(mask: &mut ResponseMask, chunks: &[&[u8]]) -> String {
    let mut out = Vec::new();
    for chunk in chunks {
        mask.push(chunk, &mut out).unwrap();
    }
    mask.finish(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn logs_mask_a_pem_block_across_lines_whatever_the_chunking() {
    let masker = masker();
    let log = format!("starting\nkey follows: {PEM}token=abc123 done\nbye\n");
    let expected = "starting\nkey follows: <masked by chaperone: pem-private-key>\n\
                    token=<masked by chaperone: password-assignment> done\nbye\n";
    for split in 0..=log.len() {
        let mut mask = plan(&masker, "get", "pods", "log");
        let (a, b) = log.as_bytes().split_at(split);
        assert_eq!(stream(&mut mask, &[a, b]), expected, "split at {split}");
        assert_eq!(mask.stats().lines_dropped, 3, "two key lines and END");
    }
}

#[test]
fn exec_output_masks_a_secret_split_across_chunks() {
    let masker = masker();
    let env = "HOME=/root\nGITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789\nAWS=AKIAIOSFODNN7EXAMPLE\r\n";
    for split in 0..=env.len() {
        for second in split..=env.len() {
            let mut mask = masker.exec_output();
            let bytes = env.as_bytes();
            let out = stream(
                &mut mask,
                &[&bytes[..split], &bytes[split..second], &bytes[second..]],
            );
            assert!(!out.contains("abcdefghijklmnop"), "{split}/{second}: {out}");
            assert!(!out.contains("IOSFODNN7"), "{split}/{second}: {out}");
            assert!(out.starts_with("HOME=/root\n"));
            assert!(
                out.ends_with("AWS=<masked by chaperone: aws-access-key-id>\r\n"),
                "{out}"
            );
        }
    }
}

#[test]
fn exec_flush_forwards_a_prompt_and_lines_are_forwarded_as_they_complete() {
    let mut mask = masker().exec_output();
    let mut out = Vec::new();
    mask.push(b"line one\n$ ", &mut out).unwrap();
    assert_eq!(text(&out), "line one\n");
    mask.flush(&mut out);
    assert_eq!(text(&out), "line one\n$ ");
}

/// An idle pause can split a line anywhere (a loaded node, a slow pipe):
/// what a flush released stays the context of the rest of the line, so a
/// value after a released `NAME=` or a secret cut by the pause is masked,
/// at every split point and with a flush at each.
#[test]
fn a_flush_mid_line_keeps_the_context_so_the_rest_is_still_masked() {
    let line = "export API_TOKEN=s3cr3t-value-0123456789 AWS=AKIAIOSFODNN7EXAMPLE done\n";
    let mut whole = Vec::new();
    let mut reference = masker().exec_output();
    reference.push(line.as_bytes(), &mut whole).unwrap();
    let whole = text(&whole);
    assert!(!whole.contains("s3cr3t"), "{whole}");
    for split in 1..line.len() {
        let mut mask = masker().exec_output();
        let mut out = Vec::new();
        mask.push(&line.as_bytes()[..split], &mut out).unwrap();
        mask.flush(&mut out);
        mask.push(&line.as_bytes()[split..], &mut out).unwrap();
        let out = text(&out);
        // A pause inside a value may let its start out (it was released
        // before the rest existed); the rest never follows it.
        let api = line.find("s3cr3t").unwrap();
        if split <= api {
            assert!(!out.contains("s3cr3t"), "{split}: {out}");
        }
        assert!(!out.contains("0123456789"), "{split}: {out}");
        let aws = line.find("AKIA").unwrap();
        if split <= aws {
            assert!(!out.contains("IOSFODNN7"), "{split}: {out}");
        }
        assert!(!out.contains("7EXAMPLE"), "{split}: {out}");
        assert!(out.starts_with("export API_TOKEN="), "{split}: {out}");
        assert!(out.ends_with(" done\n"), "{split}: {out}");
        if split <= api {
            assert_eq!(out, whole, "a pause before the secrets changes nothing");
        }
    }
    // Lines after a flushed one are masked on their own.
    let mut mask = masker().exec_output();
    let mut out = Vec::new();
    mask.push(b"Password: ", &mut out).unwrap();
    mask.flush(&mut out);
    mask.push(b"\nplain line\n", &mut out).unwrap();
    assert_eq!(text(&out), "Password: \nplain line\n");
}

#[test]
fn an_overlong_line_is_forwarded_in_bounded_pieces_without_leaking() {
    let rules = MaskRules {
        max_line_bytes: 1024,
        ..MaskRules::default()
    };
    let masker = Masker::new(&rules).unwrap();
    let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
    let mut line = String::new();
    while line.len() < 10_000 {
        line.push_str("filler ");
        if line.len().is_multiple_of(3) {
            line.push_str(jwt);
            line.push(' ');
        }
    }
    line.push('\n');
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let mut mask = masker.exec_output();
        let mut out = Vec::new();
        let mut rest = line.as_bytes();
        let mut peak = 0;
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len().min(300));
            mask.push(&rest[..n], &mut out).unwrap();
            rest = &rest[n..];
            if let Inner::Lines(lines) = &mask.inner {
                peak = peak.max(lines.pending_len());
            }
        }
        mask.finish(&mut out).unwrap();
        let out = text(&out);
        assert!(!out.contains("eyJzdWIi"), "{out}");
        assert!(out.contains("<masked by chaperone: jwt>"));
        assert!(peak <= 2 * 1024 + 300, "held back {peak} bytes");
    }
}

// === planning ===

#[test]
fn plan_picks_the_transform_from_the_request() {
    let masker = masker();
    let target = |verb, group, resource, sub| masker.target(&request(verb, group, resource, sub));
    assert_eq!(target("get", "", "secrets", ""), Some(Target::Secret));
    assert_eq!(target("watch", "", "secrets", ""), Some(Target::Secret));
    assert_eq!(
        target("list", "", "configmaps", ""),
        Some(Target::ConfigMap)
    );
    assert_eq!(target("get", "", "pods", ""), Some(Target::Workload));
    assert_eq!(
        target("get", "apps", "deployments", ""),
        Some(Target::Workload)
    );
    assert_eq!(
        target("get", "apps", "deployments", "status"),
        Some(Target::Workload)
    );
    assert_eq!(target("get", "apps", "deployments", "scale"), None);
    assert_eq!(target("get", "", "pods", "log"), Some(Target::PodLog));
    assert_eq!(
        target("create", "", "pods", "exec"),
        Some(Target::ExecOutput)
    );
    assert_eq!(
        target("get", "", "pods", "attach"),
        Some(Target::ExecOutput)
    );
    assert_eq!(target("get", "", "namespaces", ""), None);
    assert_eq!(target("get", "example.com", "secrets", ""), None);
    let mut version = request("get", "", "", "");
    version.is_resource_request = false;
    version.path = "/version".into();
    assert_eq!(masker.target(&version), None);
    assert!(
        masker
            .plan(&version, Some("application/json"))
            .unwrap()
            .is_none()
    );

    // Logs are text: any content type.
    let log = masker
        .plan(&request("get", "", "pods", "log"), Some("text/plain"))
        .unwrap()
        .unwrap();
    assert_eq!(log.target(), Target::PodLog);
    // Table responses are JSON.
    assert!(
        masker
            .plan(
                &request("list", "", "secrets", ""),
                Some("application/json;as=Table;v=v1;g=meta.k8s.io"),
            )
            .unwrap()
            .is_some()
    );

    let off = Masker::new(&MaskRules {
        config_maps: false,
        ..MaskRules::default()
    })
    .unwrap();
    assert_eq!(off.target(&request("get", "", "configmaps", "")), None);
}

#[test]
fn rules_read_from_yaml_and_refuse_mistakes() {
    let rules: MaskRules = serde_yaml::from_str(
        "exec: false\ndisable: [bearer-token]\npatterns:\n  - name: itk\n    regex: 'itk_[a-z]{4}'\nmaxLineBytes: 4096\n",
    )
    .unwrap();
    assert!(!rules.exec && rules.secrets);
    assert_eq!(rules.max_line_bytes, 4096);
    let masker = Masker::new(&rules).unwrap();
    assert_eq!(
        masker
            .mask_text(b"x itk_abcd Bearer abcdefgh12345")
            .map(String::from_utf8),
        Some(Ok(
            "x <masked by chaperone: itk> Bearer abcdefgh12345".into()
        ))
    );
    assert!(serde_yaml::from_str::<MaskRules>("secret: true").is_err());
    let err = Masker::new(&MaskRules {
        max_line_bytes: 10,
        ..MaskRules::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("maxLineBytes"), "{err}");
    assert!(
        Masker::new(&MaskRules {
            sensitive_env_names: Some("(".into()),
            ..MaskRules::default()
        })
        .is_err()
    );
}

// === large and random inputs ===

/// A SecretList like the API server's, `count` items.
pub(crate) fn secret_list(count: usize) -> (Vec<u8>, Vec<String>) {
    let mut body = String::from(
        "{\n  \"kind\": \"SecretList\",\n  \"apiVersion\": \"v1\",\n  \"metadata\": {\n    \"resourceVersion\": \"9\"\n  },\n  \"items\": [\n",
    );
    let mut secrets = Vec::new();
    for i in 0..count {
        let password = format!("pw-{i:08}-Zx9");
        let b64 = STANDARD.encode(&password);
        let applied = serde_json::to_string(&format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{{\"name\":\"s{i}\"}},\"stringData\":{{\"password\":\"{password}\"}}}}\n"
        ))
        .unwrap();
        if i > 0 {
            body.push_str(",\n");
        }
        body.push_str(&format!(
            "    {{\n      \"metadata\": {{\n        \"name\": \"s{i}\",\n        \"namespace\": \"prod-a\",\n        \"uid\": \"aced9d15-14c2-424a-818f-{i:012}\",\n        \"resourceVersion\": \"{i}\",\n        \"annotations\": {{\n          \"kubectl.kubernetes.io/last-applied-configuration\": {applied}\n        }},\n        \"managedFields\": [{{\"manager\":\"kubectl\",\"operation\":\"Update\",\"apiVersion\":\"v1\",\"fieldsType\":\"FieldsV1\",\"fieldsV1\":{{\"f:data\":{{\".\":{{}},\"f:password\":{{}}}},\"f:type\":{{}}}}}}]\n      }},\n      \"data\": {{\n        \"password\": \"{b64}\"\n      }},\n      \"type\": \"Opaque\"\n    }}"
        ));
        secrets.push(password);
    }
    body.push_str("\n  ]\n}\n");
    (body.into_bytes(), secrets)
}

#[test]
fn a_large_list_under_random_chunking_leaks_nothing() {
    let (body, secrets) = secret_list(400);
    let masker = masker();
    let (whole, stats) = run_split(&masker, "list", "secrets", "", &body, &[]).unwrap();
    assert_eq!(stats.values_masked, 800);
    for secret in &secrets {
        assert!(!contains(&whole, secret));
        assert!(!contains(&whole, &STANDARD.encode(secret)));
    }
    let list: Value = serde_json::from_slice(&whole).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 400);
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..5 {
        let mut splits: Vec<usize> = (0..200).map(|_| rng.random_range(0..body.len())).collect();
        splits.sort_unstable();
        let (out, _) = run_split(&masker, "list", "secrets", "", &body, &splits).unwrap();
        assert!(out == whole);
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let masker = masker();
    let mut rng = StdRng::seed_from_u64(1);
    let seeds = [
        fixture("secret-get.body"),
        fixture("secret-watch.body"),
        fixture("secret-list-table.body"),
        fixture("secret-get-protobuf.body"),
    ];
    let alphabet = b"{}[]:,\"\\ u0aZ=\n-1.eE+tfnrl/";
    for round in 0..600 {
        let mut input = seeds[round % seeds.len()].clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..input.len());
            match rng.random_range(0..3) {
                0 => input[at] = alphabet[rng.random_range(0..alphabet.len())],
                1 => input[at] = rng.random(),
                _ => {
                    input.remove(at);
                }
            }
        }
        if round % 10 == 0 {
            input = (0..rng.random_range(0..200))
                .map(|_| rng.random())
                .collect();
        }
        let split = rng.random_range(0..=input.len());
        for (verb, resource, sub) in [
            ("get", "secrets", ""),
            ("watch", "secrets", ""),
            ("get", "configmaps", ""),
            ("get", "pods", ""),
            ("get", "pods", "log"),
        ] {
            let _ = run_split(&masker, verb, resource, sub, &input, &[split]);
        }
    }
}

#[test]
fn escaping_round_trips_through_a_json_parser() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..2000 {
        let len = rng.random_range(0..40);
        let text: String = (0..len)
            .map(|_| char::from_u32(rng.random_range(0..0x300)).unwrap_or('x'))
            .collect();
        let mut escaped = Vec::new();
        json::escape_json(text.as_bytes(), &mut escaped);
        let parsed: String = serde_json::from_slice(&escaped).unwrap();
        assert_eq!(parsed, text);
        let mut back = Vec::new();
        json::unescape(&escaped[1..escaped.len() - 1], &mut back).unwrap();
        assert_eq!(back, text.as_bytes());
    }
    let mut back = Vec::new();
    json::unescape(br"\ud83d\ude00 \u00e9\/", &mut back).unwrap();
    assert_eq!(text(&back), "\u{1f600} \u{e9}/");
}

#[test]
fn a_long_secret_fed_byte_by_byte_is_masked_in_bounded_time() {
    let rules = MaskRules {
        max_line_bytes: 16 << 10,
        ..MaskRules::default()
    };
    let masker = Masker::new(&rules).unwrap();
    let line = format!("password={}\n", "A".repeat(100_000));
    let started = std::time::Instant::now();
    let mut mask = masker.exec_output();
    let mut out = Vec::new();
    for byte in line.as_bytes() {
        mask.push(std::slice::from_ref(byte), &mut out).unwrap();
    }
    mask.finish(&mut out).unwrap();
    assert!(
        !contains(&out, "AAAAAAAA"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(text(&out).starts_with("password=<masked by chaperone: password-assignment>"));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// Containers where nothing is masked (`managedFields`, `labels`, a pod's
/// `status`) are skipped by brackets and strings rather than read token by
/// token: brackets, quotes and escapes inside their strings, and any split
/// point, must not end them early or late.
#[test]
fn skipped_containers_end_exactly_where_json_ends_them() {
    let masker = masker();
    // Strings in the skipped parts hold brackets, escaped quotes, escaped
    // backslashes before a closing quote, \u escapes and key names that are
    // masked elsewhere ("data"); a value after each skipped part is masked.
    let body = br#"{"kind":"Secret","metadata":{"name":"s","labels":{"a]":"}\"{","data":"[\\","u":"\u0022]}"},"managedFields":[{"fieldsV1":{"f:data":{"f:password":{}}},"x":[[],{},"\\\\\"",-1.5e+3,true,false,null]}]},"extra":{"data":{"password":"bm90LWEtc2VjcmV0"}},"data":{"password":"aHVudGVyMg=="},"more":[{"}":"{"}],"stringData":{"token":"hunter2"}}"#;
    let (whole, stats) = run_split(&masker, "get", "secrets", "", body, &[]).unwrap();
    assert_eq!(stats.values_masked, 2, "{}", text(&whole));
    assert!(!contains(&whole, "aHVudGVyMg=="));
    assert!(!contains(&whole, "hunter2"));
    // What is not masked is forwarded byte for byte.
    let parsed: Value = serde_json::from_slice(&whole).unwrap();
    let original: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(parsed["metadata"], original["metadata"]);
    assert_eq!(parsed["extra"], original["extra"]);
    assert_eq!(parsed["more"], original["more"]);
    for split in 0..=body.len() {
        let (out, split_stats) = run_split(&masker, "get", "secrets", "", body, &[split]).unwrap();
        assert_eq!(text(&out), text(&whole), "split at {split}");
        assert_eq!(split_stats, stats);
    }
    let every: Vec<usize> = (1..body.len()).collect();
    let (out, _) = run_split(&masker, "get", "secrets", "", body, &every).unwrap();
    assert_eq!(out, whole, "byte by byte");

    // Broken JSON inside a skipped container is still refused.
    for broken in [
        &br#"{"metadata":{"labels":{"a":"b"]},"data":{"p":"eA=="}}"#[..],
        br#"{"metadata":{"labels":{"a":@}},"data":{"p":"eA=="}}"#,
        br#"{"metadata":{"labels":{"a":"b"}"#,
        br#"{"metadata":{"labels":{"a":"b\"}},"data":{"p":"eA=="}}"#,
    ] {
        let result = run_split(&masker, "get", "secrets", "", broken, &[]);
        assert!(result.is_err(), "{} was accepted", text(broken));
    }
    let deep = format!(
        "{{\"metadata\":{{\"labels\":{}",
        "[".repeat(json::MAX_DEPTH + 1)
    );
    let err = run_split(&masker, "get", "secrets", "", deep.as_bytes(), &[]).unwrap_err();
    assert!(matches!(err, MaskError::TooDeep { .. }), "{err:?}");
}

#[test]
fn last_applied_is_rewritten_around_its_masked_values_only() {
    // The annotation's document as kubectl writes it; its values escape
    // quotes, backslashes, control and non-ASCII characters.
    let document = "{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{\"annotations\":{},\"name\":\"n\\u00e9\\t\\\"x\\\"\"},\"stringData\":{\"p\":\"a\\\"b\\\\c\\u00e9\\n\\u0001\"},\"data\":{\"k\":\"YWJj\"},\"type\":\"Opaque\"}\n";
    let mut canonical = Vec::new();
    json::escape_json(document.as_bytes(), &mut canonical);
    let canonical = String::from_utf8(canonical).unwrap();
    // Encodings escape_json would not write: still read, masked the same.
    // (raw, whether its bytes outside the masked values are kept: all
    // but those with a `\\u` escape in the outer string, which is then
    // written anew).
    let variants = [
        (canonical.clone(), true),
        (canonical.replace(",\\\"type", ",\\t\\\"type"), true),
        (canonical.replace("v1", "v\\/1"), true),
        (canonical.replace("\\n\"", "\\u000a\""), false),
        (canonical.replace("Secret", "Secr\\u0065t"), false),
        (canonical.replace(",\\\"type", ",\\u0009\\\"type"), false),
        (
            canonical.replace("Opaque", "Opaque\\ud83d\\ude00\\u00e9"),
            false,
        ),
        (canonical.replace("YWJj", "YWJ\\u006a"), false),
    ];
    let masker = masker();
    for (raw, kept) in &variants {
        let prefix = r#"{"kind":"Secret","metadata":{"annotations":{"kubectl.kubernetes.io/last-applied-configuration":"#;
        let suffix = r#"}},"type":"Opaque"}"#;
        let body = format!("{prefix}{raw}{suffix}");
        let (whole, stats) =
            run_split(&masker, "get", "secrets", "", body.as_bytes(), &[]).unwrap();
        assert_eq!(stats.values_masked, 2, "{raw}");
        let out = text(&whole);
        let written = out
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .unwrap_or_else(|| panic!("only the annotation changes: {out}"));
        let decoded: String = serde_json::from_str(written).unwrap();
        let mut expected: Value =
            serde_json::from_str(&serde_json::from_str::<String>(raw).unwrap()).unwrap();
        expected["stringData"]["p"] = "<masked by chaperone: 9 bytes>".into();
        expected["data"]["k"] = STANDARD.encode("<masked by chaperone: 3 bytes>").into();
        assert_eq!(
            serde_json::from_str::<Value>(&decoded).unwrap(),
            expected,
            "{raw}"
        );
        assert!(decoded.ends_with("}\n"), "{decoded:?}");
        // Everything but the two values is what the API server sent.
        let restored = decoded
            .replace(
                &format!("\"{}\"", STANDARD.encode("<masked by chaperone: 3 bytes>")),
                "\"YWJj\"",
            )
            .replace(
                "\"<masked by chaperone: 9 bytes>\"",
                "\"a\\\"b\\\\c\\u00e9\\n\\u0001\"",
            );
        assert_eq!(restored, serde_json::from_str::<String>(raw).unwrap());
        if *kept {
            // The API server's bytes with the two values replaced.
            let escaped = |inner: &str| {
                let mut quoted = Vec::new();
                json::escape_json(inner.as_bytes(), &mut quoted);
                text(&quoted[1..quoted.len() - 1]).to_owned()
            };
            let expected = raw
                .replace(
                    &escaped(r#""a\"b\\c\u00e9\n\u0001""#),
                    &escaped("\"<masked by chaperone: 9 bytes>\""),
                )
                .replace("YWJj", &STANDARD.encode("<masked by chaperone: 3 bytes>"));
            assert_eq!(written, expected);
        } else {
            // Written anew, as escape_json writes the masked document.
            let mut re_escaped = Vec::new();
            json::escape_json(decoded.as_bytes(), &mut re_escaped);
            assert_eq!(written, text(&re_escaped), "{raw}");
        }
        for split in 0..=body.len() {
            let (out, split_stats) =
                run_split(&masker, "get", "secrets", "", body.as_bytes(), &[split]).unwrap();
            assert_eq!(text(&out), text(&whole), "split at {split} of {raw}");
            assert_eq!(split_stats, stats);
        }
    }
}

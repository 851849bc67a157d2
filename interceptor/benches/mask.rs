//! Masking throughput: a 10 MB SecretList and a 10 MB watch stream of
//! Secrets, fed in 16 KiB chunks (an HTTP/2 DATA frame) as the proxy does;
//! plus a pod log for the text path, and the same text as exec output
//! (WebSocket stdout messages decoded, masked and re-framed by the exec tap).
//!
//! Times are the benchmark thread's CPU time, not wall time: the figure is
//! throughput per core, and stays meaningful on a loaded machine.
//!
//! `cargo bench -p chaperone --bench mask`

use std::hint::black_box;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use chaperone::exec::{ExecTap, websocket};
use chaperone::mask::{MaskRules, Masker};
use chaperone::proxy::TunnelTap as _;
use chaperone::request::RequestInfo;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TARGET_BYTES: usize = 10 << 20;
const CHUNK: usize = 16 << 10;

/// One Secret as `kubectl apply` leaves it: labels, the last-applied
/// annotation, managedFields, two data values.
fn secret(i: usize, pretty: bool) -> String {
    let password = format!("pw-{i:08}-Zx9-long-enough-password");
    let url = format!("postgres://app:{password}@db-{i}:5432/app");
    let applied = serde_json::to_string(&format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{{\"annotations\":{{}},\"labels\":{{\"app\":\"web\"}},\"name\":\"s{i}\",\"namespace\":\"prod-a\"}},\"stringData\":{{\"password\":\"{password}\",\"url\":\"{url}\"}},\"type\":\"Opaque\"}}\n"
    ))
    .unwrap();
    let object = format!(
        r#"{{"metadata":{{"name":"s{i}","namespace":"prod-a","uid":"aced9d15-14c2-424a-818f-{i:012}","resourceVersion":"{i}","creationTimestamp":"2026-11-23T09:16:35Z","labels":{{"app":"web"}},"annotations":{{"kubectl.kubernetes.io/last-applied-configuration":{applied}}},"managedFields":[{{"manager":"kubectl-client-side-apply","operation":"Update","apiVersion":"v1","time":"2026-11-23T09:16:35Z","fieldsType":"FieldsV1","fieldsV1":{{"f:data":{{".":{{}},"f:password":{{}},"f:url":{{}}}},"f:metadata":{{"f:annotations":{{".":{{}},"f:kubectl.kubernetes.io/last-applied-configuration":{{}}}},"f:labels":{{".":{{}},"f:app":{{}}}}}},"f:type":{{}}}}}}]}},"data":{{"password":"{}","url":"{}"}},"type":"Opaque"}}"#,
        STANDARD.encode(&password),
        STANDARD.encode(&url),
    );
    if pretty {
        let value: serde_json::Value = serde_json::from_str(&object).unwrap();
        serde_json::to_string_pretty(&value).unwrap()
    } else {
        object
    }
}

/// A SecretList as the API server writes it (indented), about 10 MB.
fn secret_list() -> Vec<u8> {
    let mut body = String::from(
        "{\n  \"kind\": \"SecretList\",\n  \"apiVersion\": \"v1\",\n  \"metadata\": {\n    \"resourceVersion\": \"9\"\n  },\n  \"items\": [\n",
    );
    let mut i = 0;
    while body.len() < TARGET_BYTES {
        if i > 0 {
            body.push_str(",\n");
        }
        body.push_str(&secret(i, true));
        i += 1;
    }
    body.push_str("\n  ]\n}\n");
    body.into_bytes()
}

/// Watch events, one compact JSON object per line, about 10 MB.
fn watch_stream() -> Vec<u8> {
    let mut body = String::new();
    let mut i = 0;
    while body.len() < TARGET_BYTES {
        body.push_str(&format!(
            "{{\"type\":\"MODIFIED\",\"object\":{{\"kind\":\"Secret\",\"apiVersion\":\"v1\",{}}}\n",
            &secret(i, false)[1..]
        ));
        i += 1;
    }
    body.into_bytes()
}

fn pod_log() -> Vec<u8> {
    let mut body = String::new();
    let mut i = 0;
    while body.len() < TARGET_BYTES {
        body.push_str(&format!(
            "2026-11-23T09:16:35.{i:06}Z INFO request handled path=/api/v1/items/{i} status=200 duration_ms=12\n"
        ));
        if i % 1000 == 0 {
            body.push_str("2026-11-23T09:16:35Z WARN retrying with password=hunter2 on postgres://app:hunter2@db/app\n");
        }
        i += 1;
    }
    body.into_bytes()
}

fn request(verb: &str, resource: &str, subresource: &str) -> RequestInfo {
    RequestInfo {
        is_resource_request: true,
        verb: verb.into(),
        resource: resource.into(),
        subresource: subresource.into(),
        namespace: "prod-a".into(),
        ..RequestInfo::default()
    }
}

fn bench_body(
    c: &mut Criterion,
    name: &str,
    masker: &Masker,
    request: &RequestInfo,
    content_type: &str,
    body: &[u8],
) {
    let mut group = c.benchmark_group("mask");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    let mut out = Vec::with_capacity(2 * CHUNK);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu_time();
            for _ in 0..iters {
                let mut mask = masker
                    .plan(request, Some(content_type))
                    .unwrap()
                    .expect("masked");
                for chunk in body.chunks(CHUNK) {
                    out.clear();
                    mask.push(chunk, &mut out).unwrap();
                    black_box(&out);
                }
                out.clear();
                mask.finish(&mut out).unwrap();
                black_box(mask.stats().values_masked);
            }
            thread_cpu_time() - start
        })
    });
    group.finish();
}

/// CPU time consumed by this thread.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn masking(c: &mut Criterion) {
    let masker = Masker::new(&MaskRules::default()).unwrap();
    bench_body(
        c,
        "secret_list_10mb",
        &masker,
        &request("list", "secrets", ""),
        "application/json",
        &secret_list(),
    );
    bench_body(
        c,
        "secret_watch_10mb",
        &masker,
        &request("watch", "secrets", ""),
        "application/json",
        &watch_stream(),
    );
    bench_body(
        c,
        "pod_log_10mb",
        &masker,
        &request("get", "pods", "log"),
        "text/plain",
        &pod_log(),
    );
}

/// `text` as the API server sends exec output: one stdout message per
/// 4 KiB written by the process.
fn exec_wire(text: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(text.len() + text.len() / 1024);
    for piece in text.chunks(4 << 10) {
        websocket::write_channel_message(&mut wire, websocket::STDOUT, piece);
    }
    wire
}

fn exec_stream(c: &mut Criterion) {
    let masker = Masker::new(&MaskRules::default()).unwrap();
    let wire = exec_wire(&pod_log());
    let mut group = c.benchmark_group("mask");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    let mut out = Vec::with_capacity(2 * CHUNK);
    group.bench_function("exec_stdout_10mb", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu_time();
            for _ in 0..iters {
                let mut tap = ExecTap::new(&masker, true, None, Arc::new(AtomicU32::new(0)));
                for chunk in wire.chunks(CHUNK) {
                    out.clear();
                    tap.upstream_sent(chunk, &mut out).unwrap();
                    black_box(&out);
                }
                out.clear();
                tap.upstream_idle(&mut out);
                black_box(&out);
            }
            thread_cpu_time() - start
        })
    });
    group.finish();
}

criterion_group!(benches, masking, exec_stream);
criterion_main!(benches);

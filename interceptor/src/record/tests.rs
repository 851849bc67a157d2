use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use super::cli::{ReadArgs, ReplayArgs, SessionsArgs, VerifyArgs};
use super::testing::{exchange, pod};
use super::*;
use crate::policy::{Action, RecordLevel};

fn meta(started: OffsetDateTime) -> SessionMeta {
    SessionMeta {
        pod: Some(pod()),
        peer: "10.244.1.7:51234".parse().unwrap(),
        started,
    }
}

fn recorder(dir: &Path) -> (Recorder, Metrics) {
    let metrics = Metrics::new();
    let mut config = RecordConfig::new(dir, "node-a");
    config.retention_bytes = None;
    config.retention_age = None;
    (Recorder::start(config, metrics.clone()).unwrap(), metrics)
}

fn run(f: impl FnOnce(&mut dyn std::io::Write) -> anyhow::Result<ExitCode>) -> (ExitCode, String) {
    let mut out = Vec::new();
    let code = f(&mut out).unwrap();
    (code, String::from_utf8(out).unwrap())
}

fn read_args(dir: &Path) -> ReadArgs {
    ReadArgs {
        dir: dir.into(),
        key: None,
        gap: read::DEFAULT_GAP,
    }
}

fn verify(dir: &Path, session: &str) -> (ExitCode, String) {
    let args = VerifyArgs {
        session: session.into(),
        read: read_args(dir),
        audit_logs: Vec::new(),
    };
    run(|out| cli::verify(&args, out))
}

fn replay(dir: &Path, session: &str, json: bool) -> String {
    let args = ReplayArgs {
        session: session.into(),
        read: read_args(dir),
        json,
    };
    let (code, out) = run(|out| cli::replay(&args, out));
    assert_eq!(code, ExitCode::SUCCESS);
    out
}

/// The recorded session of the issue's scenario: a get, a masked get, a
/// denied delete, a held request and an exec with typed input.
fn record_scenario(recorder: &Recorder) -> (String, Vec<Arc<Exchange>>) {
    let session = recorder.session(meta(OffsetDateTime::now_utc()));
    let id = session.id().to_owned();
    let list = exchange(
        "list",
        "pods",
        "",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    );
    let secret = exchange(
        "get",
        "secrets",
        "db-creds",
        Action::Mask,
        RecordLevel::RequestResponse,
        200,
    );
    let delete = exchange(
        "delete",
        "pods",
        "web-0",
        Action::Deny,
        RecordLevel::Metadata,
        403,
    );
    let held = exchange(
        "delete",
        "deployments",
        "web",
        Action::Approve,
        RecordLevel::Metadata,
        403,
    );
    let mut exec = exchange(
        "create",
        "pods",
        "web-0",
        Action::Allow,
        RecordLevel::Metadata,
        101,
    );
    exec.request.subresource = "exec".into();
    exec.stage = Stage::ResponseStarted;
    let unrecorded = exchange("get", "nodes", "n1", Action::Allow, RecordLevel::None, 200);
    let all: Vec<Arc<Exchange>> = [list, secret, delete, held, exec]
        .into_iter()
        .map(Arc::new)
        .collect();
    for e in &all[..4] {
        session.exchange(e.clone());
    }
    session.exchange(Arc::new(unrecorded));
    session.exchange(all[4].clone());
    let t0 = OffsetDateTime::now_utc();
    let stream = session.stream(
        all[4].audit_id,
        StreamInfo {
            kind: "exec".into(),
            namespace: "agents".into(),
            pod: "web-0".into(),
            container: "app".into(),
            command: vec!["/bin/sh".into()],
            tty: true,
            width: 120,
            height: 30,
        },
        t0,
    );
    let ms = |n| t0 + Duration::from_millis(n);
    stream.data(Channel::Stdout, "$ ".into(), ms(10));
    stream.data(Channel::Stdin, "cat /etc/app/env\r".into(), ms(500));
    // A UTF-8 character split across two frames.
    let line = "DB_PASSWORD=****** café\r\n".as_bytes();
    let split = line.len() - 4;
    stream.data(
        Channel::Stdout,
        bytes::Bytes::copy_from_slice(&line[..split]),
        ms(600),
    );
    stream.data(
        Channel::Stdout,
        bytes::Bytes::copy_from_slice(&line[split..]),
        ms(601),
    );
    stream.data(Channel::Stderr, "warning: x\r\n".into(), ms(700));
    stream.data(Channel::Stdin, "exit\r".into(), ms(1500));
    drop(stream);
    drop(session);
    recorder.flush();
    (id, all)
}

fn session_file(dir: &Path, id: &str) -> PathBuf {
    dir.join("agents")
        .join("coder-7f9c")
        .join(format!("{id}.jsonl"))
}

#[test]
fn a_session_replays_in_order_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, _) = recorder(tmp.path());
    let (id, exchanges) = record_scenario(&recorder);

    // Grouped by pod, readable by the owner only.
    let file = session_file(tmp.path(), &id);
    assert!(file.is_file(), "{}", file.display());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(file.parent().unwrap()), 0o700);

    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(out.starts_with("ok: 8 records"), "{out}");

    // The readable timeline, in order.
    let text = replay(tmp.path(), &id, false);
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains('└'))
        .filter(|l| {
            l.contains(" list ")
                || l.contains(" get ")
                || l.contains(" delete ")
                || l.contains(" create")
                || l.contains(" stream ")
        })
        .collect();
    assert_eq!(rows.len(), 6, "{text}");
    assert!(
        rows[0].contains("list")
            && rows[0].contains("pods")
            && rows[0].contains("allow")
            && rows[0].contains("200"),
        "{text}"
    );
    assert!(
        rows[1].contains("secrets")
            && rows[1].contains("agents/db-creds")
            && rows[1].contains("mask"),
        "{text}"
    );
    assert!(
        rows[2].contains("delete")
            && rows[2].contains("agents/web-0")
            && rows[2].contains("deny")
            && rows[2].contains("403"),
        "{text}"
    );
    assert!(
        rows[3].contains("deployments") && rows[3].contains("approve(apr-0001)"),
        "{text}"
    );
    assert!(
        rows[4].contains("pods/exec") && rows[4].contains("101"),
        "{text}"
    );
    assert!(
        rows[5].contains("exec agents/web-0 -c app -- /bin/sh"),
        "{text}"
    );
    assert!(text.contains("ms"), "latency shown: {text}");
    assert!(text.contains("asciinema play"), "{text}");
    assert!(text.contains("2 value(s) masked"), "{text}");
    assert!(
        !text.contains("nodes"),
        "level None is not recorded: {text}"
    );

    // The machine-readable timeline carries the same sequence and the bodies
    // at the level the policy set.
    let json: Value = serde_json::from_str(&replay(tmp.path(), &id, true)).unwrap();
    assert_eq!(json["verified"], true);
    let events = json["events"].as_array().unwrap();
    let ids: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "exchange")
        .map(|e| e["auditID"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = exchanges.iter().map(|e| e.audit_id.to_string()).collect();
    assert_eq!(ids, expected);
    assert_eq!(events[1]["responseObject"]["data"]["password"], "KioqKio=");
    assert!(
        events[0].get("responseObject").is_none(),
        "Metadata level: no bodies"
    );
    assert_eq!(events[5]["type"], "stream");
    assert_eq!(events[5]["auditID"], exchanges[4].audit_id.to_string());
    assert_eq!(
        json["session"]["caller"]["username"],
        "system:serviceaccount:agents:coder"
    );

    // The list.
    let args = SessionsArgs {
        read: read_args(tmp.path()),
        pod: Some("agents/coder-7f9c".into()),
        output: cli::Output::Table,
        connections: true,
    };
    let (_, list) = run(|out| cli::sessions(&args, out));
    let row = list.lines().find(|l| l.starts_with(&id)).expect(&list);
    let cols: Vec<&str> = row.split_whitespace().collect();
    // id agent-session pod caller date time duration allowed denied masked held chain
    assert!(cols[1].starts_with("coder-7f9c-"), "{list}");
    assert_eq!(cols[2], "agents/coder-7f9c");
    assert_eq!(cols[3], "system:serviceaccount:agents:coder");
    assert_eq!(&cols[7..], ["3", "1", "1", "1", "ok"], "{list}");
    let summaries = read::list_sessions(tmp.path(), None, None).unwrap();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].allowed, 3);
    let other = SessionsArgs {
        read: read_args(tmp.path()),
        pod: Some("agents/other".into()),
        output: cli::Output::Table,
        connections: false,
    };
    let (_, list) = run(|out| cli::sessions(&other, out));
    assert_eq!(list, "", "nothing on stdout, as kubectl");
    recorder.shutdown();
}

/// Checks a cast against the asciicast v2 spec; returns the events.
fn check_asciicast_v2(text: &str) -> (Value, Vec<(f64, String, String)>) {
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(header["width"].as_u64().unwrap() > 0);
    assert!(header["height"].as_u64().unwrap() > 0);
    assert!(header["timestamp"].is_i64());
    assert!(header["env"].is_object());
    assert!(header["title"].is_string());
    let mut events = Vec::new();
    let mut last = 0.0;
    for line in lines {
        let event: Value = serde_json::from_str(line).unwrap();
        let event = event.as_array().expect("events are arrays");
        assert_eq!(event.len(), 3, "{line}");
        let t = event[0].as_f64().expect("time is a number");
        assert!(t >= last, "times never go back: {line}");
        last = t;
        let code = event[1].as_str().unwrap();
        assert!(["o", "i"].contains(&code), "{line}");
        events.push((t, code.to_owned(), event[2].as_str().unwrap().to_owned()));
    }
    (header, events)
}

#[test]
fn exec_streams_become_valid_asciicast_v2() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, _) = recorder(tmp.path());
    let (id, _) = record_scenario(&recorder);
    let cast = tmp
        .path()
        .join("agents/coder-7f9c")
        .join(format!("{id}.s1.cast"));
    let text = std::fs::read_to_string(&cast).unwrap();
    let (header, events) = check_asciicast_v2(&text);
    assert_eq!(header["width"], 120);
    assert_eq!(header["height"], 30);
    assert_eq!(header["title"], "exec agents/web-0 -c app -- /bin/sh");
    let input: String = events
        .iter()
        .filter(|e| e.1 == "i")
        .map(|e| e.2.as_str())
        .collect();
    assert_eq!(input, "cat /etc/app/env\rexit\r");
    let output: String = events
        .iter()
        .filter(|e| e.1 == "o")
        .map(|e| e.2.as_str())
        .collect();
    assert_eq!(output, "$ DB_PASSWORD=****** café\r\nwarning: x\r\n");
    assert_eq!(events[1], (0.5, "i".into(), "cat /etc/app/env\r".into()));

    // The real player, when it is installed (pip install asciinema).
    match std::process::Command::new("asciinema")
        .arg("cat")
        .arg(&cast)
        .output()
    {
        Ok(result) => {
            assert!(
                result.status.success(),
                "asciinema cat: {}",
                String::from_utf8_lossy(&result.stderr)
            );
            let shown = String::from_utf8_lossy(&result.stdout);
            assert!(shown.contains("DB_PASSWORD=****** café"), "{shown}");
        }
        Err(_) => {
            eprintln!("asciinema is not installed: checked the cast against the v2 spec only")
        }
    }
    recorder.shutdown();
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

#[test]
fn editing_one_byte_fails_verify_at_exactly_that_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, _) = recorder(tmp.path());
    let (id, _) = record_scenario(&recorder);
    recorder.shutdown();
    let file = session_file(tmp.path(), &id);
    let original = lines_of(&file);
    assert_eq!(original.len(), 8);

    for target in 0..original.len() {
        // Change one byte inside a value: "403" -> "203", a letter, a digit.
        let mut lines = original.clone();
        let line = &lines[target];
        let pos = line
            .find("\"status\":403")
            .map(|p| p + 10)
            .or_else(|| line.find("\"verb\":\"").map(|p| p + 8))
            .unwrap_or(10);
        let mut bytes = line.clone().into_bytes();
        bytes[pos] = if bytes[pos] == b'2' { b'3' } else { b'2' };
        lines[target] = String::from_utf8(bytes).unwrap();
        write_lines(&file, &lines);
        let (code, out) = verify(tmp.path(), &id);
        assert_eq!(code, ExitCode::FAILURE, "{out}");
        let at = format!("{}:{}:", file.display(), target + 1);
        assert!(
            out.starts_with(&format!("BROKEN: {at}")),
            "edit of line {}: {out}",
            target + 1
        );
    }

    // An edit that recomputes the record's own hash is caught by the next one.
    let mut lines = original.clone();
    let mut record: serde_json::Map<String, Value> = serde_json::from_str(&lines[3]).unwrap();
    record.insert("status".into(), Value::from(200));
    let prev = record["prev"].as_str().unwrap().to_owned();
    lines[3] = chain::seal(record, &prev, None).0;
    write_lines(&file, &lines);
    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains(&format!("{}:5:", file.display())), "{out}");
    assert!(out.contains("does not follow"), "{out}");

    // Truncation: the last record removed.
    write_lines(&file, &original[..7]);
    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains("without an end record"), "{out}");
    // `chaperone sessions` shows such a session as open (a live connection
    // looks the same), not as broken.
    let listed = &crate::record::read::list_sessions(tmp.path(), None, None).unwrap()[0];
    assert!(!listed.intact && listed.open, "{listed:?}");

    // Truncation in the middle of a line.
    let mut text = original.join("\n");
    text.truncate(text.len() - 20);
    std::fs::write(&file, text).unwrap();
    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains(&format!("{}:8:", file.display())), "{out}");
    let listed = &crate::record::read::list_sessions(tmp.path(), None, None).unwrap()[0];
    assert!(!listed.intact && !listed.open, "{listed:?}");

    // A record removed from the middle.
    let mut lines = original.clone();
    lines.remove(2);
    write_lines(&file, &lines);
    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains(&format!("{}:3:", file.display())), "{out}");

    // Restored, it verifies again; a path works as well as an id.
    write_lines(&file, &original);
    let (code, _) = verify(tmp.path(), file.to_str().unwrap());
    assert_eq!(code, ExitCode::SUCCESS);
    let (code, _) = verify(Path::new("/nonexistent"), file.to_str().unwrap());
    assert_eq!(code, ExitCode::SUCCESS);
}

#[test]
fn unknown_sessions_say_how_to_find_one() {
    let tmp = tempfile::tempdir().unwrap();
    let args = VerifyArgs {
        session: "20260101T000000Z-000000000000".into(),
        read: read_args(tmp.path()),
        audit_logs: Vec::new(),
    };
    let error = cli::verify(&args, &mut Vec::new()).unwrap_err().to_string();
    assert!(error.contains("chaperone sessions --record-dir"), "{error}");
}

#[test]
fn rotation_continues_the_chain_across_files() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let mut config = RecordConfig::new(tmp.path(), "node-a");
    config.max_file_bytes = 2048;
    config.retention_bytes = None;
    config.retention_age = None;
    let recorder = Recorder::start(config, metrics).unwrap();
    let session = recorder.session(meta(OffsetDateTime::now_utc()));
    let id = session.id().to_owned();
    let mut expected = Vec::new();
    for i in 0..40 {
        let e = Arc::new(exchange(
            "get",
            "configmaps",
            &format!("cm-{i}"),
            Action::Allow,
            RecordLevel::Metadata,
            200,
        ));
        expected.push(e.audit_id.to_string());
        session.exchange(e);
    }
    drop(session);
    recorder.flush();
    let dir = tmp.path().join("agents/coder-7f9c");
    let parts: Vec<PathBuf> = (1..)
        .map(|n| dir.join(format!("{id}.p{n}.jsonl")))
        .take_while(|p| p.is_file())
        .collect();
    assert!(parts.len() >= 3, "rotated into several files: {parts:?}");
    for part in std::iter::once(dir.join(format!("{id}.jsonl"))).chain(parts.iter().cloned()) {
        let size = std::fs::metadata(&part).unwrap().len();
        assert!(size < 2048 + 1024, "{} is {size} bytes", part.display());
    }
    let first_of_part: Value = serde_json::from_str(&lines_of(&parts[0])[0]).unwrap();
    assert_eq!(first_of_part["type"], "continue");

    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(
        out.contains(&format!("in {} file(s)", parts.len() + 1)),
        "{out}"
    );
    let json: Value = serde_json::from_str(&replay(tmp.path(), &id, true)).unwrap();
    let ids: Vec<&str> = json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["auditID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, expected);

    // A deleted middle part shows.
    std::fs::remove_file(&parts[0]).unwrap();
    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains("missing"), "{out}");
    recorder.shutdown();
}

#[test]
fn retention_deletes_the_oldest_sessions_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = RecordConfig::new(tmp.path(), "node-a");
    config.retention_bytes = None;
    config.retention_age = None;
    let recorder = Recorder::start(config.clone(), Metrics::new()).unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let (id, _) = record_scenario(&recorder);
        ids.push(id);
        std::thread::sleep(Duration::from_millis(20));
    }
    let open = recorder.session(meta(OffsetDateTime::now_utc()));
    open.exchange(Arc::new(exchange(
        "get",
        "pods",
        "p",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    )));
    recorder.flush();
    recorder.shutdown();
    let sizes: Vec<u64> = read::list_sessions(tmp.path(), None, None)
        .unwrap()
        .iter()
        .map(|s| {
            let dir = s.path.parent().unwrap();
            std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&s.id))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        })
        .collect();
    assert_eq!(sizes.len(), 5);
    let one = sizes[0];

    let fifth = read::list_sessions(tmp.path(), None, None).unwrap()[4]
        .id
        .clone();

    // Room for two scenario sessions: the oldest go until the rest fits (the
    // three oldest; the newest scenario, the small fifth and the live one
    // stay). An open session is never deleted.
    config.retention_bytes = Some(one * 2);
    let recorder = Recorder::start(config, Metrics::new()).unwrap();
    let live = recorder.session(meta(OffsetDateTime::now_utc()));
    live.exchange(Arc::new(exchange(
        "get",
        "pods",
        "p",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    )));
    recorder.flush();
    let left: Vec<String> = read::list_sessions(tmp.path(), None, None)
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert!(left.contains(&live.id().to_owned()), "{left:?}");
    assert!(
        !left.contains(&ids[0]) && !left.contains(&ids[1]) && !left.contains(&ids[2]),
        "{left:?}"
    );
    assert!(left.contains(&ids[3]) && left.contains(&fifth), "{left:?}");
    // Casts go with their session.
    let casts = std::fs::read_dir(tmp.path().join("agents/coder-7f9c"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".cast"))
        .count();
    assert_eq!(casts, 1);
    drop(live);
    recorder.shutdown();

    // Age: everything closed and older than the limit goes.
    let mut config = RecordConfig::new(tmp.path(), "node-a");
    config.retention_bytes = None;
    config.retention_age = Some(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(10));
    let recorder = Recorder::start(config, Metrics::new()).unwrap();
    recorder.flush();
    assert!(
        read::list_sessions(tmp.path(), None, None)
            .unwrap()
            .is_empty()
    );
    assert!(
        !tmp.path().join("agents").exists(),
        "empty directories are removed"
    );
    recorder.shutdown();
}

#[test]
fn a_full_queue_never_blocks_and_leaves_a_gap_record() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let mut config = RecordConfig::new(tmp.path(), "node-a");
    config.queue = 1;
    let recorder = Recorder::start(config, metrics.clone()).unwrap();
    let session = recorder.session(meta(OffsetDateTime::now_utc()));
    let id = session.id().to_owned();
    let started = std::time::Instant::now();
    for i in 0..2000 {
        session.exchange(Arc::new(exchange(
            "get",
            "pods",
            &format!("p{i}"),
            Action::Allow,
            RecordLevel::Metadata,
            200,
        )));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    session.exchange(Arc::new(exchange(
        "get",
        "pods",
        "last",
        Action::Allow,
        RecordLevel::Metadata,
        200,
    )));
    drop(session);
    recorder.flush();
    let dropped = metrics.record_dropped_count();
    let json: Value = serde_json::from_str(&replay(tmp.path(), &id, true)).unwrap();
    let events = json["events"].as_array().unwrap();
    let written = events.iter().filter(|e| e["type"] == "exchange").count() as u64;
    let gaps: u64 = events
        .iter()
        .filter(|e| e["type"] == "gap")
        .map(|e| e["dropped"].as_u64().unwrap())
        .sum();
    assert!(dropped > 0, "a queue of 1 overflowed");
    assert_eq!(
        written + dropped,
        2001,
        "every exchange is written or counted"
    );
    assert_eq!(gaps, dropped, "every drop is in a gap record");
    let text = replay(tmp.path(), &id, false);
    assert!(text.contains("GAP:"), "{text}");
    let (code, _) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::SUCCESS);
    recorder.shutdown();
}

#[test]
fn a_stream_that_outlives_its_session_is_sealed_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, metrics) = recorder(tmp.path());
    let session = recorder.session(meta(OffsetDateTime::now_utc()));
    let id = session.id().to_owned();
    let stream = session.stream(
        uuid::Uuid::new_v4(),
        StreamInfo {
            kind: "attach".into(),
            namespace: "agents".into(),
            pod: "web-0".into(),
            ..StreamInfo::default()
        },
        OffsetDateTime::now_utc(),
    );
    stream.data(
        Channel::Stdout,
        "hello\r\n".into(),
        OffsetDateTime::now_utc(),
    );
    drop(session);
    recorder.flush();
    stream.data(
        Channel::Stdout,
        "late\r\n".into(),
        OffsetDateTime::now_utc(),
    );
    drop(stream);
    recorder.flush();

    let (code, out) = verify(tmp.path(), &id);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    let json: Value = serde_json::from_str(&replay(tmp.path(), &id, true)).unwrap();
    let events = json["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "stream");
    assert_eq!(events[0]["bytesOut"], 7);
    let cast = std::fs::read_to_string(
        tmp.path()
            .join("agents/coder-7f9c")
            .join(format!("{id}.s1.cast")),
    )
    .unwrap();
    let (header, frames) = check_asciicast_v2(&cast);
    assert_eq!(header["width"], 80, "default terminal size");
    assert_eq!(frames.len(), 1, "nothing after the seal: {cast}");
    assert_eq!(
        metrics.record_dropped_count(),
        1,
        "the late frame is counted"
    );
    recorder.shutdown();
}

// === evidence: keyed chains, casts in the chain, lineage ===

/// A node's layout: recordings in `<tmp>/sessions`, the key beside them.
fn keyed_recorder(tmp: &Path) -> (Recorder, PathBuf) {
    let dir = tmp.join("sessions");
    let key_path = cli::default_key_path(&dir);
    assert_eq!(key_path, tmp.join("record.key"));
    let mut config = RecordConfig::new(&dir, "node-a");
    config.retention_bytes = None;
    config.retention_age = None;
    config.key = Some(chain::ChainKey::load_or_create(&key_path).unwrap());
    (Recorder::start(config, Metrics::new()).unwrap(), dir)
}

/// Rewrites every record of a session file with `edit`, resealing the
/// whole chain as anyone can (plain SHA-256, or `key`).
fn rewrite_whole(
    file: &Path,
    key: Option<&chain::ChainKey>,
    edit: impl Fn(&mut serde_json::Map<String, Value>),
) {
    let mut prev = chain::GENESIS.to_owned();
    let lines: Vec<String> = lines_of(file)
        .iter()
        .map(|line| {
            let mut record: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            record.remove("hash");
            record.remove("prev");
            edit(&mut record);
            let (line, hash) = chain::seal(record, &prev, key);
            prev = hash;
            line
        })
        .collect();
    write_lines(file, &lines);
}

#[test]
fn a_session_rewritten_whole_does_not_verify_without_the_node_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, dir) = keyed_recorder(tmp.path());
    let (id, _) = record_scenario(&recorder);
    recorder.shutdown();
    let file = session_file(&dir, &id);
    let original = std::fs::read_to_string(&file).unwrap();
    let (code, out) = verify(&dir, &id);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(out.contains("chain keyed with node key"), "{out}");
    assert!(out.contains("1 exec cast(s) match"), "{out}");

    // The denied delete turned into an allowed one, every hash recomputed.
    let whitewash = |r: &mut serde_json::Map<String, Value>| {
        if r.get("decision") == Some(&Value::from("deny")) {
            r.insert("decision".into(), "allow".into());
            r.insert("status".into(), 200.into());
        }
    };
    // 1. Resealed with SHA-256, the header left as it was.
    rewrite_whole(&file, None, whitewash);
    let (code, out) = verify(&dir, &id);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(
        out.starts_with(&format!("BROKEN: {}:1:", file.display())),
        "{out}"
    );
    assert!(out.contains("the session was rewritten"), "{out}");

    // 2. The header made to look unkeyed, as before keyed chains.
    std::fs::write(&file, &original).unwrap();
    rewrite_whole(&file, None, |r| {
        whitewash(r);
        for field in ["chain", "keyId"] {
            r.remove(field);
        }
    });
    let (code, out) = verify(&dir, &id);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("the session's chain is not keyed"), "{out}");

    // 3. Resealed with a key of the forger's own.
    std::fs::write(&file, &original).unwrap();
    let forger = chain::ChainKey::from_bytes(&[9; 32]);
    let forger_id = forger.id().to_owned();
    rewrite_whole(&file, Some(&forger), |r| {
        whitewash(r);
        if r.contains_key("keyId") {
            r.insert("keyId".into(), forger_id.clone().into());
        }
    });
    let (code, out) = verify(&dir, &id);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(
        out.contains(&format!("keyed with node key {forger_id}")),
        "{out}"
    );

    // Without the key a keyed session cannot be vouched for either.
    std::fs::write(&file, &original).unwrap();
    let args = VerifyArgs {
        session: id.clone(),
        read: ReadArgs {
            key: Some("none".into()),
            ..read_args(&dir)
        },
        audit_logs: Vec::new(),
    };
    let (code, out) = run(|out| cli::verify(&args, out));
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("no key was given: pass --key"), "{out}");
    // Restored: it verifies again.
    assert_eq!(verify(&dir, &id).0, ExitCode::SUCCESS);
}

#[test]
fn a_tampered_or_missing_cast_fails_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, dir) = keyed_recorder(tmp.path());
    let (id, _) = record_scenario(&recorder);
    recorder.shutdown();
    let file = session_file(&dir, &id);
    let stream_line = lines_of(&file)
        .iter()
        .position(|l| l.contains("\"type\":\"stream\""))
        .unwrap()
        + 1;
    let cast = file.with_file_name(format!("{id}.s1.cast"));
    let original = std::fs::read_to_string(&cast).unwrap();
    let record: Value = serde_json::from_str(&lines_of(&file)[stream_line - 1]).unwrap();
    use sha2::Digest as _;
    assert_eq!(
        record["castSha256"],
        hex::encode(sha2::Sha256::digest(original.as_bytes()))
    );

    // What the agent typed, edited after the fact.
    std::fs::write(
        &cast,
        original.replace("cat /etc/app/env", "ls /etc/app/env "),
    )
    .unwrap();
    let (code, out) = verify(&dir, &id);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(
        out.starts_with(&format!("BROKEN: {}:{stream_line}:", file.display())),
        "{out}"
    );
    assert!(out.contains("does not match the SHA-256"), "{out}");
    // The replay warns too.
    let text = replay(&dir, &id, false);
    assert!(
        text.contains("WARNING: the recording does not verify"),
        "{text}"
    );

    // Cut short, or deleted.
    std::fs::write(&cast, &original[..original.len() / 2]).unwrap();
    assert_eq!(verify(&dir, &id).0, ExitCode::FAILURE);
    std::fs::remove_file(&cast).unwrap();
    let (code, out) = verify(&dir, &id);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("it was deleted or moved"), "{out}");

    std::fs::write(&cast, &original).unwrap();
    assert_eq!(verify(&dir, &id).0, ExitCode::SUCCESS);
}

fn kubectl_process() -> crate::identity::ProcessInfo {
    crate::identity::ProcessInfo {
        pid: 4242,
        uid: 1000,
        command: "kubectl".into(),
        executable: "/usr/local/bin/kubectl".into(),
        parents: vec![(4200, "sh".into()), (4100, "agent".into())],
    }
}

/// One connection of pod `pod` that starts at `started` and makes one
/// request a second later.
fn connection(recorder: &Recorder, pod_name: &str, started: OffsetDateTime) -> String {
    let mut meta = meta(started);
    meta.pod.as_mut().unwrap().name = pod_name.into();
    let session = recorder.session(meta);
    let mut e = exchange("get", "pods", "", Action::Allow, RecordLevel::Metadata, 200);
    e.received = started + Duration::from_secs(1);
    e.completed = e.received;
    let mut caller = (*e.caller).clone();
    caller.process = Some(kubectl_process());
    e.caller = Arc::new(caller);
    session.exchange(Arc::new(e));
    session.id().to_owned()
}

#[test]
fn connections_group_into_agent_sessions_by_idle_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, _) = recorder(tmp.path());
    let base = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let at = |secs| base + Duration::from_secs(secs);
    // Three kubectl commands a minute apart, then one after half an hour
    // idle; another pod in between.
    let first = connection(&recorder, "coder-7f9c", at(0));
    let second = connection(&recorder, "coder-7f9c", at(60));
    let third = connection(&recorder, "coder-7f9c", at(120));
    let later = connection(&recorder, "coder-7f9c", at(1920));
    let other = connection(&recorder, "reviewer-1", at(90));
    recorder.shutdown();

    let sessions = |gap: &str, output: cli::Output, connections: bool| {
        let args = SessionsArgs {
            read: ReadArgs {
                gap: crate::policy::parse_duration(gap).unwrap(),
                ..read_args(tmp.path())
            },
            pod: None,
            output,
            connections,
        };
        run(|out| cli::sessions(&args, out)).1
    };
    let json = sessions("5m", cli::Output::Json, false);
    let list: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().unwrap();
    let shape: Vec<(String, Vec<String>)> = items
        .iter()
        .map(|i| {
            (
                i["pod"].as_str().unwrap().to_owned(),
                i["connections"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["id"].as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("coder-7f9c".to_owned(), vec![first.clone(), second, third]),
            ("reviewer-1".to_owned(), vec![other]),
            ("coder-7f9c".to_owned(), vec![later.clone()]),
        ],
        "{json}"
    );
    let agent = &items[0];
    assert_eq!(agent["kind"], "AgentSession");
    assert_eq!(agent["metadata"]["namespace"], "agents");
    assert_eq!(agent["requests"], 3);
    assert_eq!(agent["chain"], "ok");
    assert_eq!(
        agent["executables"],
        serde_json::json!(["/usr/local/bin/kubectl"])
    );
    let name = agent["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("coder-7f9c-"), "{name}");

    // The table, kubectl-like; a longer gap makes one agent session of the pod.
    let table = sessions("5m", cli::Output::Table, false);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[..3], ["NAME", "POD", "CALLER"], "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], name);
    // name pod caller date time duration connections requests ...
    assert_eq!(row[6..8], ["3", "3"], "{table}");
    assert_eq!(sessions("1h", cli::Output::Table, false).lines().count(), 3);
    let names = sessions("5m", cli::Output::Name, false);
    assert!(
        names.starts_with(&format!("agentsession/{name}\n")),
        "{names}"
    );
    let yaml: Value = serde_yaml::from_str(&sessions("5m", cli::Output::Yaml, false)).unwrap();
    assert_eq!(yaml, list);
    let wide = sessions("5m", cli::Output::Wide, true);
    assert!(wide.contains("/usr/local/bin/kubectl"), "{wide}");

    // Replayed as one, each row tagged with its connection, whose process
    // is named.
    let text = replay(tmp.path(), &name, false);
    assert!(
        text.starts_with(&format!(
            "agent session {name}  pod agents/coder-7f9c  3 connection(s)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("[1] {first}"))
            && text.contains(
                "process kubectl pid 4242 uid 1000 /usr/local/bin/kubectl < sh(4200) < agent(4100)"
            ),
        "{text}"
    );
    for tag in ["[1]  ", "[2]  ", "[3]  "] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(tag) && l.contains(" get ")),
            "{tag} in {text}"
        );
    }
    let json: Value = serde_json::from_str(&replay(tmp.path(), &name, true)).unwrap();
    assert_eq!(json["verified"], true);
    assert_eq!(json["connections"].as_array().unwrap().len(), 3);
    assert_eq!(
        json["connections"][0]["session"]["process"]["executable"],
        "/usr/local/bin/kubectl"
    );
    // A connection id still replays that connection alone.
    let alone = replay(tmp.path(), &later, false);
    assert!(alone.starts_with(&format!("session {later}")), "{alone}");

    // Verified as one: every connection, and the first broken one named.
    let (code, out) = verify(tmp.path(), &name);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(out.contains("all 3 connection(s) verify"), "{out}");
    let file = session_file(tmp.path(), &first);
    let edited = std::fs::read_to_string(&file)
        .unwrap()
        .replace("\"status\":200", "\"status\":201");
    std::fs::write(&file, edited).unwrap();
    let (code, out) = verify(tmp.path(), &name);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(
        out.contains(&format!("[1] {first} BROKEN: {}:2:", file.display())),
        "{out}"
    );
    assert!(out.contains("1 of 3 connection(s) do not verify"), "{out}");

    // An unknown name says where names come from.
    let args = VerifyArgs {
        session: "coder-7f9c-00000000".into(),
        read: read_args(tmp.path()),
        audit_logs: Vec::new(),
    };
    let error = cli::verify(&args, &mut Vec::new()).unwrap_err().to_string();
    assert!(error.contains("chaperone sessions --record-dir"), "{error}");
}

/// Whoever holds the node's record key (root on the node) can reseal a
/// rewritten session; the audit log, which usually leaves the node, is the
/// second witness `verify --audit-log` asks.
#[test]
fn the_audit_log_catches_a_rewrite_made_with_the_node_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (recorder, dir) = keyed_recorder(tmp.path());
    let (id, exchanges) = record_scenario(&recorder);
    recorder.shutdown();
    let log = tmp.path().join("audit.log");
    let lines: Vec<String> = exchanges
        .iter()
        .map(|e| {
            String::from_utf8(crate::audit::Event::from_exchange(e).unwrap().to_line()).unwrap()
                + "\n"
        })
        .collect();
    std::fs::write(&log, lines.concat()).unwrap();
    let verify_with_log = |session: &str, log: &Path| {
        let args = VerifyArgs {
            session: session.into(),
            read: read_args(&dir),
            audit_logs: vec![log.to_owned()],
        };
        run(|out| cli::verify(&args, out))
    };
    let listed = read::group_sessions(
        read::list_sessions(&dir, None, None).unwrap_or_default(),
        read::DEFAULT_GAP,
    );
    let name = listed[0].name.clone();
    let (code, out) = verify_with_log(&name, &log);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(
        out.contains("audit: 5 recorded request stage(s) agree"),
        "{out}"
    );

    // Resealed with the node's own key: the chain alone is satisfied.
    let file = session_file(&dir, &id);
    let original = std::fs::read_to_string(&file).unwrap();
    let key = chain::ChainKey::load(&tmp.path().join("record.key")).unwrap();
    rewrite_whole(&file, Some(&key), |r| {
        if r.get("decision") == Some(&Value::from("deny")) {
            r.insert("decision".into(), "allow".into());
            r.insert("status".into(), 200.into());
        }
    });
    assert_eq!(verify(&dir, &id).0, ExitCode::SUCCESS);
    let (code, out) = verify_with_log(&name, &log);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("was recorded as delete pods agents/web-0 by system:serviceaccount:agents:coder: allow 200, but the audit log says delete pods agents/web-0 by system:serviceaccount:agents:coder: deny 403"), "{out}");
    let (code, _) = verify_with_log(&id, &log);
    assert_eq!(code, ExitCode::FAILURE, "one connection is checked too");
    std::fs::write(&file, &original).unwrap();

    // A request the log holds but no recording does (a record removed and
    // the chain resealed, or a whole connection's file deleted).
    let mut extra: Value = serde_json::from_str(&lines[0]).unwrap();
    extra["auditID"] = Value::from("00000000-0000-4000-8000-00000000dead");
    let mut with_extra = lines.concat();
    with_extra.push_str(&format!("{extra}\n"));
    assert!(with_extra.ends_with("}\n"));
    let log2 = tmp.path().join("audit-2.log");
    std::fs::write(&log2, with_extra).unwrap();
    let (code, out) = verify_with_log(&name, &log2);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(
        out.contains("the audit log holds 1 request(s) of agents/coder-7f9c made during this agent session that no recording of it holds"),
        "{out}"
    );
    // A recorded request the log lacks.
    std::fs::write(&log2, lines[1..].concat()).unwrap();
    let (code, out) = verify_with_log(&name, &log2);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("is not in the audit log"), "{out}");
}

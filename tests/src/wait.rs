//! Waiting on what a test can observe (a child's output, a file, a
//! counter) instead of sleeping a fixed time and hoping it was long
//! enough: fast when the machine is fast, and a timeout that says what
//! never happened when it is not.

use std::{
    io::Read,
    process::Child,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Polls `probe` until it returns `Some`, every 20 ms; panics after
/// `limit` saying `what` never happened.
pub fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_for`] inside an async test: awaits `probe` every 20 ms (the
/// runtime keeps serving meanwhile) until it returns `Some`; panics after
/// `limit` saying `what` never happened.
pub async fn until<T, F>(what: &str, limit: Duration, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running child whose stdout is read as it comes, on a thread of its
/// own, so a test can wait for a line it prints (a watch's first object,
/// port-forward's "Forwarding from") and still have everything at the end.
pub struct Followed {
    child: Child,
    seen: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Followed {
    /// Follows `child`, which must have been spawned with a piped stdout.
    pub fn new(mut child: Child) -> Followed {
        let mut stdout = child.stdout.take().expect("spawned with a piped stdout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Followed {
            child,
            seen,
            reader,
        }
    }

    /// Everything the child printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits until the child has printed `needle`; panics after `limit`
    /// with what it printed.
    pub fn wait_for(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for {needle:?} in the output of {:?}; it printed:\n{}",
                self.child.id(),
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (within `limit`) for the child to exit by itself; its status
    /// and everything it printed. Panics after `limit` with what it printed.
    pub fn wait_exit(self, limit: Duration) -> (std::process::ExitStatus, String) {
        let Followed {
            mut child,
            seen,
            reader,
        } = self;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("the child can be waited on") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "waited {limit:?} for {:?} to exit; it printed:\n{}",
                    child.id(),
                    String::from_utf8_lossy(&seen.lock().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = reader.join();
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        (status, text)
    }

    /// Kills the child (SIGKILL) and returns everything it printed.
    pub fn kill(self) -> String {
        let Followed {
            mut child,
            seen,
            reader,
        } = self;
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        String::from_utf8_lossy(&seen.lock().unwrap()).into_owned()
    }
}

/// Waits until every connection recorded under `dir` (a recorder's
/// `--record-dir`, searched to any depth) is sealed: the last part of each
/// connection's file (`<id>.jsonl`, `<id>.pN.jsonl`) ends with its `end`
/// record, which the recorder writes once the connection closed and
/// everything it carried (exchanges, exec streams and their casts) is on
/// disk. Returns how many connections were sealed; panics after `limit`
/// naming the files still open, and if nothing was recorded at all.
pub fn sealed_recordings(dir: &std::path::Path, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let lasts = last_parts(dir);
        let open: Vec<String> = lasts
            .iter()
            .filter(|path| !ends_sealed(path))
            .map(|path| path.display().to_string())
            .collect();
        if !lasts.is_empty() && open.is_empty() {
            return lasts.len();
        }
        assert!(
            Instant::now() < deadline,
            "waited {limit:?} for every recorded connection under {} to be sealed (an `end` \
             record last); {}",
            dir.display(),
            if lasts.is_empty() {
                "nothing was recorded".to_owned()
            } else {
                format!("still open: {open:?}")
            }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last part of each recorded connection under `dir`.
fn last_parts(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut last: std::collections::BTreeMap<std::path::PathBuf, (u32, std::path::PathBuf)> =
        Default::default();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".jsonl") else {
                continue;
            };
            let (id, part) = match stem.rsplit_once(".p") {
                Some((id, n)) if n.parse::<u32>().is_ok() => (id, n.parse().unwrap()),
                _ => (stem, 0),
            };
            let key = dir.join(id);
            if last.get(&key).is_none_or(|(seen, _)| part >= *seen) {
                last.insert(key, (part, path));
            }
        }
    }
    last.into_values().map(|(_, path)| path).collect()
}

/// Whether the file's last complete line is an `end` record.
fn ends_sealed(path: &std::path::Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    text.ends_with('\n')
        && text
            .lines()
            .last()
            .and_then(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .is_some_and(|record| record["type"] == "end")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &std::path::Path, name: &str, types: &[&str]) {
        let lines: String = types
            .iter()
            .map(|t| format!("{{\"type\":\"{t}\",\"hash\":\"x\"}}\n"))
            .collect();
        std::fs::write(dir.join(name), lines).unwrap();
    }

    #[test]
    fn sealed_recordings_counts_connections_whose_last_part_ends_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("default/agent-0");
        std::fs::create_dir_all(&pod).unwrap();
        record(&pod, "a.jsonl", &["session", "exchange", "end"]);
        // Rotated: the first part has no end record, the last one does.
        record(&pod, "b.jsonl", &["session", "exchange"]);
        record(&pod, "b.p1.jsonl", &["exchange", "end"]);
        assert_eq!(sealed_recordings(dir.path(), Duration::from_secs(1)), 2);
    }

    #[test]
    #[should_panic(expected = "to be sealed (an `end` record last); still open")]
    fn sealed_recordings_names_what_is_still_open() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), "a.jsonl", &["session", "end"]);
        record(dir.path(), "b.jsonl", &["session", "exchange"]);
        sealed_recordings(dir.path(), Duration::from_millis(100));
    }

    #[test]
    #[should_panic(expected = "nothing was recorded")]
    fn sealed_recordings_fails_when_nothing_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        sealed_recordings(dir.path(), Duration::from_millis(100));
    }
}

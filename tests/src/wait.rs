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

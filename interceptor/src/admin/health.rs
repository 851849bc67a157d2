//! [`Health`]: named liveness and readiness checks that the node agent
//! registers at startup and updates as things change (eBPF attached, CA
//! loaded, upstream reachable). `/healthz` and `/readyz` report them in the
//! API server's own format (`[+]name ok`, `[-]name failed: reason`).

use std::sync::{Arc, Mutex, PoisonError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: failing means restart the process.
    Liveness,
    /// `/readyz`: failing means do not send traffic yet.
    Readiness,
}

#[derive(Debug)]
struct CheckState {
    name: String,
    probe: Probe,
    /// `None` when passing, otherwise why not.
    failure: Mutex<Option<String>>,
}

/// The handle to one registered check.
#[derive(Clone, Debug)]
pub struct Check {
    state: Arc<CheckState>,
}

impl Check {
    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn set_ok(&self) {
        *self.lock() = None;
    }

    /// Marks the check failing, with a reason that tells an operator what to
    /// look at.
    pub fn set_failed(&self, reason: impl Into<String>) {
        *self.lock() = Some(reason.into());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.state
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The registry of checks. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health {
    checks: Arc<Mutex<Vec<Arc<CheckState>>>>,
}

/// A probe's answer: whether it passes and the report body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub ok: bool,
    pub body: String,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a readiness check; it fails ("not checked yet") until
    /// [`Check::set_ok`].
    pub fn readiness(&self, name: &str) -> Check {
        self.register(name, Probe::Readiness, Some("not checked yet".into()))
    }

    /// Registers a liveness check; it passes until [`Check::set_failed`].
    pub fn liveness(&self, name: &str) -> Check {
        self.register(name, Probe::Liveness, None)
    }

    fn register(&self, name: &str, probe: Probe, failure: Option<String>) -> Check {
        let state = Arc::new(CheckState {
            name: name.to_owned(),
            probe,
            failure: Mutex::new(failure),
        });
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(state.clone());
        Check { state }
    }

    /// The report for `/healthz` ([`Probe::Liveness`]) or `/readyz`
    /// ([`Probe::Readiness`]; liveness checks count there too).
    pub fn report(&self, probe: Probe) -> Report {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut ok = true;
        let mut body = String::new();
        for check in checks
            .iter()
            .filter(|c| probe == Probe::Readiness || c.probe == Probe::Liveness)
        {
            let failure = check
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            match failure {
                None => body.push_str(&format!("[+]{} ok\n", check.name)),
                Some(reason) => {
                    ok = false;
                    body.push_str(&format!("[-]{} failed: {}\n", check.name, reason));
                }
            }
        }
        let what = match probe {
            Probe::Liveness => "healthz",
            Probe::Readiness => "readyz",
        };
        body.push_str(&format!(
            "{what} check {}\n",
            if ok { "passed" } else { "failed" }
        ));
        Report { ok, body }
    }
}

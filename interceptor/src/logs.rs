//! How chaperone logs, for people and for log pipelines: text or JSON
//! (`--log-format`), colour only on a terminal, a `--log` filter that must
//! parse, and warnings that repeat (a watch retrying every second) logged
//! once, then at most once a minute with the count, in plain words with the
//! fix instead of a Rust debug dump.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// Installs the global subscriber writing to stderr. A filter that does not
/// parse is an error that says so, never a silent `info`.
pub fn init(filter: &str, format: LogFormat) -> Result<(), BadFilter> {
    let env_filter = parse_filter(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

/// A `--log` filter that does not parse, with the syntax that would.
#[derive(Debug, thiserror::Error)]
#[error(
    "--log {filter:?} (or CHAPERONE_LOG) is not a log filter: {error}. Use a level \
     (`error`, `warn`, `info`, `debug`, `trace`) or `target=level` pairs separated \
     by commas, e.g. `info,chaperone=debug`"
)]
pub struct BadFilter {
    filter: String,
    error: tracing_subscriber::filter::ParseError,
}

/// `filter` as a tracing `EnvFilter`, or what is wrong with it.
pub fn parse_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, BadFilter> {
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|error| BadFilter {
            filter: filter.to_owned(),
            error,
        })
}

/// A warning that repeats: the first is logged, then at most one per
/// `every`, saying how many were left out.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

/// How often a repeating warning is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(REPEAT_EVERY)
    }
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(left out since the last one logged)` when this occurrence is to
    /// be logged, `None` when it is left out.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// The watch works again: the next failure is logged at once.
    pub fn reset(&mut self) {
        self.last = None;
        self.suppressed = 0;
    }
}

/// A watch's failure in plain words, with what to check: `resource` is
/// what is watched (`AgentPolicy objects (agentpolicies.chaperone.dev)`).
pub fn watch_error(error: &kube::runtime::watcher::Error, resource: &str) -> String {
    use kube::runtime::watcher::Error as W;
    let status = |status: &kube::core::Status| {
        let mut text = format!("the API server answered {}", status.code);
        if !status.reason.is_empty() {
            text.push_str(&format!(" {}", status.reason));
        }
        if !status.message.is_empty() {
            text.push_str(&format!(": {}", status.message));
        }
        match status.code {
            // Only chaperone's own kinds come from a CRD the operator can
            // install; a built-in kind missing is the server's version.
            404 if resource.contains(".chaperone.dev") => text.push_str(&format!(
                ". The API server does not serve {resource}: install its CRD (deploy/base/crds)"
            )),
            404 => text.push_str(&format!(
                ". The API server does not serve {resource} (too old a Kubernetes version? \
                 `kubectl api-resources` lists what it serves)"
            )),
            401 => text.push_str(". chaperone's credentials were not accepted"),
            403 => text.push_str(&format!(
                ". chaperone may not list and watch {resource}: apply deploy/base/rbac"
            )),
            _ => {}
        }
        text
    };
    let client = |error: &kube::Error| match error {
        kube::Error::Api(s) => status(s),
        other => format!(
            "{other}. Check that the API server is reachable from this node and its \
             certificate is trusted"
        ),
    };
    match error {
        W::InitialListFailed(e) => format!("listing {resource}: {}", client(e)),
        W::WatchStartFailed(e) => format!("watching {resource}: {}", client(e)),
        W::WatchFailed(e) => format!("watching {resource}: {}", client(e)),
        W::WatchError(s) => format!("watching {resource}: {}", status(s)),
        W::NoResourceVersion => format!("watching {resource}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_refused_with_the_syntax() {
        let error = parse_filter("chaperone=verbose").unwrap_err().to_string();
        assert!(error.contains("chaperone=verbose"), "{error}");
        assert!(error.contains("info,chaperone=debug"), "{error}");
        parse_filter("info,chaperone=debug").unwrap();
        parse_filter("warn").unwrap();
    }

    #[test]
    fn a_repeating_warning_is_logged_once_a_minute_with_the_count() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.allow_at(start), Some(0));
        for second in 1..60 {
            assert_eq!(throttle.allow_at(start + Duration::from_secs(second)), None);
        }
        assert_eq!(
            throttle.allow_at(start + Duration::from_secs(61)),
            Some(59),
            "the next one says how many were left out"
        );
        throttle.reset();
        assert_eq!(throttle.allow_at(start + Duration::from_secs(62)), Some(0));
    }

    #[test]
    fn a_missing_crd_says_to_install_it_without_a_debug_dump() {
        let status = kube::core::Status {
            code: 404,
            reason: "NotFound".into(),
            message: "the server could not find the requested resource".into(),
            ..Default::default()
        };
        let error =
            kube::runtime::watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)));
        let text = watch_error(&error, "AgentPolicy objects (agentpolicies.chaperone.dev)");
        assert!(text.contains("404 NotFound"), "{text}");
        assert!(text.contains("install its CRD"), "{text}");
        assert!(!text.contains("Status {"), "no debug dump: {text}");
        assert!(!text.contains("ApiError"), "{text}");

        let text = watch_error(
            &error,
            "the kubernetes EndpointSlices (endpointslices.discovery.k8s.io)",
        );
        assert!(!text.contains("CRD"), "a built-in kind has no CRD: {text}");
        assert!(text.contains("kubectl api-resources"), "{text}");
    }
}

//! The data path's threads. Each is a single-threaded tokio runtime that
//! serves the agent connections handed to it, with upstream pools of its
//! own, so one request is read, checked, forwarded, answered, masked and
//! written back on one thread.
//!
//! Why not the multi-threaded runtime: on it, the agent connection's task,
//! the request's stream task and the upstream connection's task land on
//! whichever worker is free, and an idle worker is woken to steal each new
//! one. Every such hop is a futex wake of a sleeping thread (an IPI to a
//! halted vCPU in a VM) on the request's path, twice per request. Measured
//! on a 2-vCPU VM, GET secret at 200 req/s through the full pipeline:
//! +340 µs over direct with the multi-threaded runtime, +180 µs on one
//! single-threaded runtime. Connections are spread over the threads
//! (fewest live connections first), so many agents still use every core;
//! one agent connection stays on one thread, as in nginx or Envoy.
//!
//! Hand-offs that wake another thread (a request's record and audit event)
//! wait until the thread has written what it can and is about to sleep:
//! [`defer_until_idle`]. The response reaches the agent's socket first, and
//! the recorder and audit threads are woken after, off the request's path.

use std::{
    cell::RefCell,
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
};

use tokio::sync::oneshot;

use super::Upstream;

/// The running data-path threads.
pub(crate) struct DataWorkers {
    workers: Vec<Worker>,
}

/// One data-path thread: where to spawn, its upstream pools, its load,
/// and how to stop it.
pub(crate) struct Worker {
    handle: tokio::runtime::Handle,
    pub(crate) upstream: Arc<Upstream>,
    live: Arc<AtomicUsize>,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl DataWorkers {
    /// Starts `count` threads (at least one), each with pools of its own to
    /// the API server `upstream` points at.
    pub(crate) fn start(count: usize, upstream: &Upstream) -> io::Result<Self> {
        let mut workers = DataWorkers {
            workers: Vec::new(),
        };
        for index in 0..count.max(1) {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("chaperone-dp-{index}"))
                .spawn(move || {
                    DEFERRED.with(|d| *d.borrow_mut() = Some(Vec::new()));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_park(run_deferred)
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = handle_tx.send(Err(error));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Runs the connections spawned onto it until told to
                    // stop (after the drain); what is left is dropped then.
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                    drop(runtime);
                    run_deferred();
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("a data-path thread exited while starting"))??;
            workers.workers.push(Worker {
                handle,
                upstream: Arc::new(upstream.with_own_pools()),
                live: Arc::new(AtomicUsize::new(0)),
                stop: stop_tx,
                thread,
            });
        }
        Ok(workers)
    }

    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }

    /// The thread with the fewest live connections.
    pub(crate) fn least_loaded(&self) -> &Worker {
        self.workers
            .iter()
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
            .expect("at least one data-path thread")
    }

    /// Opens each thread's pooled upstream connection (and learns whether
    /// the server speaks HTTP/2) before the first agent arrives.
    pub(crate) fn warm_up(&self) {
        for worker in &self.workers {
            let upstream = worker.upstream.clone();
            worker.handle.spawn(async move {
                if let Err(error) = upstream.warm_up().await {
                    tracing::debug!(%error, "warming up a data-path thread's upstream connection");
                }
            });
        }
    }

    /// Stops the threads and waits for them; call after the drain.
    pub(crate) async fn stop(self) {
        let threads: Vec<JoinHandle<()>> = self
            .workers
            .into_iter()
            .map(|worker| {
                let _ = worker.stop.send(());
                worker.thread
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Worker {
    /// Runs one connection on this thread, counted as live until it ends.
    pub(crate) fn spawn<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let live = self.live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        self.handle.spawn(async move {
            let _live = LiveConnection(live);
            connection.await;
        });
    }
}

/// Hand-offs deferred on this thread; `Some` on data-path threads only.
type Deferred = Vec<Box<dyn FnOnce()>>;

thread_local! {
    static DEFERRED: RefCell<Option<Deferred>> = const { RefCell::new(None) };
}

/// Deferred hand-offs run at once past this many, in order, so a thread
/// that never idles still hands everything over.
const MAX_DEFERRED: usize = 256;

/// Runs `handoff` when this data-path thread is next about to sleep (its
/// other work done, the responses it had written flushed), in the order
/// given; at once on any other thread. For work whose only effect is to
/// wake another thread, which need not happen before the agent's answer.
pub fn defer_until_idle(handoff: impl FnOnce() + 'static) {
    let deferred = DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(queue) if queue.len() < MAX_DEFERRED => {
            queue.push(Box::new(handoff));
            None
        }
        _ => Some(handoff),
    });
    if let Some(handoff) = deferred {
        // Not a data-path thread, or its queue is full: earlier ones first.
        run_deferred();
        handoff();
    }
}

/// Runs what [`defer_until_idle`] queued on this thread (the runtime's
/// park hook, and the thread's last act).
fn run_deferred() {
    loop {
        let batch = DEFERRED.with(|d| d.borrow_mut().as_mut().map(std::mem::take));
        match batch {
            Some(batch) if !batch.is_empty() => batch.into_iter().for_each(|handoff| handoff()),
            _ => return,
        }
    }
}

/// Counts a connection as live on its thread until dropped (also when the
/// runtime drops it unfinished).
struct LiveConnection(Arc<AtomicUsize>);

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Upstream {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Upstream::new(super::super::UpstreamSpec {
            base: "https://127.0.0.1:1".parse().unwrap(),
            tls,
            tls_server_name: None,
            connector: crate::tls::ConnectorOptions::default(),
            streams_per_connection: 100,
            http1_connections: 0,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn deferred_handoffs_run_in_order_once_the_thread_idles_and_at_once_elsewhere() {
        use std::sync::Mutex;
        let order = Arc::new(Mutex::new(Vec::new()));
        {
            let order = order.clone();
            defer_until_idle(move || order.lock().unwrap().push("elsewhere"));
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["elsewhere"],
            "not a data-path thread: at once"
        );

        let workers = DataWorkers::start(1, &upstream()).unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let during = order.clone();
        workers.least_loaded().spawn(async move {
            for n in ["first", "second"] {
                let order = during.clone();
                defer_until_idle(move || order.lock().unwrap().push(n));
            }
            // Still busy (no await point reached): nothing has run yet.
            let _ = done_tx.send(during.lock().unwrap().len());
        });
        assert_eq!(done_rx.await.unwrap(), 1);
        for _ in 0..100 {
            if order.lock().unwrap().len() == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(*order.lock().unwrap(), ["elsewhere", "first", "second"]);

        // A thread that never idles still hands everything over, in order.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let busy = Arc::new(Mutex::new(Vec::new()));
        let during = busy.clone();
        workers.least_loaded().spawn(async move {
            for n in 0..MAX_DEFERRED + 10 {
                let busy = during.clone();
                defer_until_idle(move || busy.lock().unwrap().push(n));
            }
            let _ = done_tx.send(during.lock().unwrap().len());
        });
        assert_eq!(
            done_rx.await.unwrap(),
            MAX_DEFERRED + 1,
            "the full queue ran, then the next one"
        );
        workers.stop().await;
        let busy = busy.lock().unwrap();
        assert_eq!(
            *busy,
            (0..MAX_DEFERRED + 10).collect::<Vec<_>>(),
            "and the rest by the thread's end"
        );
    }

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_thread_and_each_runs_on_one_thread() {
        let workers = DataWorkers::start(2, &upstream()).unwrap();
        assert_eq!(workers.len(), 2);
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let seen = seen_tx.clone();
            let mut release = release_rx.clone();
            workers.least_loaded().spawn(async move {
                let before = std::thread::current().id();
                // A task this connection spawns runs on its thread too.
                let spawned = tokio::spawn(async { std::thread::current().id() })
                    .await
                    .unwrap();
                let _ = release.wait_for(|r| *r).await;
                let _ = seen.send((before, spawned, std::thread::current().id()));
            });
        }
        let loads: Vec<usize> = workers
            .workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, vec![2, 2], "spread evenly while all are live");
        release_tx.send(true).unwrap();
        let mut threads = std::collections::HashSet::new();
        for _ in 0..4 {
            let (before, spawned, after) = seen_rx.recv().await.unwrap();
            assert_eq!(before, spawned, "a spawned task stays on its thread");
            assert_eq!(before, after, "a connection never changes threads");
            assert_ne!(before, std::thread::current().id());
            threads.insert(before);
        }
        assert_eq!(threads.len(), 2, "both threads served connections");
        // Counted down as they end.
        for _ in 0..100 {
            if workers
                .workers
                .iter()
                .all(|w| w.live.load(Ordering::Relaxed) == 0)
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            workers
                .workers
                .iter()
                .all(|w| w.live.load(Ordering::Relaxed) == 0)
        );
        workers.stop().await;
    }
}

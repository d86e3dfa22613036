//! `spawn_daemon`: the whole kaiwa daemon in-process for a test, on a fresh SQLite file in a
//! temp dir (or the store a test gives as `DATABASE_URL`, which several daemons may share), with
//! the tiny random model, together with what it talks to: a loopback fake of a
//! chat platform, the web server's port, or nothing. Each daemon runs on a runtime of its own, as
//! in a process of its own, and keeps its own logs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kaiwa::bot::event::ChannelRef;
use kaiwa::config::Settings;
use kaiwa::shutdown::{shutdown_channel, Shutdown, ShutdownTrigger};
use kaiwa::store::{Store, StoredMessage};
use tokio::sync::oneshot;

use super::logs::{clear_thread_dispatch, set_thread_dispatch, Logs};

/// How long a test waits for the daemon (or a fake) to get something done before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// The other side a test daemon talks to: a loopback fake of a chat platform
/// ([`FakeTelegram`](super::telegram::FakeTelegram), [`FakeDiscord`](super::discord::FakeDiscord)),
/// the web server's clients ([`Web`](super::web::Web)), or nothing (`()`: the test gives the settings itself).
pub trait Peer: Sized {
    /// Starts it on 127.0.0.1.
    async fn start() -> Self;

    /// The settings that point the daemon at it.
    fn settings(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// A listener the daemon serves the web API on instead of binding `HTTP_ADDR` (it then runs
    /// as `kaiwa serve` does, the web server alone).
    fn listener(&self) -> Option<std::net::TcpListener> {
        None
    }

    /// Waits (at most [`WAIT`]) until `daemon`, started on [`Peer::settings`], talks to it.
    async fn connected(&self, _daemon: &TestDaemon) {}
}

impl Peer for () {
    async fn start() {}
}

/// Starts `P` and the daemon pointed at it, with a fresh database and `env` over the settings
/// `P` gives and the test defaults (no cooldown, short replies); returns both once they are
/// connected. A `DATABASE_URL` in `env` replaces the fresh database: daemons given the same one
/// share a store, as replicas do.
pub async fn spawn_daemon<P: Peer>(env: &[(&str, &str)]) -> (P, TestDaemon) {
    let peer = P::start().await;
    let daemon = spawn_daemon_on(&peer, env).await;
    peer.connected(&daemon).await;
    (peer, daemon)
}

/// [`spawn_daemon`] for a peer the test started (and set up) itself; does not wait for them to
/// connect.
pub async fn spawn_daemon_on<P: Peer>(peer: &P, env: &[(&str, &str)]) -> TestDaemon {
    let mut all: Vec<(String, String)> = peer
        .settings()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let dir = Arc::new(tempfile::tempdir().unwrap());
    TestDaemon::start(dir, all, peer.listener(), Logs::default()).await
}

/// Runs the daemon on a thread and runtime of its own (two workers, as on the 2-core machines
/// kaiwa is measured on), every thread of which logs into `logs`; `web`, when given, is the
/// listener it serves the web API on alone. The answer comes when the daemon has stopped; the
/// rest of its runtime is then shut down, and `dir` (its database) removed once nothing uses it.
fn run_apart(
    settings: Settings,
    shutdown: Shutdown,
    web: Option<std::net::TcpListener>,
    logs: &Logs,
    dir: Arc<tempfile::TempDir>,
) -> oneshot::Receiver<anyhow::Result<()>> {
    let (tx, rx) = oneshot::channel();
    let dispatch = logs.dispatch();
    std::thread::Builder::new()
        .name("test-daemon".into())
        .spawn(move || {
            let for_threads = dispatch.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start(move || set_thread_dispatch(&for_threads))
                .on_thread_stop(clear_thread_dispatch)
                .build()
                .expect("the daemon's runtime");
            let result = tracing::dispatcher::with_default(&dispatch, || {
                runtime.block_on(async move {
                    match web {
                        Some(l) => {
                            let l = tokio::net::TcpListener::from_std(l)?;
                            kaiwa::app::serve_on(settings, l, shutdown).await
                        }
                        None => kaiwa::app::run(settings, shutdown).await,
                    }
                })
            });
            let _ = tx.send(result);
            runtime.shutdown_timeout(Duration::from_secs(10));
            drop(dir);
        })
        .expect("a thread for the daemon");
    rx
}

/// A running daemon.
pub struct TestDaemon {
    dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    listener: Option<std::net::TcpListener>,
    /// The store: the test's `DATABASE_URL`, else a SQLite file in `dir`.
    database_url: String,
    logs: Logs,
    trigger: Option<ShutdownTrigger>,
    /// What `kaiwa::app::run` (or `serve_on`) returned; dropped unsent if it panicked.
    done: Option<oneshot::Receiver<anyhow::Result<()>>>,
    store: Store,
}

/// The last `n` lines of `logs`, for a failure message (all of them can be megabytes).
pub fn last_lines(logs: &str, n: usize) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("kaiwa.db").display())
}

impl TestDaemon {
    async fn start(
        dir: Arc<tempfile::TempDir>,
        env: Vec<(String, String)>,
        listener: Option<std::net::TcpListener>,
        logs: Logs,
    ) -> TestDaemon {
        let db = env
            .iter()
            .rev()
            .find(|(k, _)| k == "DATABASE_URL")
            .map_or_else(|| database_url(dir.path()), |(_, url)| url.clone());
        let model = super::model::tiny_model_dir();
        let mut all: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), db.clone()),
            ("MODEL_DIR".into(), model.display().to_string()),
            ("USER_COOLDOWN_MS".into(), "0".into()),
            ("MAX_NEW_TOKENS".into(), "12".into()),
        ];
        all.extend(env.iter().cloned());
        let settings = kaiwa::config::Settings::from_lookup(move |k| {
            all.iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        })
        .unwrap();
        // Open (and migrate) the database before the daemon does: two first migrations of the
        // same fresh file at once would race (daemons that share a store are started one after
        // the other).
        let store = Store::open(&db).await.unwrap();
        let (trigger, shutdown) = shutdown_channel();
        let web = listener.as_ref().map(|l| l.try_clone().unwrap());
        let done = run_apart(settings, shutdown, web, &logs, Arc::clone(&dir));
        TestDaemon {
            dir,
            env,
            listener,
            database_url: db,
            logs,
            trigger: Some(trigger),
            done: Some(done),
            store,
        }
    }

    /// The store the daemon writes to (a second pool on the same file).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone()
    }

    /// Everything this daemon (and the ones it restarted as) logged so far.
    pub fn logs(&self) -> String {
        self.logs.text()
    }

    /// This daemon's logs, to read after it stopped.
    pub fn log_capture(&self) -> Logs {
        self.logs.clone()
    }

    /// Waits until the logs contain `needle`; returns them. Panics after [`WAIT`].
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} in the logs within {WAIT:?}; the last lines:\n{}",
                last_lines(&logs, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the messages stored in `channel` satisfy `done` (`what` names what is
    /// awaited); returns them. Panics after [`WAIT`].
    pub async fn wait_for_rows(
        &self,
        channel: &ChannelRef,
        what: &str,
        done: impl Fn(&[StoredMessage]) -> bool,
    ) -> Vec<StoredMessage> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let rows = self.store.channel_messages(channel).await.unwrap();
            if done(&rows) {
                return rows;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {WAIT:?} for {what} in {channel}; stored: {rows:#?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Triggers shutdown and waits (at most 30 s) for the daemon to stop.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown().await
    }

    async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
        let done = self.done.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), done)
            .await
            .expect("the daemon did not stop within 30 s")
            .expect("the daemon panicked")
    }

    /// Stops the daemon and starts a new one on the same database, settings, peer and logs.
    pub async fn restart(mut self) -> TestDaemon {
        self.shutdown().await.unwrap();
        let listener = self.listener.take();
        let logs = self.logs.clone();
        TestDaemon::start(Arc::clone(&self.dir), self.env.clone(), listener, logs).await
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
    }
}

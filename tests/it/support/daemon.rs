//! `spawn_daemon`: the whole kaiwa daemon in-process for a test, on a fresh SQLite file in a
//! temp dir, with the tiny random model, together with what it talks to: a loopback fake of a
//! chat platform, the web server's port, or nothing.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kaiwa::bot::event::ChannelRef;
use kaiwa::shutdown::{shutdown_channel, ShutdownTrigger};
use kaiwa::store::{Store, StoredMessage};

/// How long a test waits for the daemon (or a fake) to get something done before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Everything any daemon in this test process logged (one global subscriber per process).
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn install_log_capture() -> Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = LogBuffer(Arc::clone(&buffer));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                "debug,sqlx=warn,hyper=info,rustls=info,h2=info,tungstenite=info,reqwest=info",
            )
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    })
    .clone()
}

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
/// connected.
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
    TestDaemon::start(dir, all, peer.listener()).await
}

/// A running daemon.
pub struct TestDaemon {
    dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    listener: Option<std::net::TcpListener>,
    trigger: Option<ShutdownTrigger>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
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
    ) -> TestDaemon {
        install_log_capture();
        let db = database_url(dir.path());
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
        // same fresh file at once would race.
        let store = Store::open(&db).await.unwrap();
        let (trigger, shutdown) = shutdown_channel();
        let handle = match &listener {
            Some(l) => {
                let l = tokio::net::TcpListener::from_std(l.try_clone().unwrap()).unwrap();
                tokio::spawn(kaiwa::app::serve_on(settings, l, shutdown))
            }
            None => tokio::spawn(kaiwa::app::run(settings, shutdown)),
        };
        TestDaemon {
            dir,
            env,
            listener,
            trigger: Some(trigger),
            handle: Some(handle),
            store,
        }
    }

    /// The store the daemon writes to (a second pool on the same file).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn database_url(&self) -> String {
        database_url(self.dir.path())
    }

    /// Everything logged so far by any daemon of this test process.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&install_log_capture().lock().unwrap()).into_owned()
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
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("the daemon did not stop within 30 s")
            .expect("the daemon task panicked")
    }

    /// Stops the daemon and starts a new one on the same database, settings and peer.
    pub async fn restart(mut self) -> TestDaemon {
        self.shutdown().await.unwrap();
        let listener = self.listener.take();
        TestDaemon::start(Arc::clone(&self.dir), self.env.clone(), listener).await
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
    }
}

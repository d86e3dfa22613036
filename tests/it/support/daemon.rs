//! `spawn_daemon`: the whole kaiwa daemon in-process for a test, on a fresh SQLite file in a
//! temp dir, with a tiny random model, pointed at loopback fakes of the platforms.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use kaiwa::shutdown::{shutdown_channel, ShutdownTrigger};
use kaiwa::store::Store;

/// Everything any daemon in this test binary logged (one global subscriber per process).
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

/// A running daemon.
pub struct TestDaemon {
    dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    trigger: Option<ShutdownTrigger>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    store: Store,
}

/// Starts the daemon with a fresh database and these settings (on top of test defaults: no
/// cooldown, short replies).
pub async fn spawn_daemon(env: &[(&str, &str)]) -> TestDaemon {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    start(dir, env).await
}

async fn start(dir: Arc<tempfile::TempDir>, env: Vec<(String, String)>) -> TestDaemon {
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
    let lookup = all.clone();
    let settings = kaiwa::config::Settings::from_lookup(move |k| {
        lookup
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap();
    // Open (and migrate) the database before the daemon does: two first migrations of the same
    // fresh file at once would race.
    let store = Store::open(&db).await.unwrap();
    let (trigger, shutdown) = shutdown_channel();
    let handle = tokio::spawn(kaiwa::app::run(settings, shutdown));
    TestDaemon {
        dir,
        env,
        trigger: Some(trigger),
        handle: Some(handle),
        store,
    }
}

fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("kaiwa.db").display())
}

impl TestDaemon {
    /// The store the daemon writes to (a second pool on the same file).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn database_url(&self) -> String {
        database_url(self.dir.path())
    }

    /// Everything logged so far by any daemon of this test binary.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&install_log_capture().lock().unwrap()).into_owned()
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
        tokio::time::timeout(std::time::Duration::from_secs(30), handle)
            .await
            .expect("the daemon did not stop within 30 s")
            .expect("the daemon task panicked")
    }

    /// Stops the daemon and starts a new one on the same database and settings.
    pub async fn restart(mut self) -> TestDaemon {
        self.shutdown().await.unwrap();
        start(Arc::clone(&self.dir), self.env.clone()).await
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
    }
}

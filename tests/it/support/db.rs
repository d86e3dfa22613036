//! The store's two engines for the tests: [`TestDb`] is a fresh database of either, a SQLite file
//! in a temp dir or a database on a real PostgreSQL server.
//!
//! The PostgreSQL server is started once per test process: Debian's server
//! binaries (`initdb`, `postgres`; `apt-get install postgresql`) make a throw-away cluster in a
//! temp dir, listening on a free port of 127.0.0.1 only, and every test gets a database of its
//! own ([`database`]). The server dies with the test process (the parent-death signal), and the
//! next run removes the clusters that dead runs left behind.
//!
//! `KAIWA_TEST_POSTGRES_URL` (a URL of a role that may create databases) runs the tests on a
//! server of your own instead. Without either, the tests that need PostgreSQL fail and say how to
//! get it: nothing is skipped.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection as _;

/// Where databases are created: a URL without the database name's path.
struct Server {
    /// `postgres://user@host:port`.
    base: String,
    /// The database to connect to for `CREATE DATABASE`.
    admin_db: String,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The engines a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A fresh, empty database; a SQLite one is removed with its temp dir when dropped.
pub struct TestDb {
    pub url: String,
    pub engine: Engine,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(engine: Engine) -> TestDb {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                TestDb {
                    url: format!("sqlite://{}", dir.path().join("kaiwa.db").display()),
                    engine,
                    _dir: Some(dir),
                }
            }
            Engine::Postgres => TestDb {
                url: database().await,
                engine,
                _dir: None,
            },
        }
    }

    pub async fn open(&self) -> kaiwa::store::Store {
        kaiwa::store::Store::open(&self.url)
            .await
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url))
    }
}

/// A URL of a new, empty database on the test server (`postgres://…/kaiwa_test_<pid>_<n>`).
pub async fn database() -> String {
    // Started on a thread of its own: starting waits on a runtime of its own, which cannot run
    // inside the test's.
    let server = match SERVER.get_or_init(|| {
        std::thread::spawn(start)
            .join()
            .unwrap_or_else(|_| Err("starting the test PostgreSQL server panicked".into()))
    }) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let name = format!(
        "kaiwa_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(&format!("{}/{}", server.base, server.admin_db))
        .await
        .expect("connect to the test PostgreSQL server");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    admin.close().await.ok();
    format!("{}/{name}", server.base)
}

fn start() -> Result<Server, String> {
    if let Ok(url) = std::env::var("KAIWA_TEST_POSTGRES_URL") {
        let (base, db) = url
            .rsplit_once('/')
            .filter(|(b, _)| b.contains("://"))
            .ok_or(
                "KAIWA_TEST_POSTGRES_URL must be postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
            )?;
        return Ok(Server {
            base: base.to_string(),
            admin_db: db.to_string(),
        });
    }
    let bin = server_binaries().ok_or(
        "PostgreSQL's server binaries (initdb, postgres) were not found: install them \
         (Debian: apt-get install postgresql) or set KAIWA_TEST_POSTGRES_URL",
    )?;
    remove_dead_clusters();
    let dir = std::env::temp_dir().join(format!("kaiwa-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // initdb and postgres refuse to run as root: as root, they run as the `postgres` user that
    // Debian's package makes.
    let owner = run_as();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
        ])
        .arg("--locale=C.UTF-8")
        .arg("-D")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_owner(&mut initdb, owner);
    let out = initdb.output().map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = free_port();
    let log = std::fs::File::create(dir.join("postgres.log")).map_err(|e| e.to_string())?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid)).ok();
    }
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        // A throw-away cluster: durability is not what is tested here.
        .args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ])
        // Test daemons each keep a pool; the tests run side by side.
        .args(["-c", "max_connections=400"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    as_owner(&mut postgres, owner);
    unsafe {
        // SAFETY: prctl is async-signal-safe. The server gets SIGQUIT (immediate shutdown)
        // when the thread that started it ends, which is never before the test process does.
        postgres.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
            Ok(())
        });
    }
    // Started from a thread that lives as long as the process (see the parent-death signal).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let spawned = postgres.spawn();
        let failed = spawned.is_err();
        tx.send(spawned.map(|_| ()).map_err(|e| format!("postgres: {e}")))
            .ok();
        if !failed {
            loop {
                std::thread::park();
            }
        }
    });
    rx.recv().map_err(|e| e.to_string())??;
    let base = format!("postgres://postgres@127.0.0.1:{port}");
    wait_ready(&base, &dir)?;
    Ok(Server {
        base,
        admin_db: "postgres".into(),
    })
}

/// Waits until the server takes connections (a fresh cluster starts in about a second).
fn wait_ready(base: &str, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    loop {
        let attempt = rt.block_on(sqlx::PgConnection::connect(&format!("{base}/postgres")));
        match attempt {
            Ok(c) => {
                rt.block_on(c.close()).ok();
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
                return Err(format!(
                    "the test PostgreSQL server did not start: {e}\n{log}"
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The directory of `initdb` and `postgres`: on PATH, or Debian's newest
/// `/usr/lib/postgresql/<version>/bin`.
fn server_binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
    });
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| {
                let e = e.ok()?;
                let version = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    })
}

/// The user and group to run the server as when the tests run as root.
fn run_as() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; read at once, before any
    // other call could reuse it (the server is started once, under the OnceLock).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        panic!("running as root, and there is no `postgres` user to run the test server as");
    }
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
}

/// A port free on 127.0.0.1 now. The server binds it a moment later; another process could
/// take it in between, which fails the start loudly rather than testing the wrong server.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    l.local_addr().expect("local addr").port()
}

/// Removes the clusters of earlier test runs whose process is gone.
fn remove_dead_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kaiwa-pg-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

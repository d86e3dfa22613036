//! `kaiwa retrain`, `kaiwa models` and `kaiwa rollback` as an owner runs them from a timer: the
//! real binary on a SQLite store, the tiny model as the base, and a running `kaiwa run` that
//! must answer with each version installed (its reply rows name the version) without a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::model::copy_of_tiny_model;
use crate::support::telegram::{private_chat, user, FakeTelegram, TOKEN};

/// A store, a copy of the tiny model as the base, and a model home, in one temp dir.
struct Owner {
    dir: tempfile::TempDir,
    base: tempfile::TempDir,
    /// The store: a SQLite file in `dir`, or a PostgreSQL database.
    db: String,
}

impl Owner {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("kaiwa.db").display());
        Owner::on(dir, db)
    }

    fn on(dir: tempfile::TempDir, db: String) -> Self {
        Owner {
            dir,
            base: copy_of_tiny_model(),
            db,
        }
    }

    fn db(&self) -> String {
        self.db.clone()
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn kaiwa(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kaiwa"));
        c.args(args)
            .env("DATABASE_URL", self.db())
            .env("RUST_LOG", "kaiwa=info")
            .current_dir(self.dir.path());
        c
    }

    /// `n` new conversations (in English and Japanese, each different from every other batch's
    /// by `batch`) imported as a user would.
    fn import(&self, batch: &str, n: usize) {
        let path = self.dir.path().join(format!("{batch}.jsonl"));
        let mut f = std::fs::File::create(&path).unwrap();
        let things = ["pizza", "tea", "music", "cats", "rain", "寿司", "山", "猫"];
        for i in 0..n {
            let x = things[i % things.len()];
            let (q, a) = if i % 2 == 0 {
                (
                    format!("Do you like {x}? ({batch} {i})"),
                    format!("Yes, I love {x}."),
                )
            } else {
                (
                    format!("{x}は好きですか？（{batch} {i}）"),
                    format!("はい、{x}が大好きです。"),
                )
            };
            let line = serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]});
            writeln!(f, "{line}").unwrap();
        }
        let out = self.kaiwa(&["import", path.to_str().unwrap(), "--format", "openai"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// `kaiwa retrain` on the home with a short budget, `extra` flags after the defaults.
    fn retrain(&self, extra: &[&str]) -> Output {
        let home = self.home();
        let mut args = vec![
            "retrain",
            "--home",
            home.to_str().unwrap(),
            "--base",
            self.base.path().to_str().unwrap(),
            "--steps",
            "6",
            "--time",
            "5m",
            "--no-suite",
            "--threads",
            "1",
        ];
        args.extend(extra);
        self.kaiwa(&args)
    }

    fn current(&self) -> Option<u32> {
        kaiwa::retrain::current(&self.home()).unwrap()
    }

    /// The report of the newest run.
    fn last_report(&self) -> serde_json::Value {
        let runs = self.home().join("runs");
        let mut names: Vec<_> = std::fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let path = runs.join(names.last().unwrap()).join("report.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `replies.model` of the reply to `message_id`, once it is sent.
async fn reply_model(db: &str, message_id: &str) -> String {
    let pool = sqlx::SqlitePool::connect(db).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let model: Option<Option<String>> = sqlx::query_scalar(
            "SELECT model FROM replies WHERE message_id = $1 AND state = 'sent'",
        )
        .bind(message_id)
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some(model) = model {
            pool.close().await;
            return model.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "no reply to {message_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a line of the daemon's log (a file) contains every one of `needles`.
async fn wait_for_log(log: &Path, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never logged a line with {needles:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole loop: new conversations → a version installed → a running daemon answers with it
/// (through the store's reload generation), a rollback and a SIGHUP are followed too, and the
/// next version replays the earlier data.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_installs_versions_that_a_running_daemon_answers_with() {
    let owner = Owner::new();
    let home = owner.home();
    owner.import("first", 60);
    let out = owner.retrain(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("installed version 2 (from 1)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(owner.current(), Some(2));
    let report = owner.last_report();
    assert_eq!(report["outcome"], "installed");
    assert_eq!(report["new_examples"], 60);
    assert!(report["validation_examples"].as_u64().unwrap() > 0);
    assert_eq!(report["training"]["steps"], 6);
    // The gate compared the candidate with version 1 on the held-out new conversations.
    let gate = &report["gate"]["comparisons"][0];
    assert_eq!(gate["figure"], "held-out bits per byte", "{report}");
    // Training changed the weights.
    let weights =
        |v: &str| std::fs::read(home.join("versions").join(v).join("model.safetensors")).unwrap();
    assert_ne!(weights("0001"), weights("0002"));

    // The daemon, pointed at the home, answers with the deployed version.
    let fake = FakeTelegram::start(TOKEN).await;
    let log = owner.dir.path().join("daemon.log");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .arg("run")
        .current_dir(owner.dir.path())
        .env_clear()
        .env("TELEGRAM_TOKEN", TOKEN)
        .env("TELEGRAM_API_URL", fake.url())
        .env("DATABASE_URL", owner.db())
        .env("MODEL_DIR", &home)
        .env("MAX_NEW_TOKENS", "4")
        .env("USER_COOLDOWN_MS", "0")
        .env("RUST_LOG", "kaiwa=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let alice = user(7, "Alice");
    let chat = private_chat(&alice);
    let say = |text: &str| {
        let m = fake.message(&chat, &alice, text);
        let id = m["message_id"].to_string();
        fake.push_message(&m);
        id
    };
    let first = say("こんにちは");
    assert!(
        reply_model(&owner.db(), &first)
            .await
            .ends_with("versions/0002"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // More conversations, another run: version 3, made from 2 with a replay of 2's data, and
    // the running daemon follows through the store.
    owner.import("second", 60);
    let out = owner.retrain(&["--keep-versions", "2"]);
    assert!(
        stderr(&out).contains("installed version 3 (from 2)"),
        "{}",
        stderr(&out)
    );
    let report = owner.last_report();
    assert_eq!(
        report["new_examples"], 60,
        "only the new conversations are new: {report}"
    );
    assert!(report["replay_examples"].as_u64().unwrap() > 0, "{report}");
    // (Loading it logs the path too, before the swap: wait for the swap.)
    wait_for_log(&log, &["model reloaded", "versions/0003"]).await;
    let second = say("元気ですか？");
    assert!(reply_model(&owner.db(), &second)
        .await
        .ends_with("versions/0003"));

    // Two versions are kept: version 1 is gone; the deployed one and its parent stay.
    assert!(!home.join("versions/0001").exists());
    assert!(home.join("versions/0002").is_dir());

    // `kaiwa models` lists them, the deployed one marked.
    let out = owner.kaiwa(&["models", "--home", home.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listing.contains("*    3"), "{listing}");
    assert!(listing.contains("from 2: 60 new examples"), "{listing}");
    assert!(listing.contains("held-out bits per byte"), "{listing}");

    // A rollback goes back to the version 3 was made from, and the daemon follows.
    let out = owner.kaiwa(&["rollback", "--home", home.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(owner.current(), Some(2));
    let mut reloads = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while reloads < 2 {
        let text = std::fs::read_to_string(&log).unwrap();
        reloads = text.matches("model reloaded").count();
        assert!(
            Instant::now() < deadline,
            "no reload after the rollback:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let third = say("おやすみ");
    assert!(reply_model(&owner.db(), &third)
        .await
        .ends_with("versions/0002"));

    // SIGHUP reloads too, with nothing said through the store.
    kaiwa::retrain::set_current(&home, 3).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for_log(&log, &["SIGHUP: model reloaded", "versions/0003"]).await;
    let fourth = say("ただいま");
    assert!(reply_model(&owner.db(), &fourth)
        .await
        .ends_with("versions/0003"));

    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let status = daemon.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

/// A candidate the gate finds worse is not installed: the deployed version stays, and the run
/// says why in its report. Too little new data ends a run before training. On both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_the_gate_is_not_installed() {
    let postgres = crate::support::db::database().await;
    for db in [None, Some(postgres)] {
        let owner = match db {
            Some(url) => Owner::on(tempfile::tempdir().unwrap(), url),
            None => Owner::new(),
        };
        tokio::task::spawn_blocking(move || gate_failure(owner))
            .await
            .unwrap();
    }
}

fn gate_failure(owner: Owner) {
    owner.import("first", 60);
    // A negative tolerance: any candidate counts as worse.
    let out = owner.retrain(&["--bpb-tolerance=-100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("not installed"), "{}", stderr(&out));
    assert_eq!(owner.current(), Some(1));
    assert!(!owner.home().join("versions/0002").exists());
    let report = owner.last_report();
    assert_eq!(report["outcome"], "rejected");
    assert_eq!(report["gate"]["passed"], false);

    // Nothing new since version 1's data (the rejected run's data is still new to it, so it
    // is trained on again); with a higher bar for "enough", nothing is done.
    let out = owner.retrain(&["--min-new", "1000"]);
    assert!(
        stderr(&out).contains("nothing to do: 60 new examples"),
        "{}",
        stderr(&out)
    );
    assert_eq!(owner.last_report()["outcome"], "nothing-new");
    assert_eq!(owner.current(), Some(1));
}

/// A run killed half-way through training continues from its checkpoint when started again,
/// and a second run while one is going is refused.
#[cfg(unix)]
#[test]
fn a_killed_run_continues_and_two_runs_at_once_are_refused() {
    let owner = Owner::new();
    owner.import("first", 60);
    let home = owner.home();
    let args = [
        "retrain",
        "--home",
        home.to_str().unwrap(),
        "--base",
        owner.base.path().to_str().unwrap(),
        "--steps",
        "40",
        "--checkpoint-every",
        "2",
        "--time",
        "10m",
        "--no-suite",
        "--threads",
        "1",
    ];
    let mut first = owner
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a checkpoint of the training.
    let deadline = Instant::now() + Duration::from_secs(120);
    let checkpoint = loop {
        let found = std::fs::read_dir(home.join("runs"))
            .ok()
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path().join("train/checkpoint"))
            .find(|p| p.is_dir());
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no checkpoint");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let second = owner.kaiwa(&args);
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("another `kaiwa retrain` is running"),
        "{}",
        stderr(&second)
    );

    first.kill().unwrap();
    first.wait().unwrap();
    assert!(checkpoint.is_dir());
    assert_eq!(owner.current(), Some(1));

    let again = owner.kaiwa(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    let report = owner.last_report();
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(report["training"]["steps"], 40, "{report}");
    assert!(
        ["installed", "rejected"].contains(&report["outcome"].as_str().unwrap()),
        "{report}"
    );
    // One run, continued: not a second one beside it.
    assert_eq!(std::fs::read_dir(home.join("runs")).unwrap().count(), 1);
}

//! What the integration tests share: the daemon in-process ([`daemon`]), loopback fakes of the
//! Telegram Bot API ([`telegram`]) and of Discord ([`discord`]), plain HTTP for the web server
//! ([`web`]), the platform-neutral core with a recording outbox ([`core`]), tiny random models
//! ([`model`]), and the helpers below.

pub mod core;
pub mod daemon;
pub mod db;
pub mod discord;
pub mod logs;
pub mod model;
pub mod telegram;
pub mod web;

/// The `meta` of every example `export-corpus --mode bot` writes from `store` (where the
/// feedback on replies is carried).
pub async fn exported_meta(store: &kaiwa::store::Store) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    kaiwa::corpus::export::export(store, dir.path(), &Default::default())
        .await
        .expect("export");
    std::fs::read_to_string(dir.path().join("train.jsonl"))
        .expect("train.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line")["meta"].clone())
        .collect()
}

/// Waits (bounded) until the exported feedback satisfies `done`; returns the metas.
pub async fn wait_for_feedback(
    store: &kaiwa::store::Store,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metas = exported_meta(store).await;
        if done(&metas) {
            return metas;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "feedback not recorded within 20 s: {metas:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The Python interpreter (`$PYTHON`, else `python3`) if it can import `module`. Where it cannot,
/// the test is skipped with a line saying so, except in CI (`CI` set), where that fails.
pub fn python_with(module: &str, install: &str) -> Option<String> {
    python_importing(module, install, "CI", std::env::var_os("CI").is_some())
}

/// As [`python_with`], for a module too heavy to install on every CI machine: a missing module
/// fails the test only where the environment variable `opt_in` is `1` (`.ci/run` then installs
/// it); elsewhere the test is skipped.
pub fn python_with_opt_in(module: &str, install: &str, opt_in: &str) -> Option<String> {
    let required = std::env::var(opt_in).is_ok_and(|v| v == "1");
    python_importing(module, install, &format!("{opt_in}=1"), required)
}

fn python_importing(module: &str, install: &str, why: &str, required: bool) -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output();
    if probe.map(|o| o.status.success()).unwrap_or(false) {
        return Some(python);
    }
    assert!(
        !required,
        "{module} is not installed for {python} ({why}); .ci/run installs it"
    );
    eprintln!("skipping: {python} cannot import {module} ({install})");
    None
}

//! Starting the daemon: open the store, load the model, start the bot and each configured
//! platform, and run until shutdown. Tests start the whole daemon through [`run`] too.

use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::task::JoinSet;

use crate::bot::Bot;
use crate::config::Settings;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Runs the daemon until `shutdown` fires (or every platform connection has ended).
pub async fn run(settings: Settings, mut shutdown: Shutdown) -> anyhow::Result<()> {
    if settings.discord.is_none() && settings.telegram.is_none() {
        bail!(
            "neither DISCORD_TOKEN nor TELEGRAM_TOKEN is set: there is nothing to connect to \
             (set one in the environment or in .env; see .env.example)"
        );
    }
    let store = Store::open(&settings.database_url).await?;
    let generator = crate::bot::load_model(&settings)
        .await
        .with_context(|| format!("loading the model in {}", settings.model_dir.display()))?;
    crate::engine::corpora::ensure_corpora(&store, &settings.model_dir)
        .await
        .context("adding the model's retrieval data to the store")?;
    tracing::info!(model = %settings.model_dir.display(), database = %settings.database_url, "kaiwa starting");
    let bot = Bot::new(settings.clone(), store.clone(), Arc::new(generator));

    let mut platforms = JoinSet::new();
    if let Some(p) = settings.telegram.clone() {
        platforms.spawn(named(
            "telegram",
            crate::platform::telegram::run(Arc::clone(&bot), p, shutdown.clone()),
        ));
    }
    if let Some(p) = settings.discord.clone() {
        platforms.spawn(named(
            "discord",
            crate::platform::discord::run(Arc::clone(&bot), p, shutdown.clone()),
        ));
    }
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            ended = platforms.join_next() => match ended {
                None => break,
                Some(Ok((name, Ok(())))) => tracing::info!(platform = name, "platform connection ended"),
                Some(Ok((name, Err(e)))) => tracing::error!(platform = name, error = %format!("{e:#}"), "platform connection failed"),
                Some(Err(e)) => tracing::error!(error = %e, "platform task panicked"),
            }
        }
    }
    tracing::info!("shutting down: finishing replies in progress");
    bot.shutdown().await;
    // Platform tasks watch the same shutdown; give them a moment, then stop them.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while platforms.join_next().await.is_some() {}
    })
    .await;
    platforms.abort_all();
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn named<F>(name: &'static str, f: F) -> (&'static str, anyhow::Result<()>)
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    (name, f.await)
}

//! Starting the daemon: listen on the web server's address, open the store, load the model,
//! start the bot and each configured platform, and run until shutdown. Tests start the whole
//! daemon through [`run`] and [`serve_on`] too.

use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::bot::Bot;
use crate::config::Settings;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Runs the daemon until `shutdown` fires (or every platform connection has ended): the bots
/// configured, and the web server too when `HTTP_ADDR` is set.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let web = match settings.web.addr {
        Some(addr) => Some(bind(&settings, addr).await?),
        None => None,
    };
    if settings.discord.is_none() && settings.telegram.is_none() && web.is_none() {
        bail!(
            "neither DISCORD_TOKEN nor TELEGRAM_TOKEN nor HTTP_ADDR is set: there is nothing to \
             connect to (set one in the environment or in .env; see .env.example)"
        );
    }
    daemon(settings, shutdown, true, web).await
}

/// Runs the web server alone (`kaiwa serve`) on `HTTP_ADDR`, or on 127.0.0.1:8080.
pub async fn serve(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = bind(&settings, crate::web::listen_addr(&settings.web)).await?;
    serve_on(settings, listener, shutdown).await
}

/// [`serve`] on a listener already bound (tests bind port 0).
pub async fn serve_on(
    settings: Settings,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    daemon(settings, shutdown, false, Some(listener)).await
}

/// Binds the web server's address, after checking it is safe to listen there.
async fn bind(settings: &Settings, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    settings.web.check_addr(addr)?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (HTTP_ADDR)"))
}

/// The daemon: the web server first (it answers `/health` with 503 while the model loads), then
/// the store, the model and the bots.
async fn daemon(
    settings: Settings,
    mut shutdown: Shutdown,
    bots: bool,
    listener: Option<TcpListener>,
) -> anyhow::Result<()> {
    let mut platforms = JoinSet::new();
    let web = match listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let web = crate::web::Web::new(settings.clone());
            let server = crate::web::serve(Arc::clone(&web), listener, shutdown.clone());
            platforms.spawn(named("web", async move {
                server.await.context("the web server stopped")
            }));
            tracing::info!(%addr, "web server listening");
            // A line for the person who started it, whatever the log level.
            eprintln!("kaiwa: chat page and OpenAI-compatible API at http://{addr}/ (API: http://{addr}/v1)");
            Some(web)
        }
        None => None,
    };
    let store = Store::open(&settings.database_url).await?;
    let generator = crate::bot::load_model(&settings)
        .await
        .with_context(|| format!("loading the model in {}", settings.model_dir.display()))?;
    crate::engine::corpora::ensure_corpora(&store, &settings.model_dir)
        .await
        .context("adding the model's retrieval data to the store")?;
    tracing::info!(model = %settings.model_dir.display(), database = %crate::store::display_url(&settings.database_url), "kaiwa starting");
    let metrics = web.as_ref().map(|w| w.metrics()).unwrap_or_default();
    let bot = Bot::with_metrics(
        settings.clone(),
        store.clone(),
        Arc::new(generator),
        metrics,
    );
    // Other daemons on the store see this one alive before it claims anything, and a `/reload`
    // in any of them reaches this one.
    // A store that cannot be written now (locked, say) is told on the next beat instead.
    if let Err(e) = store.announce().await {
        tracing::warn!(error = %e, "could not tell the store this daemon is alive; trying again in a moment");
    }
    let in_step = tokio::spawn(Arc::clone(&bot).keep_in_step(crate::bot::STORE_CHECK_EVERY));
    let on_hangup = tokio::spawn(reload_on_hangup(Arc::clone(&bot)));
    if let Some(web) = &web {
        // Web requests in flight died with the last process; their clients are gone.
        bot.recover(crate::domain::Platform::Web, None).await;
        web.set_bot(Arc::clone(&bot));
    }
    if let Some(p) = settings.telegram.clone().filter(|_| bots) {
        platforms.spawn(named(
            "telegram",
            crate::platform::telegram::run(Arc::clone(&bot), p, shutdown.clone()),
        ));
    }
    if let Some(p) = settings.discord.clone().filter(|_| bots) {
        platforms.spawn(named(
            "discord",
            crate::platform::discord::run(
                Arc::clone(&bot),
                p,
                settings.discord_shards,
                shutdown.clone(),
            ),
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
    // What is still pending now was left unanswered: the next daemon to start takes it at once.
    in_step.abort();
    on_hangup.abort();
    if let Err(e) = store.leave().await {
        tracing::warn!(error = %e, "could not tell the store this daemon stopped");
    }
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

/// SIGHUP reloads the model (`kill -HUP`, `systemctl reload`): a new version installed by
/// `kaiwa retrain`, or files changed by hand. (Daemons on other machines follow the store's
/// reload generation instead, which `kaiwa retrain` and `/reload` raise.)
async fn reload_on_hangup(bot: Arc<crate::bot::Bot>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP cannot be watched: reload with /reload instead");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match bot.reload_model().await {
                Ok(model) => {
                    tracing::info!(model = %model.dir().display(), "SIGHUP: model reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the model could not be reloaded; the old one keeps answering")
                }
            }
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}

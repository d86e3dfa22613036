//! `kaiwa run` and `kaiwa serve`: the daemons, each until SIGINT or SIGTERM.

use anyhow::Result;
use kaiwa::config::Settings;
use kaiwa::shutdown::{shutdown_channel, wait_for_signal, Shutdown};

use crate::args::ServeArgs;

pub fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    until_signal(|shutdown| kaiwa::app::run(settings, shutdown))
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let settings = args.settings()?;
    until_signal(|shutdown| kaiwa::app::serve(settings, shutdown))
}

/// Runs a daemon made by `daemon` until it ends; SIGINT or SIGTERM triggers its shutdown.
fn until_signal<F>(daemon: impl FnOnce(Shutdown) -> F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let (trigger, shutdown) = shutdown_channel();
    crate::runtime()?.block_on(async move {
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: shutting down");
            trigger.trigger();
        });
        daemon(shutdown).await
    })
}

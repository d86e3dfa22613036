//! Each test daemon's logs, apart from every other's: the daemon runs on a runtime of its own
//! whose threads all log into its [`Logs`] (a tracing dispatcher set on each of them), so a test
//! sees what its daemon logged, not what the daemons of the tests beside it did.
//!
//! Threads that belong to no daemon log nowhere: the global subscriber is [`Quiet`]. It exists
//! to pass on the `log` crate's records (teloxide's, tract's) to whatever dispatcher the thread
//! that logs has, at debug level and below. Threads a daemon's libraries start themselves (the
//! model's rayon pool, sqlx's SQLite workers) have none, so what they log is not kept.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex, Once};

use tracing::dispatcher::{self, DefaultGuard, Dispatch};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::util::SubscriberInitExt;

/// What a test daemon logs: everything at debug level but the chattiest libraries (serenity's
/// and teloxide's debug lines included, for the tests that no token is ever logged).
const FILTER: &str = "debug,sqlx=warn,hyper=info,rustls=info,h2=info,tungstenite=info,reqwest=info";

/// One daemon's log lines (its restarts' too), as text.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// A dispatcher that formats into these logs.
    pub fn dispatch(&self) -> Dispatch {
        route_log_records();
        let writer = self.clone();
        Dispatch::new(
            tracing_subscriber::fmt()
                .with_env_filter(FILTER)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish(),
        )
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    /// The dispatcher of the daemon this thread runs, while it runs it.
    static THREAD_DISPATCH: RefCell<Option<DefaultGuard>> = const { RefCell::new(None) };
}

/// Makes `dispatch` this thread's for as long as it lives (a runtime's `on_thread_start`).
pub fn set_thread_dispatch(dispatch: &Dispatch) {
    let guard = dispatcher::set_default(dispatch);
    THREAD_DISPATCH.with(|d| *d.borrow_mut() = Some(guard));
}

/// Undoes [`set_thread_dispatch`] (a runtime's `on_thread_stop`).
pub fn clear_thread_dispatch() {
    THREAD_DISPATCH.with(|d| d.borrow_mut().take());
}

/// Installs [`Quiet`] as the global subscriber and, with it, the bridge from the `log` crate.
fn route_log_records() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        Quiet
            .try_init()
            .expect("no other global subscriber in the test process");
    });
}

/// The subscriber of threads that belong to no daemon: it keeps nothing, but says debug level, so
/// that `log` records up to debug are passed on to a daemon thread's own dispatcher.
struct Quiet;

impl Subscriber for Quiet {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::DEBUG)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

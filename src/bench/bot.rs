//! `kaiwa bench bot`: the bot's whole path for a message — stored, admitted, queued per channel,
//! context from the store, the reply engine, the reply sent and stored — at 1, 20 and 100
//! channels talking at once, each person waiting for the answer before writing again. Messages
//! go through kaiwa's Telegram adapter against a loopback Bot API (`telegram_loop`), or, with
//! [`Through::Outbox`], straight to the bot with an in-process outbox noting each reply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use super::telegram_loop::LoopbackTelegram;
use super::{peak_rss_mib, percentile};
use crate::bot::event::{
    BoxFuture, ChannelRef, ChatKind, Incoming, IncomingMessage, Outbox, Platform, SendError,
    SentMessage,
};
use crate::bot::Bot;
use crate::config::{PlatformSettings, Secret, Settings, TelegramSettings};
use crate::model::Generator;
use crate::store::{now_ms, Store, StoreError};

/// How long a person waits for an answer before counting it as not answered.
const REPLY_LIMIT: Duration = Duration::from_secs(60);

/// The figures at one number of channels.
#[derive(Debug, Clone, Serialize)]
pub struct BotStep {
    pub channels: usize,
    pub messages: usize,
    /// Messages answered "busy" or not answered within a minute.
    pub not_answered: usize,
    pub replies_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub peak_rss_mib: f64,
}

/// Records each reply's time by the message it answers.
#[derive(Default)]
struct TimingOutbox {
    replies: Mutex<HashMap<String, (Instant, String)>>,
    sent: Notify,
    next: Mutex<u64>,
}

impl Outbox for TimingOutbox {
    fn send<'a>(
        &'a self,
        _channel: &'a ChannelRef,
        text: &'a str,
        reply_to: Option<&'a str>,
    ) -> BoxFuture<'a, Result<SentMessage, SendError>> {
        Box::pin(async move {
            if let Some(id) = reply_to {
                self.replies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_string(), (Instant::now(), text.to_string()));
                self.sent.notify_waiters();
            }
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            Ok(SentMessage {
                message_id: format!("sent-{next}"),
                sent_at_ms: now_ms(),
            })
        })
    }

    fn typing<'a>(&'a self, _channel: &'a ChannelRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }
}

impl TimingOutbox {
    /// When the reply to `id` was sent, and its text; `None` after `limit`.
    async fn wait_for(&self, id: &str, limit: Duration) -> Option<(Instant, String)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.sent.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self
                .replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(id)
            {
                return Some(r.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// How the benchmark's messages reach the bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Through {
    /// kaiwa's Telegram adapter (teloxide) over HTTP, against a loopback Bot API.
    Telegram,
    /// Handed to the bot in-process, replies noted by an in-process outbox (no HTTP).
    Outbox,
}

impl std::str::FromStr for Through {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "telegram" => Ok(Through::Telegram),
            "outbox" => Ok(Through::Outbox),
            other => Err(format!("{other:?}: telegram or outbox")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BotBenchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the loopback Telegram API: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the benchmark on `store` (which should hold the model's retrieval data): for each entry
/// of `channels`, that many people each write `per_channel` of `prompts`, one after another.
pub async fn bench_bot(
    mut settings: Settings,
    store: Store,
    generator: Arc<Generator>,
    prompts: &[String],
    channels: &[usize],
    per_channel: usize,
    through: Through,
) -> Result<Vec<BotStep>, BotBenchError> {
    // Each person waits for the answer before writing again; no flood control in the way.
    settings.user_cooldown = Duration::ZERO;
    let bot = Bot::new(settings, store, generator);
    let outbox = Arc::new(TimingOutbox::default());
    let telegram = match through {
        Through::Outbox => None,
        Through::Telegram => {
            let api = Arc::new(LoopbackTelegram::start().await?);
            let (trigger, shutdown) = crate::shutdown::shutdown_channel();
            let platform = TelegramSettings {
                api: PlatformSettings {
                    token: Secret::from("1000:bench"),
                    api_url: Some(api.url().to_string()),
                },
                webhook: None,
            };
            let adapter = tokio::spawn(crate::platform::telegram::run(
                Arc::clone(&bot),
                platform,
                shutdown,
            ));
            Some((api, trigger, adapter))
        }
    };
    let run = now_ms();
    let mut steps = Vec::new();
    for (step, &n) in channels.iter().enumerate() {
        super::reset_peak_rss();
        let started = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|c| {
                let (bot, outbox) = (Arc::clone(&bot), Arc::clone(&outbox));
                let api = telegram.as_ref().map(|(api, _, _)| Arc::clone(api));
                // A chat no earlier run used (the store keeps what earlier runs wrote).
                let chat_id = (run % 1_000_000_000) * 100_000 + step as i64 * 10_000 + c as i64;
                let mine: Vec<String> = (0..per_channel)
                    .map(|i| prompts[(c * per_channel + i) % prompts.len()].clone())
                    .collect();
                tokio::spawn(async move {
                    let mut times = Vec::new();
                    let mut missed = 0;
                    for (i, text) in mine.into_iter().enumerate() {
                        let t = Instant::now();
                        let answer = match &api {
                            Some(api) => {
                                let id = api.write(chat_id, &text);
                                api.reply_to(id, REPLY_LIMIT).await
                            }
                            None => {
                                let id = format!("{run}-{n}-{c}-{i}");
                                let message = IncomingMessage {
                                    channel: ChannelRef::new(
                                        Platform::Telegram,
                                        format!("bench-{run}-{n}-{c}"),
                                    ),
                                    kind: ChatKind::Direct,
                                    message_id: id.clone(),
                                    author_id: format!("bench-{n}-{c}"),
                                    author_name: format!("person {c}"),
                                    author_is_bot: false,
                                    text,
                                    reply_to: None,
                                    replies_to_bot: false,
                                    mentions_bot: false,
                                    sent_at_ms: now_ms(),
                                    guild_id: None,
                                    roles: Vec::new(),
                                };
                                let out: Arc<dyn Outbox> = outbox.clone();
                                bot.handle(Incoming::Message(message), out).await;
                                outbox.wait_for(&id, REPLY_LIMIT).await
                            }
                        };
                        match answer {
                            Some((at, reply)) if reply != crate::bot::commands::BUSY => {
                                times.push(at.duration_since(t).as_secs_f64() * 1e3)
                            }
                            _ => missed += 1,
                        }
                    }
                    (times, missed)
                })
            })
            .collect();
        let (mut times, mut missed) = (Vec::new(), 0);
        for t in tasks {
            if let Ok((t, m)) = t.await {
                times.extend(t);
                missed += m;
            }
        }
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let step = BotStep {
            channels: n,
            messages: n * per_channel,
            not_answered: missed,
            replies_per_s: times.len() as f64 / seconds,
            p50_ms: percentile(&mut times, 0.50),
            p99_ms: percentile(&mut times, 0.99),
            peak_rss_mib: peak_rss_mib(),
        };
        tracing::info!(?step, "bot benchmark step");
        steps.push(step);
    }
    if let Some((_api, trigger, adapter)) = telegram {
        trigger.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(30), adapter).await;
    }
    bot.shutdown().await;
    Ok(steps)
}

//! The platform-neutral core of the daemon: store → decide → build context → generate → send.
//!
//! Platform adapters hand every event to [`Bot::handle`]. A message is stored before anything
//! else; a redelivered message is recognised by its platform id and goes no further. Replies are
//! queued per channel (one generation at a time per channel, in order) and generated on a
//! bounded pool of blocking threads, off the async runtime.

pub mod access;
pub mod commands;
pub mod event;
pub mod split;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify, Semaphore};

use crate::backoff::Backoff;
use crate::config::{ReplyPolicy, Settings};
use crate::conversation::{self, Speakers};
use crate::engine::{Reply, ReplyEngine, Request};
use crate::metrics::Metrics;
use crate::model::{ChatMessage, GenerateOptions, Generator};
use crate::store::{now_ms, Insert, NewMessage, ReplyProvenance, Store, StoredMessage};
use event::{
    ChannelRef, ChatKind, Incoming, IncomingMessage, Outbox, Platform, SendError, SentMessage,
};

/// The longest message text stored and considered; longer text is cut (with a log line).
const MAX_TEXT_CHARS: usize = 32_000;
/// How long shutdown waits for queued replies before cancelling them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The bot's latest replies in a channel that the engine will not say again.
pub const RECENT_REPLIES: usize = 8;
/// The name the bot's own messages are stored under.
pub const SELF_NAME: &str = "kaiwa";

/// What a reply is made from, whichever front end asks ([`Bot::compose`]).
pub struct Compose {
    /// The conversation as the model sees it, ending with the user's turn.
    pub messages: Vec<ChatMessage>,
    /// The message being answered, as its author wrote it.
    pub user_text: String,
    /// The bot's latest replies in this conversation, never said again.
    pub recent_replies: Vec<String>,
    pub options: GenerateOptions,
}

/// The engine's reply and the provenance row to record with it.
pub struct Composed {
    pub reply: Reply,
    pub provenance: ReplyProvenance,
}

/// What becomes of a message once it is stored ([`Bot::on_message`]).
enum Then {
    /// Only stored (not for the bot, or not to be answered).
    Store,
    /// A command to run.
    Command(commands::Command),
    /// To be answered, but the reply would come too late: say so.
    SayBusy,
    /// Addressed to the bot by someone not allowed to talk to it: stored, not answered.
    Refuse,
    /// To be answered, but its author has had today's `DAILY_QUOTA` replies.
    OverQuota,
    /// To be answered.
    Answer,
}

/// A user's cooldown taken by a message ([`Bot::cooled_down`]).
struct CooldownTaken {
    at: Instant,
    previous: Option<Instant>,
}

/// What [`Bot::recover`] did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Recovered {
    resumed: usize,
    already_sent: usize,
    failed: usize,
    /// Held by a daemon still running (another shard, a replica): left to it.
    held: usize,
}

/// A place in the reply queue ([`Bot::reserve`]), given back on drop.
pub struct Reservation(Arc<Bot>);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.release_pending();
    }
}

/// A reply waiting for its turn in its channel's queue.
struct Job {
    message: IncomingMessage,
    outbox: Arc<dyn Outbox>,
}

/// The bot, shared by every platform adapter.
pub struct Bot {
    settings: Settings,
    store: Store,
    model: RwLock<Arc<Generator>>,
    /// The store's reload generation the model loaded now answers to (see
    /// [`Bot::keep_in_step`]).
    reload_generation: AtomicI64,
    engine: Arc<ReplyEngine>,
    queues: Mutex<HashMap<ChannelRef, mpsc::UnboundedSender<Job>>>,
    generation_slots: Arc<Semaphore>,
    /// Replies queued or in progress.
    pending: AtomicUsize,
    idle: Notify,
    last_answered: Mutex<HashMap<(Platform, String), Instant>>,
    accepting: AtomicBool,
    /// Set when shutdown gives up waiting: running generations stop early.
    cancel: Arc<AtomicBool>,
    /// The moving average of a reply's time once it has a worker, in seconds.
    reply_seconds: Mutex<Option<f64>>,
    metrics: Arc<Metrics>,
}

/// How often a daemon tells the store it is alive and checks it for a `/reload` made in another
/// process ([`Bot::keep_in_step`]).
pub const STORE_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Loads the model directory of `settings` (`MODEL_DIR`, on `THREADS` threads), off the async
/// threads: at start-up and on `/reload`.
pub async fn load_model(settings: &Settings) -> Result<Generator, crate::model::ModelError> {
    let (dir, threads) = (settings.model_dir.clone(), settings.threads);
    tokio::task::spawn_blocking(move || Generator::load_with_threads(&dir, threads))
        .await
        .map_err(|e| crate::model::ModelError::Invalid(format!("model loading panicked: {e}")))?
}

impl Bot {
    pub fn new(settings: Settings, store: Store, model: Arc<Generator>) -> Arc<Self> {
        Self::with_metrics(settings, store, model, Arc::new(Metrics::default()))
    }

    /// [`Bot::new`], counting into `metrics` (the web server's, so `/metrics` shows both).
    pub fn with_metrics(
        settings: Settings,
        store: Store,
        model: Arc<Generator>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Bot {
            metrics,
            generation_slots: Arc::new(Semaphore::new(settings.workers)),
            engine: Arc::new(ReplyEngine::new(settings.engine.clone())),
            settings,
            store,
            model: RwLock::new(model),
            reload_generation: AtomicI64::new(0),
            queues: Mutex::new(HashMap::new()),
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
            last_answered: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            cancel: Arc::new(AtomicBool::new(false)),
            reply_seconds: Mutex::new(None),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The model replies come from now.
    pub fn model(&self) -> Arc<Generator> {
        Arc::clone(&self.model.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Loads the model directory again and swaps it in; replies in progress finish on the old one.
    /// Retrieval data the directory ships that the store lacks is added first.
    pub async fn reload_model(&self) -> Result<Arc<Generator>, crate::model::ModelError> {
        let loaded = Arc::new(load_model(&self.settings).await?);
        if let Err(e) =
            crate::engine::corpora::ensure_corpora(&self.store, &self.settings.model_dir).await
        {
            tracing::error!(error = %e, "could not add the model's retrieval data");
        }
        *self.model.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&loaded);
        Ok(loaded)
    }

    /// `/reload`: asks every process on the store to reload its model (they follow within the
    /// period of their [`Bot::keep_in_step`]), then reloads it here. Also says whether the
    /// others could be told: a store that cannot be written still gets the model reloaded here.
    pub async fn reload_everywhere(
        &self,
    ) -> Result<(Arc<Generator>, bool), crate::model::ModelError> {
        let told = match self.store.request_reload().await {
            Ok(g) => {
                self.reload_generation.fetch_max(g, Ordering::SeqCst);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "could not ask the other processes on the store to reload");
                false
            }
        };
        Ok((self.reload_model().await?, told))
    }

    /// Keeps this daemon in step with the others on its store, every `every` until the task is
    /// stopped (stop it after [`Bot::shutdown`], so that replies still draining stay this
    /// daemon's): says it is alive ([`Store::announce`]), and reloads the model whenever
    /// `/reload` in any process on the store raised its reload generation. With several daemons
    /// on one store (shards, replicas, a web server of its own), one `/reload` reaches them all.
    pub async fn keep_in_step(self: Arc<Self>, every: Duration) {
        // What the store says at first is what the loaded model already answers to.
        let mut baseline = true;
        loop {
            if let Err(e) = self.store.announce().await {
                tracing::warn!(error = %e, "could not tell the store this daemon is alive");
            }
            match self.store.reload_generation().await {
                Ok(g) if baseline => {
                    self.reload_generation.fetch_max(g, Ordering::SeqCst);
                    baseline = false;
                }
                Ok(g) if self.reload_generation.fetch_max(g, Ordering::SeqCst) < g => {
                    match self.reload_model().await {
                        Ok(m) => tracing::info!(
                            generation = g,
                            model = %m.dir().display(),
                            "model reloaded: /reload in another process on the store"
                        ),
                        Err(e) => tracing::error!(
                            generation = g,
                            error = %e,
                            "model reload asked by another process failed; still using the previous model"
                        ),
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not check the store for /reload"),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Handles one event from a platform. Returns once the event is stored and any reply is
    /// queued (not sent). Errors are logged, never raised: the daemon keeps serving.
    pub async fn handle(self: &Arc<Self>, event: Incoming, outbox: Arc<dyn Outbox>) {
        if let Err(e) = self.handle_checked(event, outbox).await {
            tracing::error!(error = %e, "could not store an event");
        }
    }

    /// [`Bot::handle`], saying whether the event could be stored: an adapter that can have
    /// the platform send it again (Telegram's offset) leaves it unconfirmed on an error, so
    /// nothing is confirmed that was not stored.
    pub async fn handle_checked(
        self: &Arc<Self>,
        event: Incoming,
        outbox: Arc<dyn Outbox>,
    ) -> Result<(), crate::store::StoreError> {
        match event {
            Incoming::Message(m) => self.on_message(m, outbox).await,
            Incoming::Edited {
                channel,
                message_id,
                text,
                edited_at_ms,
            } => self
                .store
                .edit_message(&channel, &message_id, &cap_text(text), edited_at_ms)
                .await
                .map(drop),
            Incoming::Deleted {
                channel,
                message_id,
            } => self
                .store
                .delete_message(&channel, &message_id, now_ms())
                .await
                .map(drop),
            Incoming::Reaction {
                channel,
                message_id,
                user_id,
                added,
                removed,
            } => {
                self.on_reaction(&channel, &message_id, &user_id, &added, &removed)
                    .await
            }
        }
    }

    /// Answers what a crash left unanswered on `platform` (claimed, never sent), in order per
    /// channel: each message younger than `RECOVER_MAX_AGE_MINUTES` is queued again; an answer
    /// that was sent but not recorded is recorded; older messages, deleted ones and commands are
    /// marked failed with the reason (`/stats` counts them). Without an outbox (the web, whose
    /// clients left with the old process) every one is marked failed. Errors are logged.
    pub async fn recover(self: &Arc<Self>, platform: Platform, outbox: Option<Arc<dyn Outbox>>) {
        match self.store.pending_replies(platform).await {
            Ok(rows) => self.recover_rows(platform, rows, outbox).await,
            Err(e) => tracing::error!(%platform, error = %e, "could not recover pending replies"),
        }
    }

    /// [`Bot::recover`] for `rows`, pending replies of `platform` the caller took from the
    /// store ([`Store::pending_replies`]) and knows to be its own: a Discord process that runs
    /// some of the bot's shards recovers only those of its shards' guilds.
    ///
    /// Only claims no running daemon holds are taken over ([`Store::take_over_claim`]): a
    /// replica starting beside one that is still generating a reply leaves it alone. Claims of
    /// a daemon that crashed moments ago look held until it is missed for
    /// [`crate::store::PROCESS_GONE_AFTER`], so they are looked at once more after that.
    pub async fn recover_rows(
        self: &Arc<Self>,
        platform: Platform,
        rows: Vec<StoredMessage>,
        outbox: Option<Arc<dyn Outbox>>,
    ) {
        let held = self.recover_pending(platform, rows, &outbox).await;
        if held.is_empty() {
            return;
        }
        let bot = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(crate::store::PROCESS_GONE_AFTER + STORE_CHECK_EVERY).await;
            let still_held = bot.recover_pending(platform, held, &outbox).await;
            if !still_held.is_empty() {
                tracing::info!(
                    %platform,
                    held = still_held.len(),
                    "pending replies stay with the running daemons that claimed them"
                );
            }
        });
    }

    /// Recovers `rows` as [`Bot::recover_rows`] says, logging what it did and any error;
    /// returns the rows a running daemon holds.
    async fn recover_pending(
        self: &Arc<Self>,
        platform: Platform,
        rows: Vec<StoredMessage>,
        outbox: &Option<Arc<dyn Outbox>>,
    ) -> Vec<StoredMessage> {
        let mut r = Recovered::default();
        let mut held = Vec::new();
        for row in rows {
            match self.recover_one(platform, &row, outbox, &mut r).await {
                Ok(true) => {}
                Ok(false) => held.push(row),
                Err(e) => {
                    tracing::error!(%platform, error = %e, "could not recover a pending reply")
                }
            }
        }
        r.held = held.len();
        if r != Recovered::default() {
            self.metrics.recovered("resumed", r.resumed);
            self.metrics.recovered("already_sent", r.already_sent);
            self.metrics.recovered("failed", r.failed);
            tracing::info!(
                %platform,
                resumed = r.resumed,
                already_sent = r.already_sent,
                failed = r.failed,
                held_by_running_daemons = r.held,
                "replies left by the last run"
            )
        }
        held
    }

    /// Recovers one pending reply, counting it in `r`; `false` when a running daemon holds it.
    async fn recover_one(
        self: &Arc<Self>,
        platform: Platform,
        row: &StoredMessage,
        outbox: &Option<Arc<dyn Outbox>>,
        r: &mut Recovered,
    ) -> Result<bool, crate::store::StoreError> {
        let oldest = now_ms() - self.settings.recover_max_age.as_millis() as i64;
        let channel = ChannelRef::new(platform, &row.chat_id).with_thread(&row.thread_id);
        let id = row.message_id.as_str();
        if !self.store.take_over_claim(&channel, id).await? {
            return Ok(false);
        }
        if self.store.has_own_answer(&channel, id).await? {
            self.store
                .mark_reply_sent(&channel, id, "sent before a restart")
                .await?;
            r.already_sent += 1;
            return Ok(true);
        }
        let why = match (&row.text, outbox) {
            (_, None) => Some("the client left with the last run".to_string()),
            (None, _) => Some("deleted before it was answered".to_string()),
            (Some(t), _) if conversation::is_bot_command(t) => {
                Some("a command left by a restart is not run again".to_string())
            }
            _ if row.sent_at_ms < oldest => Some(format!(
                "not answered before a restart, and older than {} minutes \
                 (RECOVER_MAX_AGE_MINUTES)",
                self.settings.recover_max_age.as_secs() / 60
            )),
            _ => None,
        };
        if let Some(why) = why {
            self.store.fail_reply(&channel, id, &why).await?;
            r.failed += 1;
            return Ok(true);
        }
        let (Some(text), Some(outbox)) = (row.text.clone(), outbox.clone()) else {
            return Ok(true);
        };
        let message = IncomingMessage {
            channel,
            kind: row.chat_kind,
            message_id: row.message_id.clone(),
            author_id: row.author_id.clone(),
            author_name: row.author_name.clone(),
            author_is_bot: row.author_is_bot,
            text,
            reply_to: row.reply_to.clone(),
            replies_to_bot: false,
            mentions_bot: false,
            sent_at_ms: row.sent_at_ms,
            guild_id: None,
            roles: Vec::new(),
        };
        self.enqueue(Job { message, outbox });
        r.resumed += 1;
        Ok(true)
    }

    /// A message missed while kaiwa was down (found by a platform's catch-up): stored, and
    /// answered like any other if it is younger than `RECOVER_MAX_AGE_MINUTES`; older ones are
    /// only stored (a late answer to an old message helps nobody).
    pub async fn catch_up(self: &Arc<Self>, m: IncomingMessage, outbox: Arc<dyn Outbox>) {
        let oldest = now_ms() - self.settings.recover_max_age.as_millis() as i64;
        if m.sent_at_ms >= oldest {
            return self.handle(Incoming::Message(m), outbox).await;
        }
        let stored = async {
            if self
                .store
                .is_opted_out(m.channel.platform, &m.author_id)
                .await?
            {
                return Ok(());
            }
            match self.admission(&m).await? {
                access::Admission::Unserved => return Ok(()),
                access::Admission::Refused if m.kind == ChatKind::Direct => return Ok(()),
                _ => {}
            }
            let mut row = received_message(&m);
            row.text = cap_text(row.text);
            if let Insert::Stored(_) = self.store.insert_message(&row).await? {
                self.metrics.message_in(m.channel.platform.as_str());
            }
            Ok::<(), crate::store::StoreError>(())
        };
        if let Err(e) = stored.await {
            tracing::error!(error = %e, "could not store a missed message");
        }
    }

    /// Records reactions, unless their author opted out or may not talk to the bot.
    async fn on_reaction(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        user_id: &str,
        added: &[String],
        removed: &[String],
    ) -> Result<(), crate::store::StoreError> {
        if self.store.is_opted_out(channel.platform, user_id).await?
            || !self.counts_reaction(channel, user_id).await?
        {
            return Ok(());
        }
        for (emoji, on) in added
            .iter()
            .map(|e| (e, true))
            .chain(removed.iter().map(|e| (e, false)))
        {
            self.store
                .record_reaction(channel, message_id, user_id, emoji, on)
                .await?;
        }
        Ok(())
    }

    async fn on_message(
        self: &Arc<Self>,
        mut m: IncomingMessage,
        outbox: Arc<dyn Outbox>,
    ) -> Result<(), crate::store::StoreError> {
        m.text = cap_text(std::mem::take(&mut m.text));
        let command = commands::parse(&m.text);
        let platform = m.channel.platform;
        if self.store.is_opted_out(platform, &m.author_id).await? {
            // Opted-out users are neither stored nor answered, except to opt back in.
            if matches!(command, Some(ref c) if c.name == commands::CommandName::OptIn) {
                self.store
                    .set_opted_out(platform, &m.author_id, false)
                    .await?;
                self.say(&outbox, &m, commands::OPTED_IN).await;
            }
            return Ok(());
        }
        let admission = self.admission(&m).await?;
        let refused = admission == access::Admission::Refused;
        // A command addressed to another bot (`/help@otherbot`) is not ours: only stored.
        let foreign_command = command
            .as_ref()
            .is_some_and(|c| c.addressee.is_some() && !m.mentions_bot);
        let command = command.filter(|_| !foreign_command);
        if admission == access::Admission::Unserved || (refused && m.kind == ChatKind::Direct) {
            // Nothing of it is kept: a group the bot does not serve, or a stranger's direct
            // message. The stranger may still use their privacy commands, and is refused.
            if refused && !m.author_is_bot && self.accepting.load(Ordering::SeqCst) {
                match command {
                    Some(c) if access::open_to_everyone(&c) => {
                        self.run_command(c, &m, &outbox).await?
                    }
                    _ => self.refuse(&m, &outbox).await?,
                }
            }
            tracing::debug!(channel = %m.channel, ?admission, "message not stored: not allowed here");
            return Ok(());
        }
        // Decided before the message is stored, so that it is stored together with its claim.
        let mut cooldown = None;
        let mut quota_taken = false;
        let then = if m.author_is_bot || foreign_command || !self.accepting.load(Ordering::SeqCst) {
            Then::Store
        } else if let Some(c) = command {
            if refused && !access::open_to_everyone(&c) {
                Then::Refuse
            } else {
                Then::Command(c)
            }
        } else if !self.should_answer(&m).await? {
            Then::Store
        } else if refused {
            Then::Refuse
        } else if let Some(taken) = self.cooled_down(&m) {
            cooldown = Some(taken);
            if !self.admits(self.pending.load(Ordering::SeqCst)) {
                Then::SayBusy
            } else if self.take_daily_reply(&m).await? {
                quota_taken = true;
                Then::Answer
            } else {
                Then::OverQuota
            }
        } else {
            Then::Store
        };
        let new = received_message(&m);
        let claim = matches!(then, Then::Command(_) | Then::SayBusy | Then::Answer);
        let inserted = match self.store.insert_message_and_claim(&new, claim).await {
            Ok(inserted) => inserted,
            Err(e) => {
                // Not stored: the platform sends it again, and it takes its reply then.
                if quota_taken {
                    if let Err(e) = self.give_back_daily_reply(&m).await {
                        tracing::warn!(error = %e, "could not give back a reply of the day");
                    }
                }
                return Err(e);
            }
        };
        if inserted == Insert::Duplicate {
            // A redelivery does not use up its author's cooldown or quota.
            if let Some(taken) = cooldown {
                self.give_back_cooldown(&m, taken);
            }
            if quota_taken {
                self.give_back_daily_reply(&m).await?;
            }
            tracing::debug!(channel = %m.channel, message = %m.message_id, "redelivered message ignored");
            return Ok(());
        }
        self.metrics.message_in(platform.as_str());
        match then {
            Then::Store => {}
            Then::Command(c) => {
                self.run_command(c, &m, &outbox).await?;
                self.store
                    .mark_reply_sent(&m.channel, &m.message_id, "command")
                    .await?;
            }
            Then::SayBusy => {
                let wait = self.expected_wait(self.pending.load(Ordering::SeqCst) + 1);
                tracing::warn!(channel = %m.channel, expected_wait_s = wait.as_secs_f64(), "reply would be too late (MAX_REPLY_WAIT_SECS, QUEUE_CAPACITY); told busy");
                self.store
                    .fail_reply(
                        &m.channel,
                        &m.message_id,
                        "busy: the reply would be too late",
                    )
                    .await?;
                self.metrics.reply(platform.as_str(), "busy");
                self.say(&outbox, &m, commands::busy(&m.text)).await;
            }
            Then::Refuse => self.refuse(&m, &outbox).await?,
            Then::OverQuota => self.over_quota(&m, &outbox).await?,
            Then::Answer => self.enqueue(Job { message: m, outbox }),
        }
        Ok(())
    }

    async fn should_answer(&self, m: &IncomingMessage) -> Result<bool, crate::store::StoreError> {
        if m.kind == ChatKind::Direct || m.mentions_bot || m.replies_to_bot {
            return Ok(true);
        }
        if self.settings.reply_policy == ReplyPolicy::All {
            return Ok(true);
        }
        self.store.answers_all(&m.channel).await
    }

    /// Per-user flood protection: at most one answered message per cooldown. `None` when the
    /// author's last answered message is too recent; otherwise the cooldown is taken.
    fn cooled_down(&self, m: &IncomingMessage) -> Option<CooldownTaken> {
        let mut last = self.last_answered.lock().unwrap_or_else(|e| e.into_inner());
        let key = (m.channel.platform, m.author_id.clone());
        let at = Instant::now();
        let previous = last.get(&key).copied();
        if previous.is_some_and(|t| at.duration_since(t) < self.settings.user_cooldown) {
            tracing::info!(user = %m.author_id, "cooldown: message stored, not answered");
            return None;
        }
        last.insert(key, at);
        Some(CooldownTaken { at, previous })
    }

    /// Undoes [`Bot::cooled_down`] for a message that was not new after all, unless the
    /// author's cooldown was taken again since.
    fn give_back_cooldown(&self, m: &IncomingMessage, taken: CooldownTaken) {
        let mut last = self.last_answered.lock().unwrap_or_else(|e| e.into_inner());
        let key = (m.channel.platform, m.author_id.clone());
        if last.get(&key) == Some(&taken.at) {
            match taken.previous {
                Some(t) => last.insert(key, t),
                None => last.remove(&key),
            };
        }
    }

    fn enqueue(self: &Arc<Self>, job: Job) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let channel = job.message.channel.clone();
        let sender = queues.entry(channel).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(Arc::clone(self).channel_worker(rx));
            tx
        });
        if let Err(mpsc::error::SendError(job)) = sender.send(job) {
            // The worker is gone (it cannot be, short of a panic): start a new one.
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(Arc::clone(self).channel_worker(rx));
            let _ = tx.send(job);
            *sender = tx;
        }
    }

    /// Answers one channel's queued messages in order.
    async fn channel_worker(self: Arc<Self>, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = jobs.recv().await {
            let channel = job.message.channel.clone();
            let id = job.message.message_id.clone();
            // A reply that went out is recorded as sent by `answer` itself.
            let outcome = self.answer(&job).await;
            let platform = channel.platform.as_str();
            self.metrics
                .reply(platform, if outcome.is_ok() { "sent" } else { "failed" });
            let recorded = match outcome {
                Ok(()) => Ok(()),
                Err(e) if self.cancel.load(Ordering::SeqCst) => {
                    // Cut short by shutdown: the claim stays pending, so the next start answers
                    // it if it is still recent (see `recover`).
                    tracing::info!(channel = %channel, message = %id, error = %e,
                        "reply cut short by shutdown; left for the next start");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(channel = %channel, message = %id, error = %e, "reply failed");
                    self.store.fail_reply(&channel, &id, &e).await
                }
            };
            if let Err(e) = recorded {
                tracing::error!(error = %e, "could not record a reply");
            }
            self.release_pending();
        }
    }

    /// Generates and sends the reply to one message, storing each part the platform took; the
    /// last one commits together with the claim's `sent` state and how the reply was made.
    async fn answer(&self, job: &Job) -> Result<(), String> {
        let m = &job.message;
        let started = Instant::now();
        if self.cancel.load(Ordering::SeqCst) {
            return Err("shutting down".into());
        }
        let typing = {
            let outbox = Arc::clone(&job.outbox);
            let channel = m.channel.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = outbox.typing(&channel).await {
                        tracing::debug!(error = %e, "typing indicator failed");
                    }
                    tokio::time::sleep(Duration::from_secs(4)).await;
                }
            })
        };
        // The worker is free for the next reply while this one is sent (a platform that is
        // slow or rate-limits must not hold up generation elsewhere): `compose` holds it.
        let result = self.generate_reply(m).await;
        typing.abort();
        let (text, provenance) = result?;
        let parts = split::split_message(&text, m.channel.platform.message_limit());
        if parts.is_empty() {
            return Err("the reply engine made an empty reply".into());
        }
        for (i, part) in parts.iter().enumerate() {
            let reply_to = (i == 0).then_some(m.message_id.as_str());
            let sent = self.send_part(job, part, reply_to).await?;
            let own = own_message(m, sent, part, false);
            let stored = if i + 1 == parts.len() {
                self.store
                    .finish_reply_with_last_part(&own, &m.message_id, &provenance)
                    .await
            } else {
                self.store.insert_message(&own).await
            };
            stored.map_err(|e| e.to_string())?;
        }
        self.metrics.bot_reply_time(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Sends one part of a reply. While the platform is unavailable (unreachable, 5xx) the send
    /// is tried again with backoff, as long as the message is recent enough to be answered
    /// (`RECOVER_MAX_AGE_MINUTES`, the rule a restart applies too) and the bot is not stopping.
    async fn send_part(
        &self,
        job: &Job,
        part: &str,
        reply_to: Option<&str>,
    ) -> Result<SentMessage, String> {
        let m = &job.message;
        let platform = m.channel.platform.as_str();
        let deadline = m.sent_at_ms + self.settings.recover_max_age.as_millis() as i64;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            match job.outbox.send(&m.channel, part, reply_to).await {
                Ok(sent) => return Ok(sent),
                Err(SendError::Unavailable(e)) => {
                    self.metrics.platform_error(platform);
                    let delay = backoff.next_delay();
                    if now_ms() + delay.as_millis() as i64 > deadline {
                        return Err(format!("{e} (gave up: the message is too old to answer)"));
                    }
                    tracing::warn!(
                        channel = %m.channel,
                        message = %m.message_id,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "platform unavailable; the reply is sent again later"
                    );
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if self.cancel.load(Ordering::SeqCst) {
                            return Err(format!("{e} (shutting down)"));
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Err(e) => {
                    self.metrics.platform_error(platform);
                    return Err(e.to_string());
                }
            }
        }
    }

    /// Builds the channel's context from the store and asks the reply engine.
    async fn generate_reply(
        &self,
        m: &IncomingMessage,
    ) -> Result<(String, ReplyProvenance), String> {
        let since = now_ms() - self.settings.context_max_age.as_millis() as i64;
        let history = self
            .store
            .channel_context(&m.channel, since, self.settings.context_messages)
            .await
            .map_err(|e| e.to_string())?;
        let speakers = if m.kind == ChatKind::Direct {
            Speakers::One
        } else {
            Speakers::Many
        };
        let messages = conversation::render(
            self.settings.system_prompt.as_deref(),
            &conversation::turns(&history),
            speakers,
        );
        let recent: Vec<String> = history
            .iter()
            .filter(|h| h.from_self && !h.is_notice)
            .filter_map(|h| h.text.clone())
            .rev()
            .take(RECENT_REPLIES)
            .collect();
        let mut options = self.reply_options();
        options.seed ^= seed_for(&m.channel, &m.message_id);
        let composed = self
            .compose(
                Compose {
                    messages,
                    user_text: m.text.clone(),
                    recent_replies: recent,
                    options,
                },
                Box::new(|_| true),
            )
            .await?;
        if composed.reply.cancelled {
            return Err("cancelled by shutdown".into());
        }
        Ok((composed.reply.text, composed.provenance))
    }

    /// The sampling settings of a reply before any per-message seed: the model's defaults under
    /// the environment's.
    pub fn reply_options(&self) -> GenerateOptions {
        self.settings.reply_options(self.model().default_options())
    }

    /// Asks the reply engine for a reply: retrieval here, then, on one of the `WORKERS`
    /// generation slots that the bots and the web share, generation and ranking on a blocking
    /// thread (retrieval for the next reply overlaps the model's work on this one). `on_delta`
    /// sees the text as it is made (see [`ReplyEngine::reply_streaming`]) and may stop it, also
    /// with `""` once the slot is taken, before any work; shutdown stops it too.
    pub async fn compose(
        &self,
        c: Compose,
        mut on_delta: Box<dyn FnMut(&str) -> bool + Send>,
    ) -> Result<Composed, String> {
        let started = Instant::now();
        let retrieval = self
            .engine
            .retrieve(&self.store, &c.user_text)
            .await
            .map_err(|e| e.to_string())?;
        let retrieved = started.elapsed();
        let slot = self
            .generation_slots
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        let working = Instant::now();
        let generator = self.model();
        let options = c.options;
        let settings = format!(
            "engine={} {}",
            self.engine.settings().mode.as_str(),
            options.describe()
        );
        let model_name = generator.dir().display().to_string();
        let cancel = Arc::clone(&self.cancel);
        let engine = Arc::clone(&self.engine);
        let reply = tokio::task::spawn_blocking(move || {
            if cancel.load(Ordering::SeqCst) || !on_delta("") {
                return Ok(Reply::cancelled());
            }
            let request = Request {
                messages: &c.messages,
                user_text: &c.user_text,
                recent_replies: &c.recent_replies,
                options: &options,
            };
            engine.reply_streaming(&generator, &request, retrieval, &mut |delta| {
                !cancel.load(Ordering::SeqCst) && on_delta(delta)
            })
        })
        .await
        .map_err(|e| format!("the reply engine panicked: {e}"))?
        .map_err(|e| e.to_string())?;
        drop(slot);
        self.observe_reply_time(working.elapsed());
        tracing::debug!(
            retrieval_ms = retrieved.as_millis() as u64,
            queued_ms = (working - started).saturating_sub(retrieved).as_millis() as u64,
            engine_ms = working.elapsed().as_millis() as u64,
            source = reply.source.provenance(),
            "reply composed"
        );
        let scores = serde_json::json!({ "source": reply.source, "scores": reply.scores });
        let provenance = ReplyProvenance {
            model: model_name,
            settings,
            prompt_tokens: reply.prompt_tokens as i64,
            new_tokens: reply.new_tokens as i64,
            latency_ms: started.elapsed().as_millis() as i64,
            engine_source: reply.source.provenance().to_string(),
            source_doc: reply.doc,
            source_message: reply.message,
            scores: Some(scores.to_string()),
        };
        Ok(Composed { reply, provenance })
    }

    /// Takes a place in the reply queue for a reply made outside the channel queues (the web),
    /// or `None` when the queue is full or the bot is shutting down. The place is given back
    /// when the returned value is dropped.
    pub fn reserve(self: &Arc<Self>) -> Option<Reservation> {
        if !self.accepting.load(Ordering::SeqCst) {
            return None;
        }
        self.pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                self.admits(n).then_some(n + 1)
            })
            .ok()?;
        Some(Reservation(Arc::clone(self)))
    }

    /// Whether one more reply may join `pending` others: under `QUEUE_CAPACITY`, and expected
    /// within `MAX_REPLY_WAIT_SECS`.
    fn admits(&self, pending: usize) -> bool {
        pending < self.settings.queue_capacity
            && self.expected_wait(pending + 1) <= self.settings.max_reply_wait
    }

    /// How long the last of `replies` replies would wait for its end: `replies` × the measured
    /// reply time (1 s before any was measured) ÷ `WORKERS`.
    pub fn expected_wait(&self, replies: usize) -> Duration {
        let each = self
            .reply_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(1.0);
        Duration::from_secs_f64(replies as f64 * each / self.settings.workers as f64)
    }

    /// Records how long one reply took once it had a worker (a moving average).
    fn observe_reply_time(&self, took: Duration) {
        let mut avg = self.reply_seconds.lock().unwrap_or_else(|e| e.into_inner());
        let t = took.as_secs_f64();
        *avg = Some(avg.map_or(t, |a| 0.8 * a + 0.2 * t));
    }

    /// Replies queued or being made, on every platform.
    pub fn queue_depth(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    fn release_pending(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Sends a short message from the bot (command answers, notices) and stores it as a notice;
    /// failures are logged.
    async fn say(&self, outbox: &Arc<dyn Outbox>, m: &IncomingMessage, text: &str) {
        let sent = match outbox.send(&m.channel, text, Some(&m.message_id)).await {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!(channel = %m.channel, error = %e, "could not send a notice");
                return;
            }
        };
        let notice = own_message(m, sent, text, true);
        if let Err(e) = self.store.insert_message(&notice).await {
            tracing::error!(error = %e, "could not store a notice");
        }
    }

    /// Stops taking new replies, waits for queued ones (up to a grace period), then cancels the
    /// rest.
    pub async fn shutdown(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        let waited = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.pending.load(Ordering::SeqCst) > 0 {
                let idle = self.idle.notified();
                if self.pending.load(Ordering::SeqCst) == 0 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), idle).await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!("replies still running at shutdown: cancelling them");
            self.cancel.store(true, Ordering::SeqCst);
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while self.pending.load(Ordering::SeqCst) > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
    }
}

/// The row for a message kaiwa received.
fn received_message(m: &IncomingMessage) -> NewMessage {
    NewMessage {
        channel: m.channel.clone(),
        kind: m.kind,
        message_id: m.message_id.clone(),
        author_id: m.author_id.clone(),
        author_name: m.author_name.clone(),
        author_is_bot: m.author_is_bot,
        from_self: false,
        is_notice: false,
        text: m.text.clone(),
        reply_to: m.reply_to.clone(),
        sent_at_ms: m.sent_at_ms,
        source: "live".into(),
    }
}

/// The row for a message kaiwa sent in answer to `m`.
fn own_message(
    m: &IncomingMessage,
    sent: event::SentMessage,
    text: &str,
    is_notice: bool,
) -> NewMessage {
    NewMessage {
        channel: m.channel.clone(),
        kind: m.kind,
        message_id: sent.message_id,
        author_id: SELF_NAME.into(),
        author_name: SELF_NAME.into(),
        author_is_bot: true,
        from_self: true,
        is_notice,
        text: text.to_string(),
        reply_to: Some(m.message_id.clone()),
        // Never before the message it answers, whatever the platform's clock says.
        sent_at_ms: sent.sent_at_ms.max(m.sent_at_ms),
        source: "live".into(),
    }
}

fn cap_text(text: String) -> String {
    if text.chars().count() <= MAX_TEXT_CHARS {
        return text;
    }
    tracing::warn!(
        chars = text.chars().count(),
        "message longer than {MAX_TEXT_CHARS} characters: cut"
    );
    text.chars().take(MAX_TEXT_CHARS).collect()
}

/// A per-message seed, so each reply samples differently but reproducibly.
fn seed_for(channel: &ChannelRef, message_id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    channel.hash(&mut h);
    message_id.hash(&mut h);
    h.finish()
}

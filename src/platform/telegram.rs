//! Telegram: takes updates from the Bot API, long-polled or posted to a webhook ([`webhook`]),
//! turns each into the bot's [`Incoming`], and sends replies through [`TelegramOutbox`].
//!
//! We take updates ourselves instead of using teloxide's dispatcher or webhook listener so that we
//! decide when an update is acknowledged: only after [`Bot::handle`] returned for it (the message
//! is stored and its reply queued) does the offset move past it, or its webhook request get a 2xx.
//! A crash therefore never loses a message; Telegram delivers it again and the core drops the
//! duplicate, also when another replica behind the webhook stored it first.
//!
//! The bot token is part of every request URL (`/bot<TOKEN>/<method>`), and HTTP client errors
//! quote that URL, so every error text that leaves this module goes through [`Scrubber`] first.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use teloxide::payloads::{
    GetUpdatesSetters as _, SendChatActionSetters as _, SendMessageSetters as _,
};
use teloxide::requests::Requester as _;
use teloxide::types::{
    AllowedUpdate, ChatAction, ChatId, Me, Message, MessageEntityKind, MessageId,
    MessageReactionUpdated, ParseMode, ReactionType, Recipient, ReplyParameters, ThreadId, Update,
    UpdateId, UpdateKind, UserId,
};
use teloxide::{ApiError, RequestError};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::bot::event::{
    BoxFuture, ChannelRef, ChatKind, Incoming, IncomingMessage, Outbox, Platform, SendError,
    SentMessage,
};
use crate::bot::Bot;
use crate::config::{ExposeSecret, PlatformSettings, TelegramSettings};
use crate::platform::retry::{self, failed_send, Pause, RateLimitRetries, Scrubber};
use crate::shutdown::Shutdown;
use crate::store::StoreError;

mod webhook;

/// How long one `getUpdates` call may wait on the server for news. Below the HTTP client's own
/// 17 s timeout (teloxide's default), so an idle poll ends normally rather than as an error.
const POLL_TIMEOUT_SECS: u32 = 10;

/// Waits between failed attempts to reach Telegram grow up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The first wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Feeds every update Telegram has for the bot to `bot` until `shutdown` fires: long-polled, or,
/// with `settings.webhook`, posted to this process ([`webhook`]).
///
/// Returns an error only when updates cannot arrive at all (bad API address, token rejected, an
/// address that cannot be listened on, a webhook Telegram refuses); network trouble is logged and
/// retried with backoff.
pub async fn run(
    bot: Arc<Bot>,
    settings: TelegramSettings,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let outbox = TelegramOutbox::new(&settings.api)?;
    let api = outbox.api.clone();
    let scrub = outbox.scrub.clone();
    // Bound first, so that an address in use stops the start before anything is asked of Telegram.
    let listener = match settings.webhook {
        Some(hook) => Some(webhook::Listener::bind(hook).await?),
        None => None,
    };

    let Some(me) = identify(&api, &scrub, &mut shutdown).await? else {
        return Ok(());
    };
    let Some(identity) = BotIdentity::from_me(&me) else {
        anyhow::bail!(
            "Telegram's getMe returned a bot without a username (user id {})",
            me.user.id
        );
    };
    info!("telegram connected as @{}", identity.username);

    let outbox: Arc<dyn Outbox> = Arc::new(outbox);
    // What the last run claimed and never sent is answered before anything new.
    bot.recover(Platform::Telegram, Some(Arc::clone(&outbox)))
        .await;
    let inbox = Inbox {
        bot,
        identity,
        outbox,
    };
    match listener {
        Some(listener) => listener.serve(inbox, &api, &scrub, shutdown).await?,
        None => poll(&inbox, &api, &scrub, &mut shutdown).await?,
    }
    info!("telegram stopped");
    Ok(())
}

/// Where updates go however they arrive, polled or posted: each is translated into the bot's
/// event and handed to the bot.
struct Inbox {
    bot: Arc<Bot>,
    identity: BotIdentity,
    outbox: Arc<dyn Outbox>,
}

impl Inbox {
    /// Hands `update` to the bot. `Ok` once Telegram may forget it: it is stored and its reply
    /// queued, or it carries nothing the bot uses (logged). An error when it could not be
    /// stored: it must stay unconfirmed, so that Telegram delivers it again.
    async fn take(&self, update: &Update) -> Result<(), StoreError> {
        let id = update.id.0;
        match translate(update, &self.identity) {
            Ok(event) => {
                self.bot
                    .handle_checked(event, Arc::clone(&self.outbox))
                    .await
            }
            Err(Skip::Unreadable(fields)) => {
                warn!("telegram: skipping unreadable update {id} (fields: {fields})");
                Ok(())
            }
            Err(Skip::Ignored(why)) => {
                debug!("telegram: ignoring update {id}: {why}");
                Ok(())
            }
        }
    }
}

/// Long-polls `getUpdates` until `shutdown` fires, moving the offset past an update only once
/// [`Inbox::take`] returned for it.
async fn poll(
    inbox: &Inbox,
    api: &teloxide::Bot,
    scrub: &Scrubber,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    // The first update we have not handled yet; 0 asks for the oldest unconfirmed one.
    let mut offset: i64 = 0;
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    while !shutdown.is_triggered() {
        let request = api
            .get_updates()
            .offset(clamp_offset(offset))
            .timeout(POLL_TIMEOUT_SECS)
            .allowed_updates(allowed_updates());
        let result = tokio::select! {
            _ = shutdown.wait() => break,
            result = request => result,
        };
        let updates = match result {
            Ok(updates) => updates,
            Err(RequestError::InvalidJson { source, raw }) => match salvage_updates(&raw) {
                Some(updates) => {
                    warn!("telegram: getUpdates answer did not parse ({source}); salvaged it");
                    updates
                }
                None => {
                    warn!("telegram: unreadable getUpdates answer ({source}); retrying");
                    backoff.wait(shutdown).await;
                    continue;
                }
            },
            Err(e) if webhook_is_set(&e) => anyhow::bail!(WEBHOOK_IS_SET),
            Err(RequestError::Api(ApiError::TerminatedByOtherGetUpdates)) => {
                // Also met for a moment when a restarted process polls before the old one's
                // last poll ended, so it is waited out, not fatal.
                warn!("{ANOTHER_POLLER}");
                backoff.wait(shutdown).await;
                continue;
            }
            Err(e) => {
                let pause = pause_after(e, &GET_UPDATES, scrub)?;
                pause.wait(&mut backoff, shutdown).await;
                continue;
            }
        };
        backoff.reset();

        let mut stalled = false;
        for update in updates {
            // The rest of the batch stays unconfirmed; Telegram delivers it to the next run.
            if shutdown.is_triggered() {
                break;
            }
            let id = i64::from(update.id.0);
            // A server may send an update again before it saw our new offset; it is handled.
            if id < offset {
                continue;
            }
            if let Err(e) = inbox.take(&update).await {
                // Not stored, so not confirmed: the same batch is asked for again.
                warn!("telegram: could not store update {id} ({e}); it stays unconfirmed and is fetched again");
                stalled = true;
                break;
            }
            // Only now is the update safe to confirm: it is stored and its reply queued.
            offset = id + 1;
        }
        if stalled {
            backoff.wait(shutdown).await;
        }
    }

    acknowledge(api, offset).await;
    Ok(())
}

/// The updates the bot asks for, polled or posted. Reactions are only sent when asked for (and,
/// in groups, to admins).
fn allowed_updates() -> Vec<AllowedUpdate> {
    vec![
        AllowedUpdate::Message,
        AllowedUpdate::EditedMessage,
        AllowedUpdate::ChannelPost,
        AllowedUpdate::EditedChannelPost,
        AllowedUpdate::MessageReaction,
    ]
}

/// Whether `getUpdates` was refused because a webhook is set (409 Conflict). teloxide knows the
/// old wording only; the Bot API now adds "Conflict: " and advice after it.
fn webhook_is_set(e: &RequestError) -> bool {
    match e {
        RequestError::Api(ApiError::CantGetUpdates) => true,
        RequestError::Api(ApiError::Unknown(description)) => description
            .to_ascii_lowercase()
            .contains("can't use getupdates method while webhook is active"),
        _ => false,
    }
}

/// Why polling stops when a webhook is set. kaiwa does not delete the webhook itself: it may be
/// that of replicas serving the bot right now (a process started by mistake with the production
/// token would take every update away from them), and only its owner knows.
const WEBHOOK_IS_SET: &str = "Telegram refuses getUpdates (409 Conflict): a webhook is set for \
     this bot, so Telegram posts its updates there instead. To take updates as one of the \
     replicas behind that webhook, set TELEGRAM_WEBHOOK_URL, TELEGRAM_WEBHOOK_SECRET (the \
     replicas' shared one) and TELEGRAM_WEBHOOK_LISTEN. To long-poll from this process instead, \
     stop those replicas and delete the webhook: \
     curl https://api.telegram.org/bot<TELEGRAM_TOKEN>/deleteWebhook";

const ANOTHER_POLLER: &str = "telegram: another process is polling with this bot token (409 \
     Conflict); only one may long-poll at a time: stop the other, or run every process as a \
     webhook replica (TELEGRAM_WEBHOOK_URL)";

/// Calls `getMe` until it answers, so we know which mentions and replies are addressed to us.
/// `None` when shutdown came first.
async fn identify(
    api: &teloxide::Bot,
    scrub: &Scrubber,
    shutdown: &mut Shutdown,
) -> anyhow::Result<Option<Me>> {
    retry::until_answered(
        Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
        shutdown,
        || async { api.get_me().await },
        |e, _| pause_after(e, &GET_ME, scrub),
    )
    .await
}

/// A Bot API method called until it answers, as its failures are told.
struct Call {
    method: &'static str,
    /// How the log line about a failed call starts.
    failed: &'static str,
    /// The error when Telegram refuses the token.
    token_refused: &'static str,
}

const GET_ME: Call = Call {
    method: "getMe",
    failed: "telegram: cannot reach the Bot API yet",
    token_refused: "Telegram rejected the bot token (TELEGRAM_TOKEN): Unauthorized; \
                    check it with @BotFather",
};

const GET_UPDATES: Call = Call {
    method: "getUpdates",
    failed: "telegram: getUpdates failed",
    token_refused: "Telegram no longer accepts the bot token (TELEGRAM_TOKEN): Unauthorized",
};

/// What a failed call calls for, logged: the wait Telegram's flood control gives (a 429's
/// `parameters.retry_after`), else the backoff; an error when the token is refused.
fn pause_after(e: RequestError, call: &Call, scrub: &Scrubber) -> anyhow::Result<Pause> {
    match e {
        RequestError::Api(ApiError::InvalidToken) => Err(anyhow::anyhow!(call.token_refused)),
        RequestError::RetryAfter(wait) => {
            warn!("telegram: {} rate limited; waiting {}", call.method, wait);
            Ok(Pause::RetryAfter(wait.duration()))
        }
        e => {
            warn!("{}: {}", call.failed, describe(&e, scrub));
            Ok(Pause::Backoff)
        }
    }
}

/// Tells Telegram that everything before `offset` was handled, so a restart does not receive it
/// again. Best effort: if it fails, the next start gets duplicates, which the core drops.
async fn acknowledge(api: &teloxide::Bot, offset: i64) {
    if offset == 0 {
        return;
    }
    // Timeout 0 answers at once; limit 1 keeps the answer small (what it returns stays
    // unconfirmed).
    let request = api
        .get_updates()
        .offset(clamp_offset(offset))
        .timeout(0)
        .limit(1);
    match tokio::time::timeout(Duration::from_secs(2), request).await {
        Ok(Ok(_)) => debug!("telegram: acknowledged updates before {offset}"),
        _ => debug!(
            "telegram: could not acknowledge updates before {offset}; they will be redelivered"
        ),
    }
}

fn clamp_offset(offset: i64) -> i32 {
    i32::try_from(offset).unwrap_or(i32::MAX)
}

/// When teloxide cannot parse a `getUpdates` answer as a whole (an update without a usable
/// `update_id`, say), recovers the updates that do parse, marking the others unreadable, so one
/// bad update neither stops the loop nor hides the good ones around it. `None` when nothing
/// usable is in the answer (not JSON, not a list, no update ids).
fn salvage_updates(raw: &str) -> Option<Vec<Update>> {
    // A lone UTF-16 surrogate escape ("\ud800") makes the whole answer invalid JSON.
    let repaired = repair_lone_surrogates(raw);
    let answer: serde_json::Value = match serde_json::from_str(&repaired) {
        Ok(answer) => answer,
        // Still unreadable as a whole: keep at least the update ids, so the offset passes them
        // instead of asking for the same answer forever.
        Err(_) => return update_ids_of(raw),
    };
    let items = answer.get("result")?.as_array()?;
    let mut updates = Vec::new();
    for item in items {
        match update_of(item) {
            Some(update) => updates.push(update),
            None => warn!("telegram: skipping an update without a valid update_id"),
        }
    }
    if updates.is_empty() && !items.is_empty() {
        return None;
    }
    Some(updates)
}

/// One update of a `getUpdates` answer or a webhook request: as teloxide reads it, or, when it
/// cannot, marked unreadable with the original kept for the log. `None` without a valid
/// `update_id`.
fn update_of(item: &serde_json::Value) -> Option<Update> {
    let id = item
        .get("update_id")
        .and_then(|v| v.as_u64())
        .and_then(|v| u32::try_from(v).ok())?;
    // From text, not `from_value`: teloxide's `UpdateKind` reads its key as a borrowed `&str`,
    // which a `Value` cannot lend, so every update parsed from a `Value` comes out unreadable.
    let update = match serde_json::from_str::<Update>(&item.to_string()) {
        // teloxide leaves an unreadable update's value empty; keep the original for the log.
        Ok(Update {
            kind: UpdateKind::Error(_),
            ..
        })
        | Err(_) => Update {
            id: UpdateId(id),
            kind: UpdateKind::Error(item.clone()),
        },
        Ok(update) => update,
    };
    Some(update)
}

/// The update a webhook request carries, read as leniently as a `getUpdates` answer: a lone
/// surrogate spoils one text, not the update; an update teloxide cannot read is kept (as
/// unreadable) for its id. `None` when the body holds no update id at all.
fn posted_update(body: &[u8]) -> Option<Update> {
    let raw = String::from_utf8_lossy(body);
    match serde_json::from_str::<serde_json::Value>(&repair_lone_surrogates(&raw)) {
        Ok(item) => update_of(&item),
        Err(_) => update_ids_of(&raw)?.into_iter().next(),
    }
}

/// `raw` with every `\uXXXX` escape of a lone UTF-16 surrogate (one not in a high–low pair)
/// replaced by `\ufffd`, the replacement character; other text unchanged.
fn repair_lone_surrogates(raw: &str) -> std::borrow::Cow<'_, str> {
    fn escape_at(b: &[u8], i: usize) -> Option<u16> {
        let hex = b.get(i..i + 6)?;
        if hex[0] != b'\\' || hex[1] != b'u' {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    }
    let b = raw.as_bytes();
    if !raw.contains("\\u") {
        return std::borrow::Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        let Some(unit) = escape_at(b, i) else {
            // Another escape (`\\`, `\"`, …): skip its two characters.
            i += 2;
            continue;
        };
        let paired = (0xD800..0xDC00).contains(&unit)
            && escape_at(b, i + 6).is_some_and(|low| (0xDC00..0xE000).contains(&low));
        if paired {
            i += 12;
        } else if (0xD800..0xE000).contains(&unit) {
            out.push_str(&raw[copied..i]);
            out.push_str("\\ufffd");
            i += 6;
            copied = i;
        } else {
            i += 6;
        }
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(raw);
    }
    out.push_str(&raw[copied..]);
    std::borrow::Cow::Owned(out)
}

/// The `update_id`s an unparseable answer mentions, as unreadable updates (logged and passed).
fn update_ids_of(raw: &str) -> Option<Vec<Update>> {
    let pattern = regex::Regex::new(r#""update_id"\s*:\s*(\d{1,10})"#).expect("a valid pattern");
    let updates: Vec<Update> = pattern
        .captures_iter(raw)
        .filter_map(|c| c[1].parse::<u32>().ok())
        .map(|id| Update {
            id: UpdateId(id),
            kind: UpdateKind::Error(serde_json::Value::Null),
        })
        .collect();
    (!updates.is_empty()).then_some(updates)
}

/// Who we are on Telegram, to tell which messages address the bot.
#[derive(Debug, Clone)]
struct BotIdentity {
    id: UserId,
    username: String,
    /// `@username`, lower-cased, for case-insensitive mention matching.
    handle: String,
}

impl BotIdentity {
    fn from_me(me: &Me) -> Option<Self> {
        let username = me.user.username.clone().filter(|u| !u.is_empty())?;
        let handle = format!("@{}", username.to_lowercase());
        Some(BotIdentity {
            id: me.user.id,
            username,
            handle,
        })
    }
}

/// Why an update produced no event.
#[derive(Debug, PartialEq)]
enum Skip {
    /// teloxide could not parse it; carries its top-level field names (never its content).
    Unreadable(String),
    /// A kind of update or message the bot has no use for.
    Ignored(&'static str),
}

/// Translates one update into the bot's own event.
/// A user's reactions on a message changed: what was added and what was removed. Anonymous
/// reactions (on behalf of a chat) are not anyone's feedback to record.
fn reaction_event(r: &MessageReactionUpdated) -> Result<Incoming, Skip> {
    let user = r.actor.user().ok_or(Skip::Ignored("anonymous reaction"))?;
    let emoji = |list: &[ReactionType]| -> Vec<String> {
        list.iter()
            .filter_map(|t| match t {
                ReactionType::Emoji { emoji } => Some(emoji.clone()),
                ReactionType::CustomEmoji { custom_emoji_id } => {
                    Some(format!(":{}:", custom_emoji_id.0))
                }
                _ => None,
            })
            .collect()
    };
    let (old, new) = (emoji(&r.old_reaction), emoji(&r.new_reaction));
    Ok(Incoming::Reaction {
        channel: ChannelRef::new(Platform::Telegram, r.chat.id.0.to_string()),
        message_id: r.message_id.0.to_string(),
        user_id: user.id.0.to_string(),
        added: new.iter().filter(|e| !old.contains(e)).cloned().collect(),
        removed: old.iter().filter(|e| !new.contains(e)).cloned().collect(),
    })
}

fn translate(update: &Update, me: &BotIdentity) -> Result<Incoming, Skip> {
    match &update.kind {
        UpdateKind::Message(message) | UpdateKind::ChannelPost(message) => {
            incoming_message(message, me).map(Incoming::Message)
        }
        UpdateKind::EditedMessage(message) | UpdateKind::EditedChannelPost(message) => {
            let text = message_text(message).ok_or(Skip::Ignored("edited message without text"))?;
            let edited_at = message.edit_date().copied().unwrap_or(message.date);
            Ok(Incoming::Edited {
                channel: channel_of(message),
                message_id: message.id.0.to_string(),
                text: text.to_string(),
                edited_at_ms: edited_at.timestamp_millis(),
            })
        }
        UpdateKind::MessageReaction(r) => reaction_event(r),
        UpdateKind::Error(value) => {
            let fields = match value.as_object() {
                Some(object) => object
                    .keys()
                    .filter(|k| *k != "update_id")
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                None => String::from("none"),
            };
            Err(Skip::Unreadable(fields))
        }
        _ => Err(Skip::Ignored("update kind the bot does not use")),
    }
}

fn incoming_message(message: &Message, me: &BotIdentity) -> Result<IncomingMessage, Skip> {
    let text = message_text(message).ok_or(Skip::Ignored("message without text or caption"))?;
    let (author_id, author_name, author_is_bot) = author_of(message);
    let reply = replied_message(message);
    Ok(IncomingMessage {
        channel: channel_of(message),
        kind: if message.chat.is_private() {
            ChatKind::Direct
        } else {
            ChatKind::Group
        },
        message_id: message.id.0.to_string(),
        author_id,
        author_name,
        author_is_bot,
        text: text.to_string(),
        reply_to: reply.map(|r| r.id.0.to_string()),
        replies_to_bot: reply
            .and_then(|r| r.from.as_ref())
            .is_some_and(|u| u.id == me.id),
        mentions_bot: mentions(message, text, me),
        sent_at_ms: message.date.timestamp_millis(),
        guild_id: None,
        roles: Vec::new(),
    })
}

/// The text of a message, or the caption of a photo, video or document.
fn message_text(message: &Message) -> Option<&str> {
    message
        .text()
        .or_else(|| message.caption())
        .filter(|t| !t.is_empty())
}

/// The chat, and the forum topic when the message is in one. Other messages also carry a
/// `message_thread_id` (the root of their reply chain in supergroups), which is not a place.
fn channel_of(message: &Message) -> ChannelRef {
    let channel = ChannelRef::new(Platform::Telegram, message.chat.id.0.to_string());
    match message.thread_id {
        Some(ThreadId(MessageId(thread))) if message.is_topic_message => {
            channel.with_thread(thread.to_string())
        }
        _ => channel,
    }
}

/// Who wrote it: `(id, display name, is a bot)`. A message sent on behalf of a chat (channel
/// posts, anonymous group admins, the linked channel) is attributed to that chat, not to the
/// placeholder user Telegram puts in `from`.
fn author_of(message: &Message) -> (String, String, bool) {
    if let Some(chat) = message.sender_chat.as_ref() {
        let name = chat
            .title()
            .or_else(|| chat.username())
            .unwrap_or("channel")
            .to_string();
        return (chat.id.0.to_string(), name, false);
    }
    match message.from.as_ref() {
        Some(user) => {
            let full = user.full_name();
            let name = if full.trim().is_empty() {
                user.username.clone().unwrap_or_else(|| user.id.to_string())
            } else {
                full
            };
            (user.id.0.to_string(), name, user.is_bot)
        }
        None => {
            let chat = &message.chat;
            let name = chat
                .title()
                .or_else(|| chat.username())
                .unwrap_or("unknown")
                .to_string();
            (chat.id.0.to_string(), name, false)
        }
    }
}

/// The message this one replies to. In a forum topic every message that replies to nothing
/// carries the topic's opening message as `reply_to_message`; that is not a reply.
fn replied_message(message: &Message) -> Option<&Message> {
    let replied = message.reply_to_message()?;
    let opens_topic =
        message.is_topic_message && message.thread_id.is_some_and(|t| t.0 == replied.id);
    (!opens_topic).then_some(replied)
}

/// Whether the message names the bot: `@username` anywhere (also as `/cmd@username`), in any
/// case, or a text mention (a link to the bot's profile, used for bots without a username).
fn mentions(message: &Message, text: &str, me: &BotIdentity) -> bool {
    let entities = message
        .entities()
        .or_else(|| message.caption_entities())
        .unwrap_or_default();
    let linked = entities
        .iter()
        .any(|e| matches!(&e.kind, MessageEntityKind::TextMention { user } if user.id == me.id));
    linked || contains_handle(text, &me.handle)
}

/// `handle` (lower-case `@name`) occurs in `text` as a whole handle, not as the start of a longer
/// one (`@kaiwa_bot` does not match `@kaiwa_bot2`).
fn contains_handle(text: &str, handle: &str) -> bool {
    let lower = text.to_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find(handle) {
        let end = from + found + handle.len();
        let continues = lower[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !continues {
            return true;
        }
        from = end;
    }
    false
}

/// Sends the bot's replies through the Bot API.
#[derive(Clone)]
pub struct TelegramOutbox {
    api: teloxide::Bot,
    scrub: Scrubber,
}

impl TelegramOutbox {
    /// A client for the Bot API at `settings.api_url` (default: api.telegram.org).
    pub fn new(settings: &PlatformSettings) -> anyhow::Result<Self> {
        let token = settings.token.expose_secret();
        let mut api = teloxide::Bot::new(token);
        if let Some(url) = settings.api_url.as_deref() {
            // teloxide appends `/bot<TOKEN>/<method>` as path segments; a trailing slash on a
            // base with a path would leave an empty segment (`/base//bot…`).
            let base = url.trim_end_matches('/');
            let parsed = base.parse().with_context(|| {
                format!(
                    "TELEGRAM_API_URL {url:?} is not a URL (expected e.g. http://127.0.0.1:8081)"
                )
            })?;
            api = api.set_api_url(parsed);
        }
        Ok(TelegramOutbox {
            api,
            scrub: scrubber(token),
        })
    }

    async fn send_message(
        &self,
        channel: &ChannelRef,
        text: &str,
        reply_to: Option<&str>,
    ) -> Result<SentMessage, SendError> {
        let chat = recipient(&channel.chat_id);
        let thread = thread_of(channel);
        // A reply whose original was deleted meanwhile is still worth sending, just unthreaded.
        let reply = reply_to
            .and_then(|id| id.parse::<i32>().ok())
            .map(|id| ReplyParameters::new(MessageId(id)).allow_sending_without_reply());
        let mut markdown = true;
        // Flood control (429) is waited out for a few tries, as long as its wait is short.
        let mut rate_limits = RateLimitRetries::reply();
        loop {
            let mut request = self.api.send_message(chat.clone(), text);
            if markdown {
                // Legacy Markdown: the most forgiving of Telegram's modes for model-written text.
                #[allow(deprecated)]
                let mode = ParseMode::Markdown;
                request = request.parse_mode(mode);
            }
            if let Some(thread) = thread {
                request = request.message_thread_id(thread);
            }
            if let Some(reply) = &reply {
                request = request.reply_parameters(reply.clone());
            }
            match request.await {
                Ok(sent) => {
                    return Ok(SentMessage {
                        message_id: sent.id.0.to_string(),
                        sent_at_ms: sent.date.timestamp_millis(),
                    })
                }
                Err(RequestError::Api(ApiError::CantParseEntities(why))) if markdown => {
                    debug!(
                        "telegram: Markdown rejected in {channel} ({why}); sending as plain text"
                    );
                    markdown = false;
                }
                Err(RequestError::RetryAfter(wait)) => match rate_limits.refused(wait.duration()) {
                    Ok(retry) => {
                        warn!("telegram: rate limited in {channel}; retrying the reply in {wait}");
                        retry.sleep().await;
                    }
                    Err(give_up) => {
                        return Err(SendError::Other(format!(
                            "telegram rate limit in {channel}: retry after {wait} \
                                 (attempt {})",
                            give_up.attempt()
                        )))
                    }
                },
                Err(e) => return Err(failed_send(unavailable(&e), describe(&e, &self.scrub))),
            }
        }
    }

    async fn send_typing(&self, channel: &ChannelRef) -> Result<(), SendError> {
        let mut request = self
            .api
            .send_chat_action(recipient(&channel.chat_id), ChatAction::Typing);
        if let Some(thread) = thread_of(channel) {
            request = request.message_thread_id(thread);
        }
        // Cosmetic: never waits out a rate limit, the reply matters more.
        request
            .await
            .map(|_| ())
            .map_err(|e| SendError::Other(describe(&e, &self.scrub)))
    }
}

impl Outbox for TelegramOutbox {
    fn send<'a>(
        &'a self,
        channel: &'a ChannelRef,
        text: &'a str,
        reply_to: Option<&'a str>,
    ) -> BoxFuture<'a, Result<SentMessage, SendError>> {
        Box::pin(self.send_message(channel, text, reply_to))
    }

    fn typing<'a>(&'a self, channel: &'a ChannelRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.send_typing(channel))
    }
}

/// Whether a failed request may pass if made again later: the Bot API could not be reached, or
/// something in front of it answered with what is not the API's JSON (a 502 page) or the API
/// said it failed inside (5xx). An answer that says the message went out is never one of them:
/// sending again would duplicate it.
fn unavailable(e: &RequestError) -> bool {
    match e {
        RequestError::Network(_) | RequestError::Io(_) => true,
        RequestError::InvalidJson { raw, .. } => {
            !raw.trim_start().starts_with('{') || !raw.contains("\"ok\":true")
        }
        RequestError::Api(ApiError::Unknown(description)) => {
            let d = description.to_ascii_lowercase();
            [
                "bad gateway",
                "internal server error",
                "service unavailable",
                "gateway timeout",
            ]
            .iter()
            .any(|s| d.contains(s))
        }
        _ => false,
    }
}

/// Chat ids are numbers; public channels may also be addressed as `@name`.
fn recipient(chat_id: &str) -> Recipient {
    match chat_id.parse::<i64>() {
        Ok(id) => Recipient::Id(ChatId(id)),
        Err(_) => Recipient::ChannelUsername(chat_id.to_string()),
    }
}

fn thread_of(channel: &ChannelRef) -> Option<ThreadId> {
    channel
        .thread_id
        .parse::<i32>()
        .ok()
        .map(|id| ThreadId(MessageId(id)))
}

/// Hides the bot token, and its secret half (after `id:`) on its own, e.g. in percent-encoded
/// URLs. (teloxide redacts the token from its network errors, but only when it looks like a real
/// one; this does not depend on that.)
fn scrubber(token: &str) -> Scrubber {
    let scrub = Scrubber::new(token);
    match token.split_once(':') {
        Some((_, secret)) if secret.len() >= 8 => scrub.and_part(secret),
        _ => scrub,
    }
}

/// A loggable description of a failed request, without the token.
fn describe(e: &RequestError, scrub: &Scrubber) -> String {
    match e {
        // The raw answer can be huge and holds users' messages; the parse error says enough.
        RequestError::InvalidJson { source, .. } => {
            format!("unreadable answer from Telegram: {source}")
        }
        // teloxide's network errors read "error sending request"; the cause (refused, timed
        // out, DNS) is further down the chain.
        other => scrub.error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOT_ID: u64 = 777;

    fn me() -> BotIdentity {
        BotIdentity {
            id: UserId(BOT_ID),
            username: "Kaiwa_Bot".into(),
            handle: "@kaiwa_bot".into(),
        }
    }

    fn user(id: u64, first: &str) -> serde_json::Value {
        json!({"id": id, "is_bot": id == BOT_ID, "first_name": first})
    }

    fn private_chat(id: i64) -> serde_json::Value {
        json!({"id": id, "type": "private", "first_name": "Ann"})
    }

    fn group_chat(id: i64) -> serde_json::Value {
        json!({"id": id, "type": "supergroup", "title": "Friends"})
    }

    /// Parsed from text, as teloxide does (see `salvage_updates` on `from_value`).
    fn update(kind: &str, message: serde_json::Value) -> Update {
        serde_json::from_str(&json!({"update_id": 10, kind: message}).to_string()).unwrap()
    }

    fn message(update: Update) -> IncomingMessage {
        match translate(&update, &me()) {
            Ok(Incoming::Message(m)) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn private_text_message_becomes_a_direct_message() {
        let m = message(update(
            "message",
            json!({"message_id": 5, "date": 1_700_000_000, "chat": private_chat(42),
                   "from": {"id": 42, "is_bot": false, "first_name": "Ann", "last_name": "Lee"},
                   "text": "hello"}),
        ));
        assert_eq!(m.channel, ChannelRef::new(Platform::Telegram, "42"));
        assert_eq!(m.kind, ChatKind::Direct);
        assert_eq!(
            (
                m.message_id.as_str(),
                m.author_id.as_str(),
                m.author_name.as_str()
            ),
            ("5", "42", "Ann Lee")
        );
        assert_eq!(m.text, "hello");
        assert_eq!(m.sent_at_ms, 1_700_000_000_000);
        assert!(!m.mentions_bot && !m.replies_to_bot && !m.author_is_bot && m.reply_to.is_none());
    }

    #[test]
    fn group_mentions_and_replies_to_the_bot_are_recognised() {
        let base =
            json!({"message_id": 6, "date": 1, "chat": group_chat(-100), "from": user(1, "Bo")});
        let with = |extra: serde_json::Value| {
            let mut m = base.clone();
            m.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            message(update("message", m))
        };
        let plain = with(json!({"text": "just chatting"}));
        assert_eq!(plain.kind, ChatKind::Group);
        assert!(!plain.mentions_bot && !plain.replies_to_bot);

        assert!(with(json!({"text": "hey @KAIWA_bot what's up"})).mentions_bot);
        assert!(with(json!({"text": "/ask@kaiwa_bot why"})).mentions_bot);
        assert!(!with(json!({"text": "@kaiwa_bot2 is another bot"})).mentions_bot);
        let linked = with(json!({"text": "Kaiwa, hi",
            "entities": [{"type": "text_mention", "offset": 0, "length": 5,
                          "user": user(BOT_ID, "Kaiwa")}]}));
        assert!(linked.mentions_bot);

        let reply = with(json!({"text": "thanks", "reply_to_message":
            {"message_id": 3, "date": 1, "chat": group_chat(-100), "from": user(BOT_ID, "Kaiwa"),
             "text": "hi"}}));
        assert_eq!(reply.reply_to.as_deref(), Some("3"));
        assert!(reply.replies_to_bot);
        let other = with(json!({"text": "thanks", "reply_to_message":
            {"message_id": 4, "date": 1, "chat": group_chat(-100), "from": user(2, "Cy"),
             "text": "hi"}}));
        assert_eq!(other.reply_to.as_deref(), Some("4"));
        assert!(!other.replies_to_bot);
    }

    #[test]
    fn forum_topic_messages_carry_the_thread_but_not_a_fake_reply() {
        let opener = json!({"message_id": 100, "date": 1, "chat": group_chat(-100),
            "from": user(1, "Bo"),
            "message_thread_id": 100, "is_topic_message": true,
            "forum_topic_created": {"name": "Ideas", "icon_color": 7322096}});
        let m = message(update(
            "message",
            json!({"message_id": 101, "date": 1, "chat": group_chat(-100), "from": user(1, "Bo"),
                   "message_thread_id": 100, "is_topic_message": true, "text": "in a topic",
                   "reply_to_message": opener}),
        ));
        assert_eq!(
            m.channel,
            ChannelRef::new(Platform::Telegram, "-100").with_thread("100")
        );
        assert_eq!(m.reply_to, None);

        // Outside forums a thread id only names a reply chain: same channel as the chat.
        let m = message(update(
            "message",
            json!({"message_id": 102, "date": 1, "chat": group_chat(-100), "from": user(1, "Bo"),
                   "message_thread_id": 90, "text": "in a chain"}),
        ));
        assert_eq!(m.channel, ChannelRef::new(Platform::Telegram, "-100"));
    }

    #[test]
    fn channel_posts_are_attributed_to_the_channel() {
        let channel = json!({"id": -1001, "type": "channel", "title": "News"});
        let m = message(update(
            "channel_post",
            json!({"message_id": 7, "date": 1, "chat": channel, "sender_chat": channel,
                   "text": "post"}),
        ));
        assert_eq!(
            (m.author_id.as_str(), m.author_name.as_str()),
            ("-1001", "News")
        );
        assert_eq!(m.kind, ChatKind::Group);
    }

    #[test]
    fn captions_count_as_text_and_stickers_are_ignored() {
        let photo = json!([{"file_id": "a", "file_unique_id": "b", "width": 1, "height": 1}]);
        let m = message(update(
            "message",
            json!({"message_id": 8, "date": 1, "chat": private_chat(42), "from": user(42, "Ann"),
                   "photo": photo, "caption": "look"}),
        ));
        assert_eq!(m.text, "look");
        let skipped = translate(
            &update(
                "message",
                json!({"message_id": 9, "date": 1, "chat": private_chat(42),
                       "from": user(42, "Ann"),
                       "photo": photo}),
            ),
            &me(),
        );
        assert!(matches!(skipped, Err(Skip::Ignored(_))), "{skipped:?}");
    }

    #[test]
    fn edits_become_edited_events() {
        let event = translate(
            &update(
                "edited_message",
                json!({"message_id": 5, "date": 1, "edit_date": 2, "chat": private_chat(42),
                       "from": user(42, "Ann"), "text": "hello again"}),
            ),
            &me(),
        );
        assert_eq!(
            event,
            Ok(Incoming::Edited {
                channel: ChannelRef::new(Platform::Telegram, "42"),
                message_id: "5".into(),
                text: "hello again".into(),
                edited_at_ms: 2000,
            })
        );
    }

    #[test]
    fn malformed_updates_are_unreadable_not_fatal() {
        let raw = json!({"update_id": 5, "message": {"garbage": true}});
        // teloxide parses it (as `UpdateKind::Error`) rather than failing the whole batch…
        let parsed: Update = serde_json::from_str(&raw.to_string()).unwrap();
        assert!(matches!(parsed.kind, UpdateKind::Error(_)));
        // …and its getUpdates puts the raw update in the error, which we name by its fields.
        let bad = Update {
            id: UpdateId(5),
            kind: UpdateKind::Error(raw),
        };
        assert_eq!(
            translate(&bad, &me()),
            Err(Skip::Unreadable("message".into()))
        );
    }

    #[test]
    fn a_batch_with_a_broken_update_id_keeps_its_good_updates() {
        let raw = json!({"ok": true, "result": [
            {"update_id": "not a number", "message": {}},
            {"update_id": 8, "message": {"garbage": true}},
            {"update_id": 9, "message": {"message_id": 1, "date": 1, "chat": private_chat(42),
                                          "from": user(42, "Ann"), "text": "hi"}}
        ]})
        .to_string();
        // teloxide refuses the whole batch…
        assert!(
            serde_json::from_str::<Vec<Update>>(&json!([{"update_id": "x"}]).to_string()).is_err()
        );
        // …and we keep what can be kept.
        let updates = salvage_updates(&raw).unwrap();
        assert_eq!(updates.len(), 2);
        assert!(matches!(updates[0].kind, UpdateKind::Error(_)));
        assert!(matches!(updates[1].kind, UpdateKind::Message(_)));
        assert_eq!(salvage_updates("<html>502</html>"), None);
        assert_eq!(
            salvage_updates(r#"{"ok":true,"result":[{"no_id":1}]}"#),
            None
        );
    }

    #[test]
    fn a_lone_surrogate_spoils_one_text_not_the_batch() {
        let good = json!({"update_id": 9, "message": {"message_id": 2, "date": 1,
            "chat": private_chat(42), "from": user(42, "Ann"), "text": "still there?"}});
        let raw = format!(
            r#"{{"ok":true,"result":[{{"update_id":8,"message":{{"message_id":1,"date":1,"chat":{},"from":{},"text":"bad \ud800 and pair \ud83d\ude00"}}}},{good}]}}"#,
            private_chat(42),
            user(42, "Ann")
        );
        assert!(serde_json::from_str::<serde_json::Value>(&raw).is_err());
        let updates = salvage_updates(&raw).unwrap();
        assert_eq!(updates.len(), 2);
        let UpdateKind::Message(m) = &updates[0].kind else {
            panic!("{:?}", updates[0].kind)
        };
        assert_eq!(m.text(), Some("bad \u{fffd} and pair 😀"));
        assert!(matches!(updates[1].kind, UpdateKind::Message(_)));
        // Escaped backslashes are not escapes.
        assert_eq!(repair_lone_surrogates(r#""a\\ud800""#), r#""a\\ud800""#);
        // Past repair: the ids still come out, so the offset moves on.
        let ids =
            salvage_updates(r#"{"ok":true,"result":[{"update_id":12,"message":{"text":"#).unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].id, UpdateId(12));
    }

    #[test]
    fn a_posted_update_is_read_as_leniently_as_a_polled_one() {
        let good = json!({"update_id": 9, "message": {"message_id": 2, "date": 1,
            "chat": private_chat(42), "from": user(42, "Ann"), "text": "hi"}})
        .to_string();
        let update = posted_update(good.as_bytes()).unwrap();
        assert_eq!(update.id, UpdateId(9));
        assert_eq!(message(update).text, "hi");

        let spoiled = good.replace("\"hi\"", "\"a \\ud800 b\"");
        assert!(serde_json::from_str::<serde_json::Value>(&spoiled).is_err());
        assert_eq!(
            message(posted_update(spoiled.as_bytes()).unwrap()).text,
            "a \u{fffd} b"
        );

        let unreadable = posted_update(br#"{"update_id": 5, "message": {"garbage": true}}"#);
        let unreadable = unreadable.unwrap();
        assert_eq!(
            translate(&unreadable, &me()),
            Err(Skip::Unreadable("message".into()))
        );
        let cut = posted_update(br#"{"update_id": 12, "message": {"text": "#).unwrap();
        assert_eq!(cut.id, UpdateId(12));
        for nothing in [
            &b""[..],
            b"<html>502</html>",
            b"[]",
            b"{}",
            b"\xff\xfe",
            br#"{"update_id": -1}"#,
        ] {
            assert!(posted_update(nothing).is_none(), "{nothing:?}");
        }
    }

    #[test]
    fn a_webhook_conflict_is_told_from_other_refusals() {
        let api = |e: ApiError| RequestError::Api(e);
        assert!(webhook_is_set(&api(ApiError::CantGetUpdates)));
        assert!(webhook_is_set(&api(ApiError::Unknown(
            "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook \
             to delete the webhook first"
                .into()
        ))));
        assert!(!webhook_is_set(&api(ApiError::TerminatedByOtherGetUpdates)));
        assert!(!webhook_is_set(&api(ApiError::Unknown(
            "Bad Gateway".into()
        ))));
    }

    /// A valid batch, then cut and overwritten at random (the escapes make surrogates and
    /// broken escapes likely).
    fn spoiled_batch() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let batch = json!({"ok": true, "result": [
            {"update_id": 8, "message": {"message_id": 1, "date": 1, "chat": private_chat(42),
                "from": user(42, "Ann"), "text": "hi \u{1F600} 今日は"}},
            {"update_id": 9, "edited_message": {"message_id": 1, "date": 1, "edit_date": 2,
                "chat": private_chat(42), "from": user(42, "Ann"), "text": "hey"}},
        ]})
        .to_string()
        .replace("\u{1F600}", "\\ud83d\\ude00");
        let pieces = prop::collection::vec(
            (
                any::<usize>(),
                prop_oneof![
                    Just("\\ud800"),
                    Just("\\"),
                    Just("\""),
                    Just("}"),
                    Just("\\u12")
                ],
            ),
            0..4,
        );
        (any::<Option<usize>>(), pieces).prop_map(move |(cut, pieces)| {
            let mut text = batch.clone();
            for (at, piece) in pieces {
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, piece);
            }
            if let Some(c) = cut {
                let mut c = (c % (text.len() + 1)).max(text.len() / 2);
                while !text.is_char_boundary(c) {
                    c -= 1;
                }
                text.truncate(c);
            }
            text
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        #[test]
        fn any_get_updates_answer_is_salvaged_or_refused(raw in "\\PC{0,200}") {
            if let Some(updates) = salvage_updates(&raw) {
                for u in updates {
                    let _ = translate(&u, &me());
                }
            }
        }

        #[test]
        fn any_webhook_body_is_read_or_refused(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Some(u) = posted_update(&raw) {
                let _ = translate(&u, &me());
            }
        }

        #[test]
        fn spoiled_webhook_bodies_are_read_or_refused(raw in spoiled_batch()) {
            if let Some(u) = posted_update(raw.as_bytes()) {
                let _ = translate(&u, &me());
            }
        }

        #[test]
        fn spoiled_batches_keep_what_can_be_read(raw in spoiled_batch()) {
            if let Some(updates) = salvage_updates(&raw) {
                for u in updates {
                    let _ = translate(&u, &me());
                }
            }
        }
    }

    #[test]
    fn scrubber_hides_the_token_and_its_secret_half() {
        let s = scrubber("12345:ABCDEFGHIJKL");
        assert_eq!(
            s.clean("GET /bot12345:ABCDEFGHIJKL/getMe"),
            "GET /bot***/getMe"
        );
        assert_eq!(s.clean("bot12345%3AABCDEFGHIJKL"), "bot12345%3A***");
    }

    #[test]
    fn api_url_with_or_without_trailing_slash_is_accepted() {
        for url in [
            "http://127.0.0.1:9/",
            "http://127.0.0.1:9",
            "http://127.0.0.1:9/tg/",
        ] {
            let settings = PlatformSettings {
                token: crate::config::Secret::from("1:x"),
                api_url: Some(url.to_string()),
            };
            let outbox = TelegramOutbox::new(&settings).unwrap();
            assert!(!outbox.api.api_url().as_str().ends_with("//"), "{url}");
        }
        let bad = PlatformSettings {
            token: crate::config::Secret::from("1:x"),
            api_url: Some("not a url".into()),
        };
        let err = TelegramOutbox::new(&bad).err().unwrap().to_string();
        assert!(err.contains("TELEGRAM_API_URL"), "{err}");
    }
}

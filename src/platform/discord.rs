//! Discord: serenity's gateway connection in, the bot's [`Incoming`] out; replies and the typing
//! indicator out through Discord's REST API ([`DiscordOutbox`]).
//!
//! A few things about serenity 0.12 shape this file:
//!
//! - With `DISCORD_API_URL` set, REST goes to `{api_url}/api/v10/...` through serenity's `proxy`
//!   option. Serenity's own rate limiter ignores that option (it always calls discord.com, token
//!   included), so it is switched off then and [`DiscordOutbox`] waits out HTTP 429 itself.
//! - The gateway address comes from `GET /api/v10/gateway/bot` on that same API, asked here (so a
//!   wrong address or token fails loudly instead of serenity silently falling back to
//!   `wss://gateway.discord.gg`). Serenity accepts `ws://` as well as `wss://`, connects with
//!   `?v=10` (JSON, no transport compression), and resumes a dropped session on the address it first
//!   connected to (it does not use READY's `resume_gateway_url`).
//! - `DISCORD_SHARDS` picks the shards this process runs (`Client::start_shard_range`). Discord
//!   sends each shard only its guilds' events (and direct messages to shard 0), so live events
//!   need no filtering; what the last run left is split by shard ([`backlog`]).
//! - "Message Content" is a privileged intent: kaiwa asks for it, and Discord refuses the
//!   connection (close code 4014) unless it is enabled in the developer portal. Should guild
//!   messages still arrive without their text, that is logged once, with what to do.

use std::future::Future;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serenity::builder::{CreateAllowedMentions, CreateMessage};
use serenity::client::{ClientBuilder, Context, EventHandler};
use serenity::gateway::GatewayError;
use serenity::http::{Http, HttpBuilder, HttpError, StatusCode};
use serenity::model::channel::{
    Message, MessageReference, MessageReferenceKind, MessageType, Reaction, ReactionType,
};
use serenity::model::event::{MessageUpdateEvent, ResumedEvent};
use serenity::model::gateway::{BotGateway, GatewayIntents, Ready};
use serenity::model::guild::{Guild, UnavailableGuild};
use serenity::model::id::{ChannelId, GuildId, MessageId, ShardId, UserId};
use serenity::model::Timestamp;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::bot::event::{
    BoxFuture, ChannelRef, ChatKind, Incoming, IncomingMessage, Outbox, Platform, SendError,
    SentMessage,
};
use crate::bot::Bot;
use crate::config::{
    DiscordShards, ExposeSecret, PlatformSettings, Secret, ShardRange, UnlistedGuilds,
};
use crate::platform::retry::{self, failed_send, GiveUp, Pause, RateLimitRetries, Scrubber};
use crate::shutdown::Shutdown;

mod backlog;

use backlog::{Backlog, ShardShare};

/// What kaiwa listens to: messages in guilds and DMs, with their text, and reactions on them
/// (feedback on replies, carried into the corpus).
const INTENTS: GatewayIntents = GatewayIntents::GUILD_MESSAGES
    .union(GatewayIntents::DIRECT_MESSAGES)
    .union(GatewayIntents::MESSAGE_CONTENT)
    .union(GatewayIntents::GUILD_MESSAGE_REACTIONS)
    .union(GatewayIntents::DIRECT_MESSAGE_REACTIONS);

/// A reply refused with 429 ([`RateLimitRetries::reply`]) waits this long after the first 429
/// when Discord did not say how long, twice as long after each further one, up to
/// [`MAX_RATE_LIMIT_WAIT`]. (Serenity drops `retry_after` from the errors it returns, so this is
/// the fallback when its own rate limiter is off or let a 429 through.)
const FIRST_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(8);

/// Waits between failed attempts to reach Discord at start-up grow up to this.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(60);

/// Connects to Discord, runs the shards `shards` names, and feeds every message event to `bot`
/// until `shutdown` fires.
///
/// Returns an error only when the connection cannot work at all (token rejected, intents not
/// allowed); network trouble is retried, and a dropped gateway connection is resumed by serenity.
pub async fn run(
    bot: Arc<Bot>,
    settings: PlatformSettings,
    shards: DiscordShards,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let outbox = Arc::new(DiscordOutbox::new(&settings));
    let scrub = outbox.scrub.clone();
    let Some((me, gateway)) = introduce(&outbox.http, &scrub, &mut shutdown).await? else {
        return Ok(()); // shut down while still connecting
    };
    let shards = match shards {
        DiscordShards::Auto => ShardRange::all(gateway.shards),
        DiscordShards::Range(range) => range,
    };
    info!(%shards, "Discord: running shards");
    // What the last run left is taken before the gateway connects. With every shard here it is
    // all this process's, answered before anything new; with some, each shard takes its part
    // once it knows its guilds.
    let backlog = Backlog::take(&bot).await;
    let (share, mut intents) = if shards.is_all() {
        backlog.settle(&bot, &outbox, me).await;
        (None, INTENTS)
    } else {
        let share = Arc::new(ShardShare::new(shards, backlog));
        (Some(share), INTENTS.union(GatewayIntents::GUILDS))
    };
    if !bot.settings().access.allowed_guilds.is_empty() {
        // GUILD_CREATE says which servers the bot is in, so unlisted ones are seen at once.
        intents = intents.union(GatewayIntents::GUILDS);
    }
    let handler = DiscordHandler {
        bot,
        outbox,
        share,
        shutdown: shutdown.clone(),
        me,
        warned_missing_content: AtomicBool::new(false),
    };
    // The gateway gets its own REST client: it only asks for the gateway address again.
    let mut client = ClientBuilder::new_with_http(build_http(&settings), intents)
        .event_handler(handler)
        .await
        .map_err(|e| {
            anyhow!(
                "could not set up the Discord client: {}",
                scrub.clean(&e.to_string())
            )
        })?;
    // Had that second ask failed, the client would now point at the public gateway; use the
    // address this run already checked.
    *client.ws_url.lock().await = gateway.url;

    let shard_manager = Arc::clone(&client.shard_manager);
    // Serenity 0.12 takes the range's end as the last shard to run (its docs: `4..7` runs 4
    // through 7).
    let started = client.start_shard_range(shards.first()..shards.last(), shards.total());
    tokio::select! {
        result = started => match result {
            Ok(()) => Ok(()),
            Err(e) => Err(explain_gateway_error(&e, &scrub)),
        },
        () = shutdown.wait() => {
            info!("Discord: closing the gateway connection");
            shard_manager.shutdown_all().await;
            Ok(())
        }
    }
}

/// The REST client: Discord itself, or the API at `api_url` (a proxy, or a test's fake).
fn build_http(settings: &PlatformSettings) -> Http {
    let builder = HttpBuilder::new(settings.token.expose_secret());
    match &settings.api_url {
        None => builder.build(),
        // Serenity's rate limiter would send every request to discord.com regardless of the
        // proxy; without it, requests go to `{api_url}/api/v10/...` and 429s reach the outbox.
        Some(url) => builder
            .proxy(url.trim_end_matches('/'))
            .ratelimiter_disabled(true)
            .build(),
    }
}

/// Asks the API who we are (`GET /users/@me`, so messages mentioning us are recognised from the
/// first event on), and where the gateway is and how many shards Discord recommends
/// (`GET /gateway/bot`). Both check the token. Network trouble is retried with backoff; `None`
/// when shutdown fired first (also during a request).
async fn introduce(
    http: &Http,
    scrub: &Scrubber,
    shutdown: &mut Shutdown,
) -> anyhow::Result<Option<(UserId, BotGateway)>> {
    let asked = retry::until_answered(
        Backoff::new(Duration::from_secs(1), MAX_CONNECT_BACKOFF),
        shutdown,
        || async {
            Ok::<_, serenity::Error>((
                http.get_current_user().await?,
                http.get_bot_gateway().await?,
            ))
        },
        |e, backoff| {
            if status_of(&e) == Some(StatusCode::UNAUTHORIZED) {
                bail!(
                    "Discord rejected the bot token (DISCORD_TOKEN): 401 Unauthorized. Copy the \
                     token again from the developer portal (Applications → your app → Bot → Reset Token)"
                );
            }
            warn!(
                error = %scrub.clean(&describe(&e)),
                failures = backoff.failures() + 1,
                "Discord: cannot reach the API; retrying with backoff"
            );
            Ok(Pause::Backoff)
        },
    )
    .await?;
    let Some((me, gateway)) = asked else {
        return Ok(None);
    };
    let limit = &gateway.session_start_limit;
    info!(
        user = %me.name,
        id = %me.id,
        session_starts_left = limit.remaining,
        recommended_shards = gateway.shards,
        "Discord: connecting to the gateway"
    );
    debug!(url = %gateway.url, "Discord gateway address");
    Ok(Some((me.id, gateway)))
}

/// Turns the error that ended the gateway connection into one an operator can act on.
fn explain_gateway_error(e: &serenity::Error, scrub: &Scrubber) -> anyhow::Error {
    match e {
        serenity::Error::Gateway(GatewayError::InvalidAuthentication) => anyhow!(
            "the Discord gateway rejected the bot token (DISCORD_TOKEN); copy it again from the \
             developer portal (Applications → your app → Bot → Reset Token)"
        ),
        serenity::Error::Gateway(GatewayError::DisallowedGatewayIntents) => anyhow!(
            "Discord refused the \"Message Content\" intent kaiwa needs to read messages: enable \
             \"Message Content Intent\" in the Discord developer portal (Applications → your app → \
             Bot → Privileged Gateway Intents), then restart"
        ),
        other => anyhow!(
            "the Discord gateway connection ended: {}",
            scrub.clean(&other.to_string())
        ),
    }
}

/// Receives serenity's events and hands the ones the bot cares about to [`Bot::handle`].
struct DiscordHandler {
    bot: Arc<Bot>,
    outbox: Arc<DiscordOutbox>,
    /// Set when this process runs only some of the bot's shards.
    share: Option<Arc<ShardShare>>,
    shutdown: Shutdown,
    /// Our own user, from `/users/@me` before the gateway connects (READY's handler runs as a
    /// task of its own, so it might come after the first messages').
    me: UserId,
    warned_missing_content: AtomicBool,
}

impl DiscordHandler {
    /// Hands an event of `shard` to the bot once the shard's part of what the last run left is
    /// settled ([`ShardShare`]), unless shutdown has begun (serenity may still deliver events
    /// while its shards stop).
    async fn deliver(&self, shard: ShardId, event: Incoming) {
        if let Some(share) = &self.share {
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                () = share.settled(shard.0) => {}
                () = shutdown.wait() => {}
            }
        }
        if self.shutdown.is_triggered() {
            debug!("Discord event after shutdown ignored");
            return;
        }
        let outbox: Arc<dyn Outbox> = self.outbox.clone();
        self.bot.handle(event, outbox).await;
    }

    /// A server not on `ALLOWED_GUILDS` is left (`DISCORD_UNLISTED_GUILDS=leave`) or ignored
    /// (the default: the core neither stores nor answers anything there), with a log line.
    async fn check_guild_listed(&self, ctx: &Context, guild: &Guild) {
        let access = &self.bot.settings().access;
        if access.serves_guild(&guild.id.to_string()) {
            return;
        }
        match access.unlisted_guilds {
            UnlistedGuilds::Ignore => info!(
                guild = %guild.id,
                name = %guild.name,
                "Discord: server not on ALLOWED_GUILDS; ignoring it (DISCORD_UNLISTED_GUILDS=ignore)"
            ),
            UnlistedGuilds::Leave => match ctx.http.leave_guild(guild.id).await {
                Ok(()) => info!(
                    guild = %guild.id,
                    name = %guild.name,
                    "Discord: server not on ALLOWED_GUILDS; left it (DISCORD_UNLISTED_GUILDS=leave)"
                ),
                Err(e) => warn!(
                    guild = %guild.id,
                    error = %self.outbox.scrub.clean(&e.to_string()),
                    "Discord: could not leave a server not on ALLOWED_GUILDS; ignoring it"
                ),
            },
        }
    }

    fn warn_missing_content_once(&self) {
        if !self.warned_missing_content.swap(true, Ordering::SeqCst) {
            warn!(
                "Discord is sending guild messages without their text, so kaiwa only sees direct \
                 messages and messages that mention it. Enable \"Message Content Intent\" in the \
                 Discord developer portal (Applications → your app → Bot → Privileged Gateway \
                 Intents) and restart kaiwa."
            );
        }
    }
}

#[serenity::async_trait]
impl EventHandler for DiscordHandler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        info!(
            user = %ready.user.name,
            id = %ready.user.id,
            shard = ctx.shard_id.0,
            guilds = ready.guilds.len(),
            "Discord: connected"
        );
        if let Some(share) = &self.share {
            let guilds = ready.guilds.iter().map(|g| g.id).collect();
            share
                .shard_ready(ctx.shard_id.0, guilds, &self.bot, &self.outbox, self.me)
                .await;
        }
    }

    async fn guild_create(&self, ctx: Context, guild: Guild, _is_new: Option<bool>) {
        self.check_guild_listed(&ctx, &guild).await;
        if let Some(share) = &self.share {
            let channels = guild.channels.keys().copied();
            let threads = guild.threads.iter().map(|t| t.id);
            share.guild_arrived(ctx.shard_id.0, guild.id, channels.chain(threads).collect());
        }
    }

    async fn guild_delete(&self, ctx: Context, gone: UnavailableGuild, _full: Option<Guild>) {
        if let Some(share) = &self.share {
            share.guild_arrived(ctx.shard_id.0, gone.id, Vec::new());
        }
    }

    async fn resume(&self, _ctx: Context, _event: ResumedEvent) {
        info!("Discord: gateway connection resumed");
    }

    async fn message(&self, ctx: Context, msg: Message) {
        let me = self.me;
        if msg.author.id == me {
            return; // the core stores its own replies when it sends them
        }
        if !is_conversation(msg.kind) {
            debug!(kind = ?msg.kind, "Discord system message ignored");
            return;
        }
        if content_withheld(&msg, me) {
            self.warn_missing_content_once();
            return;
        }
        if msg.content.is_empty() {
            debug!(message = %msg.id, "Discord message without text (attachments only) ignored");
            return;
        }
        self.deliver(ctx.shard_id, Incoming::Message(incoming_message(&msg, me)))
            .await;
    }

    async fn message_update(
        &self,
        ctx: Context,
        _old: Option<Message>,
        _new: Option<Message>,
        event: MessageUpdateEvent,
    ) {
        if let Some(edited) = edited_event(&event, self.me) {
            self.deliver(ctx.shard_id, edited).await;
        }
    }

    async fn message_delete(
        &self,
        ctx: Context,
        channel_id: ChannelId,
        message_id: MessageId,
        _guild_id: Option<GuildId>,
    ) {
        let event = Incoming::Deleted {
            channel: channel_ref(channel_id),
            message_id: message_id.to_string(),
        };
        self.deliver(ctx.shard_id, event).await;
    }

    async fn reaction_add(&self, ctx: Context, reaction: Reaction) {
        if let Some(event) = reaction_event(&reaction, true, self.me) {
            self.deliver(ctx.shard_id, event).await;
        }
    }

    async fn reaction_remove(&self, ctx: Context, reaction: Reaction) {
        if let Some(event) = reaction_event(&reaction, false, self.me) {
            self.deliver(ctx.shard_id, event).await;
        }
    }

    async fn message_delete_bulk(
        &self,
        ctx: Context,
        channel_id: ChannelId,
        message_ids: Vec<MessageId>,
        _guild_id: Option<GuildId>,
    ) {
        for message_id in message_ids {
            let event = Incoming::Deleted {
                channel: channel_ref(channel_id),
                message_id: message_id.to_string(),
            };
            self.deliver(ctx.shard_id, event).await;
        }
    }
}

/// A reaction added or removed by someone other than the bot. Custom emoji are stored by name
/// (`:name:`).
fn reaction_event(r: &Reaction, added: bool, me: UserId) -> Option<Incoming> {
    let user = r.user_id.filter(|u| *u != me)?;
    let emoji = match &r.emoji {
        ReactionType::Unicode(e) => e.clone(),
        ReactionType::Custom { name, id, .. } => {
            format!(":{}:", name.clone().unwrap_or_else(|| id.to_string()))
        }
        _ => return None,
    };
    let (added, removed) = if added {
        (vec![emoji], Vec::new())
    } else {
        (Vec::new(), vec![emoji])
    };
    Some(Incoming::Reaction {
        channel: channel_ref(r.channel_id),
        message_id: r.message_id.to_string(),
        user_id: user.to_string(),
        added,
        removed,
    })
}

/// A Discord channel as the bot sees it. Threads are channels of their own on Discord, so the
/// thread part stays empty.
fn channel_ref(channel_id: ChannelId) -> ChannelRef {
    ChannelRef::new(Platform::Discord, channel_id.to_string())
}

/// Messages people write (and bots' command answers), as opposed to join notices, pins, boosts…
fn is_conversation(kind: MessageType) -> bool {
    matches!(
        kind,
        MessageType::Regular
            | MessageType::InlineReply
            | MessageType::ChatInputCommand
            | MessageType::ContextMenuCommand
    )
}

/// True when Discord withheld the message's content, as it does for guild messages when the
/// Message Content intent is missing: empty text, no attachments, embeds, stickers or poll, from
/// a person, in a guild, not mentioning us (mentions and DMs keep their content regardless).
fn content_withheld(msg: &Message, me: UserId) -> bool {
    msg.guild_id.is_some()
        && !msg.author.bot
        && !mentions(msg, me)
        && msg.content.is_empty()
        && msg.attachments.is_empty()
        && msg.embeds.is_empty()
        && msg.sticker_items.is_empty()
        && msg.poll.is_none()
        && msg.message_snapshots.is_empty()
}

fn mentions(msg: &Message, me: UserId) -> bool {
    msg.mentions.iter().any(|u| u.id == me)
}

/// A MESSAGE_CREATE in the bot's terms.
fn incoming_message(msg: &Message, me: UserId) -> IncomingMessage {
    // Only a reply's reference points at the message answered; a forward's points elsewhere.
    let reply_to = msg
        .message_reference
        .as_ref()
        .filter(|r| r.kind == MessageReferenceKind::Default)
        .and_then(|r| r.message_id);
    let replies_to_bot = reply_to.is_some()
        && msg
            .referenced_message
            .as_ref()
            .is_some_and(|r| r.author.id == me);
    let author_name = msg
        .member
        .as_ref()
        .and_then(|m| m.nick.clone())
        .or_else(|| msg.author.global_name.clone())
        .unwrap_or_else(|| msg.author.name.clone());
    IncomingMessage {
        channel: channel_ref(msg.channel_id),
        kind: if msg.guild_id.is_none() {
            ChatKind::Direct
        } else {
            ChatKind::Group
        },
        message_id: msg.id.to_string(),
        author_id: msg.author.id.to_string(),
        author_name,
        author_is_bot: msg.author.bot,
        text: msg.content.clone(),
        reply_to: reply_to.map(|id| id.to_string()),
        replies_to_bot,
        mentions_bot: mentions(msg, me),
        sent_at_ms: unix_ms(&msg.timestamp),
        guild_id: msg.guild_id.map(|g| g.to_string()),
        roles: msg
            .member
            .as_ref()
            .map(|m| m.roles.iter().map(|r| r.to_string()).collect())
            .unwrap_or_default(),
    }
}

/// A MESSAGE_UPDATE in the bot's terms, when it changed the text. Updates also report embeds
/// being resolved and pins, without content; and without the Message Content intent the content
/// is empty, which must not blank the stored text.
fn edited_event(event: &MessageUpdateEvent, me: UserId) -> Option<Incoming> {
    if event.author.as_ref().is_some_and(|a| a.id == me) {
        return None;
    }
    let text = event.content.clone().filter(|t| !t.is_empty())?;
    let edited_at_ms = event.edited_timestamp.as_ref().map_or_else(now_ms, unix_ms);
    Some(Incoming::Edited {
        channel: channel_ref(event.channel_id),
        message_id: event.id.to_string(),
        text,
        edited_at_ms,
    })
}

fn unix_ms(t: &Timestamp) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn now_ms() -> i64 {
    unix_ms(&Timestamp::now())
}

/// How the core sends on Discord: messages and the typing indicator, over REST.
pub struct DiscordOutbox {
    http: Arc<Http>,
    /// Keeps the token out of error texts.
    scrub: Scrubber,
    /// With `DISCORD_API_URL`: messages are sent here, so a 429's `retry_after` is read.
    proxy: Option<ProxyRest>,
}

/// `POST /channels/{id}/messages` on the API at `DISCORD_API_URL`, waiting out 429s for the
/// `retry_after` Discord gives (serenity's errors drop it, and its rate limiter cannot be used
/// with a proxy).
struct ProxyRest {
    client: reqwest::Client,
    base: String,
    token: Secret,
}

impl ProxyRest {
    async fn create_message(
        &self,
        channel: ChannelId,
        body: String,
        scrub: &Scrubber,
    ) -> Result<Message, SendError> {
        let url = format!("{}/api/v10/channels/{channel}/messages", self.base);
        let failed =
            |e: String| SendError::Other(format!("sending a message: {}", scrub.clean(&e)));
        let mut rate_limits = RateLimitRetries::reply();
        loop {
            let response = self
                .client
                .post(&url)
                .header(
                    "Authorization",
                    format!("Bot {}", self.token.expose_secret()),
                )
                .header("Content-Type", "application/json")
                .body(body.clone())
                .send()
                .await
                .map_err(|e| {
                    SendError::Unavailable(format!(
                        "sending a message: {}",
                        scrub.clean(&e.to_string())
                    ))
                })?;
            let status = response.status();
            let header_wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = response.bytes().await.map_err(|e| failed(e.to_string()))?;
            if status.is_success() {
                return serde_json::from_slice(&bytes)
                    .map_err(|e| failed(format!("unreadable answer: {e}")));
            }
            let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                let limit = RateLimit::of(&answer, header_wait.as_deref());
                match rate_limits.refused(limit.retry_after.unwrap_or(FIRST_RATE_LIMIT_WAIT)) {
                    Ok(retry) => {
                        warn!(
                            attempt = retry.attempt,
                            wait_ms = retry.wait.as_millis() as u64,
                            global = limit.global,
                            "Discord rate limit (429) on sending a message: waiting its retry_after"
                        );
                        retry.sleep().await;
                        continue;
                    }
                    Err(GiveUp::TooLong { wait, .. }) => {
                        return Err(failed(format!(
                            "rate limited for {:.0} s; not waiting that long",
                            wait.as_secs_f64()
                        )));
                    }
                    // The last try: its 429 is the error.
                    Err(GiveUp::Exhausted { .. }) => {}
                }
            }
            let why = format!(
                "Discord answered {status}: {}",
                answer["message"].as_str().unwrap_or("(no message)")
            );
            return Err(failed_send(
                status.is_server_error(),
                format!("sending a message: {}", scrub.clean(&why)),
            ));
        }
    }
}

/// What a Discord 429 asks of the bot: wait `retry_after`, the body's (seconds, to the
/// millisecond) or else the `Retry-After` header's (whole seconds), and whether the limit is the
/// bot's as a whole (`"global": true`) rather than the route's.
#[derive(Debug, PartialEq)]
struct RateLimit {
    retry_after: Option<Duration>,
    global: bool,
}

impl RateLimit {
    fn of(answer: &serde_json::Value, retry_after_header: Option<&str>) -> Self {
        let header = retry_after_header.and_then(|v| v.parse::<f64>().ok());
        RateLimit {
            retry_after: answer["retry_after"]
                .as_f64()
                .or(header)
                .and_then(retry::seconds),
            global: answer["global"].as_bool().unwrap_or(false),
        }
    }
}

impl DiscordOutbox {
    /// A REST client for Discord, or for the API at `settings.api_url`.
    pub fn new(settings: &PlatformSettings) -> Self {
        DiscordOutbox {
            http: Arc::new(build_http(settings)),
            scrub: Scrubber::new(settings.token.expose_secret()),
            proxy: settings.api_url.as_ref().map(|url| ProxyRest {
                client: reqwest::Client::new(),
                base: url.trim_end_matches('/').to_string(),
                token: settings.token.clone(),
            }),
        }
    }

    /// Runs `request`, again while Discord answers 429; other errors become [`SendError`]s.
    async fn with_rate_limit_retries<T, F, Fut>(
        &self,
        what: &str,
        mut request: F,
    ) -> Result<T, SendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = serenity::Result<T>>,
    {
        let mut rate_limits = RateLimitRetries::reply();
        let mut unknown_wait = Backoff::new(FIRST_RATE_LIMIT_WAIT, MAX_RATE_LIMIT_WAIT);
        loop {
            let e = match request().await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            if status_of(&e) == Some(StatusCode::TOO_MANY_REQUESTS) {
                if let Ok(retry) = rate_limits.refused(unknown_wait.next_step()) {
                    warn!(
                        attempt = retry.attempt,
                        wait_ms = retry.wait.as_millis() as u64,
                        "Discord rate limit (429) on {what}: waiting"
                    );
                    retry.sleep().await;
                    continue;
                }
            }
            let why = format!("{what}: {}", self.scrub.clean(&describe(&e)));
            return Err(failed_send(unavailable(&e), why));
        }
    }
}

impl Outbox for DiscordOutbox {
    fn send<'a>(
        &'a self,
        channel: &'a ChannelRef,
        text: &'a str,
        reply_to: Option<&'a str>,
    ) -> BoxFuture<'a, Result<SentMessage, SendError>> {
        Box::pin(async move {
            let channel_id = ChannelId::from(parse_snowflake(&channel.chat_id, "channel id")?);
            // The reply must not ping its author, and generated text must not ping anyone.
            let mut message = CreateMessage::new()
                .content(text)
                .allowed_mentions(CreateAllowedMentions::new().replied_user(false));
            if let Some(id) = reply_to {
                let mut reference = MessageReference::from((
                    channel_id,
                    MessageId::from(parse_snowflake(id, "message id")?),
                ));
                // Answer even if the message was deleted meanwhile.
                reference.fail_if_not_exists = Some(false);
                message = message.reference_message(reference);
            }
            let sent = match &self.proxy {
                Some(proxy) => {
                    let body = serde_json::to_string(&message)
                        .map_err(|e| SendError::Other(format!("sending a message: {e}")))?;
                    proxy.create_message(channel_id, body, &self.scrub).await?
                }
                None => {
                    self.with_rate_limit_retries("sending a message", || {
                        channel_id.send_message(&self.http, message.clone())
                    })
                    .await?
                }
            };
            Ok(SentMessage {
                message_id: sent.id.to_string(),
                sent_at_ms: unix_ms(&sent.timestamp),
            })
        })
    }

    fn typing<'a>(&'a self, channel: &'a ChannelRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let channel_id = ChannelId::from(parse_snowflake(&channel.chat_id, "channel id")?);
            // Best effort and repeated by the core every few seconds: no retrying.
            channel_id.broadcast_typing(&self.http).await.map_err(|e| {
                SendError::Other(format!(
                    "typing indicator: {}",
                    self.scrub.clean(&describe(&e))
                ))
            })
        })
    }
}

fn parse_snowflake(s: &str, what: &str) -> Result<NonZeroU64, SendError> {
    s.parse()
        .map_err(|_| SendError::Other(format!("{what} {s:?} is not a Discord snowflake")))
}

fn status_of(e: &serenity::Error) -> Option<StatusCode> {
    match e {
        serenity::Error::Http(h) => h.status_code(),
        _ => None,
    }
}

/// Whether a failed request may pass if made again later: Discord could not be reached, or
/// failed inside (5xx).
fn unavailable(e: &serenity::Error) -> bool {
    match e {
        serenity::Error::Http(HttpError::Request(_)) => true,
        serenity::Error::Http(h) => h.status_code().is_some_and(|s| s.is_server_error()),
        _ => false,
    }
}

/// An error text that says what Discord answered, not just serenity's summary of it.
fn describe(e: &serenity::Error) -> String {
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => {
            format!(
                "Discord answered {} to {} {}: {}",
                r.status_code, r.method, r.url, r.error.message
            )
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u64 = 900_000_000_000_000_001;

    fn user(id: u64, name: &str, bot: bool) -> serde_json::Value {
        serde_json::json!({"id": id.to_string(), "username": name, "global_name": null, "avatar": null, "bot": bot})
    }

    fn message(extra: serde_json::Value) -> Message {
        let mut m = serde_json::json!({
            "id": "1300000000000000001", "channel_id": "1200000000000000001",
            "author": user(1, "alice", false), "content": "hello",
            "timestamp": "2024-05-01T12:00:00.250000+00:00", "edited_timestamp": null,
            "tts": false, "mention_everyone": false, "mentions": [], "mention_roles": [],
            "attachments": [], "embeds": [], "pinned": false, "type": 0,
        });
        if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
            m.extend(extra.clone());
        }
        serde_json::from_value(m).unwrap()
    }

    #[test]
    fn direct_message_becomes_a_direct_incoming_message() {
        let m = incoming_message(&message(serde_json::json!({})), UserId::new(ME));
        assert_eq!(
            m.channel,
            ChannelRef::new(Platform::Discord, "1200000000000000001")
        );
        assert_eq!(m.kind, ChatKind::Direct);
        assert_eq!(
            (
                m.message_id.as_str(),
                m.author_id.as_str(),
                m.author_name.as_str()
            ),
            ("1300000000000000001", "1", "alice")
        );
        assert_eq!(m.text, "hello");
        assert_eq!(m.sent_at_ms, 1_714_564_800_250);
        assert!(!m.mentions_bot && !m.replies_to_bot && !m.author_is_bot && m.reply_to.is_none());
    }

    #[test]
    fn guild_reply_to_the_bot_with_nick_and_mention() {
        let original = serde_json::json!({
            "id": "1300000000000000000", "channel_id": "1200000000000000001", "author": user(ME, "kaiwa", true),
            "content": "hi", "timestamp": "2024-05-01T11:59:00+00:00", "edited_timestamp": null, "tts": false,
            "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": false, "type": 0,
        });
        let msg = message(serde_json::json!({
            "guild_id": "1100000000000000001", "type": 19,
            "author": {"id": "1", "username": "alice", "global_name": "Alice A.", "avatar": null},
            "member": {"nick": "Ali", "roles": [], "joined_at": "2024-01-01T00:00:00+00:00", "deaf": false, "mute": false},
            "mentions": [user(ME, "kaiwa", true)],
            "message_reference": {"message_id": "1300000000000000000", "channel_id": "1200000000000000001"},
            "referenced_message": original,
        }));
        let m = incoming_message(&msg, UserId::new(ME));
        assert_eq!(m.kind, ChatKind::Group);
        assert_eq!(m.author_name, "Ali");
        assert_eq!(m.reply_to.as_deref(), Some("1300000000000000000"));
        assert!(m.replies_to_bot && m.mentions_bot);
    }

    #[test]
    fn withheld_content_is_recognised_only_where_discord_withholds_it() {
        let me = UserId::new(ME);
        let guild = serde_json::json!({"guild_id": "1100000000000000001", "content": ""});
        assert!(content_withheld(&message(guild.clone()), me));
        assert!(
            !content_withheld(&message(serde_json::json!({"content": ""})), me),
            "DMs keep their content"
        );
        let mut mentioning = guild.clone();
        mentioning["mentions"] = serde_json::json!([user(ME, "kaiwa", true)]);
        assert!(!content_withheld(&message(mentioning), me));
        let mut with_text = guild;
        with_text["content"] = "hi".into();
        assert!(!content_withheld(&message(with_text), me));
    }

    #[test]
    fn edits_without_text_are_not_edits() {
        let event = |extra: serde_json::Value| -> MessageUpdateEvent {
            let mut e = serde_json::json!({"id": "1300000000000000001", "channel_id": "1200000000000000001"});
            if let (Some(e), Some(extra)) = (e.as_object_mut(), extra.as_object()) {
                e.extend(extra.clone());
            }
            serde_json::from_value(e).unwrap()
        };
        let me = UserId::new(ME);
        assert!(edited_event(&event(serde_json::json!({})), me).is_none());
        assert!(edited_event(&event(serde_json::json!({"content": ""})), me).is_none());
        let edited = edited_event(
            &event(
                serde_json::json!({"content": "new", "edited_timestamp": "2024-05-01T12:00:01+00:00"}),
            ),
            me,
        );
        assert!(
            matches!(edited, Some(Incoming::Edited { ref text, edited_at_ms: 1_714_564_801_000, .. }) if text == "new")
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// Any MESSAGE_CREATE serenity accepts becomes an incoming message without a panic: its
        /// text is the content as sent, its ids are the message's, and it mentions the bot
        /// exactly when the bot is among the mentioned users.
        #[test]
        fn any_message_serenity_reads_becomes_an_incoming_message(
            content in ".{0,300}",
            kind in 0u8..60,
            in_guild in proptest::prelude::any::<bool>(),
            mentioned in proptest::collection::vec((0u64..4, proptest::prelude::any::<bool>()), 0..4),
            author_bot in proptest::prelude::any::<bool>(),
            nick in proptest::option::of(".{0,40}"),
            reply_to in proptest::option::of(1u64..u64::MAX),
            which_time in 0usize..4,
            junk_time in "[0-9T:+.Z-]{0,30}",
        ) {
            let valid_times = [
                "2024-05-01T12:00:00.250000+00:00",
                "9999-12-31T23:59:59+00:00",
                "1970-01-01T00:00:00Z",
            ];
            let timestamp = valid_times.get(which_time).map_or(junk_time, |t| t.to_string());
            let mentions: Vec<serde_json::Value> = mentioned
                .iter()
                .map(|&(i, bot)| user(if i == 0 { ME } else { i }, "someone", bot))
                .collect();
            let mut extra = serde_json::json!({
                "content": content, "type": kind, "mentions": mentions,
                "author": user(42, "author", author_bot), "timestamp": timestamp,
            });
            if in_guild {
                extra["guild_id"] = "1100000000000000001".into();
                if let Some(nick) = &nick {
                    extra["member"] = serde_json::json!({"nick": nick, "roles": [],
                        "joined_at": "2024-01-01T00:00:00+00:00", "deaf": false, "mute": false});
                }
            }
            if let Some(id) = reply_to {
                extra["message_reference"] = serde_json::json!({"message_id": id.to_string(),
                    "channel_id": "1200000000000000001"});
            }
            let mut m = serde_json::json!({
                "id": "1300000000000000001", "channel_id": "1200000000000000001",
                "edited_timestamp": null, "tts": false, "mention_everyone": false,
                "mention_roles": [], "attachments": [], "embeds": [], "pinned": false,
            });
            m.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let parsed = serde_json::from_value::<Message>(m);
            // Everything but a junk timestamp is a message serenity reads.
            proptest::prop_assert!(parsed.is_ok() || which_time == 3, "{:?}", parsed.err());
            if let Ok(msg) = parsed {
                let me = UserId::new(ME);
                let incoming = incoming_message(&msg, me);
                let _ = (is_conversation(msg.kind), content_withheld(&msg, me));
                proptest::prop_assert_eq!(&incoming.text, &content);
                proptest::prop_assert_eq!(incoming.message_id.as_str(), "1300000000000000001");
                proptest::prop_assert_eq!(
                    incoming.mentions_bot,
                    mentioned.iter().any(|&(i, _)| i == 0)
                );
                proptest::prop_assert_eq!(incoming.kind == ChatKind::Group, in_guild);
            }
        }
    }

    #[test]
    fn a_429_is_read_as_discord_sends_it() {
        let answer = serde_json::json!({"message": "You are being rate limited.",
            "retry_after": 0.25, "global": true});
        assert_eq!(
            RateLimit::of(&answer, Some("1")),
            RateLimit {
                retry_after: Some(Duration::from_millis(250)),
                global: true
            }
        );
        // Without the body's, the header's; without either, the caller guesses.
        let route = serde_json::json!({"message": "You are being rate limited."});
        assert_eq!(
            RateLimit::of(&route, Some("2")),
            RateLimit {
                retry_after: Some(Duration::from_secs(2)),
                global: false
            }
        );
        assert_eq!(RateLimit::of(&route, None).retry_after, None);
        let nonsense = serde_json::json!({"retry_after": -1});
        assert_eq!(RateLimit::of(&nonsense, Some("2")).retry_after, None);
    }

    #[test]
    fn scrub_removes_the_token() {
        let scrub = DiscordOutbox::new(&PlatformSettings {
            token: Secret::from("abc.def.ghi"),
            api_url: None,
        })
        .scrub;
        assert_eq!(scrub.clean("Bot abc.def.ghi failed"), "Bot *** failed");
    }
}

//! A fake Discord on 127.0.0.1: enough of API v10 (REST and the WebSocket gateway) for serenity,
//! with controls for tests.
//!
//! REST: `GET /api/v10/gateway[/bot]`, `GET /api/v10/users/@me`, `POST
//! /api/v10/channels/{id}/messages` (recorded; answered with a full message object, and echoed
//! over the gateway as Discord does) and `POST /api/v10/channels/{id}/typing`. Every request must
//! carry `Authorization: Bot <token>`.
//!
//! Gateway (`/gateway`, JSON, no compression): HELLO, IDENTIFY → READY (and, with the `GUILDS`
//! intent, a GUILD_CREATE for each of the shard's guilds), heartbeats → ACK, RESUME → replay →
//! RESUMED. The bot has [`FakeDiscord::start_with_shards`] shards (one unless a test says
//! otherwise; `GET /gateway/bot` recommends that many and IDENTIFY must use that total), each
//! with its own session and event log, as Discord shards the bot's guilds: a dispatch goes to the
//! shard of its guild (`(guild_id >> 22) % shards`, [`shard_of`]) and one without a guild (a
//! direct message) to shard 0. A shard's connection delivers its log in order and numbers frames
//! as it sends them, so `s` always grows and a RESUME replays exactly what came after the
//! client's last seen `s`. Frames dispatched while a shard has no connection up wait for its next
//! one (after RESUME or a fresh IDENTIFY), so a test never loses an event to timing.
//!
//! Everything is bounded: waits take a timeout and panic with what the fake saw.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::daemon::{last_lines, Peer, TestDaemon, WAIT};

/// The bot token the fake accepts when [`spawn_daemon`](super::daemon::spawn_daemon) starts it;
/// shaped like a real bot token, so a leak would be the real thing.
pub const TOKEN: &str = "MTA0NjAwMDAwMDAwMDAwMDAwMQ.GkX7qP.Vq3b8Zr1LmN0pQsT5uWxYz2aBcDeFgHiJkLmNo";

/// The bot's user (and application) id in the fake.
pub const BOT_USER_ID: &str = "1046000000000000001";
pub const BOT_USERNAME: &str = "kaiwa-test";
/// Short, so heartbeats (and their ACKs) happen within a test.
pub const HEARTBEAT_INTERVAL_MS: u64 = 3_000;
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;
/// Gateway intents bits (Discord's numbering).
pub const INTENT_GUILDS: u64 = 1 << 0;
pub const INTENT_GUILD_MESSAGES: u64 = 1 << 9;
pub const INTENT_DIRECT_MESSAGES: u64 = 1 << 12;
pub const INTENT_MESSAGE_CONTENT: u64 = 1 << 15;

/// The shard of `total` that Discord gives a guild: `(guild_id >> 22) % total` (0 for an id that
/// is not a snowflake).
pub fn shard_of(guild_id: &str, total: usize) -> usize {
    guild_id
        .parse::<u64>()
        .map_or(0, |id| ((id >> 22) % total.max(1) as u64) as usize)
}

/// A fresh, increasing snowflake id (timestamp in the high bits, as Discord's).
pub fn snowflake() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let ms = unix_ms().saturating_sub(DISCORD_EPOCH_MS);
    ((ms << 22) | (COUNTER.fetch_add(1, Ordering::Relaxed) & 0x3f_ffff)).to_string()
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339, as Discord writes timestamps (`2024-05-01T12:00:00.250000+00:00`).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}000+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// A Discord user as payloads carry it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeUser {
    pub id: String,
    pub username: String,
    pub global_name: Option<String>,
    pub bot: bool,
}

impl FakeUser {
    pub fn person(id: &str, username: &str) -> Self {
        FakeUser {
            id: id.into(),
            username: username.into(),
            global_name: None,
            bot: false,
        }
    }

    pub fn bot_account(id: &str, username: &str) -> Self {
        FakeUser {
            bot: true,
            ..FakeUser::person(id, username)
        }
    }

    pub fn with_global_name(mut self, name: &str) -> Self {
        self.global_name = Some(name.into());
        self
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "username": self.username, "discriminator": "0",
            "global_name": self.global_name, "avatar": null, "bot": self.bot,
            "public_flags": 0,
        })
    }
}

/// Builds a realistic MESSAGE_CREATE payload (`d`).
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    json: Value,
}

impl MessageBuilder {
    /// A message in a guild text channel.
    pub fn in_guild(guild_id: &str, channel_id: &str, author: &FakeUser, content: &str) -> Self {
        let mut b = Self::base(channel_id, author, content);
        b.json["guild_id"] = guild_id.into();
        b.json["member"] = json!({
            "roles": [], "joined_at": rfc3339(unix_ms() - 86_400_000), "deaf": false, "mute": false,
            "flags": 0, "nick": null, "premium_since": null, "pending": false,
        });
        b
    }

    /// A direct message (no guild).
    pub fn direct(channel_id: &str, author: &FakeUser, content: &str) -> Self {
        Self::base(channel_id, author, content)
    }

    fn base(channel_id: &str, author: &FakeUser, content: &str) -> Self {
        MessageBuilder {
            json: json!({
                "id": snowflake(), "channel_id": channel_id, "author": author.to_json(),
                "content": content, "timestamp": rfc3339(unix_ms()), "edited_timestamp": null,
                "tts": false, "mention_everyone": false, "mentions": [], "mention_roles": [],
                "attachments": [], "embeds": [], "pinned": false, "type": 0, "flags": 0,
                "components": [], "nonce": snowflake(),
            }),
        }
    }

    /// Mentions `user`: `<@id>` in front of the text and the user in `mentions`.
    pub fn mentioning(mut self, user: &FakeUser) -> Self {
        let content = format!(
            "<@{}> {}",
            user.id,
            self.json["content"].as_str().unwrap_or("")
        );
        self.json["content"] = content.into();
        if let Some(m) = self.json["mentions"].as_array_mut() {
            m.push(user.to_json());
        }
        self
    }

    /// The author's nickname in the guild (`member.nick`).
    pub fn nick(mut self, nick: &str) -> Self {
        self.json["member"]["nick"] = nick.into();
        self
    }

    pub fn build(self) -> Value {
        self.json
    }
}

/// A message the bot posted, as the fake recorded it.
#[derive(Debug, Clone)]
pub struct SentMessage {
    pub id: String,
    pub channel_id: String,
    pub content: String,
    /// `message_reference.message_id`, when it was a reply.
    pub reply_to: Option<String>,
    pub allowed_mentions: Value,
    pub at: Instant,
}

/// An IDENTIFY the gateway received.
#[derive(Debug, Clone)]
pub struct Identify {
    /// As sent (serenity sends `Bot <token>`).
    pub token: String,
    pub intents: u64,
    /// `shard: [id, total]`, when sent.
    pub shard: Option<(u64, u64)>,
}

/// A RESUME the gateway received.
#[derive(Debug, Clone)]
pub struct Resume {
    pub session_id: String,
    pub seq: u64,
}

/// A dispatch a shard's connection sent: which shard, which event, and the message or guild it
/// was about (`d.id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub shard: usize,
    pub event: String,
    pub id: Option<String>,
}

/// One entry of a shard's event log.
#[derive(Debug, Clone)]
enum Frame {
    Dispatch {
        t: String,
        d: Value,
    },
    /// Sent verbatim; not numbered.
    Raw(String),
}

/// The gateway session: which `s` stands for which point of the log.
#[derive(Debug)]
struct Session {
    id: String,
    seq: u64,
    /// `(s, index of the next log frame after it)`, for RESUME.
    resume_points: Vec<(u64, usize)>,
}

/// One shard's side of the gateway: its event log, its session and its connection.
#[derive(Debug, Default)]
struct ShardGateway {
    log: Vec<Frame>,
    /// The next log index to deliver on the live connection.
    next_frame: usize,
    /// Log frames before this index were delivered on some connection.
    delivered: usize,
    session: Option<Session>,
    /// The connection allowed to talk for this shard (the one that identified or resumed last);
    /// others close. 0: none.
    current_connection: u64,
    /// The current connection is identified or resumed.
    live: bool,
}

#[derive(Debug, Default)]
struct FakeState {
    /// One per shard of the bot.
    shards: Vec<ShardGateway>,
    sessions_started: u64,
    connections_opened: u64,
    deliveries: Vec<Delivery>,
    identifies: Vec<Identify>,
    resumes: Vec<Resume>,
    drops: usize,
    gateway_queries: Vec<HashMap<String, String>>,
    refuse_message_content: bool,
    sent: Vec<SentMessage>,
    typing: Vec<String>,
    rate_limited: Vec<Instant>,
    pending_429: VecDeque<(f64, bool)>,
    /// `METHOD path -> status`, for failure messages.
    requests: Vec<String>,
    guild_of_channel: HashMap<String, String>,
    /// Each guild's channels, in the order they became known.
    guilds: Vec<(String, Vec<String>)>,
    /// Every message of every channel, for `GET /channels/{id}/messages`.
    history: Vec<Value>,
}

impl FakeState {
    /// The shard a dispatch goes to: its guild's, or shard 0 (direct messages).
    fn shard_for(&self, d: &Value) -> usize {
        let guild = d["guild_id"].as_str().map(String::from).or_else(|| {
            d["channel_id"]
                .as_str()
                .and_then(|c| self.guild_of_channel.get(c).cloned())
        });
        guild.map_or(0, |g| shard_of(&g, self.shards.len()))
    }

    fn push(&mut self, frame: Frame) {
        let shard = match &frame {
            Frame::Dispatch { d, .. } => self.shard_for(d),
            Frame::Raw(_) => 0,
        };
        self.shards[shard].log.push(frame);
    }

    fn add_channel(&mut self, guild_id: &str, channel_id: &str) {
        self.guild_of_channel
            .insert(channel_id.into(), guild_id.into());
        match self.guilds.iter_mut().find(|(g, _)| g == guild_id) {
            Some((_, channels)) if channels.iter().any(|c| c == channel_id) => {}
            Some((_, channels)) => channels.push(channel_id.into()),
            None => self
                .guilds
                .push((guild_id.into(), vec![channel_id.to_string()])),
        }
    }

    fn any_live(&self) -> bool {
        self.shards.iter().any(|s| s.live)
    }
}

struct Shared {
    token: String,
    addr: SocketAddr,
    bot: FakeUser,
    state: Mutex<FakeState>,
    /// Bumped after every change: wakes gateway connections and waiting tests.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.send_modify(|v| *v += 1);
        out
    }

    fn gateway_url(&self) -> String {
        format!("ws://{}/gateway", self.addr)
    }
}

/// The fake; the server stops when it is dropped.
pub struct FakeDiscord {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Peer for FakeDiscord {
    async fn start() -> FakeDiscord {
        FakeDiscord::start(TOKEN).await
    }

    fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DISCORD_TOKEN", self.shared.token.clone()),
            ("DISCORD_API_URL", self.url()),
        ]
    }

    /// Until the daemon's gateway connection is identified (or resumed).
    async fn connected(&self, daemon: &TestDaemon) {
        if !self.connected_within(WAIT).await {
            panic!(
                "the daemon did not connect to the fake Discord within {WAIT:?}; {}\nkaiwa and serenity logs:\n{}",
                self.summary(),
                relevant_logs(&daemon.logs())
            );
        }
    }
}

/// The daemon's and serenity's log lines (the model runtime's are many and beside the point).
fn relevant_logs(logs: &str) -> String {
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("kaiwa") || l.contains("serenity"))
        .collect();
    last_lines(&lines.join("\n"), 60)
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeDiscord {
    /// Starts the fake on a free port; requests must authenticate with `token`. The bot has one
    /// shard.
    pub async fn start(token: &str) -> FakeDiscord {
        FakeDiscord::start_with_shards(token, 1).await
    }

    /// [`FakeDiscord::start`] for a bot with `shards` shards (at least 1).
    pub async fn start_with_shards(token: &str, shards: usize) -> FakeDiscord {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Discord");
        let addr = listener.local_addr().expect("fake Discord address");
        let shared = Arc::new(Shared {
            token: token.to_string(),
            addr,
            bot: FakeUser::bot_account(BOT_USER_ID, BOT_USERNAME),
            state: Mutex::new(FakeState {
                shards: (0..shards.max(1))
                    .map(|_| ShardGateway::default())
                    .collect(),
                ..FakeState::default()
            }),
            changed: watch::channel(0).0,
        });
        let app = Router::new()
            .route("/api/v10/gateway", get(rest_gateway))
            .route("/api/v10/gateway/bot", get(rest_gateway_bot))
            .route("/api/v10/users/@me", get(rest_me))
            .route(
                "/api/v10/channels/{channel_id}/messages",
                post(rest_create_message).get(rest_channel_messages),
            )
            .route("/api/v10/channels/{channel_id}/typing", post(rest_typing))
            .route(
                "/api/v10/users/@me/guilds/{guild_id}",
                delete(rest_leave_guild),
            )
            .route("/gateway", get(gateway))
            .fallback(rest_unknown)
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeDiscord { shared, server }
    }

    /// The REST base, for `DISCORD_API_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn bot_user(&self) -> &FakeUser {
        &self.shared.bot
    }

    /// Adds a guild with its text channels; READY lists it on its shard, and GUILD_CREATE
    /// brings it with them. (A message in a guild's channel adds both, too.)
    pub fn add_guild(&self, guild_id: &str, channel_ids: &[&str]) {
        self.shared.update(|s| {
            for c in channel_ids {
                s.add_channel(guild_id, c);
            }
        });
    }

    /// Sends a dispatch (`op` 0) with the next sequence number, on the shard of its guild
    /// (`d.guild_id`, else the guild of `d.channel_id`), or on shard 0.
    pub fn dispatch(&self, event: &str, d: Value) {
        self.shared
            .update(|s| s.push(Frame::Dispatch { t: event.into(), d }));
    }

    /// Sends MESSAGE_CREATE with `message` (see [`MessageBuilder`]).
    pub fn dispatch_message_create(&self, message: Value) {
        if let (Some(c), Some(g)) = (message["channel_id"].as_str(), message["guild_id"].as_str()) {
            self.shared.lock().add_channel(g, c);
        }
        self.add_history(message.clone());
        self.dispatch("MESSAGE_CREATE", message);
    }

    /// Adds `message` to its channel's history without telling the gateway: a message written
    /// while the bot was not connected. REST returns it (without `guild_id`, as Discord does).
    pub fn add_history(&self, message: Value) {
        let mut stored = message;
        if let Some(m) = stored.as_object_mut() {
            m.remove("guild_id");
            m.remove("member");
        }
        self.shared.update(|s| s.history.push(stored));
    }

    /// Sends MESSAGE_UPDATE for `message` with its text changed to `content`.
    pub fn dispatch_message_edit(&self, message: &Value, content: &str) {
        let mut edited = message.clone();
        edited["content"] = content.into();
        edited["edited_timestamp"] = rfc3339(unix_ms()).into();
        self.dispatch("MESSAGE_UPDATE", edited);
    }

    /// Sends MESSAGE_DELETE for `message`.
    pub fn dispatch_message_delete(&self, message: &Value) {
        let mut d = json!({"id": message["id"], "channel_id": message["channel_id"]});
        if let Some(g) = message.get("guild_id") {
            d["guild_id"] = g.clone();
        }
        self.dispatch("MESSAGE_DELETE", d);
    }

    /// Sends `payload` as it is (malformed payloads, unknown opcodes), on shard 0.
    pub fn dispatch_raw(&self, payload: Value) {
        self.send_raw_text(&payload.to_string());
    }

    /// Sends a text frame as it is, JSON or not, on shard 0.
    pub fn send_raw_text(&self, text: &str) {
        self.shared.update(|s| s.push(Frame::Raw(text.into())));
    }

    /// Closes every shard's gateway connection abruptly (no close frame), as a network failure
    /// would.
    pub fn drop_connection(&self) {
        self.shared.update(|s| {
            for shard in &mut s.shards {
                shard.current_connection = 0;
                shard.live = false;
            }
            s.drops += 1;
        });
    }

    /// Makes IDENTIFY with the Message Content intent fail as Discord does when the intent is not
    /// enabled in the developer portal (close code 4014).
    pub fn refuse_message_content_intent(&self) {
        self.shared.update(|s| s.refuse_message_content = true);
    }

    /// Answers the next message create with 429 (per-route limit), as Discord does.
    pub fn fail_next_send_with_429(&self, retry_after_secs: f64) {
        self.shared
            .update(|s| s.pending_429.push_back((retry_after_secs, false)));
    }

    /// Answers the next message create with a global 429.
    pub fn fail_next_send_with_global_429(&self, retry_after_secs: f64) {
        self.shared
            .update(|s| s.pending_429.push_back((retry_after_secs, true)));
    }

    pub fn sent(&self) -> Vec<SentMessage> {
        self.shared.lock().sent.clone()
    }

    /// Channel ids of typing indicators, in order.
    pub fn typing(&self) -> Vec<String> {
        self.shared.lock().typing.clone()
    }

    /// When each 429 was answered.
    pub fn rate_limited(&self) -> Vec<Instant> {
        self.shared.lock().rate_limited.clone()
    }

    pub fn identifies(&self) -> Vec<Identify> {
        self.shared.lock().identifies.clone()
    }

    pub fn identify_count(&self) -> usize {
        self.shared.lock().identifies.len()
    }

    pub fn resumes(&self) -> Vec<Resume> {
        self.shared.lock().resumes.clone()
    }

    pub fn resume_count(&self) -> usize {
        self.shared.lock().resumes.len()
    }

    /// The query string of each gateway connection (`v`, `encoding`, `compress`).
    pub fn gateway_queries(&self) -> Vec<HashMap<String, String>> {
        self.shared.lock().gateway_queries.clone()
    }

    /// Every REST request so far, as `METHOD path -> status`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The dispatches the shards' connections sent, in order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.lock().deliveries.clone()
    }

    /// Whether a gateway connection is identified (or resumed) within `timeout`; a bool rather
    /// than a panic, so the caller can explain (with the daemon's logs, say).
    pub async fn connected_within(&self, timeout: Duration) -> bool {
        self.shard_connected_within(None, timeout).await
    }

    /// [`FakeDiscord::connected_within`] for `shard`'s connection (`None`: any shard's).
    pub async fn shard_connected_within(&self, shard: Option<usize>, timeout: Duration) -> bool {
        let mut changes = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let live = {
                let s = self.shared.lock();
                match shard {
                    None => s.any_live(),
                    Some(k) => s.shards.get(k).is_some_and(|g| g.live),
                }
            };
            if live {
                return true;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Waits until the bot has posted at least `n` messages; returns them all.
    pub async fn wait_for_sent(&self, n: usize, timeout: Duration) -> Vec<SentMessage> {
        self.wait_for(&format!("{n} sent message(s)"), timeout, |s| {
            (s.sent.len() >= n).then(|| s.sent.clone())
        })
        .await
    }

    /// Waits until `done` returns `Some` for the fake's state; panics after `timeout` with
    /// `what` and a summary of what the fake saw.
    async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&FakeState) -> Option<T>,
    ) -> T {
        let mut changes = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = done(&self.shared.lock()) {
                return v;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                panic!(
                    "fake Discord: no {what} within {timeout:?}; {}",
                    self.summary()
                );
            }
        }
    }

    /// What the fake saw, for failure messages.
    pub fn summary(&self) -> String {
        let s = self.shared.lock();
        format!(
            "identifies: {:?}, resumes: {}, drops: {}, live shards: {:?}, sent: {:?}, requests: {:?}",
            s.identifies.iter().map(|i| i.shard).collect::<Vec<_>>(),
            s.resumes.len(),
            s.drops,
            s.shards.iter().map(|g| g.live).collect::<Vec<_>>(),
            s.sent
                .iter()
                .map(|m| (
                    &m.channel_id,
                    &m.reply_to,
                    m.content.chars().take(40).collect::<String>()
                ))
                .collect::<Vec<_>>(),
            s.requests,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// REST

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(format!("Bot {}", shared.token).as_str())
}

fn record(shared: &Shared, line: String) {
    shared.update(|s| s.requests.push(line));
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"message": "401: Unauthorized", "code": 0})),
    )
        .into_response()
}

async fn rest_gateway(State(shared): State<Arc<Shared>>) -> Response {
    record(&shared, "GET /api/v10/gateway -> 200".into());
    Json(json!({"url": shared.gateway_url()})).into_response()
}

async fn rest_gateway_bot(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        record(&shared, "GET /api/v10/gateway/bot -> 401".into());
        return unauthorized();
    }
    record(&shared, "GET /api/v10/gateway/bot -> 200".into());
    let shards = shared.lock().shards.len();
    Json(json!({
        "url": shared.gateway_url(), "shards": shards,
        "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1},
    }))
    .into_response()
}

async fn rest_me(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        record(&shared, "GET /api/v10/users/@me -> 401".into());
        return unauthorized();
    }
    record(&shared, "GET /api/v10/users/@me -> 200".into());
    let mut me = shared.bot.to_json();
    me["verified"] = true.into();
    me["mfa_enabled"] = false.into();
    me["flags"] = 0.into();
    Json(me).into_response()
}

async fn rest_create_message(
    State(shared): State<Arc<Shared>>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("POST /api/v10/channels/{channel_id}/messages");
    if !authorized(&shared, &headers) {
        record(&shared, format!("{path} -> 401"));
        return unauthorized();
    }
    let pending_429 = shared.lock().pending_429.pop_front();
    if let Some((retry_after, global)) = pending_429 {
        record(&shared, format!("{path} -> 429"));
        shared.update(|s| s.rate_limited.push(Instant::now()));
        return rate_limited(retry_after, global);
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            record(&shared, format!("{path} -> 400"));
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"message": format!("400: Bad Request ({e})"), "code": 50109})),
            )
                .into_response();
        }
    };
    let content = request["content"].as_str().unwrap_or_default().to_string();
    if content.is_empty() || content.chars().count() > 2000 {
        record(&shared, format!("{path} -> 400"));
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "message": "Invalid Form Body", "code": 50035,
                "errors": {"content": {"_errors": [{"code": "BASE_TYPE_BAD_LENGTH", "message": "Must be between 1 and 2000 in length."}]}},
            })),
        )
            .into_response();
    }
    let reply_to = request["message_reference"]["message_id"]
        .as_str()
        .map(String::from)
        .or_else(|| {
            request["message_reference"]["message_id"]
                .as_u64()
                .map(|id| id.to_string())
        });
    let guild_id = shared.lock().guild_of_channel.get(&channel_id).cloned();
    let id = snowflake();
    let mut message = json!({
        "id": id, "channel_id": channel_id, "author": shared.bot.to_json(), "content": content,
        "timestamp": rfc3339(unix_ms()), "edited_timestamp": null, "tts": false,
        "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [],
        "embeds": [], "pinned": false, "type": if reply_to.is_some() { 19 } else { 0 },
        "flags": 0, "components": [],
    });
    if let Some(r) = &reply_to {
        message["message_reference"] =
            json!({"type": 0, "message_id": r, "channel_id": channel_id, "guild_id": guild_id});
    }
    let sent = SentMessage {
        id,
        channel_id: channel_id.clone(),
        content,
        reply_to,
        allowed_mentions: request["allowed_mentions"].clone(),
        at: Instant::now(),
    };
    // Discord tells the gateway about the bot's own messages too.
    let mut echoed = message.clone();
    if let Some(g) = guild_id {
        echoed["guild_id"] = g.into();
    }
    shared.update(|s| {
        s.requests.push(format!("{path} -> 200"));
        s.sent.push(sent);
        s.history.push(message.clone());
        s.push(Frame::Dispatch {
            t: "MESSAGE_CREATE".into(),
            d: echoed,
        });
    });
    Json(message).into_response()
}

/// A 429 as Discord sends it: JSON body with `retry_after` in seconds, and the same in headers.
fn rate_limited(retry_after: f64, global: bool) -> Response {
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": global})),
    )
        .into_response();
    let h = response.headers_mut();
    let value =
        |s: String| HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("0"));
    h.insert(
        "retry-after",
        value(format!("{}", retry_after.ceil() as u64)),
    );
    h.insert("x-ratelimit-limit", value("5".into()));
    h.insert("x-ratelimit-remaining", value("0".into()));
    h.insert(
        "x-ratelimit-reset",
        value(format!("{:.3}", unix_ms() as f64 / 1000.0 + retry_after)),
    );
    h.insert(
        "x-ratelimit-reset-after",
        value(format!("{retry_after:.3}")),
    );
    h.insert("x-ratelimit-bucket", value("fake-channel-messages".into()));
    h.insert(
        "x-ratelimit-scope",
        value(if global { "global" } else { "user" }.into()),
    );
    if global {
        h.insert("x-ratelimit-global", value("true".into()));
    }
    response
}

/// `GET /channels/{id}/messages?after=ID&limit=N`: newest first, as Discord answers.
async fn rest_channel_messages(
    State(shared): State<Arc<Shared>>,
    Path(channel_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = format!("GET /api/v10/channels/{channel_id}/messages");
    if !authorized(&shared, &headers) {
        record(&shared, format!("{path} -> 401"));
        return unauthorized();
    }
    let after: u64 = query.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(50)
        .clamp(1, 100);
    let id = |m: &Value| {
        m["id"]
            .as_str()
            .and_then(|i| i.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut page: Vec<Value> = shared
        .lock()
        .history
        .iter()
        .filter(|m| m["channel_id"].as_str() == Some(channel_id.as_str()) && id(m) > after)
        .cloned()
        .collect();
    page.sort_by_key(|m| std::cmp::Reverse(id(m)));
    page.truncate(limit);
    record(&shared, format!("{path} -> 200"));
    Json(Value::Array(page)).into_response()
}

async fn rest_typing(
    State(shared): State<Arc<Shared>>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("POST /api/v10/channels/{channel_id}/typing");
    if !authorized(&shared, &headers) {
        record(&shared, format!("{path} -> 401"));
        return unauthorized();
    }
    shared.update(|s| {
        s.requests.push(format!("{path} -> 204"));
        s.typing.push(channel_id);
    });
    StatusCode::NO_CONTENT.into_response()
}

/// The bot leaves a guild: recorded in [`FakeDiscord::requests`].
async fn rest_leave_guild(
    State(shared): State<Arc<Shared>>,
    Path(guild_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("DELETE /api/v10/users/@me/guilds/{guild_id}");
    if !authorized(&shared, &headers) {
        record(&shared, format!("{path} -> 401"));
        return unauthorized();
    }
    record(&shared, format!("{path} -> 204"));
    StatusCode::NO_CONTENT.into_response()
}

async fn rest_unknown(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    record(&shared, format!("{method} {uri} -> 404"));
    (
        StatusCode::NOT_FOUND,
        Json(json!({"message": "404: Not Found", "code": 0})),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Gateway

async fn gateway(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    shared.update(|s| s.gateway_queries.push(query.clone()));
    // Only what serenity uses: JSON text frames, no zlib-stream transport compression.
    if query.get("encoding").is_some_and(|e| e != "json") || query.contains_key("compress") {
        return (
            StatusCode::BAD_REQUEST,
            "fake Discord speaks JSON without transport compression",
        )
            .into_response();
    }
    let id = shared.update(|s| {
        s.connections_opened += 1;
        s.connections_opened
    });
    upgrade.on_upgrade(move |socket| async move {
        Connection {
            shared,
            socket,
            id,
            shard: None,
        }
        .run()
        .await
    })
}

/// One gateway WebSocket connection.
struct Connection {
    shared: Arc<Shared>,
    socket: WebSocket,
    id: u64,
    /// The shard it speaks for, from its IDENTIFY or RESUME.
    shard: Option<usize>,
}

/// What a connection does next.
enum Step {
    Continue,
    Close,
}

impl Connection {
    async fn run(mut self) {
        let mut changes = self.shared.changed.subscribe();
        let hello = json!({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}, "s": null, "t": null});
        if self.send(hello.to_string()).await.is_err() {
            return;
        }
        loop {
            // Superseded or dropped: close without a close frame.
            if !self.is_current() {
                return;
            }
            if self.deliver().await.is_err() {
                return;
            }
            tokio::select! {
                incoming = self.socket.recv() => match incoming {
                    Some(Ok(WsMessage::Text(text))) => {
                        if let Step::Close = self.on_payload(text.as_str()).await {
                            return;
                        }
                    }
                    Some(Ok(WsMessage::Close(_))) => {
                        // Reading on sends the close reply the client waits for.
                        let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.recv()).await;
                        self.went_away();
                        return;
                    }
                    Some(Err(_)) | None => {
                        self.went_away();
                        return;
                    }
                    Some(Ok(_)) => {}
                },
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn send(&mut self, text: String) -> Result<(), axum::Error> {
        self.socket.send(WsMessage::Text(text.into())).await
    }

    /// Not superseded by a newer connection of its shard, nor dropped (a connection not yet
    /// identified or resumed speaks for no shard and stays).
    fn is_current(&self) -> bool {
        self.shard
            .is_none_or(|k| self.shared.lock().shards[k].current_connection == self.id)
    }

    /// The connection closed: its shard, if it still speaks for it, has none live.
    fn went_away(&self) {
        if let Some(k) = self.shard {
            self.shared.update(|s| {
                let shard = &mut s.shards[k];
                if shard.current_connection == self.id {
                    shard.live = false;
                }
            });
        }
    }

    /// Takes `k`'s connection over (after IDENTIFY or RESUME): the one it had is superseded.
    fn speak_for(&mut self, k: usize) {
        self.shard = Some(k);
        self.shared.update(|s| {
            s.shards[k].current_connection = self.id;
            s.shards[k].live = false;
        });
    }

    /// Sends the log frames this connection has not sent yet, numbering dispatches.
    async fn deliver(&mut self) -> Result<(), axum::Error> {
        let Some(k) = self.shard else {
            return Ok(());
        };
        loop {
            // A plain lock: delivering changes nothing a test waits for, and a notification here
            // would wake this very connection again.
            let frame = {
                let mut guard = self.shared.lock();
                let state = &mut *guard;
                let s = &mut state.shards[k];
                if !s.live || s.current_connection != self.id || s.next_frame >= s.log.len() {
                    None
                } else {
                    let index = s.next_frame;
                    s.next_frame += 1;
                    s.delivered = s.delivered.max(s.next_frame);
                    let frame = s.log[index].clone();
                    Some(match frame {
                        Frame::Raw(text) => text,
                        Frame::Dispatch { t, d } => {
                            let session =
                                s.session.as_mut().expect("a live connection has a session");
                            session.seq += 1;
                            session.resume_points.push((session.seq, index + 1));
                            state.deliveries.push(Delivery {
                                shard: k,
                                event: t.clone(),
                                id: d["id"].as_str().map(String::from),
                            });
                            json!({"op": 0, "t": t, "s": session.seq, "d": d}).to_string()
                        }
                    })
                }
            };
            match frame {
                Some(text) => self.send(text).await?,
                None => return Ok(()),
            }
        }
    }

    async fn on_payload(&mut self, text: &str) -> Step {
        let Ok(payload) = serde_json::from_str::<Value>(text) else {
            return self.close(4002, "Decode error.").await;
        };
        match payload["op"].as_u64() {
            Some(1) => {
                self.send_or_close(json!({"op": 11, "d": null, "s": null, "t": null}))
                    .await
            }
            Some(2) => self.on_identify(&payload["d"]).await,
            Some(6) => self.on_resume(&payload["d"]).await,
            // Presence updates, member requests…: accepted and ignored.
            Some(_) => Step::Continue,
            None => self.close(4001, "Unknown opcode.").await,
        }
    }

    async fn on_identify(&mut self, d: &Value) -> Step {
        let identify = Identify {
            token: d["token"].as_str().unwrap_or_default().to_string(),
            intents: d["intents"].as_u64().unwrap_or(0),
            shard: d["shard"]
                .as_array()
                .and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?))),
        };
        let token_ok = identify
            .token
            .strip_prefix("Bot ")
            .unwrap_or(&identify.token)
            == self.shared.token;
        let refuse_content = self.shared.lock().refuse_message_content;
        let intents = identify.intents;
        let (shard, of) = identify.shard.unwrap_or((0, 1));
        self.shared.update(|s| s.identifies.push(identify));
        if !token_ok {
            return self.close(4004, "Authentication failed.").await;
        }
        if refuse_content && intents & INTENT_MESSAGE_CONTENT != 0 {
            return self.close(4014, "Disallowed intent(s).").await;
        }
        let total = self.shared.lock().shards.len();
        if of != total as u64 || shard >= of {
            return self.close(4010, "Invalid shard.").await;
        }
        let k = shard as usize;
        self.speak_for(k);
        let (session_id, guilds) = self.shared.update(|s| {
            s.sessions_started += 1;
            let id = format!("fake-session-{}", s.sessions_started);
            let guilds: Vec<(String, Vec<String>)> = s
                .guilds
                .iter()
                .filter(|(g, _)| shard_of(g, total) == k)
                .cloned()
                .collect();
            // READY is `s` 1; GUILD_CREATEs, when the GUILDS intent asks for them, follow it.
            let creates = if intents & INTENT_GUILDS != 0 {
                guilds.len() as u64
            } else {
                0
            };
            let g = &mut s.shards[k];
            g.session = Some(Session {
                id: id.clone(),
                seq: 1 + creates,
                resume_points: (1..=1 + creates).map(|q| (q, g.delivered)).collect(),
            });
            // A new session starts after everything any earlier connection delivered.
            g.next_frame = g.delivered;
            g.live = true;
            (id, guilds)
        });
        let listed: Vec<Value> = guilds
            .iter()
            .map(|(g, _)| json!({"id": g, "unavailable": true}))
            .collect();
        let ready = json!({
            "op": 0, "t": "READY", "s": 1,
            "d": {
                "v": 10, "user": self.shared.bot.to_json(), "guilds": listed,
                "session_id": session_id, "resume_gateway_url": self.shared.gateway_url(),
                "shard": [k, total], "application": {"id": BOT_USER_ID, "flags": 0},
                "private_channels": [], "relationships": [], "presences": [],
                "geo_ordered_rtc_regions": [],
            }
        });
        if let Step::Close = self.send_or_close(ready).await {
            return Step::Close;
        }
        if intents & INTENT_GUILDS == 0 {
            return Step::Continue;
        }
        for (seq, (guild, channels)) in (2..).zip(&guilds) {
            let d = guild_create(guild, channels);
            self.shared.update(|s| {
                s.deliveries.push(Delivery {
                    shard: k,
                    event: "GUILD_CREATE".into(),
                    id: Some(guild.clone()),
                })
            });
            let create = json!({"op": 0, "t": "GUILD_CREATE", "s": seq, "d": d});
            if let Step::Close = self.send_or_close(create).await {
                return Step::Close;
            }
        }
        Step::Continue
    }

    async fn on_resume(&mut self, d: &Value) -> Step {
        let resume = Resume {
            session_id: d["session_id"].as_str().unwrap_or_default().to_string(),
            seq: d["seq"].as_u64().unwrap_or(0),
        };
        let token = d["token"].as_str().unwrap_or_default();
        let token_ok = token.strip_prefix("Bot ").unwrap_or(token) == self.shared.token;
        let (session_id, seq) = (resume.session_id.clone(), resume.seq);
        self.shared.update(|s| s.resumes.push(resume));
        if !token_ok {
            return self.close(4004, "Authentication failed.").await;
        }
        // The shard whose session it is, if the client's `seq` is one it was sent.
        let resumable = self.shared.lock().shards.iter().position(|g| {
            g.session.as_ref().is_some_and(|x| {
                x.id == session_id && x.resume_points.iter().any(|(s, _)| *s == seq)
            })
        });
        let Some(k) = resumable else {
            // Not resumable: Discord answers INVALID_SESSION (d: false), the client re-identifies.
            return self
                .send_or_close(json!({"op": 9, "d": false, "s": null, "t": null}))
                .await;
        };
        self.speak_for(k);
        self.shared.update(|s| {
            let g = &mut s.shards[k];
            let session = g.session.as_ref().expect("resumable session");
            if let Some((_, next)) = session.resume_points.iter().find(|(s, _)| *s == seq) {
                g.next_frame = *next;
            }
            g.live = true;
        });
        // Replay what the client missed, then RESUMED.
        if self.deliver().await.is_err() {
            return Step::Close;
        }
        let seq = self.shared.update(|s| {
            let g = &mut s.shards[k];
            let session = g.session.as_mut().expect("resumed session");
            session.seq += 1;
            session.resume_points.push((session.seq, g.next_frame));
            session.seq
        });
        self.send_or_close(json!({"op": 0, "t": "RESUMED", "s": seq, "d": {}}))
            .await
    }

    async fn send_or_close(&mut self, payload: Value) -> Step {
        match self.send(payload.to_string()).await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close,
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) -> Step {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = self.socket.send(WsMessage::Close(Some(frame))).await;
        self.went_away();
        Step::Close
    }
}

/// A GUILD_CREATE's `d`: the guild with its text channels, as much of it as serenity reads.
fn guild_create(guild_id: &str, channels: &[String]) -> Value {
    let channels: Vec<Value> = channels
        .iter()
        .enumerate()
        .map(|(position, id)| {
            json!({
                "id": id, "type": 0, "guild_id": guild_id, "name": format!("channel-{position}"),
                "position": position, "permission_overwrites": [], "nsfw": false,
                "parent_id": null, "topic": null, "last_message_id": null,
                "rate_limit_per_user": 0, "flags": 0,
            })
        })
        .collect();
    // Two parts: one `json!` this long exceeds the macro's recursion limit.
    let mut guild = json!({
        "id": guild_id, "name": format!("guild {guild_id}"), "icon": null, "icon_hash": null,
        "splash": null, "discovery_splash": null, "owner_id": "2000000000000000999",
        "afk_channel_id": null, "afk_timeout": 300, "widget_enabled": false,
        "verification_level": 0, "default_message_notifications": 0,
        "explicit_content_filter": 0, "roles": [], "emojis": [], "features": [], "mfa_level": 0,
        "application_id": null, "system_channel_id": null, "system_channel_flags": 0,
        "rules_channel_id": null, "max_members": 500_000, "vanity_url_code": null,
    });
    let create_fields = json!({
        "description": null, "banner": null, "premium_tier": 0,
        "premium_subscription_count": 0, "preferred_locale": "en-US",
        "public_updates_channel_id": null, "nsfw_level": 0, "stickers": [],
        "premium_progress_bar_enabled": false, "safety_alerts_channel_id": null,
        "joined_at": rfc3339(unix_ms() - 86_400_000), "large": false, "unavailable": false,
        "member_count": 2, "voice_states": [], "members": [], "channels": channels,
        "threads": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
        "incidents_data": null,
    });
    if let (Some(g), Some(more)) = (guild.as_object_mut(), create_fields.as_object()) {
        g.extend(more.clone());
    }
    guild
}

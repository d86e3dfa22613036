//! A fake Telegram Bot API on 127.0.0.1: a real HTTP server (axum) that answers
//! `POST /bot<TOKEN>/<method>` with JSON bodies the way api.telegram.org does, so the daemon's real
//! teloxide client talks to it unchanged. It implements `getMe`, `getUpdates` (long polling,
//! capped at one second), `sendMessage`, `sendChatAction`, `setWebhook` and `deleteWebhook`; tests
//! queue updates, read what the bot sent, and inject failures (429 flood control, Markdown
//! rejection). While a webhook is set, `getUpdates` is refused with 409 Conflict, as the Bot API
//! does; the fake posts nothing to the webhook (tests post updates to the daemon themselves).
//!
//! Bodies are read as JSON, and as multipart/form-data text fields: teloxide sends `setWebhook` as
//! a form (it may carry a certificate file), every other method kaiwa uses as JSON.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::daemon::Peer;

/// The longest a `getUpdates` call waits for news, whatever timeout it asked for: keeps tests
/// fast and shutdown prompt.
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);

/// Telegram's limit on a message's text, in characters.
const MAX_TEXT_CHARS: usize = 4096;

/// The bot token the fake accepts when [`spawn_daemon`](super::daemon::spawn_daemon) starts it;
/// shaped like a real one (35-character secret), so teloxide treats it as it would in production.
pub const TOKEN: &str = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw7";

/// The bot account the fake serves.
pub const BOT_ID: i64 = 7_000_000_001;
pub const BOT_USERNAME: &str = "kaiwa_test_bot";

/// Put in a message's text, it reaches the bot as a lone UTF-16 surrogate escape (`\ud800`),
/// which no JSON parser accepts: the poison a real Bot API answer once carried.
pub const LONE_SURROGATE: &str = "\u{E000}lone-surrogate\u{E000}";

/// One `sendMessage` call the fake accepted.
#[derive(Debug, Clone)]
pub struct SentMessage {
    pub chat_id: i64,
    pub text: String,
    pub parse_mode: Option<String>,
    /// From `reply_parameters.message_id` (or the legacy `reply_to_message_id`).
    pub reply_to_message_id: Option<i64>,
    pub message_thread_id: Option<i64>,
    /// The Message object the fake answered with (use it to reply to the bot).
    pub message: Value,
}

impl SentMessage {
    pub fn message_id(&self) -> i64 {
        self.message["message_id"]
            .as_i64()
            .expect("sent message has an id")
    }
}

/// One `setWebhook` call, as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SetWebhookCall {
    pub url: String,
    pub secret_token: Option<String>,
    pub allowed_updates: Option<Vec<String>>,
    pub drop_pending_updates: Option<bool>,
}

/// What the Bot API answers `getUpdates` with while a webhook is set.
pub const WEBHOOK_IS_ACTIVE: &str = "Conflict: can't use getUpdates method while webhook is \
                                     active; use deleteWebhook to delete the webhook first";

/// One `sendChatAction` call.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatActionCall {
    pub chat_id: i64,
    pub action: String,
    pub message_thread_id: Option<i64>,
}

#[derive(Default)]
struct Inner {
    /// Raw updates not yet confirmed by an offset.
    updates: Vec<Value>,
    next_update_id: i64,
    next_message_id: i64,
    /// Chats seen in pushed updates, to answer with the right chat object.
    chats: HashMap<i64, Value>,
    /// Messages by `(chat id, message id)`, so replies can quote them.
    messages: HashMap<(i64, i64), Value>,
    sent: Vec<SentMessage>,
    chat_actions: Vec<ChatActionCall>,
    send_attempts: usize,
    fail_with_429: VecDeque<u32>,
    /// A 429 storm: 3 of every 10 send attempts are refused with this `retry_after`.
    storm: Option<u32>,
    /// The next this many `sendMessage` attempts get a 502 page.
    fail_with_502: usize,
    /// The whole API is down: every request gets a 502 page (what a proxy in front of an
    /// unavailable Bot API answers).
    down: bool,
    requests_while_down: usize,
    reject_markdown: usize,
    markdown_rejections: usize,
    unauthorized_requests: usize,
    /// Requests per method name, as sent.
    calls: HashMap<String, usize>,
    last_offset: Option<i64>,
    /// The `allowed_updates` of the latest `getUpdates` that gave one (the Bot API keeps it).
    allowed_updates: Option<Vec<String>>,
    /// Every `setWebhook`, in order; the webhook is set from the first until a `deleteWebhook`.
    set_webhooks: Vec<SetWebhookCall>,
    webhook_set: bool,
    delete_webhooks: usize,
}

struct Shared {
    token: String,
    inner: Mutex<Inner>,
    /// Wakes a waiting `getUpdates` when an update is pushed.
    news: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the fake's state from the others.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The running fake; the server stops when this is dropped.
pub struct FakeTelegram {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl FakeTelegram {
    /// Starts the fake on a random loopback port, accepting `token`.
    pub async fn start(token: &str) -> FakeTelegram {
        let shared = Arc::new(Shared {
            token: token.to_string(),
            inner: Mutex::new(Inner {
                next_update_id: 1,
                next_message_id: 1,
                ..Inner::default()
            }),
            news: Notify::new(),
        });
        let app = Router::new()
            .route("/{bot}/{method}", post(api))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Telegram");
        let addr = listener.local_addr().expect("fake Telegram address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeTelegram {
            shared,
            addr,
            server,
        }
    }

    /// The API base to give the bot (`TELEGRAM_API_URL`): teloxide appends `/bot<TOKEN>/<method>`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Queues a raw update (it may be malformed). Ids of later generated updates follow its
    /// `update_id`, if it has a numeric one.
    pub fn push_update(&self, update: Value) {
        self.push_updates(vec![update]);
    }

    /// Queues several raw updates at once, so one `getUpdates` answer carries them all.
    pub fn push_updates(&self, updates: Vec<Value>) {
        {
            let mut inner = self.shared.lock();
            for update in updates {
                if let Some(id) = update.get("update_id").and_then(Value::as_i64) {
                    inner.next_update_id = inner.next_update_id.max(id + 1);
                }
                inner.updates.push(update);
            }
        }
        self.shared.news.notify_waiters();
    }

    /// Wraps a message (from [`FakeTelegram::message`]) in an update with a fresh id and queues it;
    /// returns the update (to push it again).
    pub fn push_message(&self, message: &Value) -> Value {
        let update = self.message_update(message);
        self.push_update(update.clone());
        update
    }

    /// An update carrying `message`, with a fresh update id, not yet queued.
    pub fn message_update(&self, message: &Value) -> Value {
        let mut inner = self.shared.lock();
        let id = inner.next_update_id;
        inner.next_update_id += 1;
        json!({"update_id": id, "message": message})
    }

    /// A realistic text message from `from` in `chat`, with a fresh message id and the
    /// entities Telegram would add (`@mentions`, a leading `/command`). Not queued yet.
    pub fn message(&self, chat: &Value, from: &Value, text: &str) -> Value {
        let mut inner = self.shared.lock();
        let id = inner.next_message_id;
        inner.next_message_id += 1;
        let chat_id = chat["id"].as_i64().expect("chat has an id");
        inner.chats.insert(chat_id, chat.clone());
        let mut message = json!({
            "message_id": id,
            "from": from,
            "chat": chat,
            "date": unix_now(),
            "text": text,
        });
        let entities = entities_of(text);
        if !entities.is_empty() {
            message["entities"] = Value::Array(entities);
        }
        inner.messages.insert((chat_id, id), message.clone());
        message
    }

    /// Everything the bot sent with `sendMessage`, in order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.shared.lock().sent.clone()
    }

    /// What the bot sent to one chat.
    pub fn sent_to(&self, chat_id: i64) -> Vec<SentMessage> {
        self.sent()
            .into_iter()
            .filter(|s| s.chat_id == chat_id)
            .collect()
    }

    /// Every `sendMessage` call, including refused ones.
    pub fn send_attempts(&self) -> usize {
        self.shared.lock().send_attempts
    }

    pub fn chat_actions(&self) -> Vec<ChatActionCall> {
        self.shared.lock().chat_actions.clone()
    }

    /// Requests made with a token other than the one the fake was started with.
    pub fn unauthorized_requests(&self) -> usize {
        self.shared.lock().unauthorized_requests
    }

    /// The `offset` of the latest `getUpdates` call: updates below it are confirmed.
    pub fn last_offset(&self) -> Option<i64> {
        self.shared.lock().last_offset
    }

    /// Markdown sends refused through [`FakeTelegram::reject_markdown_next`] so far.
    pub fn markdown_rejections(&self) -> usize {
        self.shared.lock().markdown_rejections
    }

    /// The next `sendMessage` gets HTTP 429 with `retry_after` (flood control).
    pub fn fail_next_send_with_429(&self, retry_after_secs: u32) {
        self.shared.lock().fail_with_429.push_back(retry_after_secs);
    }

    /// The next `n` `sendMessage` attempts get HTTP 502 with an HTML page.
    pub fn fail_next_sends_with_502(&self, n: usize) {
        self.shared.lock().fail_with_502 += n;
    }

    /// Takes the whole API down (every request gets HTTP 502 with an HTML page) or back up.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    /// Requests that came while the API was down.
    pub fn requests_while_down(&self) -> usize {
        self.shared.lock().requests_while_down
    }

    /// From now on, 3 of every 10 `sendMessage` attempts get HTTP 429 with `retry_after`.
    pub fn rate_limit_storm(&self, retry_after_secs: u32) {
        self.shared.lock().storm = Some(retry_after_secs);
    }

    /// The next `sendMessage` that has a `parse_mode` gets 400 "can't parse entities".
    pub fn reject_markdown_next(&self) {
        self.shared.lock().reject_markdown += 1;
    }

    /// Every `setWebhook` call, in order.
    pub fn set_webhooks(&self) -> Vec<SetWebhookCall> {
        self.shared.lock().set_webhooks.clone()
    }

    /// `deleteWebhook` calls.
    pub fn delete_webhooks(&self) -> usize {
        self.shared.lock().delete_webhooks
    }

    /// Sets a webhook as another deployment would have: `getUpdates` is refused from now on.
    pub fn set_webhook_elsewhere(&self, url: &str) {
        let mut inner = self.shared.lock();
        inner.webhook_set = true;
        inner.set_webhooks.push(SetWebhookCall {
            url: url.to_string(),
            secret_token: None,
            allowed_updates: None,
            drop_pending_updates: None,
        });
    }

    /// Requests made with `method` (as the Bot API names it, any case).
    pub fn calls(&self, method: &str) -> usize {
        let inner = self.shared.lock();
        inner
            .calls
            .iter()
            .filter(|(m, _)| m.eq_ignore_ascii_case(method))
            .map(|(_, n)| n)
            .sum()
    }

    /// Waits until the bot has sent at least `n` messages; panics after `timeout`.
    pub async fn wait_for_sent(&self, n: usize, timeout: Duration) -> Vec<SentMessage> {
        self.wait_until(timeout, &format!("{n} sent message(s)"), |f| {
            f.sent().len() >= n
        })
        .await;
        self.sent()
    }

    /// Polls `done` every 20 ms until it holds; panics after `timeout`, naming `what`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&FakeTelegram) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            if tokio::time::Instant::now() >= deadline {
                let inner = self.shared.lock();
                let sent: Vec<_> = inner
                    .sent
                    .iter()
                    .map(|s| (s.chat_id, s.text.chars().take(40).collect::<String>()))
                    .collect();
                panic!(
                    "fake Telegram: waited {timeout:?} for {what}; sent {sent:?}; \
                     {} sendMessage attempt(s); requests by method {:?}; \
                     {} with a wrong token; last offset {:?}; {} update(s) unconfirmed",
                    inner.send_attempts,
                    inner.calls,
                    inner.unauthorized_requests,
                    inner.last_offset,
                    inner.updates.len(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Peer for FakeTelegram {
    async fn start() -> FakeTelegram {
        FakeTelegram::start(TOKEN).await
    }

    fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TELEGRAM_TOKEN", self.shared.token.clone()),
            ("TELEGRAM_API_URL", self.url()),
        ]
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A user object.
pub fn user(id: i64, first_name: &str) -> Value {
    json!({"id": id, "is_bot": false, "first_name": first_name, "language_code": "en"})
}

/// The private chat between the bot and `user`.
pub fn private_chat(user: &Value) -> Value {
    json!({"id": user["id"], "type": "private", "first_name": user["first_name"]})
}

/// A supergroup (ids of supergroups are negative, -100…).
pub fn group_chat(id: i64, title: &str) -> Value {
    json!({"id": id, "type": "supergroup", "title": title})
}

/// `message`, made a reply to `replied` (as Telegram nests it: one level deep).
pub fn replying_to(message: &Value, replied: &Value) -> Value {
    let mut replied = replied.clone();
    if let Some(object) = replied.as_object_mut() {
        object.remove("reply_to_message");
    }
    let mut message = message.clone();
    message["reply_to_message"] = replied;
    message
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The entities Telegram adds to plain text: `mention` for `@name`, `bot_command` for a leading
/// `/cmd[@name]`. Offsets and lengths are in UTF-16 code units, as in the real API.
fn entities_of(text: &str) -> Vec<Value> {
    let mut entities = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let utf16_at = |i: usize| chars[..i].iter().map(|c| c.len_utf16()).sum::<usize>();
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || chars[i - 1].is_whitespace();
        if starts_word && (chars[i] == '@' || (chars[i] == '/' && i == 0)) {
            let mut end = i + 1;
            while end < chars.len()
                && (is_name(chars[end]) || (chars[i] == '/' && chars[end] == '@'))
            {
                end += 1;
            }
            if end > i + 1 {
                let kind = if chars[i] == '@' {
                    "mention"
                } else {
                    "bot_command"
                };
                let offset = utf16_at(i);
                entities.push(
                    json!({"type": kind, "offset": offset, "length": utf16_at(end) - offset}),
                );
            }
            i = end;
        } else {
            i += 1;
        }
    }
    entities
}

/// An error answer as Telegram gives it.
fn api_error(status: StatusCode, description: &str) -> Response {
    let body = json!({"ok": false, "error_code": status.as_u16(), "description": description});
    (status, Json(body)).into_response()
}

fn ok(result: Value) -> Response {
    (StatusCode::OK, Json(json!({"ok": true, "result": result}))).into_response()
}

async fn api(
    State(shared): State<Arc<Shared>>,
    Path((bot, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    *shared.lock().calls.entry(method.clone()).or_default() += 1;
    {
        let mut inner = shared.lock();
        let fail_send = method.eq_ignore_ascii_case("sendmessage") && inner.fail_with_502 > 0;
        if inner.down || fail_send {
            if inner.down {
                inner.requests_while_down += 1;
            } else {
                inner.fail_with_502 -= 1;
            }
            return bad_gateway();
        }
    }
    if bot.strip_prefix("bot") != Some(shared.token.as_str()) {
        shared.lock().unauthorized_requests += 1;
        return api_error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let params = if body.is_empty() {
        Some(json!({}))
    } else if let Some(boundary) = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| rest.split_once("boundary="))
        .map(|(_, b)| b.trim_matches('"'))
    {
        form_fields(&body, boundary)
    } else {
        serde_json::from_slice(&body).ok()
    };
    let Some(params) = params else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: the fake Bot API reads JSON and form text fields only",
        );
    };
    // Method names are case-insensitive in the Bot API, and teloxide sends them as `GetMe`.
    match method.to_ascii_lowercase().as_str() {
        "getme" => ok(json!({
            "id": BOT_ID, "is_bot": true, "first_name": "Kaiwa", "username": BOT_USERNAME,
            "can_join_groups": true, "can_read_all_group_messages": false,
            "supports_inline_queries": false, "can_connect_to_business": false,
            "has_main_web_app": false,
        })),
        "getupdates" => get_updates(&shared, &params).await,
        "setwebhook" => set_webhook(&shared, &params),
        "deletewebhook" => {
            let mut inner = shared.lock();
            inner.delete_webhooks += 1;
            inner.webhook_set = false;
            ok(json!(true))
        }
        "sendmessage" => send_message(&shared, &params),
        "sendchataction" => send_chat_action(&shared, &params),
        _ => api_error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// What nginx answers for an upstream that is down.
fn bad_gateway() -> Response {
    (
        StatusCode::BAD_GATEWAY,
        [("content-type", "text/html")],
        "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
         <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n\
         </body>\r\n</html>\r\n",
    )
        .into_response()
}

/// The text fields of a multipart/form-data body, as a JSON object of strings; `None` when it
/// is not one.
fn form_fields(body: &[u8], boundary: &str) -> Option<Value> {
    let body = std::str::from_utf8(body).ok()?;
    let mut fields = serde_json::Map::new();
    for part in body.split(&format!("--{boundary}")).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let (head, value) = part.split_once("\r\n\r\n")?;
        let name = head.split("name=\"").nth(1)?.split('"').next()?;
        let value = value.strip_suffix("\r\n").unwrap_or(value);
        fields.insert(name.to_string(), Value::String(value.to_string()));
    }
    Some(Value::Object(fields))
}

fn set_webhook(shared: &Shared, params: &Value) -> Response {
    let text = |key: &str| params.get(key).and_then(Value::as_str).map(str::to_string);
    let Some(url) = text("url") else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: bad webhook: url is empty",
        );
    };
    let call = SetWebhookCall {
        url,
        secret_token: text("secret_token"),
        allowed_updates: params.get("allowed_updates").and_then(allowed_list),
        // A form sends it as text, JSON as a boolean.
        drop_pending_updates: params
            .get("drop_pending_updates")
            .map(|v| v == &json!(true) || v == "true"),
    };
    let mut inner = shared.lock();
    inner.webhook_set = true;
    inner.set_webhooks.push(call);
    ok(json!(true))
}

async fn get_updates(shared: &Shared, params: &Value) -> Response {
    if shared.lock().webhook_set {
        return api_error(StatusCode::CONFLICT, WEBHOOK_IS_ACTIVE);
    }
    let offset = params.get("offset").and_then(Value::as_i64).unwrap_or(0);
    let limit = params
        .get("limit")
        .and_then(Value::as_u64)
        .unwrap_or(100)
        .clamp(1, 100) as usize;
    let asked = Duration::from_secs(params.get("timeout").and_then(Value::as_u64).unwrap_or(0));
    let deadline = tokio::time::Instant::now() + asked.min(MAX_POLL_WAIT);
    {
        let mut inner = shared.lock();
        inner.last_offset = Some(offset);
        if let Some(list) = params.get("allowed_updates").and_then(allowed_list) {
            inner.allowed_updates = Some(list);
        }
    }
    loop {
        // Registered before looking, so a push between the look and the wait is not missed.
        let news = shared.news.notified();
        tokio::pin!(news);
        news.as_mut().enable();
        {
            let mut inner = shared.lock();
            // An update is confirmed (and forgotten) once polled with a higher offset.
            if offset > 0 {
                inner.updates.retain(|u| {
                    u.get("update_id")
                        .and_then(Value::as_i64)
                        .is_none_or(|id| id >= offset)
                });
            }
            // As the Bot API does, drop what the bot did not ask for: by default everything but
            // `chat_member`, `message_reaction` and `message_reaction_count`.
            let allowed = inner.allowed_updates.clone();
            inner.updates.retain(|u| is_allowed(u, allowed.as_deref()));
            if !inner.updates.is_empty() {
                let batch: Vec<Value> = inner.updates.iter().take(limit).cloned().collect();
                // Updates without a usable id can never be confirmed; hand them out once.
                inner
                    .updates
                    .retain(|u| u.get("update_id").and_then(Value::as_i64).is_some());
                let body = json!({"ok": true, "result": batch})
                    .to_string()
                    .replace(LONE_SURROGATE, "\\ud800");
                return (
                    StatusCode::OK,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response();
            }
        }
        if tokio::time::timeout_at(deadline, news).await.is_err() {
            return ok(json!([]));
        }
    }
}

/// `allowed_updates` as sent: a JSON array, or (form-encoded) a string holding one.
fn allowed_list(v: &Value) -> Option<Vec<String>> {
    let parsed;
    let array = match v {
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s).ok()?;
            parsed.as_array()?
        }
        v => v.as_array()?,
    };
    let list: Vec<String> = array
        .iter()
        .filter_map(|x| x.as_str().map(String::from))
        .collect();
    (!list.is_empty()).then_some(list)
}

fn is_allowed(update: &Value, allowed: Option<&[String]>) -> bool {
    let Some(kind) = update
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "update_id"))
    else {
        return true; // malformed updates are delivered as they are
    };
    match allowed {
        Some(list) => list.iter().any(|a| a == kind),
        None => !matches!(
            kind.as_str(),
            "chat_member" | "message_reaction" | "message_reaction_count"
        ),
    }
}

fn int(params: &Value, key: &str) -> Option<i64> {
    params.get(key).and_then(Value::as_i64)
}

fn send_message(shared: &Shared, params: &Value) -> Response {
    let mut inner = shared.lock();
    inner.send_attempts += 1;
    let Some(chat_id) = int(params, "chat_id") else {
        return api_error(StatusCode::BAD_REQUEST, "Bad Request: chat not found");
    };
    let text = params
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if text.trim().is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: message text is empty",
        );
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return api_error(StatusCode::BAD_REQUEST, "Bad Request: message is too long");
    }
    let stormed = inner
        .storm
        .filter(|_| matches!(inner.send_attempts % 10, 1 | 4 | 7));
    if let Some(retry_after) = inner.fail_with_429.pop_front().or(stormed) {
        let body = json!({
            "ok": false, "error_code": 429,
            "description": format!("Too Many Requests: retry after {retry_after}"),
            "parameters": {"retry_after": retry_after},
        });
        return (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    }
    let parse_mode = params
        .get("parse_mode")
        .and_then(Value::as_str)
        .map(str::to_string);
    if parse_mode.is_some() && inner.reject_markdown > 0 {
        inner.reject_markdown -= 1;
        inner.markdown_rejections += 1;
        return api_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: can't parse entities: \
             Can't find end of the entity starting at byte offset 0",
        );
    }
    let reply_parameters = params.get("reply_parameters");
    let reply_to_message_id = reply_parameters
        .and_then(|r| int(r, "message_id"))
        .or_else(|| int(params, "reply_to_message_id"));
    let allow_without_reply = reply_parameters
        .and_then(|r| r.get("allow_sending_without_reply"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let replied = reply_to_message_id.and_then(|id| inner.messages.get(&(chat_id, id)).cloned());
    if reply_to_message_id.is_some() && replied.is_none() && !allow_without_reply {
        return api_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: message to be replied not found",
        );
    }
    let message_thread_id = int(params, "message_thread_id");

    let id = inner.next_message_id;
    inner.next_message_id += 1;
    let chat = inner
        .chats
        .get(&chat_id)
        .cloned()
        .unwrap_or_else(|| json!({"id": chat_id, "type": "private"}));
    let mut message = json!({
        "message_id": id,
        "from": {"id": BOT_ID, "is_bot": true, "first_name": "Kaiwa", "username": BOT_USERNAME},
        "chat": chat,
        "date": unix_now(),
        "text": text,
    });
    if let Some(mut replied) = replied {
        if let Some(object) = replied.as_object_mut() {
            object.remove("reply_to_message");
        }
        message["reply_to_message"] = replied;
    }
    if let Some(thread) = message_thread_id {
        message["message_thread_id"] = json!(thread);
        message["is_topic_message"] = json!(true);
    }
    inner.messages.insert((chat_id, id), message.clone());
    inner.sent.push(SentMessage {
        chat_id,
        text,
        parse_mode,
        reply_to_message_id,
        message_thread_id,
        message: message.clone(),
    });
    ok(message)
}

fn send_chat_action(shared: &Shared, params: &Value) -> Response {
    let Some(chat_id) = int(params, "chat_id") else {
        return api_error(StatusCode::BAD_REQUEST, "Bad Request: chat not found");
    };
    let action = params
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    shared.lock().chat_actions.push(ChatActionCall {
        chat_id,
        action,
        message_thread_id: int(params, "message_thread_id"),
    });
    ok(json!(true))
}

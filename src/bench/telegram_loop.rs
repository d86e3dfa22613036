//! A loopback Telegram Bot API for `kaiwa bench bot --through telegram`: a real HTTP server on
//! 127.0.0.1 that answers `getMe`, `getUpdates` (long polling), `sendMessage` and
//! `sendChatAction` as api.telegram.org does, so the benchmark drives kaiwa's real Telegram
//! adapter (teloxide, JSON over HTTP) and notes when each reply arrives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// The longest a `getUpdates` call waits here for news.
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Inner {
    updates: Vec<Value>,
    next_update_id: i64,
    next_message_id: i64,
    /// Replies by the message id they answer: when they came and their text.
    replies: HashMap<i64, (Instant, String)>,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    news: Notify,
    replied: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running loopback API; the server stops when this is dropped.
pub struct LoopbackTelegram {
    shared: Arc<Shared>,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for LoopbackTelegram {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl LoopbackTelegram {
    pub async fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        shared.lock().next_message_id = 1;
        let app = Router::new()
            .route("/{bot}/{method}", post(api))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(LoopbackTelegram {
            shared,
            url,
            server,
        })
    }

    /// The API base to give the adapter (`TELEGRAM_API_URL`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A person writes `text` in their private chat `chat_id`; returns the message's id.
    pub fn write(&self, chat_id: i64, text: &str) -> i64 {
        let id = {
            let mut inner = self.shared.lock();
            let (update_id, message_id) = (inner.next_update_id, inner.next_message_id);
            inner.next_update_id += 1;
            inner.next_message_id += 1;
            let person = json!({"id": chat_id, "is_bot": false, "first_name": "person"});
            let chat = json!({"id": chat_id, "type": "private", "first_name": "person"});
            inner.updates.push(json!({
                "update_id": update_id,
                "message": {"message_id": message_id, "date": unix_now(), "chat": chat,
                            "from": person, "text": text},
            }));
            message_id
        };
        self.shared.news.notify_waiters();
        id
    }

    /// When the reply to `message_id` arrived, and its text; `None` after `limit`.
    pub async fn reply_to(&self, message_id: i64, limit: Duration) -> Option<(Instant, String)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.replied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.shared.lock().replies.get(&message_id) {
                return Some(r.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

fn unix_now() -> i64 {
    crate::store::now_ms() / 1000
}

fn ok(result: Value) -> Json<Value> {
    Json(json!({"ok": true, "result": result}))
}

async fn api(
    State(shared): State<Arc<Shared>>,
    Path((_bot, method)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Json<Value> {
    let params: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    match method.to_ascii_lowercase().as_str() {
        "getme" => ok(json!({
            "id": 7_000_000_001_i64, "is_bot": true, "first_name": "Kaiwa",
            "username": "kaiwa_bench_bot", "can_join_groups": true,
            "can_read_all_group_messages": false, "supports_inline_queries": false,
            "can_connect_to_business": false, "has_main_web_app": false,
        })),
        "getupdates" => {
            let offset = params["offset"].as_i64().unwrap_or(0);
            let deadline = tokio::time::Instant::now()
                + MAX_POLL_WAIT.min(Duration::from_secs(params["timeout"].as_u64().unwrap_or(0)));
            loop {
                let notified = shared.news.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let ready: Vec<Value> = {
                    let mut inner = shared.lock();
                    inner
                        .updates
                        .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
                    inner.updates.clone()
                };
                if !ready.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return ok(Value::Array(ready));
                }
            }
        }
        "sendmessage" => {
            let chat_id = params["chat_id"].as_i64().unwrap_or(0);
            let text = params["text"].as_str().unwrap_or_default().to_string();
            let answered = params["reply_parameters"]["message_id"].as_i64();
            let message_id = {
                let mut inner = shared.lock();
                let id = inner.next_message_id;
                inner.next_message_id += 1;
                if let Some(m) = answered {
                    inner.replies.insert(m, (Instant::now(), text.clone()));
                }
                id
            };
            shared.replied.notify_waiters();
            ok(json!({
                "message_id": message_id, "date": unix_now(), "text": text,
                "chat": {"id": chat_id, "type": "private", "first_name": "person"},
                "from": {"id": 7_000_000_001_i64, "is_bot": true, "first_name": "Kaiwa",
                         "username": "kaiwa_bench_bot"},
            }))
        }
        "sendchataction" => ok(json!(true)),
        _ => Json(json!({"ok": false, "error_code": 404, "description": "Not Found"})),
    }
}

//! The web server: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`), a chat page
//! at `/`, `/health` and `/metrics`, on axum.
//!
//! Replies come from the same [`Bot`] as on Discord and Telegram: the same reply engine, the
//! same store (platform `web`, one channel per API key and session) and the same generation
//! slots and queue, so the bots and the web never run more generations at once than `WORKERS`.
//! The server listens before the model is loaded: `/health` answers 503 until it is.

mod openai;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::bot::Bot;
use crate::config::{ExposeSecret, Settings, WebSettings};
use crate::domain::{ChannelRef, Platform};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::now_ms;

/// The largest request body; bigger ones get 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The most messages one completion request may carry.
pub const MAX_MESSAGES: usize = 512;
/// The longest message of a request, in characters.
pub const MAX_MESSAGE_CHARS: usize = 32_000;
/// All the messages of a request together, in characters.
pub const MAX_TOTAL_CHARS: usize = 200_000;
/// The longest session id (`X-Kaiwa-Session`).
pub const MAX_SESSION_CHARS: usize = 64;
/// The most messages `/api/history` returns.
const HISTORY_LIMIT: usize = 400;
/// What `Retry-After` says when the queue is full or the model is loading.
const RETRY_AFTER_SECS: u64 = 2;
/// The header naming a conversation.
const SESSION_HEADER: &str = "x-kaiwa-session";
/// The session of API requests that name none.
const DEFAULT_SESSION: &str = "api";

/// The chat page, served from the binary.
const PAGE: &str = include_str!("page.html");

/// The model id the server answers to and `/v1/models` lists: the model directory's name.
pub fn model_id(model_dir: &std::path::Path) -> String {
    model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "kaiwa".into())
}

/// The server's shared state.
pub struct Web {
    settings: Settings,
    bot: OnceLock<Arc<Bot>>,
    metrics: Arc<Metrics>,
    limits: KeyLimits,
    /// The model id `/v1/models` lists: the model directory's name.
    model_id: String,
    /// The chat page, asking for `model_id`.
    page: String,
    started: i64,
    /// The keys' SHA-256 digests (compared instead of the keys, in constant time).
    key_digests: Vec<[u8; 32]>,
}

impl Web {
    pub fn new(settings: Settings) -> Arc<Self> {
        let model_id = model_id(&settings.model_dir);
        // The page asks for this model; `<` is escaped so no name can end the script.
        let page = PAGE.replace(
            "\"__KAIWA_MODEL__\"",
            &serde_json::to_string(&model_id)
                .expect("a string serializes")
                .replace('<', "\\u003c"),
        );
        let key_digests = settings
            .web
            .api_keys
            .iter()
            .map(|k| Sha256::digest(k.expose_secret().as_bytes()).into())
            .collect();
        Arc::new(Web {
            limits: KeyLimits::new(&settings.web),
            settings,
            bot: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
            model_id,
            page,
            started: now_ms() / 1000,
            key_digests,
        })
    }

    /// The metrics `/metrics` shows; give them to the [`Bot`] so its figures show there too.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Starts answering: the model is loaded.
    pub fn set_bot(&self, bot: Arc<Bot>) {
        let _ = self.bot.set(bot);
    }

    fn bot(&self) -> Result<&Arc<Bot>, ApiError> {
        self.bot.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading; try again shortly",
                "server_error",
                Some("model_loading"),
            )
            .retry_after(RETRY_AFTER_SECS)
        })
    }

    /// Who is calling: checks the key (when keys are configured) and names the caller by it,
    /// never by the key itself.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let session = session_of(headers)?;
        if self.key_digests.is_empty() {
            return Ok(Caller {
                key_id: "local".into(),
                session,
            });
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(given) = given.filter(|k| !k.is_empty()) else {
            return Err(ApiError::unauthorized(
                "no API key: send it as 'Authorization: Bearer KEY'",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let known = self
            .key_digests
            .iter()
            .fold(false, |found, d| found | constant_time_eq(d, &digest));
        if !known {
            return Err(ApiError::unauthorized("the API key is not valid"));
        }
        let key_id: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Caller {
            key_id: format!("key-{key_id}"),
            session,
        })
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A checked caller: which key (by a digest prefix, or `local` without keys) and which
/// conversation.
#[derive(Debug, Clone)]
struct Caller {
    key_id: String,
    session: String,
}

impl Caller {
    /// The store's channel of this conversation; also its user id.
    fn channel(&self) -> ChannelRef {
        ChannelRef::new(Platform::Web, self.user_id())
    }

    fn user_id(&self) -> String {
        format!("{}:{}", self.key_id, self.session)
    }
}

/// The session a request names, or the default one.
fn session_of(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get(SESSION_HEADER) else {
        return Ok(DEFAULT_SESSION.into());
    };
    let s = value.to_str().unwrap_or("");
    let ok = !s.is_empty()
        && s.len() <= MAX_SESSION_CHARS
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(ApiError::invalid(format!(
            "X-Kaiwa-Session must be 1 to {MAX_SESSION_CHARS} letters, digits, '-' or '_'"
        )));
    }
    Ok(s.to_string())
}

/// Per-key limits: requests running at once, and requests started a minute (a token bucket).
struct KeyLimits {
    concurrency: usize,
    per_minute: u32,
    keys: Mutex<HashMap<String, KeyState>>,
}

struct KeyState {
    running: Arc<Semaphore>,
    tokens: f64,
    refilled: Instant,
}

impl KeyLimits {
    fn new(s: &WebSettings) -> Self {
        KeyLimits {
            concurrency: s.key_concurrency,
            per_minute: s.key_rate_per_minute,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// A permit for one request of `key_id`, or the 429 to answer.
    fn admit(&self, key_id: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let state = keys.entry(key_id.to_string()).or_insert_with(|| KeyState {
            running: Arc::new(Semaphore::new(self.concurrency)),
            tokens: self.per_minute as f64,
            refilled: now,
        });
        if self.per_minute > 0 {
            let rate = self.per_minute as f64 / 60.0;
            let elapsed = now.duration_since(state.refilled).as_secs_f64();
            state.tokens = (state.tokens + elapsed * rate).min(self.per_minute as f64);
            state.refilled = now;
            if state.tokens < 1.0 {
                let wait = ((1.0 - state.tokens) / rate).ceil() as u64;
                return Err(ApiError::rate_limited(
                    format!("rate limit reached: {} requests a minute", self.per_minute),
                    wait.max(1),
                ));
            }
        }
        let permit = Arc::clone(&state.running)
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::rate_limited(
                    format!(
                        "too many requests at once: {} may run together",
                        self.concurrency
                    ),
                    RETRY_AFTER_SECS,
                )
            })?;
        if self.per_minute > 0 {
            state.tokens -= 1.0;
        }
        Ok(permit)
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        message: impl Into<String>,
        kind: &'static str,
        code: Option<&'static str>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            retry_after: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            message,
            "invalid_request_error",
            None,
        )
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            message,
            "invalid_request_error",
            Some("invalid_api_key"),
        )
    }

    fn rate_limited(message: String, retry_after: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            message,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        )
        .retry_after(retry_after)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            message,
            "server_error",
            None,
        )
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": null,
                "code": self.code,
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        // The error type, for the metrics layer.
        response.extensions_mut().insert(ErrorKind(self.kind));
        response
    }
}

#[derive(Clone, Copy)]
struct ErrorKind(&'static str);

/// The routes, with the metrics layer and CORS when origins are configured.
pub fn router(web: Arc<Web>) -> Router {
    let cors = cors_layer(&web.settings.web);
    let router = Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/api/history", get(history))
        .route("/api/reset", post(reset))
        .route("/api/feedback", post(feedback))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&web),
            track,
        ))
        .with_state(web);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

fn cors_layer(s: &WebSettings) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if s.cors_origins.is_empty() {
        return None;
    }
    let origin = if s.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            s.cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static(SESSION_HEADER),
            ]),
    )
}

/// Counts every request by route, method and status, and its time to the response headers.
async fn track(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    web.metrics
        .request(&route, &method, status, started.elapsed().as_secs_f64());
    if let Some(ErrorKind(kind)) = response.extensions().get::<ErrorKind>() {
        web.metrics.error(kind);
    } else if status >= 400 {
        // Rejections axum makes itself (a body over the limit, a wrong method).
        web.metrics.error("invalid_request_error");
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route",
        "invalid_request_error",
        Some("not_found"),
    )
}

async fn page(State(web): State<Arc<Web>>) -> Response {
    let mut r = Html(web.page.clone()).into_response();
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src 'self' data:",
        ),
    );
    r
}

async fn health(State(web): State<Arc<Web>>) -> Response {
    if web.bot.get().is_some() {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "loading"})),
        )
            .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        r
    }
}

async fn metrics_text(State(web): State<Arc<Web>>) -> Response {
    let depth = web.bot.get().map(|b| b.queue_depth()).unwrap_or(0);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        web.metrics.render(depth),
    )
        .into_response()
}

async fn models(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, ApiError> {
    web.caller(&headers)?;
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": web.model_id,
            "object": "model",
            "created": web.started,
            "owned_by": "kaiwa",
        }],
    }))
    .into_response())
}

/// `GET /api/history`: the conversation since its last reset, oldest first, with the caller's
/// 👍/👎 on each reply.
async fn history(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = web.caller(&headers)?;
    let bot = web.bot()?;
    let channel = caller.channel();
    let store = bot.store();
    let messages = store
        .channel_context(&channel, 0, HISTORY_LIMIT)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut feedback: HashMap<String, i8> = HashMap::new();
    for (id, emoji) in store
        .reactions_by(&channel, &caller.user_id())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        *feedback.entry(id).or_default() += crate::text::reaction_sign(&emoji);
    }
    let out: Vec<serde_json::Value> = messages
        .iter()
        .filter(|m| !m.is_notice && !m.is_system)
        .filter_map(|m| {
            let text = m.text.as_deref()?;
            Some(serde_json::json!({
                "id": m.message_id,
                "role": if m.from_self { "assistant" } else { "user" },
                "content": text,
                "feedback": feedback.get(&m.message_id).copied().unwrap_or(0).signum(),
            }))
        })
        .collect();
    Ok(Json(serde_json::json!({ "messages": out })).into_response())
}

/// `POST /api/reset`: a new conversation in this session (the old one stays stored).
async fn reset(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = web.caller(&headers)?;
    web.bot()?
        .store()
        .reset_channel(&caller.channel(), now_ms())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(serde_json::json!({"ok": true})).into_response())
}

#[derive(serde::Deserialize)]
struct FeedbackBody {
    message_id: String,
    value: i8,
}

/// `POST /api/feedback`: 👍 (1), 👎 (-1) or neither (0) on a reply, stored as a reaction.
async fn feedback(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = web.caller(&headers)?;
    let bot = web.bot()?;
    let body: FeedbackBody = openai::parse_json(&openai::body_bytes(body)?)?;
    if !(-1..=1).contains(&body.value) {
        return Err(ApiError::invalid("value must be 1, -1 or 0"));
    }
    let channel = caller.channel();
    let known = bot
        .store()
        .is_own_reply(&channel, &body.message_id)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if !known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such reply in this conversation",
            "invalid_request_error",
            Some("reply_not_found"),
        ));
    }
    let user = caller.user_id();
    for (emoji, sign) in [("👍", 1), ("👎", -1)] {
        bot.store()
            .record_reaction(&channel, &body.message_id, &user, emoji, body.value == sign)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
    }
    Ok(Json(serde_json::json!({"ok": true})).into_response())
}

/// Where `settings` say to listen: `HTTP_ADDR`, else [`crate::config::DEFAULT_HTTP_ADDR`].
pub fn listen_addr(settings: &WebSettings) -> SocketAddr {
    settings.addr.unwrap_or_else(|| {
        crate::config::DEFAULT_HTTP_ADDR
            .parse()
            .expect("a valid default address")
    })
}

/// Serves `web` on `listener` until `shutdown` fires and the requests in progress have ended
/// (the daemon stops waiting for them after a few seconds).
pub async fn serve(
    web: Arc<Web>,
    listener: TcpListener,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = router(web);
    let graceful = async move { shutdown.wait().await };
    let server = axum::serve(listener, app).with_graceful_shutdown(graceful);
    server.await
}

//! `POST /v1/chat/completions` as OpenAI defines it: the request checked field by field, the
//! reply made by the bot's engine in a task of its own (so a reply is recorded whatever the
//! client does), and answered whole or streamed as Server-Sent Events chunk by chunk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    ApiError, Caller, Web, MAX_BODY_BYTES, MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS,
    RETRY_AFTER_SECS,
};
use crate::bot::{Bot, Compose, Reservation, RECENT_REPLIES, SELF_NAME};
use crate::conversation::{self, Speakers, Turn};
use crate::domain::ChatKind;
use crate::engine::EngineMode;
use crate::model::{ChatMessage, Sampling};
use crate::store::{now_ms, Insert, NewMessage, ReplyProvenance};

/// The most tokens a request may ask for.
const MAX_NEW_TOKENS: u32 = 8192;
/// The most stop strings (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Characters a streamed chunk of a chosen reply carries.
const CHUNK_CHARS: usize = 8;

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    #[serde(default)]
    messages: Vec<InMessage>,
    stream: Option<bool>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    stream_options: Option<StreamOptions>,
    /// `false`: nothing of this request is stored (OpenAI's own field).
    store: Option<bool>,
    tools: Option<Vec<Value>>,
    response_format: Option<ResponseFormat>,
    logprobs: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

/// A request that passed every check.
#[derive(Debug)]
struct Checked {
    messages: Vec<ChatMessage>,
    user_text: String,
    recent_replies: Vec<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    store: bool,
}

/// Reads a JSON body, naming the field that is wrong.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            ApiError::invalid(format!(
                "the body is not valid JSON of this request: {inner}"
            ))
        } else {
            ApiError::invalid(format!("invalid value at {path}: {inner}"))
        }
    })
}

/// The body, or 413 when it is over [`MAX_BODY_BYTES`].
pub(super) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {MAX_BODY_BYTES} bytes"),
                "invalid_request_error",
                Some("request_too_large"),
            )
        } else {
            ApiError::invalid(format!("the request body could not be read: {r}"))
        }
    })
}

fn text_of(i: usize, content: Option<&Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                if p.kind != "text" {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}]: only text content is supported, not {:?}",
                        p.kind
                    )));
                }
                out.push_str(p.text.as_deref().unwrap_or(""));
            }
            Ok(out)
        }
    }
}

/// Checks a request against OpenAI's rules and kaiwa's limits, and turns its messages into the
/// conversation the engine sees: system messages first (or `SYSTEM_PROMPT`), then the latest
/// `context_messages` turns, consecutive turns of one role joined.
fn check(
    req: ChatRequest,
    system_prompt: Option<&str>,
    context: usize,
) -> Result<Checked, ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools are not supported by this model"));
    }
    if let Some(f) = &req.response_format {
        if f.kind != "text" {
            return Err(ApiError::invalid(format!(
                "response_format {:?} is not supported (only \"text\")",
                f.kind
            )));
        }
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs are not supported"));
    }
    if req.stream_options.is_some() && req.stream != Some(true) {
        return Err(ApiError::invalid(
            "stream_options is only allowed when stream is true",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(format!(
            "at most {MAX_MESSAGES} messages a request"
        )));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    let mut total = 0;
    for (i, m) in req.messages.iter().enumerate() {
        let text = text_of(i, m.content.as_ref())?;
        let chars = text.chars().count();
        if chars > MAX_MESSAGE_CHARS {
            return Err(ApiError::invalid(format!(
                "messages[{i}] is {chars} characters; at most {MAX_MESSAGE_CHARS}"
            )));
        }
        total += chars;
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" | "assistant" => turns.push(Turn {
                speaker: m.role.clone(),
                is_assistant: m.role == "assistant",
                text,
            }),
            "tool" | "function" => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}]: {} messages are not supported (this model has no tools)",
                    m.role
                )))
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}]: unknown role {other:?} (system, user or assistant)"
                )))
            }
        }
    }
    if total > MAX_TOTAL_CHARS {
        return Err(ApiError::invalid(format!(
            "the messages are {total} characters together; at most {MAX_TOTAL_CHARS}"
        )));
    }
    // Consecutive messages of one role become one, as the model's chat template expects.
    let turns = conversation::render(None, &turns, Speakers::One);
    let last = req.messages.last().expect("not empty");
    let user_text = turns
        .last()
        .filter(|_| last.role == "user")
        .map(|t| t.content.trim().to_string())
        .unwrap_or_default();
    if user_text.is_empty() {
        return Err(ApiError::invalid(
            "the last message must be the user's, with text",
        ));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    if let Some(m) = max_tokens {
        if m == 0 || m > MAX_NEW_TOKENS {
            return Err(ApiError::invalid(format!(
                "max_tokens must be 1 to {MAX_NEW_TOKENS}"
            )));
        }
    }
    if let Some(t) = req.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid("temperature must be 0 to 2"));
        }
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid("top_p must be above 0 and at most 1"));
        }
    }
    let stops = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > MAX_STOPS || stops.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(format!(
            "stop must be up to {MAX_STOPS} non-empty strings"
        )));
    }
    let recent_replies = turns
        .iter()
        .rev()
        .filter(|t| t.role == "assistant")
        .take(RECENT_REPLIES)
        .map(|t| t.content.clone())
        .collect();
    let keep = turns.len().saturating_sub(context.max(1));
    let mut messages = Vec::with_capacity(turns.len() - keep + 1);
    let system = system.join("\n");
    match (system.trim(), system_prompt) {
        ("", Some(s)) if !s.trim().is_empty() => messages.push(ChatMessage::system(s)),
        ("", _) => {}
        (s, _) => messages.push(ChatMessage::system(s)),
    }
    messages.extend(turns.into_iter().skip(keep));
    Ok(Checked {
        messages,
        user_text,
        recent_replies,
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stops,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        store: req.store.unwrap_or(true),
    })
}

/// What the reply task sends the response.
#[derive(Debug)]
enum Piece {
    Text(String),
    Done {
        finish: &'static str,
        usage: Usage,
        /// The whole reply (for a plain response).
        text: String,
    },
    Failed(ApiError),
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The request must name the model this server serves: OpenAI answers an unknown model with
/// 404 `model_not_found`, and answering it with another model would be silently wrong.
fn check_model(requested: Option<String>, served: &str) -> Result<(), ApiError> {
    match requested.as_deref().map(str::trim) {
        None | Some("") => Err(ApiError::invalid(format!(
            "you must provide a model parameter (this server serves {served:?})"
        ))),
        Some(m) if m == served => Ok(()),
        Some(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model {m:?} does not exist here; this server serves {served:?} \
                 (GET /v1/models)"
            ),
            "invalid_request_error",
            Some("model_not_found"),
        )),
    }
}

/// A completion id no other request has: time, a counter and random bits.
fn completion_id() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let random: u64 =
        rand::Rng::random(&mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::from_os_rng());
    format!("chatcmpl-{:x}{n:x}{random:016x}", now_ms())
}

pub(super) async fn chat_completions(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = web.caller(&headers)?;
    let body = body_bytes(body)?;
    let mut request: ChatRequest = parse_json(&body)?;
    let model = request.model.take();
    let checked = check(
        request,
        web.settings.system_prompt.as_deref(),
        web.settings.context_messages,
    )?;
    let bot = Arc::clone(web.bot()?);
    check_model(model, &web.model_id)?;
    let permit = web.limits.admit(&caller.key_id)?;
    let reservation = bot.reserve().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is busy: this reply would be too late; try again shortly",
            "server_error",
            Some("queue_full"),
        )
        .retry_after(RETRY_AFTER_SECS)
    })?;
    let id = completion_id();
    let created = now_ms() / 1000;
    let stream = checked.stream;
    let include_usage = checked.include_usage;
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        web: Arc::clone(&web),
        bot,
        caller,
        checked,
        id: id.clone(),
        started: Instant::now(),
        _reservation: reservation,
    };
    tokio::spawn(async move {
        job.run(tx).await;
        drop(permit);
    });
    let model = web.model_id.clone();
    if stream {
        Ok(stream_response(rx, id, created, model, include_usage))
    } else {
        whole_response(rx, id, created, model).await
    }
}

async fn whole_response(
    mut rx: mpsc::UnboundedReceiver<Piece>,
    id: String,
    created: i64,
    model: String,
) -> Result<Response, ApiError> {
    while let Some(piece) = rx.recv().await {
        match piece {
            Piece::Text(_) => {}
            Piece::Failed(e) => return Err(e),
            Piece::Done {
                finish,
                usage,
                text,
            } => {
                return Ok(Json(json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": null},
                        "logprobs": null,
                        "finish_reason": finish,
                    }],
                    "usage": usage,
                    "system_fingerprint": null,
                }))
                .into_response())
            }
        }
    }
    Err(ApiError::internal("the reply ended without an answer"))
}

/// A stream event with one choice's `delta`.
fn chunk(id: &str, created: i64, model: &str, delta: Value, finish: Option<&str>) -> Event {
    let choices = json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    chunk_with(id, created, model, choices, None)
}

/// A `chat.completion.chunk` event: `choices` (empty in the usage chunk) and `usage`.
fn chunk_with(id: &str, created: i64, model: &str, choices: Value, usage: Option<Usage>) -> Event {
    let mut body = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": null,
        "choices": choices,
    });
    if let Some(u) = usage {
        body["usage"] = json!(u);
    }
    Event::default().data(body.to_string())
}

/// The SSE stream: the role first, then the pieces, the finish, the usage if asked, `[DONE]`.
fn stream_response(
    rx: mpsc::UnboundedReceiver<Piece>,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
) -> Response {
    enum State {
        Start,
        Pieces,
        Ended,
    }
    let first = chunk(
        &id,
        created,
        &model,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    let events = futures_util::stream::unfold(
        (rx, State::Start, Some(first)),
        move |(mut rx, state, first)| {
            let (id, model) = (id.clone(), model.clone());
            async move {
                let events: Vec<Event> = match state {
                    State::Start => {
                        return Some((
                            vec![first.expect("the first chunk")],
                            (rx, State::Pieces, None),
                        ))
                    }
                    State::Ended => return None,
                    State::Pieces => match rx.recv().await {
                        Some(Piece::Text(t)) => {
                            return Some((
                                vec![chunk(&id, created, &model, json!({"content": t}), None)],
                                (rx, State::Pieces, None),
                            ))
                        }
                        Some(Piece::Done { finish, usage, .. }) => {
                            let mut out =
                                vec![chunk(&id, created, &model, json!({}), Some(finish))];
                            if include_usage {
                                out.push(chunk_with(&id, created, &model, json!([]), Some(usage)));
                            }
                            out.push(Event::default().data("[DONE]"));
                            out
                        }
                        Some(Piece::Failed(e)) => vec![
                            Event::default().data(
                                json!({"error": {"message": e.message, "type": e.kind,
                                                  "param": null, "code": e.code}})
                                .to_string(),
                            ),
                            Event::default().data("[DONE]"),
                        ],
                        None => vec![Event::default().data(
                            json!({"error": {"message": "the reply ended without an answer",
                                              "type": "server_error", "param": null,
                                              "code": null}})
                            .to_string(),
                        )],
                    },
                };
                Some((events, (rx, State::Ended, None)))
            }
        },
    );
    let events = futures_util::StreamExt::flat_map(events, |v| {
        futures_util::stream::iter(v.into_iter().map(Ok::<Event, std::convert::Infallible>))
    });
    Sse::new(events).into_response()
}

/// One reply, from storing the user's message to recording the reply; runs in a task of its
/// own.
struct Job {
    web: Arc<Web>,
    bot: Arc<Bot>,
    caller: Caller,
    checked: Checked,
    id: String,
    started: Instant,
    _reservation: Reservation,
}

/// How a reply ended, for the record.
enum Outcome {
    /// Made whole and sent but for its end, which goes out once the reply is stored.
    Sent(Piece),
    /// The client went away after this much of the reply.
    Cut,
    Failed(String),
}

impl Job {
    async fn run(self, tx: mpsc::UnboundedSender<Piece>) {
        let store = self.bot.store().clone();
        let channel = self.caller.channel();
        let question_id = format!("{}-user", self.id);
        let user_id = self.caller.user_id();
        let keep = match self.checked.store {
            false => false,
            true => match store.is_opted_out(channel.platform, &user_id).await {
                Ok(opted_out) => !opted_out,
                Err(e) => {
                    let _ = tx.send(Piece::Failed(ApiError::internal(e.to_string())));
                    return;
                }
            },
        };
        // The user's message is stored before anything else is done with it.
        if keep {
            let row = NewMessage {
                channel: channel.clone(),
                kind: ChatKind::Direct,
                message_id: question_id.clone(),
                author_id: user_id.clone(),
                author_name: self.caller.session.clone(),
                author_is_bot: false,
                from_self: false,
                is_notice: false,
                text: self.checked.user_text.clone(),
                reply_to: None,
                sent_at_ms: now_ms(),
                source: "live".into(),
            };
            let stored = match store.insert_message(&row).await {
                Ok(Insert::Stored(_)) => store.claim_reply(&channel, &question_id).await,
                Ok(Insert::Duplicate) => Ok(false),
                Err(e) => Err(e),
            };
            match stored {
                Ok(true) => {}
                Ok(false) => {
                    let _ = tx.send(Piece::Failed(ApiError::internal(
                        "this request was answered already",
                    )));
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not store a web message");
                    let _ = tx.send(Piece::Failed(ApiError::internal(
                        "the message could not be stored",
                    )));
                    return;
                }
            }
        }
        let (outcome, provenance, text) = self.reply(&tx).await;
        if matches!(outcome, Outcome::Cut) {
            self.web.metrics.cut();
            tracing::info!(id = %self.id, chars = text.chars().count(), "client left before the reply ended");
        }
        if keep {
            let recorded = self
                .record(&channel, &question_id, &outcome, provenance.as_ref(), &text)
                .await;
            if let Err(e) = recorded {
                tracing::error!(error = %e, "could not record a web reply");
            }
        }
        // The end goes out once the reply is stored: a client that has it can find it.
        if let Outcome::Sent(done) = outcome {
            let _ = tx.send(done);
        }
    }

    /// Makes the reply and sends it piece by piece; says how it ended, with the text the client
    /// was given.
    async fn reply(
        &self,
        tx: &mpsc::UnboundedSender<Piece>,
    ) -> (Outcome, Option<ReplyProvenance>, String) {
        let c = &self.checked;
        let generator = self.bot.model();
        // The request's settings are the top layer, over the daemon's.
        let mut options = self.bot.reply_options().overridden_by(&Sampling {
            temperature: c.temperature,
            top_p: c.top_p,
            max_new_tokens: c.max_tokens.map(|m| m as usize),
            ..Sampling::default()
        });
        options.stop = c.stops.clone();
        options.seed = match c.seed {
            Some(s) => s as u64,
            None => options.seed ^ seed_of(&self.id),
        };
        let max_new_tokens = options.max_new_tokens;
        let prompt_tokens = generator
            .prompt_tokens(&c.messages, 0)
            .map(|(ids, _)| ids.len())
            .unwrap_or(0);
        let streamed = Arc::new(Mutex::new(String::new()));
        let first_at = Arc::new(Mutex::new(None::<Instant>));
        let on_delta = {
            let (tx, streamed, first_at) =
                (tx.clone(), Arc::clone(&streamed), Arc::clone(&first_at));
            Box::new(move |delta: &str| {
                if delta.is_empty() {
                    return !tx.is_closed();
                }
                first_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
                streamed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(delta);
                tx.send(Piece::Text(delta.to_string())).is_ok()
            })
        };
        let composed = self
            .bot
            .compose(
                Compose {
                    messages: c.messages.clone(),
                    user_text: c.user_text.clone(),
                    recent_replies: c.recent_replies.clone(),
                    options,
                },
                on_delta,
            )
            .await;
        let streamed = std::mem::take(&mut *streamed.lock().unwrap_or_else(|e| e.into_inner()));
        let composed = match composed {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "web reply failed");
                let _ = tx.send(Piece::Failed(ApiError::internal(
                    "the reply could not be made",
                )));
                return (Outcome::Failed(e), None, streamed);
            }
        };
        if composed.reply.cancelled {
            return if tx.is_closed() && !streamed.is_empty() {
                (Outcome::Cut, Some(composed.provenance), streamed)
            } else if tx.is_closed() {
                (
                    Outcome::Failed("the client left before the reply".into()),
                    None,
                    streamed,
                )
            } else {
                let _ = tx.send(Piece::Failed(ApiError::internal(
                    "the server is shutting down",
                )));
                (
                    Outcome::Failed("cancelled by shutdown".into()),
                    None,
                    streamed,
                )
            };
        }
        let generated_here = self.bot.settings().engine.mode == EngineMode::Generate;
        let (text, finish) = if generated_here && !streamed.is_empty() {
            let finish = if composed.reply.new_tokens >= max_new_tokens {
                "length"
            } else {
                "stop"
            };
            (streamed, finish)
        } else {
            // A chosen reply (or the model's, when it wrote nothing to stream): cut to the
            // request's stop strings and token limit, then sent in pieces.
            let (text, finish) = fit(&composed.reply.text, &c.stops, c.max_tokens, &generator);
            let mut sent = String::new();
            for piece in pieces(&text) {
                first_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
                if tx.send(Piece::Text(piece.to_string())).is_err() {
                    return (Outcome::Cut, Some(composed.provenance), sent);
                }
                sent.push_str(piece);
            }
            (text, finish)
        };
        let completion_tokens = generator
            .tokenizer()
            .encode(&text, false)
            .map(|ids| ids.len())
            .unwrap_or(0);
        let usage = Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        };
        let m = &self.web.metrics;
        m.tokens(prompt_tokens, completion_tokens);
        if let Some(t) = *first_at.lock().unwrap_or_else(|e| e.into_inner()) {
            m.first_token(t.duration_since(self.started).as_secs_f64());
        }
        m.reply_done(self.started.elapsed().as_secs_f64());
        let done = Piece::Done {
            finish,
            usage,
            text: text.clone(),
        };
        (Outcome::Sent(done), Some(composed.provenance), text)
    }

    /// Stores the reply (as far as the client got it) and how it ended.
    async fn record(
        &self,
        channel: &crate::domain::ChannelRef,
        question_id: &str,
        outcome: &Outcome,
        provenance: Option<&ReplyProvenance>,
        text: &str,
    ) -> Result<(), crate::store::StoreError> {
        let store = self.bot.store();
        if !text.trim().is_empty() && !matches!(outcome, Outcome::Failed(_)) {
            let own = NewMessage {
                channel: channel.clone(),
                kind: ChatKind::Direct,
                message_id: self.id.clone(),
                author_id: SELF_NAME.into(),
                author_name: SELF_NAME.into(),
                author_is_bot: true,
                from_self: true,
                is_notice: false,
                text: text.to_string(),
                reply_to: Some(question_id.to_string()),
                sent_at_ms: now_ms(),
                source: "live".into(),
            };
            store.insert_message(&own).await?;
        }
        match (outcome, provenance) {
            (Outcome::Sent(_), Some(p)) => store.finish_reply(channel, question_id, p).await,
            (Outcome::Cut, Some(p)) if !text.trim().is_empty() => {
                let reason = format!(
                    "cut: the client left after {} characters",
                    text.chars().count()
                );
                store.cut_reply(channel, question_id, p, &reason).await
            }
            (Outcome::Cut, _) => {
                store
                    .fail_reply(channel, question_id, "the client left before the reply")
                    .await
            }
            (Outcome::Failed(e), _) => store.fail_reply(channel, question_id, e).await,
            (Outcome::Sent(_), None) => Ok(()),
        }
    }
}

fn seed_of(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// A chosen reply cut before the first stop string (`stop`) and to `max_tokens` tokens
/// (`length`).
fn fit(
    text: &str,
    stops: &[String],
    max_tokens: Option<u32>,
    generator: &crate::model::Generator,
) -> (String, &'static str) {
    let mut text = text.to_string();
    if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(at);
    }
    if let Some(max) = max_tokens {
        let tokenizer = generator.tokenizer();
        if let Ok(ids) = tokenizer.encode(&text, false) {
            if ids.len() > max as usize {
                let cut = tokenizer
                    .decode(&ids[..max as usize], true)
                    .unwrap_or_default();
                // A token boundary inside a character decodes to U+FFFD: leave it out.
                return (cut.trim_end_matches('\u{FFFD}').to_string(), "length");
            }
        }
    }
    (text, "stop")
}

/// A reply in pieces of about [`CHUNK_CHARS`] characters, never inside a character.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .char_indices()
            .nth(CHUNK_CHARS)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> Result<Checked, ApiError> {
        let req: ChatRequest = parse_json(body.to_string().as_bytes())?;
        check(req, Some("be kind"), 40)
    }

    #[test]
    fn a_conversation_becomes_the_engine_s_messages() {
        let c = request(json!({
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "今日の"}, {"type": "text", "text": "天気は？"}]},
            ],
            "max_tokens": 16, "stop": "。", "stream": true,
            "stream_options": {"include_usage": true}, "store": false,
        }))
        .unwrap();
        let roles: Vec<&str> = c.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(c.messages[0].content, "be kind");
        assert_eq!(c.user_text, "今日の天気は？");
        assert_eq!(c.recent_replies, ["hello"]);
        assert_eq!(
            (c.max_tokens, c.stops.clone()),
            (Some(16), vec!["。".to_string()])
        );
        assert!(c.stream && c.include_usage && !c.store);
    }

    #[test]
    fn bad_requests_are_refused_with_the_field_named() {
        for (body, want) in [
            (json!({"messages": []}), "must not be empty"),
            (json!({"messages": "hi"}), "messages"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "unknown role",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n = 1",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": "x"}]}),
                "last message",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "only text",
            ),
        ] {
            let e = request(body.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(e.message.contains(want), "{body}: {}", e.message);
        }
        let e = parse_json::<ChatRequest>(b"{\"messages\": [").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, ..Default::default() })]

        /// Any body, valid JSON or not, is a checked request or a 400 naming what is wrong.
        #[test]
        fn any_body_is_checked_or_refused_with_a_reason(
            cut in proptest::prelude::any::<usize>(),
            edits in proptest::collection::vec(
                (proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..6),
        ) {
            let mut body = json!({
                "model": "kaiwa", "stream": true, "max_tokens": 8, "stop": ["。", "\n"],
                "stream_options": {"include_usage": true}, "temperature": 0.5, "seed": -3,
                "messages": [{"role": "system", "content": "s"}, {"role": "user",
                  "content": [{"type": "text", "text": "今日は"}]}],
            })
            .to_string()
            .into_bytes();
            body.truncate(body.len() / 2 + cut % (body.len() / 2 + 1));
            for (at, byte) in edits {
                let at = at % body.len().max(1);
                if at < body.len() {
                    body[at] = byte;
                }
            }
            match parse_json::<ChatRequest>(&body).and_then(|r| check(r, None, 40)) {
                Ok(c) => proptest::prop_assert!(!c.user_text.is_empty()),
                Err(e) => proptest::prop_assert!(
                    e.status == StatusCode::BAD_REQUEST && !e.message.is_empty()
                ),
            }
        }
    }

    #[test]
    fn only_the_served_model_is_answered() {
        assert!(check_model(Some("kaiwa".into()), "kaiwa").is_ok());
        let e = check_model(Some("gpt-4o".into()), "kaiwa").unwrap_err();
        assert_eq!(
            (e.status, e.code, e.kind),
            (
                StatusCode::NOT_FOUND,
                Some("model_not_found"),
                "invalid_request_error"
            )
        );
        assert!(e.message.contains("\"gpt-4o\"") && e.message.contains("\"kaiwa\""));
        for missing in [None, Some(" ".to_string())] {
            let e = check_model(missing, "kaiwa").unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains("model"), "{}", e.message);
        }
    }

    #[test]
    fn stream_options_need_a_stream() {
        let e = request(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": true},
        }))
        .unwrap_err();
        assert!(e.message.contains("stream_options"), "{}", e.message);
    }

    #[test]
    fn pieces_never_split_a_character() {
        let text = "今日はいい天気ですね、散歩に行きましょう。Sounds good!";
        let parts: Vec<&str> = pieces(text).collect();
        assert!(parts.len() > 2);
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.chars().count() <= CHUNK_CHARS));
    }
}

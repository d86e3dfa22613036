//! `kaiwa bench serve`: streamed chat completions over HTTP at 1, 8 and 32 concurrent clients
//! (requests a second, time to the first piece of a reply and to its end, p50/p99, failures),
//! beside the same prompts answered in-process through the bots' path (`Bot::compose` under the
//! same generation slots), so what the HTTP layer adds is known; with the process's peak memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{peak_rss_mib, percentile};
use crate::bot::{Bot, Compose};
use crate::config::Settings;
use crate::model::{ChatMessage, Generator};
use crate::store::Store;

/// Errors of the serving benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ServeBenchError {
    #[error("the server did not start: {0}")]
    Start(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The figures at one number of concurrent clients.
#[derive(Debug, Clone, Serialize)]
pub struct ServeStep {
    pub clients: usize,
    pub requests: usize,
    /// Requests that got no complete stream (an error status, no `[DONE]`).
    pub failed: usize,
    pub http_rps: f64,
    pub http_first_p50_ms: f64,
    pub http_first_p99_ms: f64,
    pub http_total_p50_ms: f64,
    pub http_total_p99_ms: f64,
    /// The same prompts through `Bot::compose` in-process (the bots' path).
    pub direct_rps: f64,
    pub direct_p50_ms: f64,
    pub direct_p99_ms: f64,
    pub peak_rss_mib: f64,
}

/// One streamed request's times, or `None` if it failed.
struct Timing {
    first_ms: f64,
    total_ms: f64,
}

/// Runs the benchmark: a server on 127.0.0.1 (an ephemeral port) with `settings`, and each
/// entry of `clients` asking `per_client` prompts each. With `store` false the requests say
/// `"store": false`, so HTTP and in-process do the same work (the in-process path stores
/// nothing); with `store` true each exchange is also written to the store, as in use.
pub async fn bench_serve(
    mut settings: Settings,
    generator: Arc<Generator>,
    prompts: &[String],
    clients: &[usize],
    per_client: usize,
    store: bool,
) -> Result<Vec<ServeStep>, ServeBenchError> {
    let most = clients.iter().copied().max().unwrap_or(1);
    // The load is the benchmark's own: no per-key limits, and room in the queue for everyone.
    settings.web.key_concurrency = most.max(1);
    settings.web.key_rate_per_minute = 0;
    settings.queue_capacity = settings.queue_capacity.max(most);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (trigger, shutdown) = crate::shutdown::shutdown_channel();
    let server = tokio::spawn(crate::app::serve_on(settings.clone(), listener, shutdown));
    wait_healthy(&addr).await?;
    let db = Store::open(&settings.database_url).await?;
    let model = crate::web::model_id(&settings.model_dir);
    let bot = Bot::new(settings, db.clone(), generator);
    let mut steps = Vec::new();
    for &c in clients {
        super::reset_peak_rss();
        let (http_rps, timings) = http_round(&addr, &model, prompts, c, per_client, store).await;
        let failed = timings.iter().filter(|t| t.is_none()).count();
        let ok: Vec<&Timing> = timings.iter().flatten().collect();
        let mut first: Vec<f64> = ok.iter().map(|t| t.first_ms).collect();
        let mut total: Vec<f64> = ok.iter().map(|t| t.total_ms).collect();
        let (direct_rps, mut direct) = direct_round(&bot, prompts, c, per_client).await;
        let step = ServeStep {
            clients: c,
            requests: timings.len(),
            failed,
            http_rps,
            http_first_p50_ms: percentile(&mut first, 0.50),
            http_first_p99_ms: percentile(&mut first, 0.99),
            http_total_p50_ms: percentile(&mut total, 0.50),
            http_total_p99_ms: percentile(&mut total, 0.99),
            direct_rps,
            direct_p50_ms: percentile(&mut direct, 0.50),
            direct_p99_ms: percentile(&mut direct, 0.99),
            peak_rss_mib: peak_rss_mib(),
        };
        tracing::info!(?step, "serve benchmark step");
        steps.push(step);
    }
    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    db.close().await;
    Ok(steps)
}

async fn wait_healthy(addr: &str) -> Result<(), ServeBenchError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr).await {
            s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await?;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            if out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(ServeBenchError::Start(format!(
        "{addr}/health was not ok within 10 minutes"
    )))
}

/// `clients` tasks asking `per_client` prompts each over HTTP; requests a second and each
/// request's times.
async fn http_round(
    addr: &str,
    model: &str,
    prompts: &[String],
    clients: usize,
    per_client: usize,
    store: bool,
) -> (f64, Vec<Option<Timing>>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (addr, model) = (addr.to_string(), model.to_string());
            let mine: Vec<String> = (0..per_client)
                .map(|i| prompts[(client * per_client + i) % prompts.len()].clone())
                .collect();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for (i, prompt) in mine.iter().enumerate() {
                    let session = format!("bench-{client}-{i}");
                    out.push(
                        stream_once(&addr, &model, &session, prompt, store)
                            .await
                            .ok()
                            .flatten(),
                    );
                }
                out
            })
        })
        .collect();
    let mut timings = Vec::new();
    for t in tasks {
        timings.extend(t.await.unwrap_or_default());
    }
    let rps = timings.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    (rps, timings)
}

/// One streamed completion (HTTP/1.0, so the body is the stream itself, ended by the close).
async fn stream_once(
    addr: &str,
    model: &str,
    session: &str,
    prompt: &str,
    store: bool,
) -> std::io::Result<Option<Timing>> {
    let body = serde_json::json!({
        "model": model,
        "stream": true,
        "store": store,
        "messages": [{"role": "user", "content": prompt}],
    })
    .to_string();
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n\
         X-Kaiwa-Session: {session}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let mut first = None;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if first.is_none() && has_text(&seen) {
            first = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    let ok = seen.starts_with(b"HTTP/1.0 200") || seen.starts_with(b"HTTP/1.1 200");
    if !ok || !contains(&seen, b"data: [DONE]") {
        return Ok(None);
    }
    Ok(Some(Timing {
        first_ms: first.unwrap_or(total).as_secs_f64() * 1e3,
        total_ms: total.as_secs_f64() * 1e3,
    }))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a stream has sent a piece of text yet (the first chunk's `"content":""` is not one).
fn has_text(stream: &[u8]) -> bool {
    const CONTENT: &[u8] = b"\"content\":\"";
    stream
        .windows(CONTENT.len() + 1)
        .any(|w| &w[..CONTENT.len()] == CONTENT && w[CONTENT.len()] != b'"')
}

/// The same load in-process: each of `clients` tasks takes a place in the queue and a
/// generation slot and composes its replies, as the bots do.
async fn direct_round(
    bot: &Arc<Bot>,
    prompts: &[String],
    clients: usize,
    per_client: usize,
) -> (f64, Vec<f64>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let bot = Arc::clone(bot);
            let mine: Vec<String> = (0..per_client)
                .map(|i| prompts[(client * per_client + i) % prompts.len()].clone())
                .collect();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for prompt in mine {
                    let t = Instant::now();
                    let Some(_place) = bot.reserve() else {
                        continue;
                    };
                    let compose = Compose {
                        messages: vec![ChatMessage::user(prompt.clone())],
                        user_text: prompt,
                        recent_replies: Vec::new(),
                        options: bot.reply_options(),
                    };
                    if bot.compose(compose, Box::new(|_| true)).await.is_ok() {
                        out.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                out
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.unwrap_or_default());
    }
    let rps = times.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    (rps, times)
}

//! Webhook mode: Telegram posts each update to this process, and each replica behind the
//! webhook's URL stores and answers what it is given; a redelivery that reaches another replica
//! is dropped by the store as a duplicate.

use std::future::IntoFuture as _;
use std::sync::Arc;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest as _, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use teloxide::payloads::SetWebhookSetters as _;
use teloxide::requests::Requester as _;
use teloxide::{ApiError, RequestError};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::{
    allowed_updates, describe, pause_after, posted_update, unavailable, Call, Inbox, FIRST_BACKOFF,
    MAX_BACKOFF,
};
use crate::backoff::Backoff;
use crate::config::{WebhookSecret, WebhookSettings};
use crate::platform::retry::{self, Scrubber};
use crate::shutdown::Shutdown;

/// The header Telegram sends the webhook's secret in.
const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// The largest request body read. An update is far smaller (a message holds at most 4096
/// characters, and quotes at most one other); a larger body is refused (413) unread.
const MAX_BODY_BYTES: usize = 1 << 20;

const SET_WEBHOOK: Call = Call {
    method: "setWebhook",
    failed: "telegram: cannot set the webhook yet",
    token_refused: "Telegram rejected the bot token (TELEGRAM_TOKEN): Unauthorized; \
                    check it with @BotFather",
};

/// The webhook's listening socket, bound at start (`TELEGRAM_WEBHOOK_LISTEN`), with what it serves.
pub(super) struct Listener {
    socket: TcpListener,
    settings: WebhookSettings,
}

impl Listener {
    pub(super) async fn bind(settings: WebhookSettings) -> anyhow::Result<Listener> {
        let socket = TcpListener::bind(settings.listen).await.with_context(|| {
            format!("listening on {} (TELEGRAM_WEBHOOK_LISTEN)", settings.listen)
        })?;
        Ok(Listener { socket, settings })
    }

    /// Tells Telegram where to post (`setWebhook`, with the secret and the updates the bot
    /// uses) and serves its requests until `shutdown` fires; requests in progress are finished.
    /// The webhook stays set at shutdown: the other replicas behind it still serve.
    pub(super) async fn serve(
        self,
        inbox: Inbox,
        api: &teloxide::Bot,
        scrub: &Scrubber,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let Listener { socket, settings } = self;
        let addr = socket.local_addr()?;
        let receiver = Arc::new(Receiver {
            inbox,
            secret: settings.secret.clone(),
            path: settings.url.path().to_string(),
            shutdown: shutdown.clone(),
        });
        let app = Router::new()
            .fallback(receive)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(receiver);
        let mut stop = shutdown.clone();
        let server = axum::serve(socket, app)
            .with_graceful_shutdown(async move { stop.wait().await })
            .into_future();
        tokio::pin!(server);
        info!(
            "telegram webhook listening on {addr} for {}",
            scrub.clean(settings.url.as_str())
        );
        // Served already while Telegram is told, which may post at once.
        tokio::select! {
            set = set_webhook(api, scrub, &settings, &mut shutdown) => set?,
            served = &mut server => {
                return served.context("the Telegram webhook listener stopped");
            }
        }
        server
            .await
            .context("the Telegram webhook listener stopped")
    }
}

/// Calls `setWebhook` until Telegram answers. Every replica does, with the same settings, so the
/// last to start changes nothing. A refusal of the webhook itself (a URL Telegram will not post
/// to) is an error; network trouble and Telegram's own failures are retried.
async fn set_webhook(
    api: &teloxide::Bot,
    scrub: &Scrubber,
    settings: &WebhookSettings,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    let url = scrub.clean(settings.url.as_str());
    let set = retry::until_answered(
        Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
        shutdown,
        || async {
            api.set_webhook(settings.url.clone())
                .secret_token(settings.secret.expose_secret())
                .allowed_updates(allowed_updates())
                .await
        },
        |e, _| match e {
            RequestError::Api(ref refusal)
                if !matches!(refusal, ApiError::InvalidToken) && !unavailable(&e) =>
            {
                Err(anyhow::anyhow!(
                    "Telegram refused the webhook {url} (TELEGRAM_WEBHOOK_URL): {}",
                    describe(&e, scrub)
                ))
            }
            e => pause_after(e, &SET_WEBHOOK, scrub),
        },
    )
    .await?;
    if set.is_some() {
        info!("telegram webhook set: Telegram posts updates to {url}");
    }
    Ok(())
}

/// What the listener's requests share.
struct Receiver {
    inbox: Inbox,
    secret: WebhookSecret,
    /// The webhook URL's path, the only one served.
    path: String,
    shutdown: Shutdown,
}

/// One request to the listener. The answers, and why:
/// - 404 off the webhook's path, 405 for other methods than POST;
/// - 401 without the secret header, 403 with a wrong secret: nothing is read or stored;
/// - 413 for a body over [`MAX_BODY_BYTES`];
/// - 503 while shutting down, or when the update could not be stored: Telegram delivers it
///   again later, to this replica or another;
/// - 200 once the update is stored and its reply queued (a redelivered one is found in the
///   store and dropped), and also for a body with nothing kaiwa can use: not JSON, an update
///   teloxide cannot read, a kind the bot does not use. Telegram would send a refused body again
///   and again, slowing delivery to the whole webhook, and it will never become readable; so it
///   is logged and confirmed, as the poller passes an unreadable update.
///
/// Every 200 has an empty body: Telegram runs a Bot API method given in a webhook's answer.
async fn receive(State(receiver): State<Arc<Receiver>>, request: Request) -> Response {
    if request.uri().path() != receiver.path {
        return StatusCode::NOT_FOUND.into_response();
    }
    if request.method() != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response();
    }
    match request.headers().get(SECRET_HEADER) {
        None => {
            warn!("telegram webhook: refused a request without the secret header");
            return StatusCode::UNAUTHORIZED.into_response();
        }
        Some(given) if !receiver.secret.matches(given.as_bytes()) => {
            warn!("telegram webhook: refused a request with a wrong secret");
            return StatusCode::FORBIDDEN.into_response();
        }
        Some(_) => {}
    }
    if receiver.shutdown.is_triggered() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    // Refused unread when it says it is too long; a body that only turns out so is cut off.
    let too_long = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&length| length > MAX_BODY_BYTES as u64);
    if let Some(length) = too_long {
        warn!("telegram webhook: refused a request of {length} bytes");
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(refused) => {
            warn!("telegram webhook: could not read a request's body ({refused})");
            return refused.into_response();
        }
    };
    let Some(update) = posted_update(&body) else {
        warn!(
            "telegram webhook: confirmed a request without a readable update ({} bytes)",
            body.len()
        );
        return StatusCode::OK.into_response();
    };
    match receiver.inbox.take(&update).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => {
            warn!(
                "telegram webhook: could not store update {} ({e}); answered 503, so Telegram \
                 delivers it again",
                update.id.0
            );
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

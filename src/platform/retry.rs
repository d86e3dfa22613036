//! What the platform adapters share about failing and trying again: calling the platform until it
//! answers, with backoff ([`until_answered`], [`Pause`]), the rule for a reply the platform
//! refused with HTTP 429 ([`RateLimitRetries`]), what a failed send becomes for the bot
//! ([`failed_send`]), and keeping the bot token out of every text that is logged or returned
//! ([`Scrubber`]).
//!
//! Each adapter reads its own protocol and hands this module plain values: Telegram's flood
//! control gives its wait as `parameters.retry_after` in the JSON answer (teloxide reads it),
//! Discord's 429 as `retry_after` in the body and in the `Retry-After` header (seconds, read with
//! [`seconds`]), for a route or, with `"global": true`, for the whole bot.

use std::future::Future;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::bot::event::SendError;
use crate::shutdown::Shutdown;

/// What a failed request calls for before the next try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The platform said how long (a 429's `retry_after`): that long, and the backoff does not
    /// grow.
    RetryAfter(Duration),
    /// The platform could not be reached, failed inside or answered nonsense: the backoff's next
    /// delay, longer after each failure.
    Backoff,
}

impl Pause {
    /// Waits as called for, or until shutdown; `false` when shutdown came first.
    pub async fn wait(self, backoff: &mut Backoff, shutdown: &mut Shutdown) -> bool {
        match self {
            Pause::RetryAfter(delay) => shutdown.sleep(delay).await,
            Pause::Backoff => backoff.wait(shutdown).await,
        }
    }
}

/// Makes `request` until it answers (a start-up call: who the bot is, where the gateway is).
/// `judge` turns each error into the [`Pause`] before the next try, logging it as its platform
/// does (it is given the backoff, whose failures do not yet count this one), or into the error
/// that ends the whole thing (the token refused). `Ok(None)` when shutdown came first, during a
/// request or a pause.
pub async fn until_answered<T, E, F, Fut>(
    mut backoff: Backoff,
    shutdown: &mut Shutdown,
    mut request: F,
    mut judge: impl FnMut(E, &Backoff) -> anyhow::Result<Pause>,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let result = tokio::select! {
            () = shutdown.wait() => return Ok(None),
            result = request() => result,
        };
        let pause = match result {
            Ok(answer) => return Ok(Some(answer)),
            Err(e) => judge(e, &backoff)?,
        };
        if !pause.wait(&mut backoff, shutdown).await {
            return Ok(None);
        }
    }
}

/// How many times a reply is tried while the platform answers 429…
pub const REPLY_ATTEMPTS: u32 = 5;
/// …and the longest wait it is given: a longer ban would stall a generation worker, so the reply
/// fails instead.
pub const REPLY_MAX_WAIT: Duration = Duration::from_secs(60);

/// Counts the 429s one request met, and says whether to wait and try again.
#[derive(Debug, Clone)]
pub struct RateLimitRetries {
    attempts: u32,
    max_wait: Duration,
    refused: u32,
}

/// Try again after waiting `wait`; this was try number `attempt` (from 1) to be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub attempt: u32,
    pub wait: Duration,
}

impl Retry {
    /// Waits it out. (Not cut short at shutdown: the reply is in flight, and at most
    /// [`REPLY_MAX_WAIT`] away.)
    pub async fn sleep(self) {
        tokio::time::sleep(self.wait).await;
    }
}

/// Why a rate-limited request is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Try number `attempt`, the last allowed, was refused too.
    Exhausted { attempt: u32 },
    /// Try number `attempt` was told to wait `wait`, more than allowed.
    TooLong { attempt: u32, wait: Duration },
}

impl GiveUp {
    /// The number of the try refused last.
    pub fn attempt(self) -> u32 {
        match self {
            GiveUp::Exhausted { attempt } | GiveUp::TooLong { attempt, .. } => attempt,
        }
    }
}

impl RateLimitRetries {
    /// At most `attempts` tries in all, each wait at most `max_wait`.
    pub fn new(attempts: u32, max_wait: Duration) -> Self {
        RateLimitRetries {
            attempts,
            max_wait,
            refused: 0,
        }
    }

    /// The rule for a reply: [`REPLY_ATTEMPTS`] tries, waits up to [`REPLY_MAX_WAIT`].
    pub fn reply() -> Self {
        Self::new(REPLY_ATTEMPTS, REPLY_MAX_WAIT)
    }

    /// One more try was refused with 429 and told to wait `retry_after` (the platform's, or
    /// the caller's guess where it gave none): wait and try again, or give up, the last try
    /// first, then a wait too long.
    pub fn refused(&mut self, retry_after: Duration) -> Result<Retry, GiveUp> {
        self.refused = self.refused.saturating_add(1);
        let attempt = self.refused;
        if attempt >= self.attempts {
            Err(GiveUp::Exhausted { attempt })
        } else if retry_after > self.max_wait {
            Err(GiveUp::TooLong {
                attempt,
                wait: retry_after,
            })
        } else {
            Ok(Retry {
                attempt,
                wait: retry_after,
            })
        }
    }
}

/// A wait in seconds as HTTP APIs give it (`"retry_after": 0.25`, `Retry-After: 2`); `None`
/// when it is negative or not a number, [`Duration::MAX`] when it is too large for one.
pub fn seconds(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// What a failed send becomes for the bot: [`SendError::Unavailable`] when the same send may
/// pass later (the platform could not be reached, or failed inside: 5xx), so the bot sends it
/// again with its own backoff; [`SendError::Other`] otherwise. `why` must be scrubbed already.
pub fn failed_send(may_pass_later: bool, why: String) -> SendError {
    if may_pass_later {
        SendError::Unavailable(why)
    } else {
        SendError::Other(why)
    }
}

/// Removes the bot token from text bound for logs and errors. HTTP client errors quote the
/// request URL (Telegram's holds the token), and an error may echo a header (Discord's
/// `Authorization: Bot <token>`); no text leaves an adapter without passing through here.
#[derive(Clone)]
pub struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    /// Hides `token` (without the white space around it); hides nothing when it is empty.
    pub fn new(token: &str) -> Self {
        Scrubber {
            secrets: Vec::new(),
        }
        .and_part(token.trim())
    }

    /// Also hides `part` of the token where it stands on its own (Telegram's secret after
    /// `id:`, apart from its id in a percent-encoded URL).
    pub fn and_part(mut self, part: &str) -> Self {
        if !part.is_empty() {
            self.secrets.push(part.to_string());
        }
        self
    }

    /// `text` with every secret replaced by `***`.
    pub fn clean(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_string(), |text, secret| {
            text.replace(secret.as_str(), "***")
        })
    }

    /// An error with the causes under it (`error sending request: …: Connection refused`: an
    /// HTTP client's own text names no cause), cleaned.
    pub fn error_chain(&self, e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(e) = cause {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cause = e.source();
        }
        self.clean(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::shutdown::shutdown_channel;

    fn quick() -> Backoff {
        Backoff::new(Duration::from_millis(2), Duration::from_millis(4))
    }

    #[tokio::test]
    async fn a_request_is_made_until_it_answers_and_only_failures_grow_the_backoff() {
        let (_trigger, mut shutdown) = shutdown_channel();
        let tries = &AtomicU32::new(0);
        let mut seen = Vec::new();
        let answer = until_answered(
            quick(),
            &mut shutdown,
            move || async move {
                match tries.fetch_add(1, Ordering::SeqCst) {
                    0 => Err("429"),
                    1 | 2 => Err("down"),
                    n => Ok(n),
                }
            },
            |e, backoff| {
                seen.push((e, backoff.failures()));
                Ok(match e {
                    "429" => Pause::RetryAfter(Duration::from_millis(1)),
                    _ => Pause::Backoff,
                })
            },
        )
        .await
        .unwrap();
        assert_eq!(answer, Some(3));
        // The platform's own wait is not a failure of ours.
        assert_eq!(seen, [("429", 0), ("down", 0), ("down", 1)]);
    }

    #[tokio::test]
    async fn a_fatal_error_ends_the_tries() {
        let (_trigger, mut shutdown) = shutdown_channel();
        let tries = &AtomicU32::new(0);
        let result: anyhow::Result<Option<()>> = until_answered(
            quick(),
            &mut shutdown,
            move || async move {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("401")
            },
            |e, _| Err(anyhow::anyhow!("token refused: {e}")),
        )
        .await;
        assert_eq!(result.unwrap_err().to_string(), "token refused: 401");
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn shutdown_ends_a_pause_and_a_request_in_flight() {
        let (trigger, mut shutdown) = shutdown_channel();
        let long = Backoff::new(Duration::from_secs(600), Duration::from_secs(600));
        let waiting = until_answered(
            long,
            &mut shutdown,
            || async { Err::<(), _>("down") },
            |_, _| Ok(Pause::Backoff),
        );
        let stop = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            trigger.trigger();
        };
        let (result, ()) = tokio::join!(waiting, stop);
        assert_eq!(result.unwrap(), None);

        let hanging = until_answered(
            quick(),
            &mut shutdown,
            std::future::pending::<Result<(), &str>>,
            |_, _| Ok(Pause::Backoff),
        );
        assert_eq!(hanging.await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_pause_waits_as_called_for_unless_shutdown_comes_first() {
        let (trigger, mut shutdown) = shutdown_channel();
        let mut backoff = quick();
        assert!(
            Pause::RetryAfter(Duration::from_millis(1))
                .wait(&mut backoff, &mut shutdown)
                .await
        );
        assert_eq!(backoff.failures(), 0);
        assert!(Pause::Backoff.wait(&mut backoff, &mut shutdown).await);
        assert_eq!(backoff.failures(), 1);
        trigger.trigger();
        let pause = Pause::RetryAfter(Duration::from_secs(600));
        assert!(!pause.wait(&mut backoff, &mut shutdown).await);
    }

    #[test]
    fn a_reply_waits_out_four_429s_and_gives_up_at_the_fifth() {
        let mut r = RateLimitRetries::reply();
        for attempt in 1..REPLY_ATTEMPTS {
            assert_eq!(
                r.refused(Duration::from_secs(1)),
                Ok(Retry {
                    attempt,
                    wait: Duration::from_secs(1)
                })
            );
        }
        // The last try counts before the wait: no wait is too long once none is left.
        assert_eq!(
            r.refused(Duration::from_secs(3600)),
            Err(GiveUp::Exhausted { attempt: 5 })
        );
    }

    #[test]
    fn a_wait_longer_than_allowed_is_not_waited() {
        let mut r = RateLimitRetries::reply();
        assert!(
            r.refused(REPLY_MAX_WAIT).is_ok(),
            "the limit itself is waited"
        );
        let too_long = r.refused(REPLY_MAX_WAIT + Duration::from_millis(1));
        assert_eq!(
            too_long,
            Err(GiveUp::TooLong {
                attempt: 2,
                wait: REPLY_MAX_WAIT + Duration::from_millis(1)
            })
        );
        assert_eq!(too_long.unwrap_err().attempt(), 2);
    }

    #[test]
    fn seconds_as_apis_give_them() {
        assert_eq!(seconds(0.25), Some(Duration::from_millis(250)));
        assert_eq!(seconds(2.0), Some(Duration::from_secs(2)));
        assert_eq!(seconds(0.0), Some(Duration::ZERO));
        assert_eq!(seconds(-1.0), None);
        assert_eq!(seconds(f64::NAN), None);
        assert_eq!(seconds(f64::INFINITY), None);
        assert_eq!(seconds(1e30), Some(Duration::MAX));
    }

    #[test]
    fn a_failed_send_that_may_pass_later_is_unavailable() {
        assert!(matches!(
            failed_send(true, "502".into()),
            SendError::Unavailable(w) if w == "502"
        ));
        assert!(matches!(
            failed_send(false, "403".into()),
            SendError::Other(w) if w == "403"
        ));
    }

    #[test]
    fn the_token_and_its_parts_are_hidden_wherever_they_stand() {
        let s = Scrubber::new(" 12345:ABCDEFGHIJKL\n").and_part("ABCDEFGHIJKL");
        assert_eq!(
            s.clean("GET /bot12345:ABCDEFGHIJKL/getMe and bot12345%3AABCDEFGHIJKL"),
            "GET /bot***/getMe and bot12345%3A***"
        );
        assert_eq!(
            Scrubber::new("abc.def.ghi").clean("Bot abc.def.ghi"),
            "Bot ***"
        );
    }

    #[test]
    fn an_empty_token_hides_nothing() {
        let s = Scrubber::new("  ").and_part("");
        assert_eq!(s.clean("nothing to hide"), "nothing to hide");
    }

    #[test]
    fn an_error_chain_names_its_causes_without_the_token() {
        #[derive(Debug)]
        struct Failed(&'static str, Option<Box<Failed>>);
        impl std::fmt::Display for Failed {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Failed {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = Failed(
            "error sending request for url (http://x/bot1:SECRETSECRET/getMe)",
            Some(Box::new(Failed(
                "client error (Connect)",
                Some(Box::new(Failed("Connection refused", None))),
            ))),
        );
        assert_eq!(
            Scrubber::new("1:SECRETSECRET").error_chain(&e),
            "error sending request for url (http://x/bot***/getMe): client error (Connect): \
             Connection refused"
        );
    }
}

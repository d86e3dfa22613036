//! What `GET /metrics` shows, in the Prometheus exposition format (OpenMetrics text): for the
//! bots, messages in, replies by outcome and their time, platform errors and replies recovered
//! after a crash; for the web, requests by route and status, tokens, latency histograms and
//! errors by kind; and the reply queue's depth. One set per daemon, shared by the bot and the web
//! server.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn seconds_histogram() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// The server's metrics; cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    errors: Family<Labels, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    first_token_seconds: Histogram,
    reply_seconds: Histogram,
    queue_depth: Gauge,
    cut_replies: Counter,
    messages_in: Family<Labels, Counter>,
    replies: Family<Labels, Counter>,
    bot_reply_seconds: Histogram,
    platform_errors: Family<Labels, Counter>,
    recovered: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kaiwa");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let request_seconds = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time until the response's headers, by route (a stream's body comes after)",
            request_seconds.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "api_errors",
            "Requests answered with an error, by its type",
            errors.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of chat completions",
            prompt_tokens.clone(),
        );
        let completion_tokens = Counter::default();
        registry.register(
            "completion_tokens",
            "Tokens of the replies sent",
            completion_tokens.clone(),
        );
        let first_token_seconds = seconds_histogram();
        registry.register(
            "time_to_first_token_seconds",
            "From a completion request to the first piece of its reply",
            first_token_seconds.clone(),
        );
        let reply_seconds = seconds_histogram();
        registry.register(
            "reply_duration_seconds",
            "From a completion request to its last piece",
            reply_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Replies queued or being made, bots and web together",
            queue_depth.clone(),
        );
        let cut_replies = Counter::default();
        registry.register(
            "cut_replies",
            "Streamed replies whose client went away before the end",
            cut_replies.clone(),
        );
        let messages_in = Family::<Labels, Counter>::default();
        registry.register(
            "messages_received",
            "Messages the bots received and stored (redeliveries not counted), by platform",
            messages_in.clone(),
        );
        let replies = Family::<Labels, Counter>::default();
        registry.register(
            "replies",
            "Replies of the bots by platform and outcome (sent, failed, busy)",
            replies.clone(),
        );
        let bot_reply_seconds = seconds_histogram();
        registry.register(
            "bot_reply_duration_seconds",
            "A bot reply's time once it had a worker: context, engine, sending",
            bot_reply_seconds.clone(),
        );
        let platform_errors = Family::<Labels, Counter>::default();
        registry.register(
            "platform_errors",
            "Sends a platform refused or that failed, by platform",
            platform_errors.clone(),
        );
        let recovered = Family::<Labels, Counter>::default();
        registry.register(
            "recovered_replies",
            "Replies a crash left claimed, by what the next start did (resumed, already_sent, failed)",
            recovered.clone(),
        );
        Metrics {
            registry,
            messages_in,
            replies,
            bot_reply_seconds,
            platform_errors,
            recovered,
            requests,
            request_seconds,
            errors,
            prompt_tokens,
            completion_tokens,
            first_token_seconds,
            reply_seconds,
            queue_depth,
            cut_replies,
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("method", method.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
        self.request_seconds
            .get_or_create(&vec![("route", route.to_string())])
            .observe(seconds);
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("type", kind.to_string())])
            .inc();
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.completion_tokens.inc_by(completion as u64);
    }

    pub fn first_token(&self, seconds: f64) {
        self.first_token_seconds.observe(seconds);
    }

    pub fn reply_done(&self, seconds: f64) {
        self.reply_seconds.observe(seconds);
    }

    pub fn cut(&self) {
        self.cut_replies.inc();
    }

    pub fn message_in(&self, platform: &str) {
        self.messages_in
            .get_or_create(&vec![("platform", platform.to_string())])
            .inc();
    }

    /// A bot reply's outcome: `sent`, `failed` or `busy`.
    pub fn reply(&self, platform: &str, outcome: &str) {
        self.replies
            .get_or_create(&vec![
                ("platform", platform.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    pub fn bot_reply_time(&self, seconds: f64) {
        self.bot_reply_seconds.observe(seconds);
    }

    pub fn platform_error(&self, platform: &str) {
        self.platform_errors
            .get_or_create(&vec![("platform", platform.to_string())])
            .inc();
    }

    /// Replies a crash left, by what was done: `resumed`, `already_sent`, `failed`.
    pub fn recovered(&self, outcome: &str, n: usize) {
        self.recovered
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc_by(n as u64);
    }

    /// The exposition text, with the queue depth as it is now.
    pub fn render(&self, queue_depth: usize) -> String {
        self.queue_depth.set(queue_depth as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_the_queue() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", "POST", 200, 0.12);
        m.tokens(10, 5);
        m.error("invalid_request_error");
        let text = m.render(3);
        for want in [
            "kaiwa_http_requests_total{route=\"/v1/chat/completions\",method=\"POST\",status=\"200\"} 1",
            "kaiwa_prompt_tokens_total 10",
            "kaiwa_completion_tokens_total 5",
            "kaiwa_queue_depth 3",
            "kaiwa_api_errors_total{type=\"invalid_request_error\"} 1",
            "kaiwa_http_request_duration_seconds_bucket{le=\"0.16\",route=\"/v1/chat/completions\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }
}

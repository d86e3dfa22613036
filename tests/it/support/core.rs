//! The platform-neutral core in-process: the bot on a fresh SQLite store (or one it is given) and
//! the tiny model, with an outbox that records what it sends.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kaiwa::bot::event::{
    BoxFuture, ChannelRef, ChatKind, Incoming, IncomingMessage, Outbox, Platform, SendError,
    SentMessage,
};
use kaiwa::bot::Bot;
use kaiwa::clock::Clock;
use kaiwa::config::Settings;
use kaiwa::model::Generator;
use kaiwa::store::Store;

#[derive(Default)]
pub struct RecordingOutbox {
    sent: Mutex<Vec<(ChannelRef, String, Option<String>)>>,
}

impl Outbox for RecordingOutbox {
    fn send<'a>(
        &'a self,
        channel: &'a ChannelRef,
        text: &'a str,
        reply_to: Option<&'a str>,
    ) -> BoxFuture<'a, Result<SentMessage, SendError>> {
        Box::pin(async move {
            let mut sent = self.sent.lock().unwrap();
            sent.push((
                channel.clone(),
                text.to_string(),
                reply_to.map(str::to_string),
            ));
            Ok(SentMessage {
                message_id: format!("bot-{}", sent.len()),
                sent_at_ms: kaiwa::store::now_ms(),
            })
        })
    }

    fn typing<'a>(&'a self, _channel: &'a ChannelRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }
}

impl RecordingOutbox {
    pub fn sent(&self) -> Vec<(ChannelRef, String, Option<String>)> {
        self.sent.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, n: usize) -> Vec<(ChannelRef, String, Option<String>)> {
        for _ in 0..400 {
            if self.sent.lock().unwrap().len() >= n {
                return self.sent();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("expected {n} sent messages, got {:?}", self.sent());
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub bot: Arc<Bot>,
    pub store: Store,
    pub outbox: Arc<RecordingOutbox>,
}

/// The bot with the test settings, `extra` over them, on the tiny model.
pub async fn harness(extra: &[(&str, &str)]) -> Harness {
    harness_on(extra, &super::model::tiny_model_dir()).await
}

/// [`harness`] on the model in `model`. A `DATABASE_URL` in `extra` names the store (one that
/// other harnesses or processes share); else it is a fresh SQLite file in the harness's dir.
pub async fn harness_on(extra: &[(&str, &str)], model: &std::path::Path) -> Harness {
    harness_at(extra, model, Clock::system()).await
}

/// [`harness`] whose day-bound rules (the daily quota, the day's one notice) read `clock`.
pub async fn harness_with_clock(extra: &[(&str, &str)], clock: Clock) -> Harness {
    harness_at(extra, &super::model::tiny_model_dir(), clock).await
}

async fn harness_at(extra: &[(&str, &str)], model: &std::path::Path, clock: Clock) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = extra
        .iter()
        .rev()
        .find(|(k, _)| *k == "DATABASE_URL")
        .map_or_else(
            || format!("sqlite://{}", dir.path().join("kaiwa.db").display()),
            |(_, url)| url.to_string(),
        );
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.clone()),
        ("USER_COOLDOWN_MS".into(), "0".into()),
        ("MAX_NEW_TOKENS".into(), "8".into()),
        ("ADMIN_IDS".into(), "telegram:admin".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut settings = Settings::from_lookup(move |k| {
        env.iter()
            .rev()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap();
    settings.clock = clock;
    let store = Store::open(&db).await.unwrap();
    let generator = Arc::new(Generator::load(model).unwrap());
    let bot = Bot::new(settings, store.clone(), generator);
    Harness {
        dir,
        bot,
        store,
        outbox: Arc::new(RecordingOutbox::default()),
    }
}

/// A Telegram message from `author` in `chat`, sent now.
pub fn message(chat: &str, kind: ChatKind, id: &str, author: &str, text: &str) -> IncomingMessage {
    IncomingMessage {
        channel: ChannelRef::new(Platform::Telegram, chat),
        kind,
        message_id: id.into(),
        author_id: author.into(),
        author_name: format!("name-{author}"),
        author_is_bot: false,
        text: text.into(),
        reply_to: None,
        replies_to_bot: false,
        mentions_bot: false,
        sent_at_ms: kaiwa::store::now_ms(),
        guild_id: None,
        roles: Vec::new(),
    }
}

impl Harness {
    pub async fn send(&self, m: IncomingMessage) {
        self.bot
            .handle(Incoming::Message(m), self.outbox.clone() as Arc<dyn Outbox>)
            .await;
    }
}

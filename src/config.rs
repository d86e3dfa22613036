//! Settings from the environment and `.env`, read and checked once at start-up, so the rest of
//! the program never re-validates them. This module is the one reader of the environment for
//! every command: the daemon reads all of [`Settings`]; a command that needs only part of it
//! (the store, the model directory, the reply engine) reads that part through the same lookup,
//! so a setting has one name, one default and one error text wherever it is used.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::clock::Clock;
use crate::domain::Platform;
use crate::engine::{EngineSettings, Weights};
use crate::model::{GenerateOptions, Sampling};
use crate::store::SharePolicy;

/// A secret (a bot token, an API key): `secrecy`'s string, whose `Debug` never shows the value
/// and whose memory is zeroed when dropped; `expose_secret()` for the one place that must send it.
pub use secrecy::{ExposeSecret, SecretString as Secret};

/// Settings for one platform connection.
#[derive(Debug, Clone)]
pub struct PlatformSettings {
    pub token: Secret,
    /// Replaces the platform's public API address (self-hosted Bot API server, proxy, tests).
    pub api_url: Option<String>,
}

/// Telegram's settings: the Bot API, and how updates reach this process.
#[derive(Debug, Clone)]
pub struct TelegramSettings {
    pub api: PlatformSettings,
    /// `TELEGRAM_WEBHOOK_URL` set: Telegram posts updates to this process (webhook mode, for
    /// several replicas behind one URL). Unset: this process long-polls `getUpdates`, which only
    /// one process per bot may do.
    pub webhook: Option<WebhookSettings>,
}

/// Webhook mode: where Telegram posts updates and how a request proves it comes from Telegram.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `TELEGRAM_WEBHOOK_URL`: the public address Telegram posts to (given to `setWebhook`); the
    /// listener serves its path. May hold a secret path, so it is logged scrubbed of the token.
    pub url: url::Url,
    /// `TELEGRAM_WEBHOOK_LISTEN`: where this process listens, behind the TLS proxy or load
    /// balancer the URL leads to ([`DEFAULT_WEBHOOK_LISTEN`] when unset).
    pub listen: std::net::SocketAddr,
    /// `TELEGRAM_WEBHOOK_SECRET`: sent to `setWebhook` and checked on every request.
    pub secret: WebhookSecret,
}

/// The secret Telegram sends in `X-Telegram-Bot-Api-Secret-Token` with every webhook request: 1 to
/// 256 characters of `A-Z`, `a-z`, `0-9`, `_` and `-` (Telegram's rule). Required in webhook mode:
/// whichever replica last called `setWebhook` decides what Telegram sends, so every replica behind
/// the URL must be given the same one rather than make up its own.
#[derive(Debug, Clone)]
pub struct WebhookSecret(Secret);

impl WebhookSecret {
    /// The secret, if `value` keeps Telegram's rule. The error never quotes the value.
    pub fn parse(value: &str) -> Result<Self, String> {
        let length = value.chars().count();
        if !(1..=256).contains(&length) {
            return Err(format!(
                "is {length} characters long; Telegram takes 1 to 256"
            ));
        }
        if let Some(at) = value
            .chars()
            .position(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            return Err(format!(
                "character {} is not one Telegram allows (A-Z, a-z, 0-9, _ and -)",
                at + 1
            ));
        }
        Ok(WebhookSecret(Secret::from(value)))
    }

    /// The secret, for the one request that sends it (`setWebhook`).
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether `given` (a request's header) is the secret, compared in constant time so that
    /// the answer's timing does not tell how much of a guess was right.
    pub fn matches(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        self.0.expose_secret().as_bytes().ct_eq(given).into()
    }
}

/// When the bot answers in group chats (it always answers direct messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyPolicy {
    /// When mentioned, replied to, or given a command.
    Mentioned,
    /// Every message, in every group (a per-channel setting can also turn this on).
    All,
}

/// Everything the daemon needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub discord: Option<PlatformSettings>,
    /// Which of the bot's Discord shards this process runs (`DISCORD_SHARDS`).
    pub discord_shards: DiscordShards,
    pub telegram: Option<TelegramSettings>,
    pub database_url: String,
    pub model_dir: PathBuf,
    /// `(platform, user id)` pairs allowed to use admin commands.
    pub admins: HashSet<(Platform, String)>,
    /// Who may talk to the bot, and how much (`ALLOWED_*`, `BLOCKED_USERS`, `DAILY_QUOTA`…).
    pub access: AccessSettings,
    /// The time day-bound rules (the daily quota, one notice a day) read: the system's, or a
    /// test's manual clock. Not read from the environment.
    pub clock: Clock,
    pub reply_policy: ReplyPolicy,
    pub system_prompt: Option<String>,
    /// At most this many stored messages form a reply's context…
    pub context_messages: usize,
    /// …and none older than this.
    pub context_max_age: Duration,
    /// The sampling settings the environment gives (`TEMPERATURE`, …); unset ones come from
    /// the model's `generation_config.json`, then kaiwa's defaults ([`Settings::reply_options`]).
    pub generation: Sampling,
    /// The base of every reply's seed (`SEED`).
    pub seed: u64,
    /// Generations running at once (each on its own thread).
    pub workers: usize,
    /// Threads one generation's matrix products are split over (`model::threads`).
    pub threads: usize,
    /// The most replies queued or in progress (a bound on memory); see also `max_reply_wait`.
    pub queue_capacity: usize,
    /// A message is answered "busy" when its reply would come later than this
    /// (`MAX_REPLY_WAIT_SECS`): the replies ahead of it × the measured reply time ÷ `WORKERS`.
    pub max_reply_wait: Duration,
    /// Minimum time between two answered messages of one user.
    pub user_cooldown: Duration,
    /// At start-up, replies a crash left unsent are made for messages younger than this
    /// (`RECOVER_MAX_AGE_MINUTES`); older ones are marked failed.
    pub recover_max_age: Duration,
    /// How replies are chosen (`REPLY_ENGINE`, the ranker's knobs, what may be retrieved).
    pub engine: EngineSettings,
    /// The web server (`kaiwa serve`, and `kaiwa run` when `HTTP_ADDR` is set).
    pub web: WebSettings,
}

/// Settings of the web server: where it listens and who may use it.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// `HTTP_ADDR`; `kaiwa serve` listens on [`DEFAULT_HTTP_ADDR`] when it is unset, `kaiwa run`
    /// not at all.
    pub addr: Option<std::net::SocketAddr>,
    /// `API_KEYS`, comma-separated: clients send one as `Authorization: Bearer KEY`. None: no
    /// key is asked for (allowed on a loopback address only, unless `allow_no_keys`).
    pub api_keys: Vec<Secret>,
    /// `HTTP_ALLOW_NO_KEYS=true`: listen on a public address without keys.
    pub allow_no_keys: bool,
    /// `CORS_ORIGINS`, comma-separated (`*` for any); none by default.
    pub cors_origins: Vec<String>,
    /// `API_KEY_CONCURRENCY`: requests one key (or, without keys, everyone) may have running.
    pub key_concurrency: usize,
    /// `API_KEY_RATE_PER_MINUTE`: requests one key may start a minute (0: no limit).
    pub key_rate_per_minute: u32,
}

/// The store when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://kaiwa.db";

/// The model directory when `MODEL_DIR` is not set (and a command is given no `--model`).
pub const DEFAULT_MODEL_DIR: &str = "models/kaiwa";

/// Where `kaiwa serve` listens when `HTTP_ADDR` is not set: this machine only.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";

/// Where the Telegram webhook listener listens when `TELEGRAM_WEBHOOK_LISTEN` is not set: every
/// interface, port 8443, since the load balancer in front of the replicas reaches them over the
/// network, and every request must carry the secret anyway. Plain HTTP: TLS ends at what is in
/// front.
pub const DEFAULT_WEBHOOK_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 8443),
);

impl WebSettings {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let list = |name: &str| -> Vec<String> {
            get(name)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        let web = WebSettings {
            addr: parse_some(get, "HTTP_ADDR")?,
            api_keys: list("API_KEYS").into_iter().map(Secret::from).collect(),
            allow_no_keys: parse(get, "HTTP_ALLOW_NO_KEYS", false)?,
            cors_origins: list("CORS_ORIGINS"),
            key_concurrency: parse(get, "API_KEY_CONCURRENCY", 4)?,
            key_rate_per_minute: parse(get, "API_KEY_RATE_PER_MINUTE", 120)?,
        };
        if web.key_concurrency == 0 {
            return Err(SettingsError {
                name: "API_KEY_CONCURRENCY",
                reason: "must be at least 1".into(),
            });
        }
        Ok(web)
    }

    /// Checks that listening on `addr` is safe: a public address needs keys (or
    /// `HTTP_ALLOW_NO_KEYS=true`).
    pub fn check_addr(&self, addr: std::net::SocketAddr) -> Result<(), SettingsError> {
        if addr.ip().is_loopback() || !self.api_keys.is_empty() || self.allow_no_keys {
            return Ok(());
        }
        Err(SettingsError {
            name: "HTTP_ADDR",
            reason: format!(
                "{addr} is reachable from other machines and API_KEYS is empty: set API_KEYS, \
                 listen on 127.0.0.1, or set HTTP_ALLOW_NO_KEYS=true to serve everyone"
            ),
        })
    }
}

/// Which of the bot's Discord shards this process runs (`DISCORD_SHARDS`). Discord splits a
/// bot's guilds over shards, one gateway connection each (a guild's shard is
/// `(guild_id >> 22) % total`; direct messages all come to shard 0), and requires more than one
/// from 2,500 guilds on. The shards may run in one process or be spread over several that share
/// one store, each answering only the guilds of its own shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscordShards {
    /// `auto`: as many shards as Discord recommends (`GET /gateway/bot`), all in this process.
    Auto,
    /// `N/TOTAL` or `FIRST-LAST/TOTAL`; unset, shard 0 of 1.
    Range(ShardRange),
}

impl Default for DiscordShards {
    fn default() -> Self {
        DiscordShards::Range(ShardRange::all(1))
    }
}

impl std::str::FromStr for DiscordShards {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(DiscordShards::Auto);
        }
        let expected = || {
            format!(
                "{s:?} is not N/TOTAL, FIRST-LAST/TOTAL or auto (e.g. 0-1/4: shards 0 and 1 of 4)"
            )
        };
        let number = |n: &str| -> Result<u32, String> {
            let n = n.trim();
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(expected());
            }
            n.parse()
                .map_err(|_| format!("{n} shards are more than Discord has"))
        };
        let (shards, total) = s.split_once('/').ok_or_else(expected)?;
        let (first, last) = match shards.split_once('-') {
            Some((first, last)) => (number(first)?, number(last)?),
            None => (number(shards)?, number(shards)?),
        };
        ShardRange::new(first, last, number(total)?).map(DiscordShards::Range)
    }
}

/// Shards `first..=last` of `total`: never empty, never past the total ([`ShardRange::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRange {
    first: u32,
    last: u32,
    total: u32,
}

impl ShardRange {
    pub fn new(first: u32, last: u32, total: u32) -> Result<Self, String> {
        if total == 0 {
            return Err("the total number of shards must be at least 1".into());
        }
        if first > last {
            return Err(format!("the range {first}-{last} runs backwards"));
        }
        if last >= total {
            return Err(format!(
                "shard {last} does not exist: the shards of {total} are numbered 0 to {}",
                total - 1
            ));
        }
        Ok(ShardRange { first, last, total })
    }

    /// Every shard of `total` (1 if `total` is 0).
    pub fn all(total: u32) -> Self {
        let total = total.max(1);
        ShardRange {
            first: 0,
            last: total - 1,
            total,
        }
    }

    pub fn first(&self) -> u32 {
        self.first
    }

    /// The last shard, included.
    pub fn last(&self) -> u32 {
        self.last
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    pub fn contains(&self, shard: u32) -> bool {
        (self.first..=self.last).contains(&shard)
    }

    /// Whether these are all the bot's shards: every guild and every direct message is this
    /// process's.
    pub fn is_all(&self) -> bool {
        self.first == 0 && self.last + 1 == self.total
    }
}

impl fmt::Display for ShardRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}/{}", self.first, self.total)
        } else {
            write!(f, "{}-{}/{}", self.first, self.last, self.total)
        }
    }
}

/// Who may talk to the bot (the settings' part; `/allow` and `/block` add to it in the store).
/// Each list holds `(platform, id)` as `ADMIN_IDS` does. Empty allow lists let everyone in;
/// a block always wins; admins are always allowed.
#[derive(Debug, Clone, Default)]
pub struct AccessSettings {
    /// `ALLOWED_USERS`: the people who may talk to the bot.
    pub allowed_users: HashSet<(Platform, String)>,
    /// `ALLOWED_CHATS`: Telegram chats and Discord channels the bot serves.
    pub allowed_chats: HashSet<(Platform, String)>,
    /// `ALLOWED_GUILDS`: Discord servers the bot serves (`discord:ID`).
    pub allowed_guilds: HashSet<(Platform, String)>,
    /// `ALLOWED_ROLES`: Discord roles whose members may talk to the bot (`discord:ID`).
    pub allowed_roles: HashSet<(Platform, String)>,
    /// `BLOCKED_USERS`: never answered, wherever they write.
    pub blocked_users: HashSet<(Platform, String)>,
    /// `REFUSAL_NOTICE=1`: a refused person is told so, once a day, in their language;
    /// otherwise they get no answer at all.
    pub refusal_notice: bool,
    /// `DAILY_QUOTA`: replies one person gets a day (UTC); `None` (unset or 0): no limit.
    pub daily_quota: Option<u32>,
    /// `DISCORD_UNLISTED_GUILDS`: what to do in a Discord server not on `ALLOWED_GUILDS`.
    pub unlisted_guilds: UnlistedGuilds,
}

impl AccessSettings {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let discord_only = |name: &'static str| -> Result<_, SettingsError> {
            let list = id_list(get, name)?;
            if let Some((p, id)) = list.iter().find(|(p, _)| *p != Platform::Discord) {
                return Err(SettingsError {
                    name,
                    reason: format!("{p}:{id}: only Discord has these (discord:ID)"),
                });
            }
            Ok(list)
        };
        let daily_quota: u32 = parse(get, "DAILY_QUOTA", 0)?;
        let unlisted_guilds = match get("DISCORD_UNLISTED_GUILDS").as_deref() {
            None | Some("ignore") => UnlistedGuilds::Ignore,
            Some("leave") => UnlistedGuilds::Leave,
            Some(other) => {
                return Err(SettingsError {
                    name: "DISCORD_UNLISTED_GUILDS",
                    reason: format!("{other:?} is not \"ignore\" or \"leave\""),
                })
            }
        };
        Ok(AccessSettings {
            allowed_users: id_list(get, "ALLOWED_USERS")?,
            allowed_chats: id_list(get, "ALLOWED_CHATS")?,
            allowed_guilds: discord_only("ALLOWED_GUILDS")?,
            allowed_roles: discord_only("ALLOWED_ROLES")?,
            blocked_users: id_list(get, "BLOCKED_USERS")?,
            refusal_notice: parse_flag(get, "REFUSAL_NOTICE")?,
            daily_quota: (daily_quota > 0).then_some(daily_quota),
            unlisted_guilds,
        })
    }

    /// Whether the Discord server `guild` is one the bot serves: `ALLOWED_GUILDS` is empty or
    /// lists it.
    pub fn serves_guild(&self, guild: &str) -> bool {
        self.allowed_guilds.is_empty()
            || self
                .allowed_guilds
                .contains(&(Platform::Discord, guild.to_string()))
    }
}

/// What kaiwa does in a Discord server that `ALLOWED_GUILDS` does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnlistedGuilds {
    /// Stays, but neither stores nor answers anything there.
    #[default]
    Ignore,
    /// Leaves the server when it arrives (at start-up or when invited).
    Leave,
}

/// A comma-separated list of `platform:id` (`ADMIN_IDS`, `ALLOWED_USERS`, …); unset: empty.
fn id_list(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<HashSet<(Platform, String)>, SettingsError> {
    let mut out = HashSet::new();
    for item in get(name)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (p, id) = item
            .split_once(':')
            .filter(|(_, id)| !id.trim().is_empty())
            .ok_or_else(|| SettingsError {
                name,
                reason: format!("{item:?} is not platform:id (e.g. telegram:12345)"),
            })?;
        let p = Platform::parse(p.trim()).ok_or_else(|| SettingsError {
            name,
            reason: format!("unknown platform {p:?} (discord, telegram or web)"),
        })?;
        out.insert((p, id.trim().to_string()));
    }
    Ok(out)
}

/// A yes/no setting: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`; unset: no.
fn parse_flag(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<bool, SettingsError> {
    match get(name).map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("0" | "false" | "no" | "off") => Ok(false),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some(other) => Err(SettingsError {
            name,
            reason: format!("{other:?} is not 1/true/yes/on or 0/false/no/off"),
        }),
    }
}

/// A setting that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {reason}")]
pub struct SettingsError {
    pub name: &'static str,
    pub reason: String,
}

impl Settings {
    /// The options of a reply: the model's own defaults (`model`, from its
    /// `generation_config.json`) with the environment's settings over them, and `SEED`.
    pub fn reply_options(&self, model: GenerateOptions) -> GenerateOptions {
        GenerateOptions {
            seed: self.seed,
            ..model.overridden_by(&self.generation)
        }
    }

    /// Reads `.env` (if present, without overriding the environment), then the environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(env_lookup())
    }

    /// Reads settings through `get`, so tests can supply their own values.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let get = non_empty(get);
        let platform = |token: &'static str, url: &'static str| {
            get(token).map(|t| PlatformSettings {
                token: Secret::from(t),
                api_url: get(url),
            })
        };
        let generation = Sampling {
            temperature: parse_some(&get, "TEMPERATURE")?,
            top_k: parse_some(&get, "TOP_K")?,
            top_p: parse_some(&get, "TOP_P")?,
            repetition_penalty: parse_some(&get, "REPETITION_PENALTY")?,
            max_new_tokens: parse_some(&get, "MAX_NEW_TOKENS")?,
            guidance_scale: parse_some(&get, "GUIDANCE_SCALE")?,
        };
        // Out-of-range values stop the daemon at start, not at its first reply.
        GenerateOptions::default()
            .overridden_by(&generation)
            .validate()
            .map_err(|e| SettingsError {
                name: "TEMPERATURE/TOP_P/REPETITION_PENALTY/GUIDANCE_SCALE",
                reason: e.to_string(),
            })?;
        let admins = id_list(&get, "ADMIN_IDS")?;
        let reply_policy = match get("REPLY_POLICY").as_deref() {
            None | Some("mentioned") => ReplyPolicy::Mentioned,
            Some("all") => ReplyPolicy::All,
            Some(other) => {
                return Err(SettingsError {
                    name: "REPLY_POLICY",
                    reason: format!("{other:?} is not \"mentioned\" or \"all\""),
                })
            }
        };
        let engine = engine_settings(&get)?;
        let settings = Settings {
            engine,
            web: WebSettings::from_lookup(&get)?,
            discord: platform("DISCORD_TOKEN", "DISCORD_API_URL"),
            discord_shards: parse(&get, "DISCORD_SHARDS", DiscordShards::default())?,
            telegram: telegram_settings(&get, platform("TELEGRAM_TOKEN", "TELEGRAM_API_URL"))?,
            database_url: database_url(&get),
            model_dir: model_dir(&get),
            admins,
            access: AccessSettings::from_lookup(&get)?,
            clock: Clock::system(),
            reply_policy,
            system_prompt: get("SYSTEM_PROMPT"),
            context_messages: parse(&get, "CONTEXT_MESSAGES", 40)?,
            context_max_age: Duration::from_secs(
                60 * parse::<u64>(&get, "CONTEXT_MAX_AGE_MINUTES", 24 * 60)?,
            ),
            generation,
            seed: parse(&get, "SEED", 0)?,
            workers: parse(&get, "WORKERS", 2)?,
            threads: parse(&get, "THREADS", crate::model::threads::default_threads())?,
            queue_capacity: parse(&get, "QUEUE_CAPACITY", 256)?,
            max_reply_wait: Duration::from_secs(parse(&get, "MAX_REPLY_WAIT_SECS", 60)?),
            user_cooldown: Duration::from_millis(parse(&get, "USER_COOLDOWN_MS", 1500)?),
            recover_max_age: Duration::from_secs(
                60 * parse::<u64>(&get, "RECOVER_MAX_AGE_MINUTES", 10)?,
            ),
        };
        for (name, value) in [("WORKERS", settings.workers), ("THREADS", settings.threads)] {
            if value == 0 {
                return Err(SettingsError {
                    name,
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(settings)
    }

    pub fn is_admin(&self, platform: Platform, user_id: &str) -> bool {
        self.admins.contains(&(platform, user_id.to_string()))
    }
}

fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, SettingsError>
where
    T::Err: fmt::Display,
{
    Ok(parse_some(get, name)?.unwrap_or(default))
}

/// Telegram's settings: `api` (from `TELEGRAM_TOKEN`, if set), and webhook mode when
/// `TELEGRAM_WEBHOOK_URL` is set. Webhook settings without the URL or the token are an error
/// rather than ignored: the process would poll while its owner thinks it takes webhooks.
fn telegram_settings(
    get: &impl Fn(&str) -> Option<String>,
    api: Option<PlatformSettings>,
) -> Result<Option<TelegramSettings>, SettingsError> {
    let Some(url) = get("TELEGRAM_WEBHOOK_URL") else {
        for name in ["TELEGRAM_WEBHOOK_LISTEN", "TELEGRAM_WEBHOOK_SECRET"] {
            if get(name).is_some() {
                return Err(SettingsError {
                    name,
                    reason: "is set but TELEGRAM_WEBHOOK_URL is not; set the URL for webhook \
                             mode, or unset this to long-poll"
                        .into(),
                });
            }
        }
        return Ok(api.map(|api| TelegramSettings { api, webhook: None }));
    };
    let Some(api) = api else {
        return Err(SettingsError {
            name: "TELEGRAM_WEBHOOK_URL",
            reason: "is set but TELEGRAM_TOKEN is not".into(),
        });
    };
    // The URL may hold a secret path: errors say what is wrong with it, not what it is.
    let url = url::Url::parse(&url).map_err(|e| SettingsError {
        name: "TELEGRAM_WEBHOOK_URL",
        reason: format!("not a URL ({e}); expected e.g. https://bot.example.com/telegram"),
    })?;
    if !matches!(url.scheme(), "https" | "http") || !url.has_host() {
        return Err(SettingsError {
            name: "TELEGRAM_WEBHOOK_URL",
            reason: "must be an https:// URL with a host (Telegram posts to https only; http is \
                     for a self-hosted Bot API server)"
                .into(),
        });
    }
    let listen = parse(get, "TELEGRAM_WEBHOOK_LISTEN", DEFAULT_WEBHOOK_LISTEN)?;
    let secret = get("TELEGRAM_WEBHOOK_SECRET").ok_or_else(|| SettingsError {
        name: "TELEGRAM_WEBHOOK_SECRET",
        reason: "is required with TELEGRAM_WEBHOOK_URL: Telegram sends it with every update, and \
                 every replica behind the URL must check the same one (1 to 256 characters of \
                 A-Z, a-z, 0-9, _ and -)"
            .into(),
    })?;
    let secret = WebhookSecret::parse(&secret).map_err(|reason| SettingsError {
        name: "TELEGRAM_WEBHOOK_SECRET",
        reason,
    })?;
    Ok(Some(TelegramSettings {
        api,
        webhook: Some(WebhookSettings {
            url,
            listen,
            secret,
        }),
    }))
}

/// A lookup that trims values and treats empty ones as unset (`KEY=` in `.env`).
fn non_empty(get: impl Fn(&str) -> Option<String>) -> impl Fn(&str) -> Option<String> {
    move |k| {
        get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }
}

/// The environment as every command reads it: `.env` first (if present, without overriding
/// what is set), values trimmed, empty ones unset.
fn env_lookup() -> impl Fn(&str) -> Option<String> {
    let _ = dotenvy::dotenv();
    non_empty(|k| std::env::var(k).ok())
}

/// The store's URL: `DATABASE_URL`, else [`DEFAULT_DATABASE_URL`].
fn database_url(get: &impl Fn(&str) -> Option<String>) -> String {
    get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into())
}

/// The store's URL from the environment and `.env` (what the store commands, `export-corpus`,
/// `import`, `forget`, `stats` and `chat`, use; the daemon reads it with the rest of
/// [`Settings`]).
pub fn database_url_from_env() -> String {
    database_url(&env_lookup())
}

/// The model directory: `MODEL_DIR`, else [`DEFAULT_MODEL_DIR`].
fn model_dir(get: &impl Fn(&str) -> Option<String>) -> PathBuf {
    get("MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR))
}

/// The model directory from the environment and `.env`: where a command given no `--model`
/// looks.
pub fn model_dir_from_env() -> PathBuf {
    model_dir(&env_lookup())
}

/// The reply engine's settings from the environment and `.env` (what `kaiwa chat`, `eval` and
/// `bench reply` use; the daemon reads them with the rest of [`Settings`]).
pub fn engine_settings_from_env() -> Result<EngineSettings, SettingsError> {
    engine_settings(&env_lookup())
}

/// The reply engine's settings: `REPLY_ENGINE`, what it may retrieve from and its ranker's
/// weights (each `RANK_*` over [`Weights::default`]).
pub fn engine_settings(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<EngineSettings, SettingsError> {
    let d = EngineSettings::default();
    let w = d.weights;
    let engine = EngineSettings {
        mode: parse(get, "REPLY_ENGINE", d.mode)?,
        pairs: parse(get, "RETRIEVE_PAIRS", d.pairs)?,
        sentences: parse(get, "RETRIEVE_SENTENCES", d.sentences)?,
        generated: parse(get, "GENERATED_CANDIDATES", d.generated)?,
        generated_max_tokens: parse(get, "GENERATED_MAX_TOKENS", d.generated_max_tokens)?,
        generate_below: parse(get, "GENERATE_BELOW_SCORE", d.generate_below)?,
        scored: parse(get, "SCORED_CANDIDATES", d.scored)?,
        max_df_fraction: parse(get, "RETRIEVE_MAX_DF", d.max_df_fraction)?,
        weights: Weights {
            similarity: parse(get, "RANK_SIMILARITY", w.similarity)?,
            topic: parse(get, "RANK_TOPIC", w.topic)?,
            coverage: parse(get, "RANK_COVERAGE", w.coverage)?,
            mmi: parse(get, "RANK_MMI", w.mmi)?,
            lambda: parse(get, "RANK_MMI_LAMBDA", w.lambda)?,
            likelihood: parse(get, "RANK_LIKELIHOOD", w.likelihood)?,
            feedback: parse(get, "RANK_FEEDBACK", w.feedback)?,
            length: parse(get, "RANK_LENGTH", w.length)?,
            min_score: parse(get, "RANK_MIN_SCORE", w.min_score)?,
        },
        share: SharePolicy {
            groups: parse(get, "SHARE_GROUPS", false)?,
            direct: parse(get, "RETRIEVE_DIRECT", false)?,
        },
    };
    engine.validate().map_err(|e| SettingsError {
        name: "REPLY_ENGINE/RETRIEVE_*/RANK_*",
        reason: e.to_string(),
    })?;
    Ok(engine)
}

/// The setting `name` if it is set.
fn parse_some<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>, SettingsError>
where
    T::Err: fmt::Display,
{
    get(name)
        .map(|v| {
            v.parse().map_err(|e: T::Err| SettingsError {
                name,
                reason: format!("{v:?}: {e}"),
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn a_public_address_needs_api_keys() {
        let web = |pairs: &[(&str, &str)]| Settings::from_lookup(lookup(pairs)).unwrap().web;
        let public: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(web(&[]).check_addr(local).is_ok());
        let refused = web(&[]).check_addr(public).unwrap_err();
        assert!(refused.reason.contains("API_KEYS"), "{refused}");
        assert!(web(&[("API_KEYS", "a, b")]).check_addr(public).is_ok());
        assert_eq!(web(&[("API_KEYS", "a, b")]).api_keys.len(), 2);
        assert!(web(&[("HTTP_ALLOW_NO_KEYS", "true")])
            .check_addr(public)
            .is_ok());
        // Keys never show in debug output either.
        let shown = format!("{:?}", web(&[("API_KEYS", "sk-secret")]));
        assert!(!shown.contains("sk-secret"), "{shown}");
    }

    #[test]
    fn access_lists_are_read_in_the_admin_ids_style() {
        let a = |pairs: &[(&str, &str)]| Settings::from_lookup(lookup(pairs)).map(|s| s.access);
        let open = a(&[]).unwrap();
        assert!(open.allowed_users.is_empty() && open.daily_quota.is_none());
        assert!(!open.refusal_notice && open.unlisted_guilds == UnlistedGuilds::Ignore);
        let set = a(&[
            ("ALLOWED_USERS", "telegram:1, discord:2"),
            ("ALLOWED_CHATS", "telegram:-100"),
            ("ALLOWED_GUILDS", "discord:5"),
            ("BLOCKED_USERS", "telegram:3"),
            ("REFUSAL_NOTICE", "1"),
            ("DAILY_QUOTA", "20"),
            ("DISCORD_UNLISTED_GUILDS", "leave"),
        ])
        .unwrap();
        assert!(set.allowed_users.contains(&(Platform::Discord, "2".into())));
        assert!(set
            .allowed_chats
            .contains(&(Platform::Telegram, "-100".into())));
        assert!(set.serves_guild("5") && !set.serves_guild("6"));
        assert!(set
            .blocked_users
            .contains(&(Platform::Telegram, "3".into())));
        assert!(set.refusal_notice);
        assert_eq!(set.daily_quota, Some(20));
        assert_eq!(set.unlisted_guilds, UnlistedGuilds::Leave);
        assert_eq!(a(&[("DAILY_QUOTA", "0")]).unwrap().daily_quota, None);
        for (name, value) in [
            ("ALLOWED_USERS", "telegram"),
            ("ALLOWED_USERS", "telegram:"),
            ("BLOCKED_USERS", "irc:1"),
            ("ALLOWED_GUILDS", "telegram:5"),
            ("ALLOWED_ROLES", "5"),
            ("REFUSAL_NOTICE", "maybe"),
            ("DAILY_QUOTA", "-1"),
            ("DISCORD_UNLISTED_GUILDS", "ban"),
        ] {
            let e = a(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name, "{name}={value}: {e}");
        }
    }

    #[test]
    fn the_store_and_the_model_have_defaults() {
        let s = Settings::from_lookup(lookup(&[("DATABASE_URL", " ")])).unwrap();
        assert_eq!(s.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(s.model_dir, PathBuf::from(DEFAULT_MODEL_DIR));
        let s = Settings::from_lookup(lookup(&[
            ("DATABASE_URL", "sqlite:///tmp/k.db"),
            ("MODEL_DIR", "m"),
        ]))
        .unwrap();
        assert_eq!(s.database_url, "sqlite:///tmp/k.db");
        assert_eq!(s.model_dir, PathBuf::from("m"));
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let s = Settings::from_lookup(lookup(&[("TELEGRAM_TOKEN", "123:SECRET-TOKEN")])).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("SECRET-TOKEN"), "{shown}");
        assert_eq!(
            s.telegram.unwrap().api.token.expose_secret(),
            "123:SECRET-TOKEN"
        );
        assert!(s.discord.is_none());
    }

    #[test]
    fn replies_use_the_model_defaults_under_the_environment() {
        let model = GenerateOptions {
            sampling: crate::model::SamplingParams {
                temperature: 0.3,
                top_k: 20,
                ..Default::default()
            },
            max_new_tokens: 50,
            seed: 99,
            stop: Vec::new(),
            guidance_scale: 1.5,
        };
        // Nothing set: the model's own settings, seed 0.
        let s = Settings::from_lookup(lookup(&[])).unwrap();
        let o = s.reply_options(model.clone());
        assert_eq!(
            o,
            GenerateOptions {
                seed: 0,
                ..model.clone()
            }
        );
        // What the environment sets wins; the rest stays the model's.
        let s = Settings::from_lookup(lookup(&[
            ("TEMPERATURE", "0.9"),
            ("GUIDANCE_SCALE", "1"),
            ("MAX_NEW_TOKENS", "12"),
            ("SEED", "7"),
        ]))
        .unwrap();
        let o = s.reply_options(model);
        assert_eq!(o.sampling.temperature, 0.9);
        assert_eq!(o.sampling.top_k, 20);
        assert_eq!((o.max_new_tokens, o.seed, o.guidance_scale), (12, 7, 1.0));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = Settings::from_lookup(lookup(&[("WORKERS", "many")])).unwrap_err();
        assert_eq!(e.name, "WORKERS");
        for (name, value) in [("WORKERS", "0"), ("THREADS", "0"), ("THREADS", "-2")] {
            let e = Settings::from_lookup(lookup(&[(name, value)])).unwrap_err();
            assert_eq!(e.name, name, "{name}={value}");
        }
        let s = Settings::from_lookup(lookup(&[("THREADS", "3")])).unwrap();
        assert_eq!(s.threads, 3);
        assert!(Settings::from_lookup(lookup(&[])).unwrap().threads >= 1);
        let e = Settings::from_lookup(lookup(&[("ADMIN_IDS", "telegram")])).unwrap_err();
        assert_eq!(e.name, "ADMIN_IDS");
        let e = Settings::from_lookup(lookup(&[("TOP_P", "2")])).unwrap_err();
        assert!(e.to_string().contains("top_p"), "{e}");
        let e = Settings::from_lookup(lookup(&[("GUIDANCE_SCALE", "-1")])).unwrap_err();
        assert!(e.to_string().contains("guidance_scale"), "{e}");
        let e = Settings::from_lookup(lookup(&[("MAX_NEW_TOKENS", "-3")])).unwrap_err();
        assert_eq!(e.name, "MAX_NEW_TOKENS");
        let s = Settings::from_lookup(lookup(&[("ADMIN_IDS", "telegram:1, discord:2")])).unwrap();
        assert!(s.is_admin(Platform::Telegram, "1") && s.is_admin(Platform::Discord, "2"));
        assert!(!s.is_admin(Platform::Telegram, "2"));
    }

    #[test]
    fn discord_shards_are_read_as_a_range_of_a_total_or_auto() {
        let shards = |v: &str| {
            Settings::from_lookup(lookup(&[("DISCORD_SHARDS", v)])).map(|s| s.discord_shards)
        };
        let range =
            |first, last, total| DiscordShards::Range(ShardRange::new(first, last, total).unwrap());
        assert_eq!(
            Settings::from_lookup(lookup(&[])).unwrap().discord_shards,
            range(0, 0, 1)
        );
        assert_eq!(shards("0/1").unwrap(), range(0, 0, 1));
        assert_eq!(shards("3/4").unwrap(), range(3, 3, 4));
        assert_eq!(shards("0-1/4").unwrap(), range(0, 1, 4));
        assert_eq!(shards(" 2 - 3 / 4 ").unwrap(), range(2, 3, 4));
        assert_eq!(shards("auto").unwrap(), DiscordShards::Auto);
        let r = ShardRange::new(1, 2, 4).unwrap();
        assert_eq!((r.first(), r.last(), r.total()), (1, 2, 4));
        assert!(r.contains(1) && r.contains(2) && !r.contains(0) && !r.contains(3));
        assert!(!r.is_all() && ShardRange::new(0, 3, 4).unwrap().is_all());
        assert_eq!(r.to_string(), "1-2/4");
        assert_eq!(ShardRange::new(3, 3, 4).unwrap().to_string(), "3/4");
        assert_eq!(ShardRange::all(0), ShardRange::all(1));
    }

    #[test]
    fn impossible_discord_shards_are_refused_with_the_reason() {
        for (value, reason) in [
            ("2-1/4", "runs backwards"),
            ("4/4", "shard 4 does not exist"),
            ("0-4/4", "numbered 0 to 3"),
            ("0/0", "at least 1"),
            ("0-0/0", "at least 1"),
            ("one/4", "is not N/TOTAL"),
            ("0-1", "is not N/TOTAL"),
            ("-1/4", "is not N/TOTAL"),
            ("+1/4", "is not N/TOTAL"),
            ("0-1-2/4", "is not N/TOTAL"),
            ("0/4/8", "is not N/TOTAL"),
            ("/4", "is not N/TOTAL"),
            ("AUTO", "is not N/TOTAL"),
            ("0/99999999999", "more than Discord has"),
        ] {
            let e = Settings::from_lookup(lookup(&[("DISCORD_SHARDS", value)])).unwrap_err();
            assert_eq!(e.name, "DISCORD_SHARDS", "{value}");
            assert!(e.reason.contains(reason), "{value}: {e}");
        }
    }

    proptest::proptest! {
        /// `FIRST-LAST/TOTAL` is accepted exactly when it names shards that exist, and reads back
        /// as written.
        #[test]
        fn a_shard_range_is_accepted_exactly_when_its_shards_exist(
            first in 0u32..6, last in 0u32..6, total in 0u32..6,
        ) {
            let parsed = format!("{first}-{last}/{total}").parse::<DiscordShards>();
            proptest::prop_assert_eq!(parsed.is_ok(), first <= last && last < total);
            if let Ok(DiscordShards::Range(r)) = parsed {
                proptest::prop_assert_eq!(r.to_string().parse::<DiscordShards>(), Ok(DiscordShards::Range(r)));
                proptest::prop_assert_eq!((r.first(), r.last(), r.total()), (first, last, total));
            }
        }
    }

    #[test]
    fn webhook_mode_needs_a_url_a_token_and_a_valid_secret() {
        let token = ("TELEGRAM_TOKEN", "1:x");
        let url = ("TELEGRAM_WEBHOOK_URL", "https://bot.example.com/tg");
        let secret = ("TELEGRAM_WEBHOOK_SECRET", "s3cret_-Z");
        let telegram = |pairs: &[(&str, &str)]| {
            Settings::from_lookup(lookup(pairs)).map(|s| s.telegram.expect("telegram is set"))
        };
        // Long polling stays the default.
        assert!(telegram(&[token]).unwrap().webhook.is_none());

        let hook = telegram(&[token, url, secret]).unwrap().webhook.unwrap();
        assert_eq!(hook.url.as_str(), "https://bot.example.com/tg");
        assert_eq!(hook.url.path(), "/tg");
        assert_eq!(hook.listen, DEFAULT_WEBHOOK_LISTEN);
        assert_eq!(hook.listen.to_string(), "0.0.0.0:8443");
        assert!(hook.secret.matches(b"s3cret_-Z"));
        assert!(!hook.secret.matches(b"s3cret_-"));
        assert!(!hook.secret.matches(b"s3cret_-Z "));
        assert!(!hook.secret.matches(b""));
        let listen = ("TELEGRAM_WEBHOOK_LISTEN", "127.0.0.1:9000");
        let hook = telegram(&[token, url, secret, listen]).unwrap().webhook;
        assert_eq!(hook.unwrap().listen.to_string(), "127.0.0.1:9000");

        let name_of = |pairs: &[(&str, &str)]| telegram(pairs).unwrap_err().name;
        assert_eq!(name_of(&[token, url]), "TELEGRAM_WEBHOOK_SECRET");
        assert_eq!(name_of(&[url, secret]), "TELEGRAM_WEBHOOK_URL");
        assert_eq!(name_of(&[token, secret]), "TELEGRAM_WEBHOOK_SECRET");
        assert_eq!(name_of(&[token, listen]), "TELEGRAM_WEBHOOK_LISTEN");
        let bad_listen = ("TELEGRAM_WEBHOOK_LISTEN", "localhost");
        assert_eq!(
            name_of(&[token, url, secret, bad_listen]),
            "TELEGRAM_WEBHOOK_LISTEN"
        );
        for bad in [
            "not a url",
            "ftp://bot.example.com/tg",
            "/tg",
            "unix:/run/kaiwa.sock",
        ] {
            let e = telegram(&[token, ("TELEGRAM_WEBHOOK_URL", bad), secret]).unwrap_err();
            assert_eq!(e.name, "TELEGRAM_WEBHOOK_URL", "{bad}");
        }
        // A self-hosted Bot API server may post over plain http.
        let http = ("TELEGRAM_WEBHOOK_URL", "http://10.0.0.5:8080/");
        assert!(telegram(&[token, http, secret]).is_ok());
    }

    #[test]
    fn webhook_secrets_keep_telegrams_rule_and_are_never_shown() {
        for good in ["a", "Z9_-", &"x".repeat(256)] {
            assert!(WebhookSecret::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(257),
            "has space",
            "dot.ted",
            "ümlaut",
            "a/b",
            "a+b=",
        ] {
            let e = WebhookSecret::parse(bad).err().unwrap();
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        let e = Settings::from_lookup(lookup(&[
            ("TELEGRAM_TOKEN", "1:x"),
            ("TELEGRAM_WEBHOOK_URL", "https://bot.example.com/"),
            ("TELEGRAM_WEBHOOK_SECRET", "open sesame"),
        ]))
        .unwrap_err();
        assert_eq!(e.name, "TELEGRAM_WEBHOOK_SECRET");
        assert!(!e.to_string().contains("sesame"), "{e}");
        let s = Settings::from_lookup(lookup(&[
            ("TELEGRAM_TOKEN", "1:x"),
            ("TELEGRAM_WEBHOOK_URL", "https://bot.example.com/"),
            ("TELEGRAM_WEBHOOK_SECRET", "open-sesame"),
        ]))
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("sesame"), "{shown}");
    }
}

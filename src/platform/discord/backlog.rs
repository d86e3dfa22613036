//! What the last run left for this one on Discord: replies it claimed and never sent, and
//! messages written while kaiwa was down (a new gateway session does not replay them). With
//! `DISCORD_SHARDS` a process may run only some of the bot's shards; it then takes on only the
//! part of the backlog in its shards' guilds ([`ShardShare`]), so that each pending reply is
//! recovered, and each missed message read, by exactly one process.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serenity::model::id::{ChannelId, GuildId, MessageId, UserId};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{describe, incoming_message, is_conversation, DiscordOutbox};
use crate::bot::event::{ChatKind, Outbox, Platform};
use crate::bot::Bot;
use crate::config::ShardRange;
use crate::store::StoredMessage;

/// Pages of 100 messages read per channel when catching up.
const CATCH_UP_PAGES: usize = 10;

/// How long a shard waits, after its READY, for the guilds READY listed to arrive
/// (GUILD_CREATE) before it settles its part of the backlog without the missing ones (a guild in
/// an outage may not come for a long time; its part waits for the next start).
const GUILDS_WAIT: Duration = Duration::from_secs(30);

/// A channel kaiwa talked in lately: its id, its kind, and the id of its latest stored message.
type RecentChannel = (String, ChatKind, String);

/// What the last run left: the replies it claimed and never sent, and the channels with a stored
/// message within `CONTEXT_MAX_AGE_MINUTES` (to read what was written after that message).
/// Taken from the store before the gateway connects, so that nothing this run stores is taken for
/// it: a reply this process (or another one) is still making is pending too, and a message
/// stored live would hide the gap before it.
#[derive(Default)]
pub(super) struct Backlog {
    pending: Vec<StoredMessage>,
    channels: Vec<RecentChannel>,
}

impl Backlog {
    /// Reads the backlog from the store; what cannot be read is logged and left out.
    pub(super) async fn take(bot: &Bot) -> Backlog {
        let store = bot.store();
        let pending = store
            .pending_replies(Platform::Discord)
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "Discord: cannot list the replies the last run left");
                Vec::new()
            });
        let since = crate::store::now_ms() - bot.settings().context_max_age.as_millis() as i64;
        let channels = store
            .recent_channels(Platform::Discord, since)
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "Discord: cannot list the channels to catch up on");
                Vec::new()
            });
        Backlog { pending, channels }
    }

    /// Takes out the part in the channels `owns` accepts (by chat id and kind).
    fn split_off(&mut self, owns: impl Fn(&str, ChatKind) -> bool) -> Backlog {
        let (pending, rest) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|row| owns(&row.chat_id, row.chat_kind));
        self.pending = rest;
        let (channels, rest) = std::mem::take(&mut self.channels)
            .into_iter()
            .partition(|(chat_id, kind, _)| owns(chat_id, *kind));
        self.channels = rest;
        Backlog { pending, channels }
    }

    /// Answers what the last run claimed and never sent, before anything new, then what was
    /// written while kaiwa was down.
    pub(super) async fn settle(self, bot: &Arc<Bot>, outbox: &Arc<DiscordOutbox>, me: UserId) {
        let recovery: Arc<dyn Outbox> = outbox.clone();
        bot.recover_rows(Platform::Discord, self.pending, Some(recovery))
            .await;
        catch_up(bot, outbox, me, &self.channels).await;
    }
}

/// This process's share of the bot's shards, when it runs only some of them. The stored rows do
/// not say which guild a channel is in, so a shard's part of the backlog is known only once the
/// shard has said which guilds are its own (READY) and what channels and active threads each has
/// (GUILD_CREATE, for which the `GUILDS` intent is asked): direct messages go with shard 0, as
/// Discord sends them there, and a guild channel with the shard of its guild; stored channels of
/// no shard here are left to the process that runs theirs. Each shard settles its part after its
/// READY, and its own live events wait until then, so what the last run left is still answered
/// first.
pub(super) struct ShardShare {
    range: ShardRange,
    /// What no shard has taken yet.
    backlog: Mutex<Backlog>,
    /// The channels and active threads of each guild that came (GUILD_CREATE) to a shard still
    /// settling; a guild that went away or is unavailable (GUILD_DELETE) has none.
    guilds: watch::Sender<HashMap<GuildId, Vec<ChannelId>>>,
    /// The shards whose part of the backlog is settled.
    settled: watch::Sender<HashSet<u32>>,
}

impl ShardShare {
    pub(super) fn new(range: ShardRange, backlog: Backlog) -> Self {
        ShardShare {
            range,
            backlog: Mutex::new(backlog),
            guilds: watch::channel(HashMap::new()).0,
            settled: watch::channel(HashSet::new()).0,
        }
    }

    /// A guild came to `shard` (GUILD_CREATE, or GUILD_DELETE with no channels). Serenity hands
    /// each event to a task of its own, so this may come before the shard's READY is handled.
    pub(super) fn guild_arrived(&self, shard: u32, guild: GuildId, channels: Vec<ChannelId>) {
        if self.is_settled(shard) {
            return; // known only to settle the backlog, which this shard has done
        }
        self.guilds.send_modify(|g| {
            g.insert(guild, channels);
        });
    }

    /// `shard` is connected and owns `guilds` (its READY): waits (at most [`GUILDS_WAIT`]) for
    /// their channels, then settles the part of the backlog in them, and the shard's live events
    /// flow. A later READY of the same shard (a new session) finds it settled.
    pub(super) async fn shard_ready(
        &self,
        shard: u32,
        guilds: Vec<GuildId>,
        bot: &Arc<Bot>,
        outbox: &Arc<DiscordOutbox>,
        me: UserId,
    ) {
        if self.is_settled(shard) || !self.range.contains(shard) {
            return;
        }
        let mut arrived = self.guilds.subscribe();
        let all_came = tokio::time::timeout(
            GUILDS_WAIT,
            arrived.wait_for(|g| guilds.iter().all(|id| g.contains_key(id))),
        )
        .await
        .is_ok();
        let mut channels = HashSet::new();
        let mut missing = 0;
        self.guilds.send_modify(|g| {
            for id in &guilds {
                match g.remove(id) {
                    Some(c) => channels.extend(c.into_iter().map(|c| c.get())),
                    None => missing += 1,
                }
            }
        });
        if !all_came {
            warn!(
                shard,
                missing,
                "Discord: guilds of this shard did not arrive within {GUILDS_WAIT:?}; what the \
                 last run left in them waits for the next start"
            );
        }
        let part = self
            .backlog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .split_off(|chat_id, kind| match kind {
                ChatKind::Direct => shard == 0,
                ChatKind::Group => chat_id
                    .parse::<u64>()
                    .is_ok_and(|id| channels.contains(&id)),
            });
        info!(
            shard,
            guilds = guilds.len(),
            channels = channels.len(),
            pending_replies = part.pending.len(),
            channels_to_catch_up = part.channels.len(),
            "Discord: the shard's guilds are known; settling what the last run left in them"
        );
        part.settle(bot, outbox, me).await;
        self.settled.send_modify(|s| {
            s.insert(shard);
        });
    }

    fn is_settled(&self, shard: u32) -> bool {
        self.settled.borrow().contains(&shard)
    }

    /// Waits until `shard`'s part of the backlog is settled.
    pub(super) async fn settled(&self, shard: u32) {
        let _ = self
            .settled
            .subscribe()
            .wait_for(|s| s.contains(&shard))
            .await;
    }
}

/// Reads, through REST, what was written in `channels` after the last message stored there,
/// oldest first, and hands it to the bot ([`Bot::catch_up`]: stored; answered if recent and
/// addressed to it). Errors are logged.
async fn catch_up(
    bot: &Arc<Bot>,
    outbox: &Arc<DiscordOutbox>,
    me: UserId,
    channels: &[RecentChannel],
) {
    let mut found = 0;
    for (chat_id, kind, last_id) in channels {
        let (Ok(channel), Ok(mut after)) = (chat_id.parse::<u64>(), last_id.parse::<u64>()) else {
            continue;
        };
        let (Some(channel), Some(_)) = (NonZeroU64::new(channel), NonZeroU64::new(after)) else {
            continue;
        };
        let channel = ChannelId::from(channel);
        let guild = guild_of(bot, outbox, channel, *kind).await;
        for _ in 0..CATCH_UP_PAGES {
            let target = serenity::http::MessagePagination::After(MessageId::new(after));
            let mut page = match outbox
                .http
                .get_messages(channel, Some(target), Some(100))
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    warn!(channel = %channel, "Discord: cannot read missed messages: {}", outbox.scrub.clean(&describe(&e)));
                    break;
                }
            };
            let full = page.len() == 100;
            page.sort_by_key(|m| m.id);
            if let Some(last) = page.last() {
                after = last.id.get();
            }
            for msg in page {
                if msg.author.id == me || !is_conversation(msg.kind) || msg.content.is_empty() {
                    continue;
                }
                let mut incoming = incoming_message(&msg, me);
                // REST messages carry no guild id; the channel's kind is known from the store.
                incoming.kind = *kind;
                incoming.guild_id.clone_from(&guild);
                found += 1;
                bot.catch_up(incoming, outbox.clone()).await;
            }
            if !full {
                break;
            }
        }
    }
    if found > 0 {
        info!(
            channels = channels.len(),
            messages = found,
            "Discord: caught up on messages written while kaiwa was down"
        );
    }
}

/// The server a channel is in, asked through REST (which leaves it out of the messages it
/// reads) where `ALLOWED_GUILDS` needs it; `None` when it is not needed or cannot be had, and a
/// message without its server is then not served in a bot limited to some servers.
async fn guild_of(
    bot: &Bot,
    outbox: &DiscordOutbox,
    channel: ChannelId,
    kind: ChatKind,
) -> Option<String> {
    if kind != ChatKind::Group || bot.settings().access.allowed_guilds.is_empty() {
        return None;
    }
    match outbox.http.get_channel(channel).await {
        Ok(c) => c.guild().map(|g| g.guild_id.to_string()),
        Err(e) => {
            warn!(channel = %channel, "Discord: cannot tell which server a channel is in: {}", outbox.scrub.clean(&describe(&e)));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(chat_id: &str, kind: ChatKind) -> StoredMessage {
        StoredMessage {
            id: 1,
            platform: Platform::Discord,
            chat_id: chat_id.into(),
            thread_id: String::new(),
            chat_kind: kind,
            message_id: "100".into(),
            author_id: "7".into(),
            author_name: "alice".into(),
            author_is_bot: false,
            from_self: false,
            is_notice: false,
            text: Some("hi".into()),
            reply_to: None,
            sent_at_ms: 0,
            edited_at_ms: None,
            source: "live".into(),
            is_system: false,
        }
    }

    #[test]
    fn a_split_takes_the_owned_rows_and_channels_and_leaves_the_rest() {
        let mut backlog = Backlog {
            pending: vec![
                row("1", ChatKind::Direct),
                row("2", ChatKind::Group),
                row("3", ChatKind::Group),
            ],
            channels: vec![
                ("1".into(), ChatKind::Direct, "10".into()),
                ("3".into(), ChatKind::Group, "30".into()),
            ],
        };
        let ours = backlog.split_off(|chat, kind| kind == ChatKind::Direct || chat == "2");
        let chats = |b: &Backlog| -> (Vec<String>, Vec<String>) {
            (
                b.pending.iter().map(|r| r.chat_id.clone()).collect(),
                b.channels.iter().map(|c| c.0.clone()).collect(),
            )
        };
        assert_eq!(
            chats(&ours),
            (vec!["1".into(), "2".into()], vec!["1".into()])
        );
        assert_eq!(chats(&backlog), (vec!["3".into()], vec!["3".into()]));
        let none = backlog.split_off(|_, _| false);
        assert!(none.pending.is_empty() && none.channels.is_empty());
    }
}

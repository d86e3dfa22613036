//! Who may talk to the bot ([`admission`]), what a refused person gets, the daily quota, and the
//! admin commands that change the lists at run time: `/allow`, `/unallow`, `/block`, `/unblock`.
//!
//! The rules, per platform (a list of Telegram ids says nothing about Discord):
//! - admins (`ADMIN_IDS`) are always allowed; a block (`BLOCKED_USERS`, `/block`) always wins
//!   over everything else;
//! - places: with no chat or server on the platform's allow lists (`ALLOWED_CHATS`,
//!   `ALLOWED_GUILDS`, `/allow here`) every group is served; otherwise only those listed. In a
//!   group that is not served nothing is stored or answered;
//! - people: with no person or role on the platform's allow lists (`ALLOWED_USERS`,
//!   `ALLOWED_ROLES`, `/allow platform:id`) everyone in a served group may talk to the bot;
//!   otherwise only those listed. The others' messages in a served group are stored as group
//!   conversation, never answered;
//! - direct messages: with no allow list at all on the platform, everyone; otherwise only people
//!   listed (or whose direct chat is). A refused direct message is not stored: a stranger's
//!   words are not training data.

use std::sync::Arc;

use super::event::{ChatKind, IncomingMessage, Outbox, Platform};
use super::Bot;
use crate::config::AccessSettings;
use crate::conversation::{Command, CommandName};
use crate::store::{AccessKind, AccessList, AccessRule, StoreError, StoredAccess, TurnedAway};

/// What the access rules make of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Its author may talk to the bot here.
    Allowed,
    /// Its author may not: in a group it is stored and never answered; in a direct chat it is
    /// not stored.
    Refused,
    /// A group the bot does not serve: nothing of it is stored or answered.
    Unserved,
}

/// Decides a message by the settings' lists (`a`), the store's (`stored`) and `admin`.
pub(super) fn admission(
    a: &AccessSettings,
    stored: &StoredAccess,
    admin: bool,
    m: &IncomingMessage,
) -> Admission {
    if admin {
        return Admission::Allowed;
    }
    let p = m.channel.platform;
    let on_platform =
        |set: &std::collections::HashSet<(Platform, String)>| set.iter().any(|(q, _)| *q == p);
    let listed = |set: &std::collections::HashSet<(Platform, String)>, id: &str| {
        set.contains(&(p, id.to_string()))
    };
    let blocked = listed(&a.blocked_users, &m.author_id) || stored.user_blocked;
    let places_listed =
        on_platform(&a.allowed_chats) || on_platform(&a.allowed_guilds) || stored.any_allowed_chats;
    let people_listed =
        on_platform(&a.allowed_users) || on_platform(&a.allowed_roles) || stored.any_allowed_users;
    let chat_listed = listed(&a.allowed_chats, &m.channel.chat_id) || stored.chat_allowed;
    let person_listed = listed(&a.allowed_users, &m.author_id)
        || stored.user_allowed
        || m.roles.iter().any(|r| listed(&a.allowed_roles, r));
    match m.kind {
        ChatKind::Direct => {
            let allowed = (!places_listed && !people_listed) || person_listed || chat_listed;
            if allowed && !blocked && !stored.chat_blocked {
                Admission::Allowed
            } else {
                Admission::Refused
            }
        }
        ChatKind::Group => {
            let guild_listed = m
                .guild_id
                .as_ref()
                .is_some_and(|g| listed(&a.allowed_guilds, g));
            let served = (!places_listed || chat_listed || guild_listed) && !stored.chat_blocked;
            if !served {
                Admission::Unserved
            } else if blocked || (people_listed && !person_listed) {
                Admission::Refused
            } else {
                Admission::Allowed
            }
        }
    }
}

/// Whether `user_id`'s reactions on `platform` count as feedback: not when they are blocked,
/// nor, where people are listed, when they are not. (Reactions do not carry roles, so with
/// `ALLOWED_ROLES` set on the platform every unblocked person's count.)
pub(super) fn counts_reaction(
    a: &AccessSettings,
    stored: &StoredAccess,
    admin: bool,
    platform: Platform,
    user_id: &str,
) -> bool {
    let key = (platform, user_id.to_string());
    if admin {
        return true;
    }
    if a.blocked_users.contains(&key) || stored.user_blocked {
        return false;
    }
    let roles_decide = a.allowed_roles.iter().any(|(q, _)| *q == platform);
    let people_listed =
        a.allowed_users.iter().any(|(q, _)| *q == platform) || stored.any_allowed_users;
    roles_decide || !people_listed || a.allowed_users.contains(&key) || stored.user_allowed
}

/// Commands a person the bot refuses may still run: their privacy does not depend on the lists.
pub(super) fn open_to_everyone(c: &Command) -> bool {
    matches!(c.name, CommandName::OptOut | CommandName::ForgetMe)
}

/// What a refused person is told (`REFUSAL_NOTICE`), in the language they wrote in.
pub fn refusal_notice(text: &str) -> &'static str {
    match crate::text::lang::detect(text) {
        "ja" => "すみません、このボットは許可された人とだけ話します。",
        _ => "Sorry, I only talk to people the operator has allowed.",
    }
}

/// What a person past `DAILY_QUOTA` is told, once a day, in the language they wrote in.
pub fn quota_notice(text: &str, quota: u32) -> String {
    match crate::text::lang::detect(text) {
        "ja" => format!("今日の返信は{quota}回までです。明日（UTC）また話しましょう。"),
        _ => format!(
            "That's all my {quota} replies to you for today; I'll answer again tomorrow (UTC)."
        ),
    }
}

/// What `/allow`, `/block` and their undo act on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `platform:id`, or the author of the message replied to.
    User(Platform, String),
    /// `here`: this chat.
    Chat(Platform, String),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::User(p, id) => format!("{p}:{id}"),
            Target::Chat(p, id) => format!("this chat ({p}:{id})"),
        }
    }
}

impl Bot {
    /// The access rules' verdict on `m` ([`admission`]), read from the settings and the store.
    pub(super) async fn admission(&self, m: &IncomingMessage) -> Result<Admission, StoreError> {
        let p = m.channel.platform;
        let stored = self
            .store
            .stored_access(p, &m.author_id, &m.channel.chat_id)
            .await?;
        let admin = self.settings.is_admin(p, &m.author_id);
        Ok(admission(&self.settings.access, &stored, admin, m))
    }

    /// Whether a reaction of `user_id` in `channel` counts ([`counts_reaction`]).
    pub(super) async fn counts_reaction(
        &self,
        channel: &crate::domain::ChannelRef,
        user_id: &str,
    ) -> Result<bool, StoreError> {
        let p = channel.platform;
        let stored = self
            .store
            .stored_access(p, user_id, &channel.chat_id)
            .await?;
        let admin = self.settings.is_admin(p, user_id);
        Ok(counts_reaction(
            &self.settings.access,
            &stored,
            admin,
            p,
            user_id,
        ))
    }

    /// Counts a refusal of a message addressed to the bot, and gives today's one notice when
    /// `REFUSAL_NOTICE` asks for it.
    pub(super) async fn refuse(
        &self,
        m: &IncomingMessage,
        outbox: &Arc<dyn Outbox>,
    ) -> Result<(), StoreError> {
        let day = self.settings.clock.utc_day();
        let first = self
            .store
            .record_turned_away(m.channel.platform, &m.author_id, day, TurnedAway::Refused)
            .await?;
        tracing::info!(channel = %m.channel, user = %m.author_id, "not allowed to talk to the bot: not answered");
        self.metrics.reply(m.channel.platform.as_str(), "refused");
        if first && self.settings.access.refusal_notice {
            self.say(outbox, m, refusal_notice(&m.text)).await;
        }
        Ok(())
    }

    /// Takes one of today's `DAILY_QUOTA` replies for the author of `m` (admins have no quota);
    /// `false` when they are all taken. `true` without a quota.
    pub(super) async fn take_daily_reply(&self, m: &IncomingMessage) -> Result<bool, StoreError> {
        let p = m.channel.platform;
        match self.settings.access.daily_quota {
            Some(quota) if !self.settings.is_admin(p, &m.author_id) => {
                let day = self.settings.clock.utc_day();
                self.store
                    .take_daily_reply(p, &m.author_id, day, quota)
                    .await
            }
            _ => Ok(true),
        }
    }

    /// Undoes [`Bot::take_daily_reply`] for a message that was not new after all.
    pub(super) async fn give_back_daily_reply(
        &self,
        m: &IncomingMessage,
    ) -> Result<(), StoreError> {
        if self.settings.access.daily_quota.is_some() {
            let day = self.settings.clock.utc_day();
            self.store
                .give_back_daily_reply(m.channel.platform, &m.author_id, day)
                .await?;
        }
        Ok(())
    }

    /// Counts a message past the author's quota, and tells them once a day.
    pub(super) async fn over_quota(
        &self,
        m: &IncomingMessage,
        outbox: &Arc<dyn Outbox>,
    ) -> Result<(), StoreError> {
        let day = self.settings.clock.utc_day();
        let first = self
            .store
            .record_turned_away(m.channel.platform, &m.author_id, day, TurnedAway::OverQuota)
            .await?;
        tracing::info!(channel = %m.channel, user = %m.author_id, "DAILY_QUOTA reached: not answered");
        self.metrics
            .reply(m.channel.platform.as_str(), "over_quota");
        if first {
            let quota = self.settings.access.daily_quota.unwrap_or(0);
            self.say(outbox, m, &quota_notice(&m.text, quota)).await;
        }
        Ok(())
    }

    /// `/allow`, `/unallow`, `/block`, `/unblock` (admins only): `platform:id` names a person,
    /// `here` this chat, and no argument on a reply the replied-to author; with neither, the
    /// lists are shown. Returns the answer.
    pub(super) async fn change_access(
        &self,
        c: &Command,
        m: &IncomingMessage,
    ) -> Result<String, StoreError> {
        let (list, on) = match c.name {
            CommandName::Allow => (AccessList::Allow, true),
            CommandName::Unallow => (AccessList::Allow, false),
            CommandName::Block => (AccessList::Block, true),
            _ => (AccessList::Block, false),
        };
        let name = match c.name {
            CommandName::Allow => "allow",
            CommandName::Unallow => "unallow",
            CommandName::Block => "block",
            _ => "unblock",
        };
        let p = m.channel.platform;
        let target = match c.args.as_str() {
            "" => match &m.reply_to {
                Some(id) => match self.store.message_author(&m.channel, id).await? {
                    Some(author) => Target::User(p, author),
                    None => return Ok("I don't have the message you replied to.".into()),
                },
                None => return self.access_lists().await,
            },
            "here" => Target::Chat(p, m.channel.chat_id.clone()),
            arg => match arg.split_once(':').and_then(|(q, id)| {
                let id = id.trim();
                (!id.is_empty() && !id.contains(char::is_whitespace))
                    .then(|| Platform::parse(q.trim()).map(|q| (q, id.to_string())))
                    .flatten()
            }) {
                Some((q, id)) => Target::User(q, id),
                None => {
                    return Ok(format!(
                        "Usage: /{name} platform:id (e.g. /{name} telegram:123), /{name} here, or /{name} in reply to someone's message."
                    ))
                }
            },
        };
        let (platform, kind, id) = match &target {
            Target::User(q, id) => (*q, AccessKind::User, id.clone()),
            Target::Chat(q, id) => (*q, AccessKind::Chat, id.clone()),
        };
        if kind == AccessKind::Chat && list == AccessList::Block && on && m.kind == ChatKind::Direct
        {
            return Ok("Block a person with /block platform:id; `here` is for groups.".into());
        }
        let rule = AccessRule {
            list,
            platform,
            kind,
            id: id.clone(),
        };
        let by = format!("{p}:{}", m.author_id);
        let changed = self.store.set_access_rule(&rule, on, &by).await?;
        let who = target.describe();
        let a = &self.settings.access;
        let key = (platform, id);
        let mut answer = match (list, on, changed) {
            (AccessList::Allow, true, _) => format!("{who} may talk to me."),
            (AccessList::Allow, false, true) => format!("{who} is off the allow list."),
            (AccessList::Allow, false, false) => format!("{who} was not on the allow list."),
            (AccessList::Block, true, _) => {
                format!("{who} is blocked: stored in groups, never answered.")
            }
            (AccessList::Block, false, true) => format!("{who} is no longer blocked."),
            (AccessList::Block, false, false) => format!("{who} was not blocked."),
        };
        let pinned = match (list, kind) {
            (AccessList::Allow, AccessKind::User) if a.allowed_users.contains(&key) => {
                Some("ALLOWED_USERS")
            }
            (AccessList::Allow, AccessKind::Chat) if a.allowed_chats.contains(&key) => {
                Some("ALLOWED_CHATS")
            }
            (AccessList::Block, AccessKind::User) if a.blocked_users.contains(&key) => {
                Some("BLOCKED_USERS")
            }
            _ => None,
        };
        if let (false, Some(setting)) = (on, pinned) {
            answer = format!(
                "{who} stays on {setting} in the settings; only the settings can change that."
            );
        }
        match (list, on, kind) {
            (AccessList::Allow, true, AccessKind::User) => answer.push_str(&format!(
                " On {platform}, only the people on the allow lists (and admins) get answers now."
            )),
            (AccessList::Allow, true, AccessKind::Chat) => answer.push_str(&format!(
                " On {platform}, only the chats on the allow lists are served now, and direct \
                 messages only from the people on them (and admins)."
            )),
            _ => {}
        }
        tracing::info!(by = %by, rule = ?rule, on, "access rule changed");
        Ok(answer)
    }

    /// The allow and block lists, the settings' and the store's, as `/allow` alone shows them.
    async fn access_lists(&self) -> Result<String, StoreError> {
        let a = &self.settings.access;
        let show = |set: &std::collections::HashSet<(Platform, String)>| {
            let mut v: Vec<String> = set.iter().map(|(p, id)| format!("{p}:{id}")).collect();
            v.sort();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        let stored = self.store.access_rules().await?;
        let of = |list: AccessList, kind: AccessKind| {
            let v: Vec<String> = stored
                .iter()
                .filter(|r| r.list == list && r.kind == kind)
                .map(|r| format!("{}:{}", r.platform, r.id))
                .collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        Ok(format!(
            "Settings — users: {}; chats: {}; servers: {}; roles: {}; blocked: {}.\n\
             Set here — users: {}; chats: {}; blocked: {}.\n\
             /allow or /block platform:id, here, or in reply to a message; /unallow and /unblock undo.",
            show(&a.allowed_users),
            show(&a.allowed_chats),
            show(&a.allowed_guilds),
            show(&a.allowed_roles),
            show(&a.blocked_users),
            of(AccessList::Allow, AccessKind::User),
            of(AccessList::Allow, AccessKind::Chat),
            of(AccessList::Block, AccessKind::User),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ChannelRef;

    fn ids(items: &[&str]) -> std::collections::HashSet<(Platform, String)> {
        items
            .iter()
            .map(|s| {
                let (p, id) = s.split_once(':').unwrap();
                (Platform::parse(p).unwrap(), id.to_string())
            })
            .collect()
    }

    fn msg(kind: ChatKind, chat: &str, author: &str) -> IncomingMessage {
        IncomingMessage {
            channel: ChannelRef::new(Platform::Telegram, chat),
            kind,
            message_id: "1".into(),
            author_id: author.into(),
            author_name: author.into(),
            author_is_bot: false,
            text: "hi".into(),
            reply_to: None,
            replies_to_bot: false,
            mentions_bot: false,
            sent_at_ms: 0,
            guild_id: None,
            roles: Vec::new(),
        }
    }

    fn decide(a: &AccessSettings, m: &IncomingMessage) -> Admission {
        admission(a, &StoredAccess::default(), false, m)
    }

    #[test]
    fn empty_lists_let_everyone_in_and_a_block_still_wins() {
        let mut a = AccessSettings::default();
        assert_eq!(
            decide(&a, &msg(ChatKind::Direct, "5", "5")),
            Admission::Allowed
        );
        assert_eq!(
            decide(&a, &msg(ChatKind::Group, "-1", "5")),
            Admission::Allowed
        );
        a.blocked_users = ids(&["telegram:5"]);
        assert_eq!(
            decide(&a, &msg(ChatKind::Direct, "5", "5")),
            Admission::Refused
        );
        assert_eq!(
            decide(&a, &msg(ChatKind::Group, "-1", "5")),
            Admission::Refused
        );
        let admin = admission(
            &a,
            &StoredAccess::default(),
            true,
            &msg(ChatKind::Direct, "5", "5"),
        );
        assert_eq!(admin, Admission::Allowed);
    }

    #[test]
    fn allowed_users_make_direct_chats_private_and_groups_listen_only() {
        let a = AccessSettings {
            allowed_users: ids(&["telegram:7"]),
            ..AccessSettings::default()
        };
        assert_eq!(
            decide(&a, &msg(ChatKind::Direct, "7", "7")),
            Admission::Allowed
        );
        assert_eq!(
            decide(&a, &msg(ChatKind::Direct, "8", "8")),
            Admission::Refused
        );
        assert_eq!(
            decide(&a, &msg(ChatKind::Group, "-1", "8")),
            Admission::Refused
        );
        assert_eq!(
            decide(&a, &msg(ChatKind::Group, "-1", "7")),
            Admission::Allowed
        );
        // Another platform's list says nothing about this one.
        let mut discord = msg(ChatKind::Direct, "9", "9");
        discord.channel.platform = Platform::Discord;
        assert_eq!(decide(&a, &discord), Admission::Allowed);
    }

    #[test]
    fn allowed_chats_guilds_and_roles_pick_places_and_people() {
        let a = AccessSettings {
            allowed_chats: ids(&["telegram:-1"]),
            allowed_guilds: ids(&["discord:100"]),
            allowed_roles: ids(&["discord:55"]),
            ..AccessSettings::default()
        };
        assert_eq!(
            decide(&a, &msg(ChatKind::Group, "-1", "8")),
            Admission::Allowed
        );
        assert_eq!(
            decide(&a, &msg(ChatKind::Group, "-2", "8")),
            Admission::Unserved
        );
        assert_eq!(
            decide(&a, &msg(ChatKind::Direct, "8", "8")),
            Admission::Refused
        );
        let mut in_guild = msg(ChatKind::Group, "300", "8");
        in_guild.channel.platform = Platform::Discord;
        in_guild.guild_id = Some("100".into());
        assert_eq!(decide(&a, &in_guild), Admission::Refused);
        in_guild.roles = vec!["55".into()];
        assert_eq!(decide(&a, &in_guild), Admission::Allowed);
        in_guild.guild_id = Some("101".into());
        assert_eq!(decide(&a, &in_guild), Admission::Unserved);
    }

    #[test]
    fn reactions_of_blocked_and_unlisted_people_are_not_feedback() {
        let mut a = AccessSettings {
            blocked_users: ids(&["telegram:8"]),
            ..AccessSettings::default()
        };
        let none = StoredAccess::default();
        let counts = |a: &AccessSettings, user: &str| {
            counts_reaction(a, &none, false, Platform::Telegram, user)
        };
        assert!(counts(&a, "7") && !counts(&a, "8"));
        a.allowed_users = ids(&["telegram:7"]);
        assert!(counts(&a, "7") && !counts(&a, "9"));
        assert!(counts_reaction(&a, &none, true, Platform::Telegram, "9"));
    }

    #[test]
    fn stored_rules_count_as_the_settings_do() {
        let a = AccessSettings::default();
        let stored = StoredAccess {
            any_allowed_users: true,
            ..StoredAccess::default()
        };
        let m = msg(ChatKind::Direct, "8", "8");
        assert_eq!(admission(&a, &stored, false, &m), Admission::Refused);
        let stored = StoredAccess {
            any_allowed_users: true,
            user_allowed: true,
            ..StoredAccess::default()
        };
        assert_eq!(admission(&a, &stored, false, &m), Admission::Allowed);
        let stored = StoredAccess {
            user_allowed: true,
            any_allowed_users: true,
            user_blocked: true,
            ..StoredAccess::default()
        };
        assert_eq!(admission(&a, &stored, false, &m), Admission::Refused);
    }
}

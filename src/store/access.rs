//! Who may talk to the bot and how much, as the store keeps it: the allow and block rules admins
//! set at run time (`/allow`, `/block`), and per person and UTC day the replies taken against
//! the daily quota, refusals and quota hits. Both are read on every message, so every process on
//! the store follows a change at once.

use super::{Store, StoreError};
use crate::domain::Platform;

/// The two lists a rule can be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessList {
    Allow,
    Block,
}

impl AccessList {
    fn as_str(self) -> &'static str {
        match self {
            AccessList::Allow => "allow",
            AccessList::Block => "block",
        }
    }
}

/// What a rule names: a person, or a chat (a Telegram chat, a Discord channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    User,
    Chat,
}

impl AccessKind {
    fn as_str(self) -> &'static str {
        match self {
            AccessKind::User => "user",
            AccessKind::Chat => "chat",
        }
    }
}

/// One rule: `list` holds the `kind` `platform:id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccessRule {
    pub list: AccessList,
    pub platform: Platform,
    pub kind: AccessKind,
    pub id: String,
}

/// What the stored rules say about one message's author and chat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredAccess {
    pub user_allowed: bool,
    pub user_blocked: bool,
    pub chat_allowed: bool,
    pub chat_blocked: bool,
    /// Some person of the platform is on the stored allow list.
    pub any_allowed_users: bool,
    /// Some chat of the platform is on the stored allow list.
    pub any_allowed_chats: bool,
}

/// Why a person was turned away, counted per day ([`Store::record_turned_away`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnedAway {
    /// Not allowed to talk to the bot, or blocked.
    Refused,
    /// Past `DAILY_QUOTA` for the day.
    OverQuota,
}

impl Store {
    /// Puts `rule` on its list (`on`) or takes it off; `by` is who did it (`platform:id`).
    /// Returns whether anything changed.
    pub async fn set_access_rule(
        &self,
        rule: &AccessRule,
        on: bool,
        by: &str,
    ) -> Result<bool, StoreError> {
        let changed = if on {
            on_engine!(&self.pool, |p| sqlx::query(
                "INSERT INTO access_rules (list, platform, kind, id, added_by, added_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
            )
            .bind(rule.list.as_str())
            .bind(rule.platform.as_str())
            .bind(rule.kind.as_str())
            .bind(&rule.id)
            .bind(by)
            .bind(super::now_ms())
            .execute(p)
            .await?
            .rows_affected())
        } else {
            on_engine!(&self.pool, |p| sqlx::query(
                "DELETE FROM access_rules
                 WHERE list = $1 AND platform = $2 AND kind = $3 AND id = $4"
            )
            .bind(rule.list.as_str())
            .bind(rule.platform.as_str())
            .bind(rule.kind.as_str())
            .bind(&rule.id)
            .execute(p)
            .await?
            .rows_affected())
        };
        Ok(changed > 0)
    }

    /// Every stored rule, in a stable order.
    pub async fn access_rules(&self) -> Result<Vec<AccessRule>, StoreError> {
        let rows: Vec<(String, String, String, String)> = on_engine!(&self.pool, |p| {
            sqlx::query_as(
                "SELECT list, platform, kind, id FROM access_rules ORDER BY list, platform, kind, id",
            )
            .fetch_all(p)
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(list, platform, kind, id)| {
                Some(AccessRule {
                    list: match list.as_str() {
                        "allow" => AccessList::Allow,
                        "block" => AccessList::Block,
                        _ => return None,
                    },
                    platform: Platform::parse(&platform)?,
                    kind: match kind.as_str() {
                        "user" => AccessKind::User,
                        "chat" => AccessKind::Chat,
                        _ => return None,
                    },
                    id,
                })
            })
            .collect())
    }

    /// What the stored rules say about `user_id` writing in `chat_id` on `platform`.
    pub async fn stored_access(
        &self,
        platform: Platform,
        user_id: &str,
        chat_id: &str,
    ) -> Result<StoredAccess, StoreError> {
        let about: Vec<(String, String)> = on_engine!(&self.pool, |p| sqlx::query_as(
            "SELECT list, kind FROM access_rules
             WHERE platform = $1 AND ((kind = 'user' AND id = $2) OR (kind = 'chat' AND id = $3))"
        )
        .bind(platform.as_str())
        .bind(user_id)
        .bind(chat_id)
        .fetch_all(p)
        .await?);
        let allowed_kinds: Vec<String> = on_engine!(&self.pool, |p| {
            sqlx::query_scalar(
            "SELECT kind FROM access_rules WHERE list = 'allow' AND platform = $1 GROUP BY kind"
        )
        .bind(platform.as_str())
        .fetch_all(p)
        .await?
        });
        let has = |list: &str, kind: &str| about.iter().any(|(l, k)| l == list && k == kind);
        Ok(StoredAccess {
            user_allowed: has("allow", "user"),
            user_blocked: has("block", "user"),
            chat_allowed: has("allow", "chat"),
            chat_blocked: has("block", "chat"),
            any_allowed_users: allowed_kinds.iter().any(|k| k == "user"),
            any_allowed_chats: allowed_kinds.iter().any(|k| k == "chat"),
        })
    }

    /// Takes one of `user_id`'s `quota` replies of `day`; `false` when the day's are all taken.
    /// One statement, so two processes answering the same person cannot both take the last.
    pub async fn take_daily_reply(
        &self,
        platform: Platform,
        user_id: &str,
        day: i64,
        quota: u32,
    ) -> Result<bool, StoreError> {
        let taken: Option<i64> = on_engine!(&self.pool, |p| sqlx::query_scalar(
            "INSERT INTO user_days (platform, user_id, day, replies) VALUES ($1, $2, $3, 1)
             ON CONFLICT (platform, user_id, day)
             DO UPDATE SET replies = user_days.replies + 1 WHERE user_days.replies < $4
             RETURNING replies"
        )
        .bind(platform.as_str())
        .bind(user_id)
        .bind(day)
        .bind(i64::from(quota))
        .fetch_optional(p)
        .await?);
        Ok(taken.is_some_and(|n| n <= i64::from(quota)))
    }

    /// Gives back a reply [`Store::take_daily_reply`] took for a message that was not answered
    /// after all (a redelivery).
    pub async fn give_back_daily_reply(
        &self,
        platform: Platform,
        user_id: &str,
        day: i64,
    ) -> Result<(), StoreError> {
        on_engine!(&self.pool, |p| sqlx::query(
            "UPDATE user_days SET replies = replies - 1
             WHERE platform = $1 AND user_id = $2 AND day = $3 AND replies > 0"
        )
        .bind(platform.as_str())
        .bind(user_id)
        .bind(day)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Counts that `user_id` was turned away on `day`; returns whether it is the first time
    /// that day for that reason, i.e. whether the day's one notice is still to be given.
    pub async fn record_turned_away(
        &self,
        platform: Platform,
        user_id: &str,
        day: i64,
        why: TurnedAway,
    ) -> Result<bool, StoreError> {
        let (count, noticed) = match why {
            TurnedAway::Refused => ("refusals", "refusal_noticed"),
            TurnedAway::OverQuota => ("quota_hits", "quota_noticed"),
        };
        let counted = format!(
            "INSERT INTO user_days (platform, user_id, day, {count}) VALUES ($1, $2, $3, 1)
             ON CONFLICT (platform, user_id, day) DO UPDATE SET {count} = user_days.{count} + 1"
        );
        on_engine!(&self.pool, |p| sqlx::query(&counted)
            .bind(platform.as_str())
            .bind(user_id)
            .bind(day)
            .execute(p)
            .await?
            .rows_affected());
        let notice = format!(
            "UPDATE user_days SET {noticed} = TRUE
             WHERE platform = $1 AND user_id = $2 AND day = $3 AND NOT {noticed}"
        );
        let first = on_engine!(&self.pool, |p| sqlx::query(&notice)
            .bind(platform.as_str())
            .bind(user_id)
            .bind(day)
            .execute(p)
            .await?
            .rows_affected());
        Ok(first == 1)
    }
}

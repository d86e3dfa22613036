//! The bot's chat commands: `/help`, `/reset`, `/optout`, `/optin`, `/forgetme`, and for admins
//! `/stats`, `/model`, `/reload`, `/answerall on|off`, `/share on|off`, and `/allow`, `/unallow`,
//! `/block`, `/unblock` (see [`super::access`]).

use std::sync::Arc;

use super::event::{ChatKind, IncomingMessage, Outbox};
use super::Bot;
use crate::store::{now_ms, StoreError};

pub const HELP: &str = "I'm kaiwa, a chat bot. I remember this channel's recent messages to reply, and they may be used to train me.\n\
/reset — forget this channel's conversation so far\n\
/optout — stop storing (and answering) your messages\n\
/optin — resume\n\
/forgetme — delete everything stored of you\n\
Admins: /stats, /model, /reload, /answerall on|off, /share on|off (whether this channel's conversation may be used to answer people elsewhere), /allow and /block platform:id|here (or in reply to someone), /unallow, /unblock";
pub const OPTED_IN: &str = "Welcome back: your messages are stored again.";
pub const BUSY: &str = "I'm busy right now; please try again in a moment.";

/// [`BUSY`] in the language of the message it answers.
pub fn busy(text: &str) -> &'static str {
    match crate::text::lang::detect(text) {
        "ja" => "いま混み合っています。少し待ってからもう一度送ってください。",
        _ => BUSY,
    }
}

pub use crate::conversation::{parse_command as parse, Command, CommandName};

impl Bot {
    /// Carries out a command and answers it.
    pub(super) async fn run_command(
        self: &Arc<Self>,
        c: Command,
        m: &IncomingMessage,
        outbox: &Arc<dyn Outbox>,
    ) -> Result<(), StoreError> {
        let platform = m.channel.platform;
        let admin = self.settings.is_admin(platform, &m.author_id);
        let store = &self.store;
        let reply = match c.name {
            CommandName::Help => HELP.to_string(),
            CommandName::Reset => {
                store.reset_channel(&m.channel, now_ms()).await?;
                "Done: I've forgotten this channel's conversation so far.".into()
            }
            CommandName::OptOut => {
                store.set_opted_out(platform, &m.author_id, true).await?;
                "OK: I won't store or answer your messages any more. /optin to resume, /forgetme to delete what I have.".into()
            }
            CommandName::OptIn => OPTED_IN.into(),
            CommandName::ForgetMe => {
                let n = store.forget_user(platform, &m.author_id).await?;
                format!("Deleted {n} stored messages of yours.")
            }
            ref n if n.is_for_admins() && !admin => "That command is for admins.".into(),
            CommandName::Stats => {
                let s = store.stats().await?;
                format!(
                    "messages {} ({} deleted, {} mine), channels {}, users {}, replies sent {}, failed {}, opted out {}, refused {}, over quota {}; replies retrieved {}, generated {}, fallback {}; retrievable pairs {}, sentences {}",
                    s.messages, s.deleted, s.bot_messages, s.channels, s.users, s.replies_sent, s.replies_failed, s.opted_out_users, s.refusals, s.quota_hits,
                    s.replies_retrieved, s.replies_generated, s.replies_fallback, s.retrieval_pairs, s.retrieval_sentences
                )
            }
            CommandName::Model => {
                let g = self.model();
                format!(
                    "model {} — {} layers, vocabulary {}, context {} tokens",
                    g.dir().display(),
                    g.decoder().num_layers(),
                    g.decoder().vocab_size(),
                    g.context_len()
                )
            }
            CommandName::Reload => match self.reload_everywhere().await {
                Ok((g, true)) => format!(
                    "Reloaded {}; the other processes on this store follow within {} s.",
                    g.dir().display(),
                    crate::bot::STORE_CHECK_EVERY.as_secs()
                ),
                Ok((g, false)) => format!(
                    "Reloaded {} here; the other processes on this store could not be told (see the log).",
                    g.dir().display()
                ),
                Err(e) => {
                    tracing::error!(error = %e, "model reload failed");
                    format!("Reload failed, still using the previous model: {e}")
                }
            },
            CommandName::AnswerAll => {
                let on = matches!(c.args.as_str(), "on" | "yes" | "true" | "1");
                store.set_answers_all(&m.channel, on).await?;
                if on {
                    "I'll answer every message here.".into()
                } else {
                    "I'll answer here only when mentioned.".into()
                }
            }
            CommandName::Share if m.kind == ChatKind::Direct => {
                if self.settings.engine.share.direct {
                    "Direct messages are shared by the operator's setting (RETRIEVE_DIRECT); \
                     /share does not change that."
                        .into()
                } else {
                    "Direct messages are never used to answer anyone else.".into()
                }
            }
            CommandName::Share => match c.args.as_str() {
                "on" | "off" => {
                    let on = c.args == "on";
                    store.set_shared(&m.channel, on).await?;
                    if on {
                        "This channel's conversation may now be used to answer people elsewhere."
                            .into()
                    } else {
                        "This channel's conversation is no longer used to answer anyone elsewhere."
                            .into()
                    }
                }
                _ => {
                    let set = store.shared(&m.channel).await?;
                    let how = match (self.settings.engine.share.shares(false, set), set) {
                        (true, Some(_)) => "shared (/share on)",
                        (true, None) => "shared (SHARE_GROUPS)",
                        (false, _) => "not shared",
                    };
                    format!("This channel is {how}. /share on|off changes it.")
                }
            },
            CommandName::Allow
            | CommandName::Unallow
            | CommandName::Block
            | CommandName::Unblock => self.change_access(&c, m).await?,
            CommandName::Unknown(ref name) => format!("Unknown command /{name}. {HELP}"),
        };
        self.say(outbox, m, &reply).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_addressee_and_args() {
        let c = parse("/answerall@kaiwa_bot on").unwrap();
        assert_eq!(
            (c.name, c.addressee.as_deref(), c.args.as_str()),
            (CommandName::AnswerAll, Some("kaiwa_bot"), "on")
        );
        assert_eq!(parse("/Reset").unwrap().name, CommandName::Reset);
        assert_eq!(parse("/start").unwrap().name, CommandName::Help);
        assert_eq!(
            parse("/Frobnicate x").unwrap().name,
            CommandName::Unknown("frobnicate".into())
        );
        assert!(parse("hello /reset").is_none());
        assert!(parse("/").is_none());
        assert!(parse("/path/to/file").is_none());
    }
}

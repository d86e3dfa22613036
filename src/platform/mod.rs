//! Platform adapters: Discord and Telegram events in, the bot's [`Incoming`] out; the bot's
//! replies through each platform's API ([`Outbox`]). Nothing here touches SQL or tensors.
//!
//! [`Incoming`]: crate::bot::event::Incoming
//! [`Outbox`]: crate::bot::event::Outbox

pub mod discord;
pub mod retry;
pub mod telegram;

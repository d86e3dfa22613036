//! What the platform adapters share about failing and trying again: keeping the bot token out of
//! every text that is logged or returned ([`Scrubber`]).
//!
//! Each adapter reads its own protocol and hands this module plain values.

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

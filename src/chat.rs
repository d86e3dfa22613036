//! `kaiwa chat`: a conversation with the reply engine in the terminal, or one reply per input
//! line when the input is a pipe (so it can be scripted).
//!
//! The conversation is kept in memory as chat messages and re-rendered through the model's chat
//! template on every turn, so what the engine sees is exactly what the bot would give it.

use std::io::{BufRead, Write};

use crate::engine::{EngineError, ReplyEngine, ReplySource, Request, Retrieval};
use crate::model::{ChatMessage, GenerateOptions, Generator};

/// How the conversation is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatStyle {
    /// A banner, a `> ` prompt, and the source of each reply.
    Terminal,
    /// One reply a line for each line read, nothing else (newlines in a reply become spaces).
    Lines,
}

/// A chat session: the model, the engine and how to show the conversation.
pub struct Chat<'a> {
    pub generator: &'a Generator,
    pub engine: &'a ReplyEngine,
    /// Looks up candidates for a message (the store, in `kaiwa chat`).
    pub retrieve: &'a mut dyn FnMut(&str) -> Result<Retrieval, EngineError>,
    pub system: Option<&'a str>,
    pub options: &'a GenerateOptions,
    pub style: ChatStyle,
}

impl Chat<'_> {
    /// Runs the read–reply–print loop until `/exit` or end of input; returns the conversation
    /// as it stands at the end.
    pub fn run(
        self,
        input: &mut dyn BufRead,
        output: &mut dyn Write,
    ) -> std::io::Result<Vec<ChatMessage>> {
        let Chat {
            generator,
            engine,
            retrieve,
            system,
            options,
            style,
        } = self;
        let mut history: Vec<ChatMessage> = Vec::new();
        let start = |history: &mut Vec<ChatMessage>| {
            history.clear();
            if let Some(s) = system {
                history.push(ChatMessage::system(s));
            }
        };
        start(&mut history);
        let terminal = style == ChatStyle::Terminal;
        if terminal {
            writeln!(
                output,
                "kaiwa chat — model {}, engine {:?} (/reset clears the conversation, /exit quits)",
                generator.dir().display(),
                engine.settings().mode
            )?;
        }
        let mut turn = 0u64;
        loop {
            if terminal {
                write!(output, "> ")?;
                output.flush()?;
            }
            let mut line = String::new();
            if input.read_line(&mut line)? == 0 {
                if terminal {
                    writeln!(output)?;
                }
                return Ok(history);
            }
            let line = line.trim();
            match line {
                "" if terminal => continue,
                "/exit" | "/quit" => return Ok(history),
                "/reset" => {
                    start(&mut history);
                    if terminal {
                        writeln!(output, "(conversation cleared)")?;
                    }
                    continue;
                }
                _ => {}
            }
            if line.is_empty() {
                // A blank line in a pipe still gets its (empty) line, so replies stay in step.
                writeln!(output)?;
                continue;
            }
            history.push(ChatMessage::user(line));
            // A new seed per turn, derived from the base seed, so a session is reproducible.
            let opts = GenerateOptions {
                seed: options.seed.wrapping_add(turn),
                ..options.clone()
            };
            turn += 1;
            let recent: Vec<String> = history
                .iter()
                .filter(|m| m.role == "assistant")
                .rev()
                .take(8)
                .map(|m| m.content.clone())
                .collect();
            let result = retrieve(line).and_then(|retrieval| {
                let request = Request {
                    messages: &history,
                    user_text: line,
                    recent_replies: &recent,
                    options: &opts,
                };
                engine.reply(generator, &request, retrieval, &|| true)
            });
            match result {
                Ok(reply) => {
                    if terminal {
                        writeln!(output, "{}", reply.text)?;
                        if reply.source != ReplySource::Generated {
                            writeln!(output, "  ({})", reply.source.as_str())?;
                        }
                    } else {
                        writeln!(output, "{}", reply.text.replace(['\r', '\n'], " "))?;
                    }
                    output.flush()?;
                    history.push(ChatMessage::assistant(reply.text));
                }
                Err(e) => {
                    history.pop();
                    if terminal {
                        writeln!(output, "(error: {e})")?;
                    } else {
                        // Keep one line per input line; the error goes to the log.
                        tracing::error!(error = %e, "no reply");
                        writeln!(output)?;
                    }
                }
            }
        }
    }
}

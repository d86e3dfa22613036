//! `kaiwa chat`: a terminal conversation with a model, streamed as it is generated.
//!
//! The conversation is kept in memory as chat messages and re-rendered through the model's chat
//! template on every turn, so what the model sees is exactly what the bot would send it.

use std::io::{BufRead, Write};

use crate::model::{ChatMessage, GenerateOptions, Generator, StopReason};

/// Runs the read–generate–print loop until `/exit` or end of input; returns the conversation
/// as it stands at the end.
pub fn run_chat(
    generator: &Generator,
    system: Option<&str>,
    options: &GenerateOptions,
    input: &mut dyn BufRead,
    output: &mut (dyn Write + Send),
) -> std::io::Result<Vec<ChatMessage>> {
    let mut history: Vec<ChatMessage> = Vec::new();
    let start = |history: &mut Vec<ChatMessage>| {
        history.clear();
        if let Some(s) = system {
            history.push(ChatMessage::system(s));
        }
    };
    start(&mut history);
    writeln!(
        output,
        "kaiwa chat — model {} (/reset clears the conversation, /exit quits)",
        generator.dir().display()
    )?;
    let mut turn = 0u64;
    loop {
        write!(output, "> ")?;
        output.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            writeln!(output)?;
            return Ok(history);
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(history),
            "/reset" => {
                start(&mut history);
                writeln!(output, "(conversation cleared)")?;
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::user(line));
        // A new seed per turn, derived from the base seed, so a session is reproducible.
        let opts = GenerateOptions {
            seed: options.seed.wrapping_add(turn),
            ..options.clone()
        };
        turn += 1;
        let mut write_error = None;
        let result = generator.generate(&history, &opts, &mut |delta| match write!(
            output,
            "{delta}"
        )
        .and_then(|_| output.flush())
        {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        });
        if let Some(e) = write_error {
            return Err(e);
        }
        match result {
            Ok(generation) => {
                writeln!(output)?;
                if generation.stop == StopReason::Length {
                    writeln!(output, "(reply cut at {} tokens)", generation.new_tokens)?;
                }
                history.push(ChatMessage::assistant(generation.text));
            }
            Err(e) => {
                history.pop();
                writeln!(output, "\n(error: {e})")?;
            }
        }
    }
}

//! From the store to training files. `export` writes the stored conversations with the bot as
//! OpenAI chat `messages` JSONL, the format TRL's SFTTrainer and axolotl read directly.

pub mod export;

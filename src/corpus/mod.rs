//! Between the store and training files: dialogue people already have comes in (`import`, one
//! file per format, written to the store by `ingest`), and stored conversations go out as
//! training files (`export`, with `clean` and `lang` for redaction, duplicates, pseudonyms and
//! languages) in the formats kaiwa's trainer, TRL and axolotl read directly.

pub mod clean;
pub mod derive;
pub mod export;
pub mod import;
pub mod ingest;

//! The store and corpora: `export-corpus`, `import`, `derive-dialogue`, `forget`, `stats`.

use anyhow::{Context, Result};

use crate::args::{DeriveDialogueArgs, ExportCorpusArgs, ForgetArgs, ImportArgs};
use crate::open_store;

pub fn export(args: &ExportCorpusArgs) -> Result<()> {
    let options = args.options()?;
    let (rt, store) = open_store()?;
    let summary = rt
        .block_on(kaiwa::corpus::export::export(&store, &args.out, &options))
        .with_context(|| format!("exporting the corpus to {}", args.out.display()))?;
    eprintln!(
        "wrote {}: {} examples ({} train, {} validation) from {} conversations, \
         {} messages read; dropped {} duplicates, {} too short, {} in other languages",
        args.out.display(),
        summary.examples(),
        summary.train.examples,
        summary.validation.examples,
        summary.conversations,
        summary.messages_read,
        summary.dropped_exact_duplicates + summary.dropped_normalized_duplicates,
        summary.dropped_too_short,
        summary.dropped_other_language,
    );
    for (lang, f) in &summary.per_language {
        eprintln!(
            "  {lang}: {} examples, {} turns, {} characters",
            f.examples, f.turns, f.characters
        );
    }
    Ok(())
}

pub fn import(args: &ImportArgs) -> Result<()> {
    let path = &args.path;
    let format = args.format;
    let (rt, store) = open_store()?;
    let summary = rt
        .block_on(kaiwa::corpus::ingest::import_file(
            &store,
            path,
            &args.options(),
        ))
        .with_context(|| format!("importing {} as {format}", path.display()))?;
    for e in &summary.errors {
        eprintln!("skipped {}: {e}", path.display());
    }
    if summary.skipped as usize > summary.errors.len() {
        eprintln!(
            "… and {} more malformed records",
            summary.skipped as usize - summary.errors.len()
        );
    }
    eprintln!(
        "imported {} as {}: {} messages in {} conversations; {} already stored, \
         {} of opted-out users left out, {} malformed records skipped",
        path.display(),
        summary.source,
        summary.messages,
        summary.conversations,
        summary.duplicates,
        summary.opted_out,
        summary.skipped
    );
    Ok(())
}

pub fn derive_dialogue(args: &DeriveDialogueArgs) -> Result<()> {
    let summary = kaiwa::corpus::derive::derive(
        &args.pairs,
        &args.out,
        &args.options(),
        args.system.as_deref(),
    )
    .with_context(|| format!("deriving dialogue from {}", args.pairs.display()))?;
    eprintln!(
        "wrote {}: {} written exchanges and {} retrieved replies (of {} questions) \
         in Japanese and English, from {} sentence pairs ({} malformed lines skipped)",
        args.out.display(),
        summary.written_exchanges,
        summary.retrieved_replies,
        summary.questions,
        summary.pairs,
        summary.skipped_lines
    );
    Ok(())
}

pub fn forget(args: &ForgetArgs) -> Result<()> {
    let platform = args.platform()?;
    let (rt, store) = open_store()?;
    let n = rt.block_on(store.forget_user(platform, &args.user))?;
    eprintln!(
        "deleted {n} messages of {} user {}",
        args.platform, args.user
    );
    Ok(())
}

pub fn stats() -> Result<()> {
    let (rt, store) = open_store()?;
    let stats = rt.block_on(store.stats())?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(())
}

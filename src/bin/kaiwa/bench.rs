//! `kaiwa bench …`: runs a benchmark of the library (`kaiwa::bench`) and prints its report, as
//! JSON and as a line or a table.

use std::sync::Arc;

use anyhow::{Context, Result};
use kaiwa::bench::{suite_prompts, InferReport, Scratch};
use kaiwa::config::Settings;
use kaiwa::model::Generator;

use crate::args::{
    BenchCommand, BotBenchArgs, CorpusBenchArgs, InferBenchArgs, ReplyBenchArgs, ServeBenchArgs,
    TrainBenchArgs,
};
use crate::runtime;

pub fn run(what: BenchCommand) -> Result<()> {
    match what {
        BenchCommand::Infer(args) => infer(&args),
        BenchCommand::Train(args) => train(&args),
        BenchCommand::Corpus(args) => corpus(args),
        BenchCommand::Reply(args) => reply(args),
        BenchCommand::Bot(args) => bot(&args),
        BenchCommand::Serve(args) => serve(&args),
    }
}

fn infer(args: &InferBenchArgs) -> Result<()> {
    let dir = args.model.dir();
    let (prompt_tokens, new_tokens, repeats) = (args.prompt_tokens, args.new_tokens, args.repeats);
    let report =
        kaiwa::bench::bench_infer(&dir, prompt_tokens, new_tokens, repeats, args.threads.get())
            .with_context(|| format!("benchmarking {}", dir.display()))?;
    print_infer(&report, args.json)?;
    if args.ort {
        let ort = kaiwa::bench::onnxruntime_decode(
            &dir,
            prompt_tokens,
            new_tokens,
            repeats,
            args.ort_threads,
        )?;
        print_infer(&ort, args.json)?;
        let agree = ort.tokens == report.tokens;
        println!(
            "tract/onnxruntime: decode {:.2}x, prefill {:.2}x (tokens agree: {agree})",
            report.decode_tokens_per_s / ort.decode_tokens_per_s,
            ort.prefill_ms / report.prefill_ms,
        );
    }
    for &weights in &args.llama_cpp {
        let llama = kaiwa::bench::llama_cpp_decode(
            &dir,
            prompt_tokens,
            new_tokens,
            repeats,
            args.threads.get(),
            weights,
        )?;
        print_infer(&llama, args.json)?;
        let agree = llama
            .tokens
            .iter()
            .zip(&report.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "tract/{}: decode {:.2}x, prefill {:.2}x (first {agree} of {} greedy tokens agree)",
            llama.runtime,
            report.decode_tokens_per_s / llama.decode_tokens_per_s,
            llama.prefill_ms / report.prefill_ms,
            report.tokens.len(),
        );
    }
    Ok(())
}

fn print_infer(r: &InferReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{:<12} prefill {} tokens: {:8.1} ms | decode {} tokens: {:7.1} tokens/s | peak RSS {:.0} MiB",
            r.runtime, r.prompt_tokens, r.prefill_ms, r.new_tokens, r.decode_tokens_per_s, r.peak_rss_mib
        );
    }
    Ok(())
}

fn train(args: &TrainBenchArgs) -> Result<()> {
    let TrainBenchArgs {
        batch,
        context,
        micro_batches,
        warmup,
        steps,
        pytorch,
        json,
        ..
    } = *args;
    let config = args.config()?;
    let r = kaiwa::bench::train::bench_train(&config, batch, context, micro_batches, warmup, steps);
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "kaiwa (burn/Flex) {} parameters, batch {}x{} in {} pass(es): {:.0} tokens/s, step {:.0} ms, \
             {:.1} GFLOP/s = {:.1}% of the measured peak {:.1} GFLOP/s, {:.2} cores busy, peak RSS {:.0} MiB",
            r.parameters,
            r.batch,
            r.context,
            r.micro_batches,
            r.tokens_per_s,
            r.step_median_ms,
            r.achieved_gflops,
            100.0 * r.peak_fraction,
            r.peak_gflops,
            r.cores_busy,
            r.peak_rss_mib
        );
    }
    if pytorch {
        let output = kaiwa::bench::train::run_pytorch(&config, batch, context, warmup, steps)?;
        print!("{output}");
        let theirs = kaiwa::bench::train::pytorch_tokens_per_s(&output)?;
        println!(
            "kaiwa/pytorch: {:.2}x ({:.0} vs {:.0} tokens/s)",
            r.tokens_per_s / theirs,
            r.tokens_per_s,
            theirs
        );
    }
    Ok(())
}

fn corpus(args: CorpusBenchArgs) -> Result<()> {
    let scratch = Scratch::new(args.dir)?;
    let rt = runtime()?;
    let mut reports = Vec::new();
    for postgres in engines(args.postgres.as_deref()) {
        let report = rt
            .block_on(kaiwa::bench::corpus::bench_corpus(
                scratch.path(),
                postgres,
                args.messages,
            ))
            .with_context(|| {
                format!("running the corpus benchmark on {}", engine_name(postgres))
            })?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        reports.push(report);
    }
    for r in &reports {
        println!(
            "{}: import {:.0} messages/s ({:.1} MiB Telegram export, peak RSS {:.0} MiB), store {:.0} MiB",
            r.engine, r.import_messages_per_s, r.export_file_mib, r.import_peak_rss_mib, r.store_mib
        );
        for e in &r.exports {
            println!(
                "{}: export --mode {:?}: {:.0} messages/s, {} examples, RSS {:.0} MiB before, \
                 peak {:.0} MiB",
                r.engine, e.mode, e.messages_per_s, e.examples, e.rss_before_mib, e.peak_rss_mib
            );
        }
    }
    if let [sqlite, postgres] = &reports[..] {
        println!(
            "postgres/sqlite: import {:.2}x, export {}",
            postgres.import_messages_per_s / sqlite.import_messages_per_s,
            sqlite
                .exports
                .iter()
                .zip(&postgres.exports)
                .map(|(s, p)| format!(
                    "--mode {:?} {:.2}x",
                    s.mode,
                    p.messages_per_s / s.messages_per_s
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The stores a store benchmark runs on: SQLite, then the PostgreSQL server when one is given.
fn engines(postgres: Option<&str>) -> Vec<Option<&str>> {
    std::iter::once(None).chain(postgres.map(Some)).collect()
}

fn engine_name(postgres: Option<&str>) -> String {
    postgres.map_or("SQLite".into(), |url| {
        format!("PostgreSQL ({})", kaiwa::store::display_url(url))
    })
}

fn reply(args: ReplyBenchArgs) -> Result<()> {
    let engine = kaiwa::engine::ReplyEngine::new(args.engine.settings()?);
    let generator = args.model.load(&args.threads)?;
    let prompts = suite_prompts(&args.suite)?;
    let scratch = Scratch::new(args.dir)?;
    let rt = runtime()?;
    let mut runs = Vec::new();
    for postgres in engines(args.postgres.as_deref()) {
        let steps = rt
            .block_on(kaiwa::bench::reply::bench_reply(
                scratch.path(),
                postgres,
                &generator,
                &engine,
                &args.sentences,
                &prompts,
                &args.pairs,
            ))
            .with_context(|| format!("running the reply benchmark on {}", engine_name(postgres)))?;
        let name = if postgres.is_some() {
            "postgres"
        } else {
            "sqlite"
        };
        println!("{}", serde_json::json!({ "engine": name, "steps": steps }));
        runs.push((name, steps));
    }
    println!("| store | pairs | indexed/s | retrieve p50 / p99 ms | reply p50 / p99 ms | RSS MiB (peak) | store MiB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, steps) in &runs {
        for s in steps {
            println!(
                "| {name} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} ({:.0}) | {:.0} |",
                s.pairs,
                s.index_pairs_per_s
                    .map_or("(kept)".to_string(), |r| format!("{r:.0}")),
                s.retrieve_p50_ms,
                s.retrieve_p99_ms,
                s.reply_p50_ms,
                s.reply_p99_ms,
                s.rss_mib,
                s.peak_rss_mib,
                s.store_mib
            );
        }
    }
    if let [(_, sqlite), (_, postgres)] = &runs[..] {
        for (s, p) in sqlite.iter().zip(postgres) {
            println!(
                "postgres/sqlite at {} pairs: indexing {}, retrieve p50 {:.2}x, reply p50 {:.2}x",
                s.pairs,
                match (p.index_pairs_per_s, s.index_pairs_per_s) {
                    (Some(p), Some(s)) => format!("{:.2}x", p / s),
                    _ => "(kept store)".into(),
                },
                p.retrieve_p50_ms / s.retrieve_p50_ms,
                p.reply_p50_ms / s.reply_p50_ms
            );
        }
    }
    Ok(())
}

fn bot(args: &BotBenchArgs) -> Result<()> {
    let settings = args.model.settings()?;
    let prompts = suite_prompts(&args.suite)?;
    let steps = runtime()?.block_on(async {
        let store = kaiwa::store::Store::open(&settings.database_url).await?;
        kaiwa::engine::corpora::ensure_corpora(&store, &settings.model_dir)
            .await
            .context("adding the model's retrieval data to the store")?;
        let generator = load_bot_model(&settings).await?;
        kaiwa::bench::bot::bench_bot(
            settings,
            store,
            generator,
            &prompts,
            &args.channels,
            args.per_channel,
            args.through,
        )
        .await
        .context("running the bot benchmark")
    })?;
    println!("{}", serde_json::to_string_pretty(&steps)?);
    println!(
        "| channels | messages (not answered) | replies/s | latency p50 / p99 ms | peak RSS MiB |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for s in &steps {
        println!(
            "| {} | {} ({}) | {:.1} | {:.0} / {:.0} | {:.0} |",
            s.channels,
            s.messages,
            s.not_answered,
            s.replies_per_s,
            s.p50_ms,
            s.p99_ms,
            s.peak_rss_mib
        );
    }
    Ok(())
}

fn serve(args: &ServeBenchArgs) -> Result<()> {
    let settings = args.model.settings()?;
    let prompts = suite_prompts(&args.suite)?;
    let steps = runtime()?.block_on(async {
        let generator = load_bot_model(&settings).await?;
        kaiwa::bench::serve::bench_serve(
            settings,
            generator,
            &prompts,
            &args.clients,
            args.per_client,
            args.stored,
        )
        .await
        .context("running the serving benchmark")
    })?;
    println!("{}", serde_json::to_string_pretty(&steps)?);
    println!("| clients | requests (failed) | HTTP req/s | first piece p50 / p99 ms | whole reply p50 / p99 ms | in-process req/s | in-process p50 / p99 ms | peak RSS MiB |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &steps {
        println!(
            "| {} | {} ({}) | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.0} / {:.0} | {:.0} |",
            s.clients,
            s.requests,
            s.failed,
            s.http_rps,
            s.http_first_p50_ms,
            s.http_first_p99_ms,
            s.http_total_p50_ms,
            s.http_total_p99_ms,
            s.direct_rps,
            s.direct_p50_ms,
            s.direct_p99_ms,
            s.peak_rss_mib
        );
    }
    Ok(())
}

/// The model the bots use (with its tokenizer and settings), as `settings` names it.
async fn load_bot_model(settings: &Settings) -> Result<Arc<Generator>> {
    let loaded = kaiwa::bot::load_model(settings)
        .await
        .with_context(|| format!("loading {}", settings.model_dir.display()))?;
    Ok(Arc::new(loaded))
}

//! `kaiwa eval`: held-out figures agree with the plain-Rust reference forward pass, the n-gram
//! baseline is a proper distribution that learns, the suite checks catch bad replies, the gate
//! fails a worse candidate with its own exit status, and a run writes the whole report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kaiwa::dataset::sequence::{Prepared, SequenceBuilder};
use kaiwa::eval::heldout;
use kaiwa::eval::suite::{check_answer, load_suites, parse_suite, Case};
use kaiwa::eval::{
    compare, ByteNgram, DataFormat, Dataset, EvalError, EvalOptions, GateRules, NgramBaseline,
    Report, EXIT_GATE_FAILED,
};
use kaiwa::model::reference::ReferenceModel;
use kaiwa::model::{ChatMessage, Generator, LlamaConfig, LlamaWeights, Preset};
use kaiwa::train::init::init_model_dir;

/// A tiny random model directory with weights drawn at `std` (large: confident and wrong;
/// small: close to uniform) and a context of `context` tokens.
fn tiny_model(dir: &Path, std: f64, context: usize, seed: u64) -> LlamaConfig {
    let mut config = LlamaConfig::preset(Preset::Tiny);
    config.initializer_range = Some(std);
    config.max_position_embeddings = context;
    init_model_dir(config, seed, dir).expect("init-model")
}

/// Two models shared by the tests: near-uniform (std 0.02) and confidently wrong (std 1.0).
struct Models {
    _dir: tempfile::TempDir,
    uniform: PathBuf,
    peaky: PathBuf,
}

fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let uniform = dir.path().join("uniform");
        let peaky = dir.path().join("peaky");
        tiny_model(&uniform, 0.02, 256, 3);
        tiny_model(&peaky, 1.0, 256, 4);
        Models {
            _dir: dir,
            uniform,
            peaky,
        }
    })
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![
            ChatMessage::system("あなたは親切なアシスタントです。"),
            ChatMessage::user("今日の天気はどうですか？"),
            ChatMessage::assistant("今日は晴れです。散歩日和ですね！"),
        ],
        vec![
            ChatMessage::user("What did you have for dinner?"),
            ChatMessage::assistant("I had curry and rice. It was delicious!"),
            ChatMessage::user("Nice! Spicy?"),
            ChatMessage::assistant("Just a little. 🌶️"),
        ],
        vec![
            ChatMessage::user("週末は何をしますか？"),
            ChatMessage::assistant("友達とサッカーの試合を見に行きます。"),
        ],
        // Nothing to score: skipped, and said so.
        vec![ChatMessage::user("hello?")],
        vec![
            ChatMessage::user("おすすめの旅行先は？"),
            ChatMessage::assistant("京都はいかがでしょう。お寺と紅葉がきれいですよ。"),
        ],
    ]
}

fn write_jsonl(path: &Path, conversations: &[Vec<ChatMessage>]) {
    let lines: Vec<String> = conversations
        .iter()
        .map(|m| serde_json::json!({ "messages": m, "meta": {} }).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn log_softmax_nll(row: &[f32], token: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - row[token as usize] as f64
}

/// The mean loss the reference forward pass gives on the eval's own token sequences, with the
/// documented sliding-window rule implemented here independently: target `j` is predicted in
/// the window starting at `k * C/2` for the smallest `k` with `k * C/2 + C > j`.
fn reference_loss(dir: &Path, data: &Dataset) -> (f64, u64, u64) {
    let config = kaiwa::model::load_config(dir).unwrap();
    let weights = LlamaWeights::load(&config, &dir.join("model.safetensors")).unwrap();
    let reference = ReferenceModel::new(&config, &weights);
    let generator = Generator::load(dir).unwrap();
    let builder = SequenceBuilder::for_model(dir, generator.tokenizer()).unwrap();
    let context = config.max_position_embeddings;
    let stride = context / 2;
    let (mut nll, mut tokens, mut bytes) = (0.0, 0u64, 0u64);
    for example in &data.examples {
        let Prepared::Ready(seq) = builder.prepare(example).unwrap() else {
            continue;
        };
        let whole = (seq.tokens.len() <= context).then(|| reference.forward(&seq.tokens));
        for j in 1..seq.tokens.len() {
            if !seq.scored[j] {
                continue;
            }
            let row = match &whole {
                Some(logits) => logits[j - 1].clone(),
                None => {
                    let mut k = 0;
                    while k * stride + context <= j {
                        k += 1;
                    }
                    let logits = reference.forward(&seq.tokens[k * stride..j]);
                    logits.last().unwrap().clone()
                }
            };
            nll += log_softmax_nll(&row, seq.tokens[j]);
            tokens += 1;
        }
        // The scored tokens decode to exactly the text that is scored.
        let scored: Vec<u32> = (0..seq.tokens.len())
            .filter(|&j| seq.scored[j])
            .map(|j| seq.tokens[j])
            .collect();
        let text = generator.tokenizer().decode(&scored, false).unwrap();
        bytes += text.len() as u64;
    }
    (nll / tokens as f64, tokens, bytes)
}

#[test]
fn heldout_loss_equals_the_reference_forward_pass_on_chat_data() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    tiny_model(&model, 0.15, 256, 11);
    let val = dir.path().join("validation.jsonl");
    write_jsonl(&val, &conversations());
    let data = Dataset::read(&val, None).unwrap();
    assert_eq!(data.format, DataFormat::Chat);

    let generator = Generator::load(&model).unwrap();
    let report = heldout::evaluate(&generator, &data, None, 2).unwrap();
    let (loss, tokens, bytes) = reference_loss(&model, &data);
    assert_eq!(report.tokens, tokens);
    assert_eq!(report.bytes, bytes);
    assert!(
        (report.loss - loss).abs() < 1e-4,
        "tract {} vs reference {loss}",
        report.loss
    );
    // The weights are large enough that the loss is far from uniform's ln(vocab).
    assert!((report.loss - (config_vocab(&model) as f64).ln()).abs() > 0.05);
    // Only the assistant's words are scored: their UTF-8 bytes, exactly.
    let assistant_bytes: usize = conversations()
        .iter()
        .flatten()
        .filter(|m| m.role == "assistant")
        .map(|m| m.content.len())
        .sum();
    assert_eq!(report.bytes as usize, assistant_bytes);
    assert_eq!(report.examples, 4);
    assert_eq!(report.skipped, 1);
    assert!(report.skipped_reasons[0].starts_with("line 4:"));
    assert_eq!(report.tokenization_mismatches, 0);
    let bpb = report.nll_nats / std::f64::consts::LN_2 / report.bytes as f64;
    assert!((report.bits_per_byte - bpb).abs() < 1e-12);
    assert!((report.perplexity - report.loss.exp()).abs() < 1e-9);
    assert_eq!(
        report.per_language.keys().collect::<Vec<_>>(),
        vec!["en", "ja"]
    );
    // The same figures whatever the number of threads.
    let one = heldout::evaluate(&generator, &data, None, 1).unwrap();
    assert_eq!(one.nll_nats, report.nll_nats);
}

fn config_vocab(dir: &Path) -> usize {
    kaiwa::model::load_config(dir).unwrap().vocab_size
}

#[test]
fn long_documents_are_scored_in_sliding_windows_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    // A 16-token context: every document below needs several windows.
    tiny_model(&model, 0.15, 16, 12);
    let val = dir.path().join("validation.txt");
    std::fs::write(
        &val,
        "今日はとてもいい天気ですね。公園を散歩して、コーヒーを飲みました。\n\
         明日は雨が降るそうです。\n\n\
         The weather was lovely today, so we walked along the river and had ice cream.\n",
    )
    .unwrap();
    let data = Dataset::read(&val, None).unwrap();
    assert_eq!(data.format, DataFormat::Text);
    assert_eq!(data.examples.len(), 2);
    let generator = Generator::load(&model).unwrap();
    let report = heldout::evaluate(&generator, &data, None, 2).unwrap();
    assert_eq!(report.context, 16);
    assert!(report.windows > 4, "{} windows", report.windows);
    let (loss, tokens, bytes) = reference_loss(&model, &data);
    assert_eq!(report.tokens, tokens);
    assert_eq!(report.bytes, bytes);
    assert!(
        (report.loss - loss).abs() < 1e-4,
        "tract {} vs reference {loss}",
        report.loss
    );
    // After the BOS token, every byte of every document is scored.
    let text_bytes = data
        .examples
        .iter()
        .map(|e| e.scored_texts()[0].len())
        .sum::<usize>();
    assert_eq!(report.bytes as usize, text_bytes);
}

#[test]
fn the_ngram_baseline_is_scored_on_the_same_bytes_and_learns_its_training_file() {
    let m = models();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    // Repetitive training text: the n-gram should find it easy.
    let mut convs = Vec::new();
    for _ in 0..20 {
        convs.extend(conversations());
    }
    write_jsonl(&train, &convs);
    let data = Dataset::read(&train, None).unwrap();
    let texts: Vec<&str> = data
        .examples
        .iter()
        .flat_map(|e| e.scored_texts())
        .collect();
    let ngram = NgramBaseline {
        model: ByteNgram::train(texts.iter().map(|t| t.as_bytes()), 5),
        train: train.display().to_string(),
    };
    // A proper distribution over the byte alphabet, after any context.
    for context in ["", "今日は", "I had curry", "\u{1f336}"] {
        let total: f64 = (0..=255u8)
            .map(|b| ngram.model.probability(context.as_bytes(), b))
            .sum();
        assert!((total - 1.0).abs() < 1e-9, "{context:?}: {total}");
    }
    let generator = Generator::load(&m.uniform).unwrap();
    let report = heldout::evaluate(&generator, &data, Some(&ngram), 2).unwrap();
    let n = report.ngram.as_ref().unwrap();
    assert_eq!(n.order, 5);
    assert_eq!(n.train_bytes, report.bytes, "trained on what is scored");
    assert!(
        n.bits_per_byte < 1.0,
        "{} bits per byte on its own training text",
        n.bits_per_byte
    );
    // The n-gram's bits are summed over exactly the bytes the transformer is scored on.
    let by_hand: f64 = texts
        .iter()
        .map(|t| ngram.model.bits(t.as_bytes(), 0))
        .sum();
    assert!((n.bits - by_hand).abs() < 1e-6 * by_hand);
    // A random model knows nothing: the n-gram beats it by far, as a trained model should.
    assert!(report.bits_per_byte > 2.0 * n.bits_per_byte);
}

fn case(yaml_case: &str) -> Case {
    let text = format!("seed: 1\ncases:\n{yaml_case}");
    let suite = parse_suite(&text, Path::new("inline.yaml")).unwrap();
    suite.cases.into_iter().next().unwrap()
}

fn failed(case: &Case, answer: &str) -> Vec<String> {
    check_answer(case, answer)
        .into_iter()
        .filter(|c| !c.passed)
        .map(|c| c.name)
        .collect()
}

#[test]
fn suite_checks_judge_hand_written_answers() {
    let weather = case(
        "  - id: weather\n    prompt: 今日の天気はどうですか？\n    keywords_any: [晴れ, 雨, 曇]\n    max_chars: 60\n",
    );
    assert_eq!(weather.language, "ja");
    assert!(failed(&weather, "今日は晴れです。暖かくて気持ちがいいですよ。").is_empty());
    // English to a Japanese prompt.
    assert_eq!(
        failed(&weather, "It is sunny and warm today."),
        vec!["language", "keywords"]
    );
    // Degenerate repetition.
    let laugh = "はははははははははははははははは晴れ";
    assert_eq!(failed(&weather, laugh), vec!["repetition"]);
    let same_line = "晴れ\n晴れ\n晴れ";
    assert_eq!(failed(&weather, same_line), vec!["repetition"]);
    // Keywords.
    assert_eq!(
        failed(&weather, "わかりません。ごめんなさい。"),
        vec!["keywords"]
    );
    // Length, in characters, not bytes.
    let long = "晴れです。今日はとても気持ちのいい天気で、散歩にぴったり。\
                明日の予報も確認しておきましょう。週末は少し崩れるかもしれません。";
    assert!(long.chars().count() > 60);
    assert_eq!(failed(&weather, long), vec!["length"]);
    assert_eq!(
        failed(&weather, "  \n "),
        vec!["non_empty", "length", "language", "keywords"]
    );

    let food = case(
        "  - id: food\n    prompt: What should I cook tonight?\n    keywords_any: [Curry, pasta]\n",
    );
    assert_eq!(food.language, "en");
    // Keywords ignore case and width (NFKC).
    assert!(failed(&food, "How about a nice curry with rice?").is_empty());
    assert!(failed(&food, "How about some ＰＡＳＴＡ? It's quick to make.").is_empty());
    assert_eq!(
        failed(&food, "今夜はカレーはいかがですか？"),
        vec!["language", "keywords"]
    );
}

#[test]
fn the_shipped_suites_cover_everyday_japanese_and_english() {
    let evals = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("evals");
    let suites = load_suites(&[evals]).unwrap();
    let cases: Vec<&Case> = suites.iter().flat_map(|s| &s.cases).collect();
    assert!(cases.iter().any(|c| c.prompt == "今日の天気はどうですか？"));
    for lang in ["ja", "en"] {
        let n = cases.iter().filter(|c| c.language == lang).count();
        assert!(n >= 8, "{n} {lang} cases");
    }
    for theme in ["greeting", "weather", "food", "sports", "travel"] {
        let n = cases.iter().filter(|c| c.id.starts_with(theme)).count();
        assert!(n >= 2, "{theme}: {n} cases");
    }
    for s in &suites {
        assert!(s.sampling.temperature.is_some() && s.sampling.max_new_tokens.is_some());
        // Every expected language agrees with the prompt's.
        for c in &s.cases {
            assert_eq!(kaiwa::text::lang::detect(&c.prompt), c.language, "{}", c.id);
        }
    }
}

fn report_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn gate_fixture() -> Report {
    let m = models();
    let dir = tempfile::tempdir().unwrap();
    let val = dir.path().join("validation.jsonl");
    write_jsonl(&val, &conversations());
    let mut options = EvalOptions::new(&m.uniform);
    options.data = Some(val);
    options.suites = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("evals")];
    options.overrides.sampling.max_new_tokens = Some(8);
    options.report_dir = Some(dir.path().join("report"));
    kaiwa::eval::run(&options).unwrap().report
}

#[test]
fn the_gate_passes_a_model_against_itself_and_fails_worse_figures() {
    let base = gate_fixture();
    let rules = GateRules::default();
    let same = compare(&base, &base, &rules).unwrap();
    assert!(same.passed, "{}", same.verdict());
    // Held-out data, suite cases passed, and on topic per language (en, ja).
    assert_eq!(same.comparisons.len(), 4, "{:?}", same.comparisons);

    // On topic: a baseline with one more Japanese reply on topic is better.
    let mut on_topic = base.clone();
    let ja = on_topic
        .suite
        .as_mut()
        .unwrap()
        .figures
        .iter_mut()
        .find(|f| f.language == "ja" && f.split == "all")
        .expect("Japanese figures");
    ja.on_topic += 1;
    let gate = compare(&base, &on_topic, &rules).unwrap();
    assert!(!gate.passed);
    assert!(
        gate.verdict().contains("on topic, ja"),
        "{}",
        gate.verdict()
    );

    // Held-out bits per byte: within the tolerance passes, beyond it fails.
    let mut cand = base.clone();
    cand.heldout.as_mut().unwrap().bits_per_byte += 0.005;
    assert!(compare(&cand, &base, &rules).unwrap().passed);
    cand.heldout.as_mut().unwrap().bits_per_byte += 0.1;
    let gate = compare(&cand, &base, &rules).unwrap();
    assert!(!gate.passed);
    assert!(
        gate.verdict().contains("held-out bits per byte"),
        "{}",
        gate.verdict()
    );
    assert!(!gate.verdict().contains("suite"), "{}", gate.verdict());
    // Better is fine.
    let mut better = base.clone();
    better.heldout.as_mut().unwrap().bits_per_byte -= 1.0;
    assert!(compare(&better, &base, &rules).unwrap().passed);

    // Suite: a case the baseline passed and the candidate fails.
    let with_case_0 = |passed: bool| {
        let mut r = base.clone();
        let suite = r.suite.as_mut().unwrap();
        suite.files[0].cases[0].passed = passed;
        suite.passed = suite
            .files
            .iter()
            .flat_map(|f| &f.cases)
            .filter(|c| c.passed)
            .count() as u64;
        r
    };
    let (failing, passing) = (with_case_0(false), with_case_0(true));
    let gate = compare(&failing, &passing, &rules).unwrap();
    assert!(!gate.passed);
    assert!(
        gate.verdict().contains("suite cases passed"),
        "{}",
        gate.verdict()
    );
    let first = &base.suite.as_ref().unwrap().files[0];
    assert_eq!(
        gate.regressions,
        vec![format!("{}/{}", first.name, first.cases[0].id)]
    );
    assert!(compare(&passing, &failing, &rules).unwrap().passed);
    let lenient = GateRules {
        case_tolerance: 1,
        ..rules
    };
    assert!(compare(&failing, &passing, &lenient).unwrap().passed);

    // Figures on other data are not comparable: no verdict at all.
    let mut other = base.clone();
    other.heldout.as_mut().unwrap().data_sha256 = "0".repeat(64);
    assert!(matches!(
        compare(&other, &base, &rules),
        Err(EvalError::NotComparable(_))
    ));
    let mut hotter = base.clone();
    hotter.suite.as_mut().unwrap().files[0]
        .sampling
        .sampling
        .temperature += 0.5;
    assert!(matches!(
        compare(&hotter, &base, &rules),
        Err(EvalError::NotComparable(_))
    ));
    // So is a suite sampled with guidance against one without; the message shows both settings.
    let mut guided = base.clone();
    guided.suite.as_mut().unwrap().files[0]
        .sampling
        .guidance_scale = 2.0;
    let Err(EvalError::NotComparable(why)) = compare(&guided, &base, &rules) else {
        panic!("guidance on one side only must not be compared")
    };
    assert!(
        why.contains("guidance_scale: 2.0")
            && why.contains("guidance_scale: 1.0")
            && !why.contains("  "),
        "{why}"
    );
    let mut no_suite = base.clone();
    no_suite.suite = None;
    assert!(matches!(
        compare(&no_suite, &base, &rules),
        Err(EvalError::NotComparable(_))
    ));
}

fn kaiwa_eval(args: &[&str], paths: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaiwa"));
    cmd.arg("eval").args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    cmd.output().unwrap()
}

#[test]
fn the_gate_fails_a_confidently_wrong_candidate_end_to_end() {
    let m = models();
    let dir = tempfile::tempdir().unwrap();
    let val = dir.path().join("validation.jsonl");
    write_jsonl(&val, &conversations());
    let report = dir.path().join("worse");

    // The candidate's random weights are large: confident and wrong, far worse than the
    // near-uniform baseline on the same bytes.
    let out = kaiwa_eval(
        &["--no-suite", "--gate", "--threads", "2"],
        &[
            ("--model", &m.peaky),
            ("--data", &val),
            ("--baseline", &m.uniform),
            ("--report", &report),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(EXIT_GATE_FAILED)),
        "{stderr}"
    );
    assert!(
        stderr.contains("gate failed") && stderr.contains("held-out bits per byte"),
        "{stderr}"
    );
    let json = report_json(&report);
    assert_eq!(json["gate"]["passed"], false);
    let cand = json["heldout"]["bits_per_byte"].as_f64().unwrap();
    let base = report_json(&report.join("baseline"))["heldout"]["bits_per_byte"]
        .as_f64()
        .unwrap();
    assert!(cand > base + 1.0, "{cand} vs {base}");
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("FAILED"));

    // The other way round the gate passes, and an earlier report serves as the baseline.
    let out = kaiwa_eval(
        &["--no-suite", "--gate"],
        &[
            ("--model", &m.uniform),
            ("--data", &val),
            ("--baseline", &report),
            ("--report", &dir.path().join("better")),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without --gate a worse candidate is reported but does not fail the command.
    let out = kaiwa_eval(
        &["--no-suite"],
        &[
            ("--model", &m.peaky),
            ("--data", &val),
            ("--baseline", &m.uniform),
            ("--report", &dir.path().join("informative")),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Data the baseline was not scored on: an error, not a verdict.
    let other = dir.path().join("other.jsonl");
    write_jsonl(&other, &conversations()[..2]);
    let out = kaiwa_eval(
        &["--no-suite", "--gate"],
        &[
            ("--model", &m.uniform),
            ("--data", &other),
            ("--baseline", &report),
            ("--report", &dir.path().join("mismatch")),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot compare"));
}

#[test]
fn an_eval_run_writes_both_reports_with_every_suite_answer() {
    let m = models();
    let dir = tempfile::tempdir().unwrap();
    let val = dir.path().join("validation.jsonl");
    write_jsonl(&val, &conversations());
    let train = dir.path().join("train.jsonl");
    write_jsonl(&train, &conversations()[1..]);
    let evals = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("evals");
    let report = dir.path().join("report");
    // The model compared with itself, suite included: the gate passes.
    let out = kaiwa_eval(
        &["--gate", "--max-new-tokens", "24"],
        &[
            ("--model", &m.uniform),
            ("--data", &val),
            ("--suite", &evals),
            ("--baseline", &m.uniform),
            ("--report", &report),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("gate: PASSED"), "{stderr}");

    let json = report_json(&report);
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    let suites = load_suites(&[evals]).unwrap();
    let total: usize = suites.iter().map(|s| s.cases.len()).sum();
    assert_eq!(json["suite"]["cases"], total);
    let files = json["suite"]["files"].as_array().unwrap();
    let mut answers = 0;
    for (file, suite) in files.iter().zip(&suites) {
        assert_eq!(file["sampling"]["seed"], suite.seed);
        assert_eq!(file["sampling"]["max_new_tokens"], 24);
        for (c, expected) in file["cases"].as_array().unwrap().iter().zip(&suite.cases) {
            assert_eq!(c["id"], expected.id.as_str());
            assert_eq!(c["prompt"], expected.prompt.as_str());
            let answer = c["answer"].as_str().unwrap();
            assert!(md.contains(&format!("#### {} ", expected.id)));
            assert!(md.contains(answer), "answer of {} missing", expected.id);
            assert!(c["checks"].as_array().unwrap().len() >= 4);
            answers += 1;
        }
    }
    assert_eq!(answers, total);
    // Held-out figures and the n-gram, trained on train.jsonl found beside the data.
    let h = &json["heldout"];
    assert!(h["bits_per_byte"].as_f64().unwrap() > 0.0);
    assert!(h["ngram"]["train"]
        .as_str()
        .unwrap()
        .ends_with("train.jsonl"));
    assert!(md.contains("bits per byte") && md.contains("byte 5-gram"));
    assert_eq!(json["gate"]["passed"], true);

    // Seeded: the same run gives the same answers.
    let again = dir.path().join("again");
    let out = kaiwa_eval(
        &["--max-new-tokens", "24"],
        &[
            ("--model", &m.uniform),
            ("--data", &val),
            (
                "--suite",
                &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("evals"),
            ),
            ("--report", &again),
        ],
    );
    assert!(out.status.success());
    assert_eq!(report_json(&again)["suite"], json["suite"]);
    assert_eq!(files[0]["sampling"]["guidance_scale"], 1.0);
    assert!(!md.contains("guidance scale"));

    // Classifier-free guidance from the command line reaches every suite and the report; a
    // negative scale is refused.
    let guided = dir.path().join("guided");
    let suite_only = |extra: &[&str], report: &Path| {
        let mut args = vec!["--max-new-tokens", "24"];
        args.extend_from_slice(extra);
        kaiwa_eval(
            &args,
            &[
                ("--model", &m.uniform),
                (
                    "--suite",
                    &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("evals"),
                ),
                ("--report", report),
            ],
        )
    };
    let out = suite_only(&["--guidance-scale", "2"], &guided);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in report_json(&guided)["suite"]["files"].as_array().unwrap() {
        assert_eq!(file["sampling"]["guidance_scale"], 2.0);
    }
    let md = std::fs::read_to_string(guided.join("report.md")).unwrap();
    assert!(md.contains("guidance scale 2,"), "{md}");
    let out = suite_only(&["--guidance-scale=-1"], &dir.path().join("bad"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("guidance_scale must be 0 or more"));
}

#[test]
fn bad_inputs_are_errors_that_name_the_file() {
    let m = models();
    let dir = tempfile::tempdir().unwrap();
    let val = dir.path().join("validation.jsonl");
    // Line 1 is a conversation (an empty one is refused by every command: `kaiwa::dataset::chat`).
    std::fs::write(
        &val,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{broken\n",
    )
    .unwrap();
    let out = kaiwa_eval(
        &["--no-suite"],
        &[("--model", &m.uniform), ("--data", &val)],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("validation.jsonl:2"), "{stderr}");

    let suite = dir.path().join("bad.yaml");
    std::fs::write(
        &suite,
        "cases:\n  - id: a\n    prompt: hello there\n    keywrods_any: [x]\n",
    )
    .unwrap();
    let out = kaiwa_eval(&[], &[("--model", &m.uniform), ("--suite", &suite)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("keywrods_any"),
        "{stderr}"
    );

    let out = kaiwa_eval(&["--no-suite"], &[("--model", &m.uniform)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to evaluate"));
}

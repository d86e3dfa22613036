//! `kaiwa train` as a whole on a tiny model: a run writes a working model directory, metrics and
//! a loss curve; a run stopped part-way and resumed computes exactly what an uninterrupted run
//! computes; fine-tuning keeps the tokenizer; bad input is a clear error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use kaiwa::model::chat_template::TokenizerConfig;
use kaiwa::model::{ChatMessage, GenerateOptions, Generator, LlamaConfig, Preset, SamplingParams};
use kaiwa::train::bpe::{builtin_text, train_byte_level_bpe};
use kaiwa::train::run::{
    resume, train, Metric, Progress, RunSpec, Start, TrainError, METRICS_FILE, PLOT_FILE,
};
use kaiwa::train::step::StepReport;

/// A tokenizer folder as `kaiwa train-tokenizer` writes it.
fn tokenizer_dir(root: &Path) -> PathBuf {
    let dir = root.join("tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    let tok = train_byte_level_bpe(builtin_text().lines(), 512).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
    TokenizerConfig::chatml().save(&dir).unwrap();
    dir
}

/// A small bilingual chat file in the export-corpus format, and a text file.
fn data_files(root: &Path) -> (PathBuf, PathBuf) {
    let pairs = [
        ("こんにちは", "こんにちは！今日はいい天気ですね。"),
        (
            "今日の天気はどうですか？",
            "晴れています。散歩にいい日です。",
        ),
        ("hello", "Hi there! How are you today?"),
        (
            "what do you like to eat?",
            "I like noodles and fresh fruit.",
        ),
        ("おすすめの料理は？", "カレーライスがおすすめです。"),
        ("do you like sports?", "Yes, I enjoy watching football."),
    ];
    let mut chat = String::new();
    for round in 0..6 {
        for (i, (u, a)) in pairs.iter().enumerate() {
            let line = serde_json::json!({
                "messages": [
                    {"role": "user", "content": format!("{u} ({round}{i})")},
                    {"role": "assistant", "content": a},
                ],
                "meta": {"language": if u.is_ascii() { "en" } else { "ja" }},
            });
            chat.push_str(&line.to_string());
            chat.push('\n');
        }
    }
    let chat_path = root.join("train.jsonl");
    std::fs::write(&chat_path, chat).unwrap();
    let text_path = root.join("text.txt");
    std::fs::write(
        &text_path,
        "猫が好きです。\n\nThe cat sat on the mat.\n\n明日は雨が降るでしょう。\n",
    )
    .unwrap();
    (chat_path, text_path)
}

fn tiny_spec(root: &Path, steps: usize) -> RunSpec {
    let (chat, text) = data_files(root);
    let mut architecture = LlamaConfig::preset(Preset::Tiny);
    architecture.max_position_embeddings = 64;
    let mut spec = RunSpec::new(
        Start::Fresh {
            architecture: Box::new(architecture),
            tokenizer: tokenizer_dir(root),
        },
        vec![chat.clone(), text],
    );
    spec.validation = Some(kaiwa::train::run::DataFile {
        path: chat,
        sha256: String::new(),
    });
    spec.context = 32;
    spec.batch_rows = 4;
    spec.micro_batch_rows = 2;
    spec.steps = Some(steps);
    spec.warmup_steps = 3;
    spec.peak_lr = 3e-3;
    spec.eval_every = 4;
    spec.eval_rows = 8;
    spec.checkpoint_every = 4;
    spec.seed = 7;
    spec
}

/// Progress that raises the stop flag after a given step, as Ctrl-C does.
struct StopAfter<'a> {
    step: usize,
    flag: &'a AtomicBool,
}

impl Progress for StopAfter<'_> {
    fn start(&mut self, _: usize, _: usize) {}
    fn step(&mut self, _: &StepReport, done: usize, _: usize, _: f64) {
        if done == self.step {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
    fn note(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: usize, _: usize) {}
    fn step(&mut self, _: &StepReport, _: usize, _: usize, _: f64) {}
    fn note(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

fn metrics(out: &Path) -> Vec<Metric> {
    std::fs::read_to_string(out.join(METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The per-step losses and validation losses, without the timings (which differ run to run).
fn curve(out: &Path) -> Vec<(usize, String, f32)> {
    metrics(out)
        .into_iter()
        .map(|m| match m {
            Metric::Step { step, loss, .. } => (step, "loss".to_string(), loss),
            Metric::Validation { step, val_loss } => (step, "val".to_string(), val_loss),
        })
        .collect()
}

#[test]
fn a_run_writes_a_model_the_runtime_loads_with_metrics_and_a_curve() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let stop = AtomicBool::new(false);
    let summary = train(tiny_spec(root.path(), 12), &out, &stop, &mut Quiet).unwrap();
    assert_eq!(summary.steps_done, 12);
    assert!(!summary.interrupted);
    assert!(
        summary.train_rows > 0 && summary.examples == 39,
        "{summary:?}"
    );
    let curve = curve(&out);
    let losses: Vec<f32> = curve
        .iter()
        .filter(|c| c.1 == "loss")
        .map(|c| c.2)
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(losses[11] < losses[0], "the loss went down: {losses:?}");
    let vals: Vec<usize> = curve.iter().filter(|c| c.1 == "val").map(|c| c.0).collect();
    assert_eq!(vals, vec![4, 8, 12]);

    // The loss curve is an SVG with the training loss as a line and the validation loss.
    assert_eq!(PLOT_FILE, "loss.svg");
    let svg = std::fs::read_to_string(out.join(PLOT_FILE)).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(r##"<polyline fill="none" opacity="1" stroke="#1F77B4""##));
    assert!(svg.contains("training loss") && svg.contains("validation loss"));

    // The model directory is complete: the runtime loads it and generates.
    let generator = Generator::load(&summary.model_dir).unwrap();
    let options = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: 8,
        ..Default::default()
    };
    generator
        .generate(&[ChatMessage::user("こんにちは")], &options, &mut |_| true)
        .unwrap();

    // The same directory cannot be started again by mistake.
    let again = train(tiny_spec(root.path(), 12), &out, &stop, &mut Quiet).unwrap_err();
    assert!(matches!(again, TrainError::RunExists(_)), "{again}");
}

#[test]
fn a_stopped_run_resumed_gives_the_same_curve_and_weights_as_an_uninterrupted_one() {
    let root = tempfile::tempdir().unwrap();
    let straight = root.path().join("straight");
    let never = AtomicBool::new(false);
    train(tiny_spec(root.path(), 12), &straight, &never, &mut Quiet).unwrap();

    // Stopped after step 6 (between checkpoints), as Ctrl-C would: a checkpoint is saved.
    let stopped = root.path().join("stopped");
    let flag = AtomicBool::new(false);
    let mut stopper = StopAfter {
        step: 6,
        flag: &flag,
    };
    let first = train(tiny_spec(root.path(), 12), &stopped, &flag, &mut stopper).unwrap();
    assert!(first.interrupted);
    assert_eq!(first.steps_done, 6);

    // A crash after the checkpoint leaves metric lines past it (and maybe half a line):
    // resuming drops them.
    let mut text = std::fs::read_to_string(stopped.join(METRICS_FILE)).unwrap();
    text.push_str("{\"step\":7,\"loss\":9.0,\"lr\":0.001,\"grad_norm\":1.0,\"tokens\":1,\"tokens_per_s\":1.0,\"elapsed_s\":1.0}\n{\"step\":8,\"lo");
    std::fs::write(stopped.join(METRICS_FILE), text).unwrap();

    let flag = AtomicBool::new(false);
    let second = resume(&stopped, &flag, &mut Quiet).unwrap();
    assert_eq!(second.steps_done, 12);
    assert!(!second.interrupted);

    assert_eq!(curve(&stopped), curve(&straight));
    let weights = |dir: &Path| std::fs::read(dir.join("model/model.safetensors")).unwrap();
    assert!(
        weights(&stopped) == weights(&straight),
        "the resumed run ended with other weights"
    );
}

#[test]
fn resuming_refuses_changed_data() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let flag = AtomicBool::new(false);
    let mut stopper = StopAfter {
        step: 2,
        flag: &flag,
    };
    train(tiny_spec(root.path(), 8), &out, &flag, &mut stopper).unwrap();
    let mut chat = std::fs::read_to_string(root.path().join("train.jsonl")).unwrap();
    chat.push_str("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"assistant\",\"content\":\"y\"}]}\n");
    std::fs::write(root.path().join("train.jsonl"), chat).unwrap();
    let flag = AtomicBool::new(false);
    let err = resume(&out, &flag, &mut Quiet).unwrap_err();
    assert!(matches!(err, TrainError::DataChanged { .. }), "{err}");
}

#[test]
fn fine_tuning_continues_from_a_model_directory_and_keeps_its_tokenizer() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let flag = AtomicBool::new(false);
    let first = train(tiny_spec(root.path(), 6), &base, &flag, &mut Quiet).unwrap();

    let mut spec = tiny_spec(root.path(), 4);
    spec.start = Start::From(first.model_dir.clone());
    let tuned = root.path().join("tuned");
    let second = train(spec, &tuned, &flag, &mut Quiet).unwrap();
    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_eq!(
        read(&first.model_dir, "tokenizer.json"),
        read(&second.model_dir, "tokenizer.json")
    );
    assert_eq!(
        read(&first.model_dir, "config.json"),
        read(&second.model_dir, "config.json")
    );
    // It starts where the base model ended, not from scratch.
    let base_curve = curve(&base);
    let tuned_curve = curve(&tuned);
    let first_loss = |c: &[(usize, String, f32)]| c.iter().find(|x| x.1 == "loss").unwrap().2;
    assert!(
        first_loss(&tuned_curve) < first_loss(&base_curve) - 0.5,
        "fine-tuning started at {} vs {} from scratch",
        first_loss(&tuned_curve),
        first_loss(&base_curve)
    );
    Generator::load(&second.model_dir).unwrap();
}

#[test]
fn bad_settings_and_data_are_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let flag = AtomicBool::new(false);
    let mut spec = tiny_spec(root.path(), 4);
    spec.steps = None;
    let err = train(spec, &root.path().join("a"), &flag, &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("budget"), "{err}");

    let mut spec = tiny_spec(root.path(), 4);
    spec.context = 1000;
    let err = train(spec, &root.path().join("b"), &flag, &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("positions"), "{err}");

    let mut spec = tiny_spec(root.path(), 4);
    let broken = root.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"messages\": [}\n").unwrap();
    spec.data = vec![kaiwa::train::run::DataFile {
        path: broken,
        sha256: String::new(),
    }];
    let err = train(spec, &root.path().join("c"), &flag, &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("broken.jsonl"), "{err}");

    let err = resume(&root.path().join("nothing"), &flag, &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("run.json"), "{err}");
}

#[test]
fn a_time_budget_fixes_the_schedule_from_the_first_steps_and_stops_in_time() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let mut spec = tiny_spec(root.path(), 1);
    spec.steps = None;
    spec.time_s = Some(3.0);
    spec.warmup_steps = 5;
    spec.eval_every = 0;
    spec.checkpoint_every = 0;
    let flag = AtomicBool::new(false);
    let summary = train(spec, &out, &flag, &mut Quiet).unwrap();
    let stored: RunSpec = serde_json::from_str(
        &std::fs::read_to_string(out.join(kaiwa::train::run::RUN_FILE)).unwrap(),
    )
    .unwrap();
    let total = stored.total_steps.expect("the schedule's length is stored");
    assert!(total > 5, "total {total}");
    assert!(
        summary.steps_done >= 5 && summary.steps_done <= total,
        "{summary:?}"
    );
    // It ended because the schedule was done or the time was spent, whichever came first.
    assert!(
        summary.steps_done == total || summary.elapsed_s >= 3.0,
        "{summary:?}"
    );
    // The validation at the end is there even with --eval-every 0.
    assert!(curve(&out).iter().any(|c| c.1 == "val"));
}

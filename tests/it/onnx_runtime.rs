//! The ONNX export run through tract agrees with the plain-Rust reference forward pass, with and
//! without the KV cache, for every variation of the graph the runtime must accept; and ONNX
//! Runtime agrees with tract on the same file.

use std::sync::Arc;

use crate::support::model::*;
use kaiwa::model::onnx_export::ExportOptions;
use kaiwa::model::q8::Q8Matrix;
use kaiwa::model::reference::ReferenceModel;
use kaiwa::model::weights::{LlamaWeights, Param};
use kaiwa::model::{LlamaConfig, OnnxDecoder};

const TOLERANCE: f32 = 1e-4;

/// Prefill `prefill` tokens, then decode the rest one at a time; every position's logits must
/// match the reference forward pass over the whole sequence, on one thread and on two.
fn check_against_reference(config: &LlamaConfig, options: &ExportOptions, prefill: usize) {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_onnx(dir.path(), config, 11, options);
    let toks = tokens(prefill + 12, config.vocab_size, 1);
    let expected = ReferenceModel::new(config, &weights).forward(&toks);
    for threads in [1, 2] {
        eprintln!("{threads} thread(s)");
        check_decoder(
            dir.path(),
            config,
            options,
            threads,
            &toks,
            prefill,
            &expected,
        );
    }
}

fn check_decoder(
    dir: &std::path::Path,
    config: &LlamaConfig,
    options: &ExportOptions,
    threads: usize,
    toks: &[u32],
    prefill: usize,
    expected: &[Vec<f32>],
) {
    let fallback = (config.kv_heads(), config.head_dim());
    let decoder = Arc::new(
        OnnxDecoder::load_with_threads(&dir.join("model.onnx"), Some(fallback), threads).unwrap(),
    );
    assert_eq!(decoder.threads(), threads);
    assert_eq!(decoder.takes_position_ids(), options.position_ids);
    assert_eq!(decoder.num_layers(), config.num_hidden_layers);
    assert_eq!(decoder.vocab_size(), config.vocab_size);
    // kaiwa's export runs every layer's attention through kaiwa's kernel; the decomposed
    // layout runs through tract's own operators.
    let fused = if options.attention_op {
        config.num_hidden_layers
    } else {
        0
    };
    assert_eq!(decoder.fused_attention(), fused);

    let got = prefill_then_decode(&decoder, toks, prefill);
    // Logits of the last rows of a prefill only: the output projection computes just those.
    assert!(decoder.projects_asked_rows_only());
    for rows in [1, 3, prefill + 1] {
        let mut session = decoder.session().unwrap();
        let last = decoder.parallel(|| session.forward_last(&toks[..prefill], rows).unwrap());
        assert_eq!(last.len(), rows.min(prefill));
        for (pos, (g, e)) in last
            .iter()
            .zip(&expected[prefill - last.len()..])
            .enumerate()
        {
            let d = max_abs_diff(g, e);
            assert!(
                d < TOLERANCE,
                "last {rows} rows, row {pos}: max abs diff {d}"
            );
        }
    }
    let mut worst = 0.0f32;
    for (pos, (g, e)) in got.iter().zip(expected).enumerate() {
        let d = max_abs_diff(g, e);
        assert!(d < TOLERANCE, "position {pos}: max abs diff {d}");
        worst = worst.max(d);
    }
    // The logits must be far from constant, or the comparison proves nothing.
    let spread = expected[0].iter().cloned().fold(f32::MIN, f32::max)
        - expected[0].iter().cloned().fold(f32::MAX, f32::min);
    assert!(
        spread > 1.0,
        "logit spread {spread} is too small for a meaningful check"
    );
    eprintln!("worst difference {worst:e} over {} positions", toks.len());
}

/// Every position's logits for `toks`: the first `prefill` in one run, then one token a run,
/// inside `parallel`; the cache ends up covering them all.
fn prefill_then_decode(decoder: &Arc<OnnxDecoder>, toks: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let mut session = decoder.session().unwrap();
    let got = decoder.parallel(|| {
        let mut got = session.forward_all(&toks[..prefill]).unwrap();
        for &t in &toks[prefill..] {
            got.extend(session.forward_all(&[t]).unwrap());
        }
        got
    });
    assert_eq!(session.past_len(), toks.len());
    got
}

/// Greedy decoding of `steps` tokens inside `parallel`; returns every step's logits.
fn greedy_logits(decoder: &Arc<OnnxDecoder>, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut session = decoder.session().unwrap();
    decoder.parallel(|| {
        let mut all = vec![session.forward(prompt).unwrap()];
        for _ in 0..steps {
            let next = kaiwa::model::sampler::argmax(all.last().unwrap());
            all.push(session.forward(&[next]).unwrap());
        }
        all
    })
}

/// The thread pool only splits each product over rows, so the logits are the same bits as on
/// one thread; two generations at once share the pool (one gets it, the other runs on its own
/// thread) and neither changes the other's result.
#[test]
fn two_threads_give_the_same_logits_as_one_and_generations_can_overlap() {
    let config = mha_untied_config();
    let dir = tempfile::tempdir().unwrap();
    write_onnx(dir.path(), &config, 5, &ExportOptions::default());
    let path = dir.path().join("model.onnx");
    let one = Arc::new(OnnxDecoder::load_with_threads(&path, None, 1).unwrap());
    let two = Arc::new(OnnxDecoder::load_with_threads(&path, None, 2).unwrap());
    let prompts = [
        tokens(17, config.vocab_size, 4),
        tokens(9, config.vocab_size, 5),
    ];
    let expected: Vec<_> = prompts.iter().map(|p| greedy_logits(&one, p, 20)).collect();
    assert_eq!(greedy_logits(&two, &prompts[0], 20), expected[0]);

    for _ in 0..3 {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = prompts
            .iter()
            .cloned()
            .map(|prompt| {
                let (two, barrier) = (Arc::clone(&two), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    greedy_logits(&two, &prompt, 20)
                })
            })
            .collect();
        for (handle, want) in handles.into_iter().zip(&expected) {
            assert_eq!(&handle.join().unwrap(), want);
        }
    }
}

/// A panic inside `parallel` reaches the caller and leaves the pool usable.
#[test]
fn a_panic_inside_parallel_leaves_the_pool_usable() {
    let config = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    write_onnx(dir.path(), &config, 6, &ExportOptions::default());
    let decoder =
        Arc::new(OnnxDecoder::load_with_threads(&dir.path().join("model.onnx"), None, 2).unwrap());
    let prompt = tokens(8, config.vocab_size, 7);
    let before = greedy_logits(&decoder, &prompt, 3);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decoder.parallel(|| panic!("boom"))
    }));
    assert!(caught.is_err());
    assert_eq!(greedy_logits(&decoder, &prompt, 3), before);
}

#[test]
fn grouped_query_tied_model_matches_reference_in_prefill_and_every_decode_step() {
    check_against_reference(&tiny_config(), &ExportOptions::default(), 20);
}

/// A prefill of 70 tokens: more query rows per head than one task of the attention kernel takes.
#[test]
fn multi_head_untied_model_matches_reference() {
    check_against_reference(&mha_untied_config(), &ExportOptions::default(), 70);
}

#[test]
fn graph_without_position_ids_matches_reference() {
    let options = ExportOptions {
        position_ids: false,
        ..Default::default()
    };
    check_against_reference(&tiny_config(), &options, 15);
}

/// Tied embeddings larger than tract's constant-folding budget (4 MiB): the output projection
/// gets its own copy of the table (packed once instead of every step), and the logits still
/// match the reference.
#[test]
fn large_tied_embeddings_are_untied_for_the_output_projection() {
    let mut config = tiny_config();
    config.vocab_size = 20_000; // 20,000 × 64 × 4 bytes = 5.1 MB
    assert!(config.tie_word_embeddings);
    let dir = tempfile::tempdir().unwrap();
    let weights = write_onnx(dir.path(), &config, 4, &ExportOptions::default());
    let decoder = Arc::new(OnnxDecoder::load(&dir.path().join("model.onnx"), None).unwrap());
    assert_eq!(decoder.untied_weights(), 1);
    let toks = tokens(10, config.vocab_size, 5);
    let expected = ReferenceModel::new(&config, &weights).forward(&toks);
    check_decoder(
        dir.path(),
        &config,
        &ExportOptions::default(),
        2,
        &toks,
        6,
        &expected,
    );

    // A small table is folded by tract itself and left alone.
    let small = tempfile::tempdir().unwrap();
    write_onnx(small.path(), &tiny_config(), 4, &ExportOptions::default());
    let decoder = OnnxDecoder::load(&small.path().join("model.onnx"), None).unwrap();
    assert_eq!(decoder.untied_weights(), 0);
}

/// Attention written out in `MatMul`, `Softmax` and `Concat` (opset 17), as Optimum exports
/// Llama: tract runs it with its own operators.
#[test]
fn decomposed_attention_graph_matches_reference() {
    let options = ExportOptions {
        attention_op: false,
        ..Default::default()
    };
    check_against_reference(&tiny_config(), &options, 13);
    check_against_reference(&mha_untied_config(), &options, 4);
}

#[test]
fn weights_in_external_data_file_load_and_match_reference() {
    let options = ExportOptions {
        external_data: true,
        ..Default::default()
    };
    check_against_reference(&mha_untied_config(), &options, 7);
}

#[test]
fn decoding_with_the_cache_equals_recomputing_the_whole_sequence() {
    let config = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    write_onnx(dir.path(), &config, 3, &ExportOptions::default());
    let decoder = Arc::new(OnnxDecoder::load(&dir.path().join("model.onnx"), None).unwrap());
    let toks = tokens(30, config.vocab_size, 2);
    let full = decoder.session().unwrap().forward_all(&toks).unwrap();
    let mut session = decoder.session().unwrap();
    session.forward(&toks[..1]).unwrap();
    for (i, &t) in toks.iter().enumerate().skip(1) {
        let step = session.forward(&[t]).unwrap();
        let d = max_abs_diff(&step, &full[i]);
        assert!(d < TOLERANCE, "step {i}: {d}");
    }
    // After a reset, the session starts over.
    session.reset().unwrap();
    let again = session.forward(&toks[..5]).unwrap();
    assert!(max_abs_diff(&again, &full[4]) < TOLERANCE);
}

/// Runs `tests/python/ort_crosscheck.py` on `onnx`: ONNX Runtime's logits for `tokens` (a prefill
/// of `prefill`, then one token at a time) and, with `batch2`, a batch of two with left padding.
fn ort_crosscheck(
    python: &str,
    onnx: &std::path::Path,
    tokens: &[u32],
    prefill: usize,
    batch2: bool,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let case = serde_json::json!({"tokens": tokens, "prefill": prefill, "batch2": batch2});
    std::fs::write(dir.path().join("case.json"), case.to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/ort_crosscheck.py"
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(onnx)
        .arg(dir.path().join("case.json"))
        .arg(dir.path().join("out.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        onnx.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.json")).unwrap()).unwrap()
}

/// ONNX Runtime, an independent implementation of the standard, must agree with tract on the
/// same file (prefill, every decode step, and a left-padded batch of two).
#[test]
fn onnxruntime_agrees_with_tract() {
    let Some(python) =
        crate::support::python_with("onnxruntime", "pip install 'onnxruntime>=1.23' numpy")
    else {
        return;
    };
    for (name, config, options) in [
        ("gqa-tied", tiny_config(), ExportOptions::default()),
        (
            "mha-untied-external",
            mha_untied_config(),
            ExportOptions {
                external_data: true,
                ..Default::default()
            },
        ),
        (
            "no-position-ids",
            tiny_config(),
            ExportOptions {
                position_ids: false,
                ..Default::default()
            },
        ),
        (
            "decomposed-attention",
            tiny_config(),
            ExportOptions {
                attention_op: false,
                ..Default::default()
            },
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_onnx(dir.path(), &config, 5, &options);
        let onnx = dir.path().join("model.onnx");
        let toks = tokens(24, config.vocab_size, 3);
        let prefill = 16;
        let result = ort_crosscheck(&python, &onnx, &toks, prefill, options.position_ids);
        let rows =
            |v: &serde_json::Value| -> Vec<Vec<f32>> { serde_json::from_value(v.clone()).unwrap() };
        let ort = rows(&result["logits"]);

        let decoder = Arc::new(OnnxDecoder::load(&onnx, None).unwrap());
        let mut session = decoder.session().unwrap();
        let mut tract = session.forward_all(&toks[..prefill]).unwrap();
        for &t in &toks[prefill..] {
            tract.extend(session.forward_all(&[t]).unwrap());
        }
        for (pos, (a, b)) in tract.iter().zip(&ort).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d < TOLERANCE,
                "{name} position {pos}: tract and onnxruntime differ by {d}"
            );
        }
        if options.position_ids {
            // Batch of two in ONNX Runtime: the unpadded row equals the single sequence, and the
            // left-padded row equals the same tokens unpadded: the mask is honoured.
            let batch_row = rows(&result["batch_row"]);
            let padded_row = rows(&result["padded_row"]);
            for pos in 0..prefill {
                assert!(
                    max_abs_diff(&batch_row[pos], &ort[pos]) < TOLERANCE,
                    "{name} batch row {pos}"
                );
            }
            let single = decoder
                .session()
                .unwrap()
                .forward_all(&toks[..prefill - 3])
                .unwrap();
            for (pos, row) in padded_row.iter().enumerate() {
                assert!(
                    max_abs_diff(row, &single[pos]) < TOLERANCE,
                    "{name} padded row {pos}"
                );
            }
        }
    }
}

/// The weights an int8 export stands for: every product's weight through its 8-bit blocks and
/// back (the output projection too, tied or not); the embedding and the norms as they were.
fn int8_reference_weights(weights: &LlamaWeights) -> LlamaWeights {
    let round_trip = |p: &Param| {
        let q = Q8Matrix::quantize_padded(&p.data, p.shape[0], p.shape[1]).unwrap();
        Param {
            shape: p.shape.clone(),
            data: q.unpadded(&q.dequantize(), p.shape[1]),
        }
    };
    let mut w = weights.clone();
    for l in &mut w.layers {
        for p in [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.o_proj,
            &mut l.gate_proj,
            &mut l.up_proj,
            &mut l.down_proj,
        ] {
            *p = round_trip(p);
        }
    }
    w.lm_head = Some(round_trip(weights.output_projection()));
    w
}

/// The largest difference between two sets of rows, relative to the spread of the reference's
/// first row.
fn relative_error(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let spread = want[0].iter().cloned().fold(f32::MIN, f32::max)
        - want[0].iter().cloned().fold(f32::MAX, f32::min);
    got.iter()
        .zip(want)
        .map(|(g, w)| max_abs_diff(g, w))
        .fold(0.0, f32::max)
        / spread
}

/// `export-onnx --quantize int8`: every product reads its weight from 8-bit blocks (a standard
/// blocked `DequantizeLinear`), tract runs each one on the blocks with kaiwa's int8 kernels,
/// and the logits follow the weights the file stands for, in prefill and every decode step, on
/// one thread and two. ONNX Runtime reads the same file and computes those weights' logits.
#[test]
fn int8_export_runs_on_int8_blocks_and_follows_its_weights() {
    let options = ExportOptions {
        int8: true,
        ..Default::default()
    };
    // The tiny preset's MLP is 176 wide: its down projection ends in a partial block.
    for config in [tiny_config(), mha_untied_config()] {
        let dir = tempfile::tempdir().unwrap();
        let weights = write_onnx(dir.path(), &config, 7, &options);
        let onnx = dir.path().join("model.onnx");
        let toks = tokens(20, config.vocab_size, 3);
        let prefill = 12;
        let exact = ReferenceModel::new(&config, &int8_reference_weights(&weights)).forward(&toks);
        let f32_logits = ReferenceModel::new(&config, &weights).forward(&toks);
        for threads in [1, 2] {
            let decoder = Arc::new(OnnxDecoder::load_with_threads(&onnx, None, threads).unwrap());
            assert_eq!(decoder.int8_products(), 7 * config.num_hidden_layers + 1);
            assert!(decoder.projects_asked_rows_only());
            let got = prefill_then_decode(&decoder, &toks, prefill);
            let error = relative_error(&got, &exact);
            let quantization = relative_error(&f32_logits, &exact);
            eprintln!(
                "{threads} thread(s): int8 kernels vs their weights {error:e}; the weights' own \
                 change {quantization:e}"
            );
            assert!(
                error < INT8_TOLERANCE,
                "int8 logits off by {error} of the spread"
            );
        }
        // The file is smaller: the products' weights take a byte (and a scale per 32) each.
        let f32_dir = tempfile::tempdir().unwrap();
        write_onnx(f32_dir.path(), &config, 7, &ExportOptions::default());
        let size = |d: &std::path::Path| std::fs::metadata(d.join("model.onnx")).unwrap().len();
        assert!(size(dir.path()) < size(f32_dir.path()));

        let Some(python) =
            crate::support::python_with("onnxruntime", "pip install 'onnxruntime>=1.23' numpy")
        else {
            continue;
        };
        let result = ort_crosscheck(&python, &onnx, &toks, prefill, false);
        let ort: Vec<Vec<f32>> = serde_json::from_value(result["logits"].clone()).unwrap();
        for (pos, (a, b)) in ort.iter().zip(&exact).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d < TOLERANCE,
                "position {pos}: onnxruntime is {d} from the int8 weights"
            );
        }
    }
}

/// How far int8 kernels may be from the products of their dequantized weights, relative to the
/// logits' spread: they quantize the activations too, per block of 32, as llama.cpp's Q8_0 does.
const INT8_TOLERANCE: f32 = 0.05;

/// The bot shares one loaded model between worker threads and moves sessions between them.
#[test]
fn decoder_is_shareable_and_sessions_are_sendable() {
    fn shareable<T: Send + Sync>() {}
    fn sendable<T: Send>() {}
    shareable::<OnnxDecoder>();
    shareable::<kaiwa::model::Generator>();
    sendable::<kaiwa::model::DecoderSession>();
}

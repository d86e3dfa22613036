//! The training core on tiny models: gradients reach every parameter, the trainable model
//! computes what the plain-Rust reference and tract (on the exported ONNX) compute, a tiny batch
//! is overfit, the loss mask and gradient accumulation mean what they say, a seed repeats a run,
//! weight decay spares norm gains, and clipping is global.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use kaiwa::bench::train::random_token_rows;
use kaiwa::model::onnx_export::{export_onnx, ExportOptions};
use kaiwa::model::reference::ReferenceModel;
use kaiwa::model::weights::tensor_specs;
use kaiwa::model::{LlamaConfig, LlamaWeights, OnnxDecoder, Preset};
use kaiwa::train::convert::to_weights;
use kaiwa::train::init::random_weights;
use kaiwa::train::loss::{cross_entropy_sum, masked_cross_entropy};
use kaiwa::train::model::Llama;
use kaiwa::train::optim::{clip_global_norm, AdamWSettings, Schedule};
use kaiwa::train::step::{batch_loss, Batch, Trainer};

use crate::support::model::{burn_logits, max_abs_diff};

/// `tiny` (grouped-query attention, tied embeddings) and an untied variant without grouping, so
/// both output projections and both attention layouts are exercised.
fn tiny_configs() -> Vec<LlamaConfig> {
    let tied = LlamaConfig::preset(Preset::Tiny);
    let untied = LlamaConfig {
        tie_word_embeddings: false,
        num_key_value_heads: Some(4),
        ..tied.clone()
    };
    vec![tied, untied]
}

fn device() -> Device {
    Device::flex().autodiff()
}

/// A model initialised as `kaiwa train` initialises one: `random_weights` from a seed.
fn model(config: &LlamaConfig, seed: u64) -> (Llama, Device) {
    let device = device();
    let weights = random_weights(config, seed);
    (Llama::from_weights(config, &weights, &device), device)
}

fn ids(tokens: &[u32]) -> Vec<i64> {
    tokens.iter().map(|&t| i64::from(t)).collect()
}

#[test]
fn the_trainable_model_holds_exactly_the_hugging_face_tensors() {
    let small = {
        let mut c = LlamaConfig::preset(Preset::Small);
        c.vocab_size = 1024;
        c
    };
    for config in tiny_configs().iter().chain([&small]) {
        let weights = random_weights(config, 1);
        let (model, _) = model(config, 1);
        let back = to_weights(&model, config).unwrap();
        assert!(back == weights, "weights changed on the way through burn");
        let expected: usize = tensor_specs(config)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(model.num_params(), expected);
    }
}

struct GradCheck<'a> {
    path: Vec<String>,
    grads: &'a GradientsParams,
    failures: Vec<String>,
    checked: usize,
}

impl ModuleVisitor for GradCheck<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.checked += 1;
        let name = self.path.join(".");
        let Some(grad) = self.grads.get::<D>(param.id) else {
            self.failures.push(format!("{name}: no gradient"));
            return;
        };
        let values: Vec<f32> = grad.into_data().try_to_vec().unwrap();
        if values.iter().any(|v| !v.is_finite()) {
            self.failures.push(format!("{name}: non-finite gradient"));
        }
        if values.iter().all(|&v| v == 0.0) {
            self.failures.push(format!("{name}: all-zero gradient"));
        }
    }
}

#[test]
fn every_parameter_receives_a_finite_nonzero_gradient() {
    for config in tiny_configs() {
        let (model, device) = model(&config, 2);
        let batch = Batch::from_rows(&random_token_rows(2, 12, config.vocab_size, 3));
        let inputs =
            Tensor::<2, Int>::from_data(TensorData::new(ids(&batch.inputs), [2, 12]), &device);
        let targets =
            Tensor::<1, Int>::from_data(TensorData::new(ids(&batch.targets), [24]), &device);
        let mask = Tensor::<1>::ones([24], &device);
        // Both losses: the plain masked one and the trainer's fused-gradient one.
        let plain = masked_cross_entropy(
            model.forward_flat(inputs.clone()),
            targets.clone(),
            mask,
            24,
        );
        let fused = cross_entropy_sum(model.forward_flat(inputs), targets).for_backward;
        for loss in [plain, fused] {
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let mut check = GradCheck {
                path: vec![],
                grads: &grads,
                failures: vec![],
                checked: 0,
            };
            model.visit(&mut check);
            assert_eq!(check.checked, tensor_specs(&config).len());
            assert!(check.failures.is_empty(), "{:#?}", check.failures);
        }
    }
}

#[test]
fn logits_match_the_reference_forward_pass() {
    for config in tiny_configs() {
        let weights = random_weights(&config, 4);
        let (model, device) = model(&config, 4);
        let tokens = random_token_rows(1, 19, config.vocab_size, 5).remove(0);
        let got = burn_logits(&model, &tokens, &device);
        let expected = ReferenceModel::new(&config, &weights).forward(&tokens);
        for (g, e) in got.iter().zip(&expected) {
            let worst = max_abs_diff(g, e);
            assert!(worst < 1e-4, "largest logit difference {worst}");
        }
    }
}

fn trainer(model: Llama, device: &Device, steps: usize, settings: AdamWSettings) -> Trainer {
    let schedule = Schedule {
        peak_lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 10,
        total_steps: steps,
    };
    Trainer::new(model, settings, schedule, device.clone())
}

fn no_decay() -> AdamWSettings {
    AdamWSettings {
        weight_decay: 0.0,
        ..AdamWSettings::default()
    }
}

fn train(model: Llama, device: &Device, batches: &[Batch], steps: usize) -> (Trainer, Vec<f32>) {
    let mut trainer = trainer(model, device, steps, no_decay());
    let losses = (0..steps).map(|_| trainer.step(batches).loss).collect();
    (trainer, losses)
}

/// The check on the trained weights: tract, running the ONNX graph kaiwa exports from
/// them, computes the logits burn computes, within 1e-4, for the whole sequence at once and one
/// token at a time through the KV cache.
#[test]
fn tract_on_the_exported_onnx_agrees_with_the_trained_model() {
    for config in tiny_configs() {
        let (model, device) = model(&config, 30);
        let batch = Batch::from_rows(&random_token_rows(4, 16, config.vocab_size, 31));
        let (trainer, losses) = train(model, &device, std::slice::from_ref(&batch), 40);
        assert!(losses[39] < losses[0] - 1.0, "trained: {losses:?}");
        let weights: LlamaWeights = to_weights(trainer.model(), &config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        export_onnx(&config, &weights, &path, &ExportOptions::default()).unwrap();
        let decoder = std::sync::Arc::new(OnnxDecoder::load(&path, None).unwrap());

        let tokens = random_token_rows(1, 23, config.vocab_size, 32).remove(0);
        let expected = burn_logits(trainer.model(), &tokens, &device);
        let mut session = decoder.session().unwrap();
        let prefill = session.forward_all(&tokens).unwrap();
        session.reset().unwrap();
        let mut stepwise = session.forward_all(&tokens[..10]).unwrap();
        for &t in &tokens[10..] {
            stepwise.extend(session.forward_all(&[t]).unwrap());
        }
        let mut worst = 0.0f32;
        for ((e, p), s) in expected.iter().zip(&prefill).zip(&stepwise) {
            worst = worst.max(max_abs_diff(e, p)).max(max_abs_diff(e, s));
        }
        assert!(worst < 1e-4, "tract and burn differ by {worst}");
    }
}

#[test]
fn a_tiny_batch_is_overfit() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let (model, device) = model(&config, 9);
    let batch = Batch::from_rows(&random_token_rows(4, 16, config.vocab_size, 10));
    let (trainer, losses) = train(model, &device, std::slice::from_ref(&batch), 300);
    let last = batch_loss(trainer.model(), &batch, &device);
    assert!(
        losses[0] > 5.0,
        "initial loss {} should be near ln(512)",
        losses[0]
    );
    assert!(last < 0.1, "loss after 300 steps {last}");
}

#[test]
fn masked_out_targets_do_not_change_the_loss() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let (model, device) = model(&config, 11);
    let mut batch = Batch::from_rows(&random_token_rows(2, 8, config.vocab_size, 12));
    for i in 0..batch.mask.len() {
        batch.mask[i] = i % 3 == 0;
    }
    let mut other = batch.clone();
    for i in 0..other.targets.len() {
        if !other.mask[i] {
            other.targets[i] = (other.targets[i] + 1) % config.vocab_size as u32;
        }
    }
    assert_eq!(
        batch_loss(&model, &batch, &device),
        batch_loss(&model, &other, &device)
    );
}

#[test]
fn two_micro_batches_step_like_one_batch() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let rows = random_token_rows(4, 12, config.vocab_size, 14);
    let mut whole = Batch::from_rows(&rows);
    // Uneven masks, so a per-micro-batch mean would weight tokens differently.
    for i in 0..whole.mask.len() {
        whole.mask[i] = i < 12 || i % 2 == 0;
    }
    let half = whole.mask.len() / 2;
    let split = |range: std::ops::Range<usize>| Batch {
        batch: 2,
        time: 12,
        inputs: whole.inputs[range.clone()].to_vec(),
        targets: whole.targets[range.clone()].to_vec(),
        mask: whole.mask[range].to_vec(),
    };
    let parts = [split(0..half), split(half..2 * half)];
    let (a_model, device) = model(&config, 13);
    let (b_model, _) = model(&config, 13);
    let (a, la) = train(a_model, &device, &[whole], 3);
    let (b, lb) = train(b_model, &device, &parts, 3);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-5, "losses {la:?} vs {lb:?}");
    }
    let (wa, wb) = (
        to_weights(a.model(), &config).unwrap(),
        to_weights(b.model(), &config).unwrap(),
    );
    for ((name, x), (_, y)) in wa.named().iter().zip(wb.named().iter()) {
        let worst = max_abs_diff(&x.data, &y.data);
        assert!(worst < 1e-5, "{name}: differs by {worst}");
    }
}

#[test]
fn the_same_seed_repeats_a_training_run_bit_for_bit() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let run = || {
        let (model, device) = model(&config, 15);
        let batch = Batch::from_rows(&random_token_rows(4, 32, config.vocab_size, 16));
        let (trainer, losses) = train(model, &device, &[batch], 5);
        (losses, to_weights(trainer.model(), &config).unwrap())
    };
    let (la, wa) = run();
    let (lb, wb) = run();
    assert_eq!(la, lb);
    assert!(wa == wb, "weights differ after 5 steps");
}

#[test]
fn a_saved_optimizer_state_continues_the_run_exactly() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let batch = Batch::from_rows(&random_token_rows(4, 16, config.vocab_size, 40));
    let batches = std::slice::from_ref(&batch);
    let (model_a, device) = model(&config, 41);
    let mut straight = trainer(model_a, &device, 8, no_decay());
    let straight_losses: Vec<f32> = (0..8).map(|_| straight.step(batches).loss).collect();

    let (model_b, _) = model(&config, 41);
    let mut first = trainer(model_b, &device, 8, no_decay());
    let mut losses: Vec<f32> = (0..3).map(|_| first.step(batches).loss).collect();
    let dir = tempfile::tempdir().unwrap();
    let optimizer = dir.path().join("optimizer.bpk");
    first.save_optimizer(&optimizer).unwrap();
    let weights = to_weights(first.model(), &config).unwrap();
    drop(first);
    // A new model from the saved weights: new parameters, as in a new process.
    let reloaded = Llama::from_weights(&config, &weights, &device);
    let schedule = Schedule {
        peak_lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 10,
        total_steps: 8,
    };
    let mut second = Trainer::resume(
        reloaded,
        no_decay(),
        schedule,
        device.clone(),
        &optimizer,
        3,
    )
    .unwrap();
    losses.extend((3..8).map(|_| second.step(batches).loss));
    assert_eq!(losses, straight_losses);
    assert!(
        to_weights(second.model(), &config).unwrap()
            == to_weights(straight.model(), &config).unwrap()
    );
}

#[test]
fn selecting_masked_rows_gives_the_masked_mean_loss() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let (model, device) = model(&config, 17);
    let mut batch = Batch::from_rows(&random_token_rows(3, 10, config.vocab_size, 18));
    for i in 0..batch.mask.len() {
        batch.mask[i] = i % 4 != 1 && i > 2;
    }
    let n = batch.mask.len();
    let plain = device.clone().without_autodiff();
    let inference = model.valid();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(ids(&batch.inputs), [3, 10]), &plain);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids(&batch.targets), [n]), &plain);
    let mask: Vec<f32> = batch.mask.iter().map(|&m| f32::from(u8::from(m))).collect();
    let mask = Tensor::<1>::from_data(TensorData::new(mask, [n]), &plain);
    let masked = masked_cross_entropy(
        inference.forward_flat(inputs),
        targets,
        mask,
        batch.masked_in(),
    )
    .into_scalar::<f32>();
    let selected = batch_loss(&model, &batch, &device);
    assert!((masked - selected).abs() < 1e-5, "{masked} vs {selected}");
}

#[test]
fn the_fused_loss_gradient_equals_the_plain_one() {
    let device = device();
    device.seed(19);
    let (n, vocab) = (24, 97);
    let logits = Tensor::<2>::random([n, vocab], Distribution::Normal(0.0, 3.0), &device);
    let targets: Vec<i64> = (0..n as i64).map(|i| i * 13 % vocab as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);

    let fused_leaf = logits.clone().require_grad();
    let fused = cross_entropy_sum(fused_leaf.clone(), targets.clone());
    let fused_grad = fused_leaf.grad(&fused.for_backward.backward()).unwrap();

    let plain_leaf = logits.require_grad();
    let plain = masked_cross_entropy(plain_leaf.clone(), targets, Tensor::ones([n], &device), 1);
    let plain_grad = plain_leaf.grad(&plain.backward()).unwrap();

    let (a, b) = (fused.value.into_scalar::<f32>(), plain.into_scalar::<f32>());
    assert!((a - b).abs() < 1e-4 * b.abs(), "loss {a} vs {b}");
    let a: Vec<f32> = fused_grad.into_data().try_to_vec().unwrap();
    let b: Vec<f32> = plain_grad.into_data().try_to_vec().unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
}

fn one_step(config: &LlamaConfig, settings: AdamWSettings) -> LlamaWeights {
    let (model, device) = model(config, 21);
    let batch = Batch::from_rows(&random_token_rows(2, 8, config.vocab_size, 22));
    let schedule = Schedule {
        peak_lr: 1e-2,
        min_lr: 1e-2,
        warmup_steps: 0,
        total_steps: 1,
    };
    let mut trainer = Trainer::new(model, settings, schedule, device);
    trainer.step(&[batch]);
    to_weights(trainer.model(), config).unwrap()
}

#[test]
fn weight_decay_touches_matrices_and_spares_norm_gains() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let without = one_step(&config, no_decay());
    let with = one_step(
        &config,
        AdamWSettings {
            weight_decay: 0.5,
            ..AdamWSettings::default()
        },
    );
    for ((name, a), (_, b)) in without.named().iter().zip(with.named().iter()) {
        if a.shape.len() == 1 {
            assert!(a.data == b.data, "{name} was decayed");
        } else {
            assert!(a.data != b.data, "{name} was not decayed");
        }
    }
}

struct GradNorm<'a>(&'a GradientsParams, f64);

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let g: Vec<f32> = self
            .0
            .get::<D>(param.id)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        self.1 += g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
    }
}

#[test]
fn clipping_scales_all_gradients_to_the_global_norm() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let (model, device) = model(&config, 23);
    let batch = Batch::from_rows(&random_token_rows(2, 8, config.vocab_size, 24));
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(ids(&batch.inputs), [2, 8]), &device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids(&batch.targets), [16]), &device);
    let loss = cross_entropy_sum(model.forward_flat(inputs), targets).for_backward;
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut before = GradNorm(&grads, 0.0);
    model.visit(&mut before);
    let before = before.1;
    let (clipped, reported) = clip_global_norm(&model, grads, Some(0.25));
    assert!((f64::from(reported) - before.sqrt()).abs() < 1e-3 * before.sqrt());
    assert!(
        reported > 0.25,
        "the test needs a norm above the limit, got {reported}"
    );
    let mut after = GradNorm(&clipped, 0.0);
    model.visit(&mut after);
    assert!(
        (after.1.sqrt() - 0.25).abs() < 1e-4,
        "clipped norm {}",
        after.1.sqrt()
    );
}

#[test]
fn micro_batches_on_two_threads_step_exactly_like_one_thread() {
    let config = LlamaConfig::preset(Preset::Tiny);
    let rows = random_token_rows(6, 12, config.vocab_size, 50);
    // Three micro-batches: a pair on two threads, then one alone.
    let parts: Vec<Batch> = rows.chunks(2).map(Batch::from_rows).collect();
    let run = |parallel: bool| {
        let (model, device) = model(&config, 51);
        let mut trainer = trainer(model, &device, 4, no_decay());
        trainer.set_parallel(parallel);
        let losses: Vec<f32> = (0..4).map(|_| trainer.step(&parts).loss).collect();
        (losses, to_weights(trainer.model(), &config).unwrap())
    };
    let (la, wa) = run(true);
    let (lb, wb) = run(false);
    assert_eq!(la, lb);
    assert!(wa == wb, "two threads and one gave other weights");
}

/// kaiwa's fused AdamW takes the same steps as burn's own `AdamW` with the same settings, and
/// continues from burn's saved state (checkpoints written before it existed).
#[test]
fn the_fused_adamw_steps_like_burns_adamw() {
    use burn::optim::{AdamWConfig, ModuleOptimizer, OptimizerRecord};
    use kaiwa::train::optim::FusedAdamW;

    let config = LlamaConfig::preset(Preset::Tiny);
    let (start, device) = model(&config, 31);
    let settings = AdamWSettings::default();
    let fused = |weight_decay| FusedAdamW {
        beta_1: settings.beta1,
        beta_2: settings.beta2,
        epsilon: settings.eps,
        weight_decay,
    };
    let burns = AdamWConfig::new()
        .with_beta_1(settings.beta1)
        .with_beta_2(settings.beta2)
        .with_epsilon(settings.eps)
        .with_weight_decay(settings.weight_decay);
    let mut optimizers = [
        ModuleOptimizer::from(fused(settings.weight_decay)),
        burns.init(),
    ];
    let mut models = [start.clone(), start];
    let dir = tempfile::tempdir().unwrap();
    for step in 0..4u64 {
        if step == 2 {
            // The fused optimizer goes on from burn's state.
            let path = dir.path().join("burn.bpk");
            optimizers[1].save(&path).unwrap();
            let record = OptimizerRecord::load(&path).unwrap();
            assert!(!record.is_empty());
            optimizers[0] = ModuleOptimizer::from(fused(settings.weight_decay)).load_record(record);
        }
        let batch = Batch::from_rows(&random_token_rows(2, 8, config.vocab_size, 40 + step));
        let inputs =
            Tensor::<2, Int>::from_data(TensorData::new(ids(&batch.inputs), [2, 8]), &device);
        let targets =
            Tensor::<1, Int>::from_data(TensorData::new(ids(&batch.targets), [16]), &device);
        for (model, optimizer) in models.iter_mut().zip(&mut optimizers) {
            let loss = cross_entropy_sum(model.forward_flat(inputs.clone()), targets.clone());
            let grads = GradientsParams::from_grads(loss.for_backward.backward(), &*model);
            *model = optimizer.step(3e-3, model.clone(), grads);
        }
    }
    let [a, b] = models.map(|m| to_weights(&m, &config).unwrap());
    let (a, b) = (a.named(), b.named());
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let diff = max_abs_diff(&x.data, &y.data);
        assert!(diff <= 1e-6, "{name}: the two optimizers differ by {diff}");
    }
}

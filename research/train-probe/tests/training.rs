//! The training core end to end on tiny models: gradients reach every parameter, the logits match
//! an independent forward pass, weights round-trip through safetensors, a tiny batch is overfit,
//! the loss mask and gradient accumulation mean what they say, and a seed repeats a run.

mod support;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use support::reference::Reference;
use support::{model, seeded_device, tiny_configs, token_rows};
use train_probe::loss::{cross_entropy_sum, masked_cross_entropy};
use train_probe::model::{Config, Llama};

use train_probe::optim::{AdamWSettings, Schedule};
use train_probe::train::{batch_loss, Batch, Trainer};
use train_probe::weights::{self, named_shapes, named_tensors};

/// The Hugging Face names and shapes kaiwa's `tensor_specs` expects, built independently.
fn hf_specs(c: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (c.hidden, c.intermediate, c.vocab);
    let (q, kv) = (c.heads * c.head_dim(), c.kv_heads * c.head_dim());
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..c.layers {
        let p = format!("model.layers.{l}");
        specs.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    specs.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    specs
}

#[test]
fn parameter_names_are_the_hugging_face_names() {
    for config in tiny_configs().iter().chain([&Config::small()]) {
        let (model, _) = model(config, 1);
        let mut names = named_shapes(&model);
        let mut expected = hf_specs(config);
        names.sort();
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(model.num_params(), config.parameter_count());
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
        let batch = Batch::from_rows(&token_rows(2, 12, config.vocab, 3));
        let inputs = Tensor::<2, Int>::from_data(
            TensorData::new(batch.inputs.iter().map(|&t| t as i64).collect(), [2, 12]),
            &device,
        );
        let targets = Tensor::<1, Int>::from_data(
            TensorData::new(batch.targets.iter().map(|&t| t as i64).collect(), [24]),
            &device,
        );
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
            assert_eq!(check.checked, hf_specs(&config).len());
            assert!(check.failures.is_empty(), "{:#?}", check.failures);
        }
    }
}

#[test]
fn logits_match_an_independent_forward_pass() {
    for config in tiny_configs() {
        let (model, device) = model(&config, 4);
        let tokens: Vec<u32> = token_rows(1, 19, config.vocab, 5).remove(0);
        let input = Tensor::<2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect(), [1, 20]),
            &device,
        );
        let logits: Vec<f32> = model.forward(input).into_data().try_to_vec().unwrap();
        let expected = Reference::new(&config, named_tensors(&model)).forward(&tokens);
        let worst = expected
            .concat()
            .iter()
            .zip(&logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "largest logit difference {worst}");
    }
}

#[test]
fn save_then_load_gives_identical_logits() {
    let dir = std::env::temp_dir().join(format!("train-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (n, config) in tiny_configs().into_iter().enumerate() {
        let (model, device) = model(&config, 6);
        let path = dir.join(format!("model{n}.safetensors"));
        weights::save(&model, &path).unwrap();
        let loaded = weights::load(&config, &path, &device).unwrap();
        let tokens = token_rows(2, 9, config.vocab, 7);
        let ids: Vec<i64> = tokens.concat().iter().map(|&t| t as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 10]), &device);
        let a: Vec<f32> = model
            .forward(input.clone())
            .into_data()
            .try_to_vec()
            .unwrap();
        let b: Vec<f32> = loaded.forward(input).into_data().try_to_vec().unwrap();
        assert_eq!(a, b);
        assert_eq!(named_tensors(&model), named_tensors(&loaded));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loading_names_the_missing_tensor() {
    let config = Config::tiny();
    let (model, device) = model(&config, 8);
    let path = std::env::temp_dir().join(format!("train-probe-miss-{}.st", std::process::id()));
    weights::save(&model, &path).unwrap();
    let wider = Config {
        tie_embeddings: false,
        ..config
    };
    let err = weights::load(&wider, &path, &device)
        .unwrap_err()
        .to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("lm_head.weight is missing"), "{err}");
}

fn train(
    model: Llama,
    device: &burn::tensor::Device,
    batches: &[Batch],
    steps: usize,
) -> (Trainer, Vec<f32>) {
    let schedule = Schedule {
        peak_lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 10,
        total_steps: steps,
    };
    let settings = AdamWSettings {
        weight_decay: 0.0,
        ..AdamWSettings::default()
    };
    let mut trainer = Trainer::new(model, settings, schedule, device.clone());
    let losses = (0..steps).map(|_| trainer.step(batches).loss).collect();
    (trainer, losses)
}

#[test]
fn a_tiny_batch_is_overfit() {
    let config = Config::tiny();
    let (model, device) = model(&config, 9);
    let batch = Batch::from_rows(&token_rows(4, 16, config.vocab, 10));
    let (trainer, losses) = train(model, &device, std::slice::from_ref(&batch), 300);
    let last = batch_loss(trainer.model(), &batch, &device);
    eprintln!(
        "overfit: loss {} at step 0, {} after 300 steps",
        losses[0], last
    );
    assert!(
        losses[0] > 5.0,
        "initial loss {} should be near ln(512)",
        losses[0]
    );
    assert!(
        last < 0.1,
        "loss after 300 steps {last} (curve {:?})",
        &losses[..10]
    );
}

#[test]
fn masked_out_targets_do_not_change_the_loss() {
    let config = Config::tiny();
    let (model, device) = model(&config, 11);
    let mut batch = Batch::from_rows(&token_rows(2, 8, config.vocab, 12));
    for i in 0..batch.mask.len() {
        batch.mask[i] = i % 3 == 0;
    }
    let mut other = batch.clone();
    for i in 0..other.targets.len() {
        if !other.mask[i] {
            other.targets[i] = (other.targets[i] + 1) % config.vocab as u32;
        }
    }
    assert_eq!(
        batch_loss(&model, &batch, &device),
        batch_loss(&model, &other, &device)
    );
}

#[test]
fn two_micro_batches_step_like_one_batch() {
    let config = Config::tiny();
    let (model, device) = model(&config, 13);
    let rows = token_rows(4, 12, config.vocab, 14);
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
    let path = std::env::temp_dir().join(format!("train-probe-acc-{}.st", std::process::id()));
    weights::save(&model, &path).unwrap();
    let copy = weights::load(&config, &path, &device).unwrap();
    std::fs::remove_file(&path).unwrap();

    let (a, la) = train(model, &device, &[whole], 3);
    let (b, lb) = train(copy, &device, &parts, 3);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-5, "losses {la:?} vs {lb:?}");
    }
    for (x, y) in named_tensors(a.model())
        .iter()
        .zip(named_tensors(b.model()).iter())
    {
        let worst = x
            .data
            .iter()
            .zip(&y.data)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-5, "{}: differs by {worst}", x.name);
    }
}

#[test]
fn the_same_seed_repeats_a_training_run_bit_for_bit() {
    let config = Config::tiny();
    let run = || {
        let (model, device) = model(&config, 15);
        let batch = Batch::from_rows(&token_rows(4, 32, config.vocab, 16));
        let (trainer, losses) = train(model, &device, &[batch], 5);
        (losses, named_tensors(trainer.model()))
    };
    let (la, wa) = run();
    let (lb, wb) = run();
    assert_eq!(la, lb);
    assert!(wa == wb, "weights differ after 5 steps");
}

#[test]
fn selecting_masked_rows_gives_the_masked_mean_loss() {
    let config = Config::tiny();
    let (model, device) = model(&config, 17);
    let mut batch = Batch::from_rows(&token_rows(3, 10, config.vocab, 18));
    for i in 0..batch.mask.len() {
        batch.mask[i] = i % 4 != 1 && i > 2;
    }
    let n = batch.mask.len();
    let plain = device.clone().without_autodiff();
    let inference = model.valid();
    let ids = |v: &[u32]| v.iter().map(|&t| t as i64).collect::<Vec<_>>();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(ids(&batch.inputs), [3, 10]), &plain);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids(&batch.targets), [n]), &plain);
    let mask: Vec<f32> = batch
        .mask
        .iter()
        .map(|&m| if m { 1.0 } else { 0.0 })
        .collect();
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
    let device = seeded_device(19);
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
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "gradients differ by {worst}");
}

fn one_step(config: &Config, settings: AdamWSettings) -> Vec<train_probe::weights::NamedTensor> {
    let (model, device) = model(config, 21);
    let batch = Batch::from_rows(&token_rows(2, 8, config.vocab, 22));
    let schedule = Schedule {
        peak_lr: 1e-2,
        min_lr: 1e-2,
        warmup_steps: 0,
        total_steps: 1,
    };
    let mut trainer = Trainer::new(model, settings, schedule, device);
    trainer.step(&[batch]);
    named_tensors(trainer.model())
}

#[test]
fn weight_decay_touches_matrices_and_spares_norm_gains() {
    let config = Config::tiny();
    let without = one_step(
        &config,
        AdamWSettings {
            weight_decay: 0.0,
            ..AdamWSettings::default()
        },
    );
    let with = one_step(
        &config,
        AdamWSettings {
            weight_decay: 0.5,
            ..AdamWSettings::default()
        },
    );
    for (a, b) in without.iter().zip(&with) {
        if a.shape.len() == 1 {
            assert!(a.data == b.data, "{} was decayed", a.name);
        } else {
            assert!(a.data != b.data, "{} was not decayed", a.name);
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
    let config = Config::tiny();
    let (model, device) = model(&config, 23);
    let batch = Batch::from_rows(&token_rows(2, 8, config.vocab, 24));
    let ids = |v: &[u32]| v.iter().map(|&t| t as i64).collect::<Vec<_>>();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(ids(&batch.inputs), [2, 8]), &device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids(&batch.targets), [16]), &device);
    let loss = cross_entropy_sum(model.forward_flat(inputs), targets).for_backward;
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut before = GradNorm(&grads, 0.0);
    model.visit(&mut before);
    let before = before.1;
    let (clipped, reported) = train_probe::optim::clip_global_norm(&model, grads, Some(0.25));
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

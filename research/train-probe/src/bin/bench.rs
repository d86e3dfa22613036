//! Training throughput of the `small` preset on the Flex CPU backend.
//!
//! `cargo run --release --bin bench -- [--batch 16] [--context 256] [--warmup 3] [--steps 10]
//! [--micro 1] [--peak] [--determinism] [--breakdown]`. Prints tokens/s for full optimizer steps (forward, backward, clipping,
//! AdamW), peak RSS, and achieved FLOP/s; `--peak` also measures the gemm stack's f32 peak on one
//! and on all threads; `--determinism` trains twice from the same seed and compares bit for bit.
//! `RAYON_NUM_THREADS` sets the thread count; `KEEP_GLIBC_DEFAULTS=1` skips `retain_freed_memory`.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use train_probe::model::{Config, Llama};
use train_probe::optim::{AdamWSettings, Schedule};
use train_probe::train::{Batch, Trainer};
use train_probe::weights::named_tensors;

struct Args {
    batch: usize,
    context: usize,
    warmup: usize,
    steps: usize,
    peak: bool,
    determinism: bool,
    breakdown: bool,
    micro: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        batch: 16,
        context: 256,
        warmup: 3,
        steps: 10,
        peak: false,
        determinism: false,
        breakdown: false,
        micro: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--batch" => args.batch = value(),
            "--context" => args.context = value(),
            "--warmup" => args.warmup = value(),
            "--steps" => args.steps = value(),
            "--peak" => args.peak = true,
            "--determinism" => args.determinism = true,
            "--breakdown" => args.breakdown = true,
            "--micro" => args.micro = value(),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn main() {
    let args = parse_args();
    if std::env::var_os("KEEP_GLIBC_DEFAULTS").is_none() {
        train_probe::train::retain_freed_memory();
    }
    let config = Config::small();
    println!(
        "small preset: {} parameters, batch {} x {} in {} micro-batch(es), threads {}",
        config.parameter_count(),
        args.batch,
        args.context,
        args.micro,
        rayon::current_num_threads()
    );
    if args.peak {
        peak_matmul();
    }
    if args.determinism {
        determinism(&config, &args);
        return;
    }

    let device = Device::flex().autodiff();
    device.seed(0);
    let model = Llama::init(&config, &device);
    if args.breakdown {
        breakdown(
            &model,
            &random_batch(&config, &args, 1),
            &device,
            args.steps,
        );
    }
    let mut trainer = trainer(model, &device);
    let batch = random_batch(&config, &args, 1);
    let batches = split(&batch, args.micro);
    let rss_before = peak_rss_mib();
    for i in 0..args.warmup {
        let t = Instant::now();
        let report = trainer.step(&batches);
        println!(
            "warm-up {i}: loss {:.4} norm {:.3} {:.0} ms",
            report.loss,
            report.grad_norm,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    if args.steps == 0 {
        return;
    }
    let mut times = Vec::new();
    let cpu_before = cpu_seconds();
    let mut last_loss = 0.0;
    for _ in 0..args.steps {
        let t = Instant::now();
        last_loss = trainer.step(&batches).loss;
        times.push(t.elapsed().as_secs_f64());
    }
    let total: f64 = times.iter().sum();
    let cpu = cpu_seconds() - cpu_before;
    let tokens = (args.batch * args.context * args.steps) as f64;
    let tokens_per_s = tokens / total;
    let flops = config.train_flops_per_token(args.context) * tokens_per_s;
    times.sort_by(f64::total_cmp);
    println!(
        "timed {} steps: {:.0} tokens/s, step median {:.0} ms (min {:.0}, max {:.0}), last loss {:.4}",
        args.steps,
        tokens_per_s,
        times[times.len() / 2] * 1e3,
        times[0] * 1e3,
        times[times.len() - 1] * 1e3,
        last_loss
    );
    println!(
        "process CPU time {:.2} s over {:.2} s wall ({:.2} cores busy); {:.0} tokens per CPU-second",
        cpu,
        total,
        cpu / total,
        tokens / cpu
    );
    println!(
        "achieved {:.1} GFLOP/s ({:.2} GFLOP per token incl. attention); peak RSS {:.0} MiB (before training {:.0} MiB)",
        flops / 1e9,
        config.train_flops_per_token(args.context) / 1e9,
        peak_rss_mib(),
        rss_before
    );
}

fn trainer(model: Llama, device: &Device) -> Trainer {
    let schedule = Schedule {
        peak_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 2,
        total_steps: 1000,
    };
    Trainer::new(model, AdamWSettings::default(), schedule, device.clone())
}

fn random_batch(config: &Config, args: &Args, seed: u64) -> Batch {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let rows: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..=args.context)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % config.vocab as u64) as u32
                })
                .collect()
        })
        .collect();
    Batch::from_rows(&rows)
}

/// Median times of the forward pass with the loss, and of forward plus backward, without updates.
fn breakdown(model: &Llama, batch: &Batch, device: &Device, reps: usize) {
    use burn::optim::GradientsParams;
    use train_probe::loss::masked_cross_entropy;
    let inputs = || {
        let ids: Vec<i64> = batch.inputs.iter().map(|&t| t as i64).collect();
        let targets: Vec<i64> = batch.targets.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        (
            Tensor::<2, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(ids, [batch.batch, batch.time]),
                device,
            ),
            Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(targets, [n]),
                device,
            ),
            Tensor::<1>::ones([n], device),
            n,
        )
    };
    let median = |f: &mut dyn FnMut()| {
        f();
        let mut t: Vec<f64> = (0..reps.max(3))
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    // Forward-only passes run on the inference copy: on the autodiff device a forward without a
    // backward keeps its graph (and activations) until the next backward.
    let inference = model.valid();
    let plain = device.clone().without_autodiff();
    let plain_inputs = || {
        let ids: Vec<i64> = batch.inputs.iter().map(|&t| t as i64).collect();
        let targets: Vec<i64> = batch.targets.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        (
            Tensor::<2, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(ids, [batch.batch, batch.time]),
                &plain,
            ),
            Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(targets, [n]),
                &plain,
            ),
            Tensor::<1>::ones([n], &plain),
            n,
        )
    };
    let logits_only = median(&mut || {
        let (x, _, _, _) = plain_inputs();
        let _ = inference.forward_flat(x).into_data();
    });
    let forward = median(&mut || {
        let (x, y, m, n) = plain_inputs();
        let _ = masked_cross_entropy(inference.forward_flat(x), y, m, n).into_scalar::<f32>();
    });
    let backward = median(&mut || {
        let (x, y, m, n) = inputs();
        let loss = masked_cross_entropy(model.forward_flat(x), y, m, n);
        let grads = GradientsParams::from_grads(loss.backward(), model);
        let _ = grads.len();
    });
    println!(
        "breakdown (median ms): inference forward to logits {logits_only:.0}, inference forward + loss {forward:.0}, training forward + loss + backward {backward:.0}"
    );
}

/// `batch` cut into `parts` micro-batches of consecutive rows (gradient accumulation).
fn split(batch: &Batch, parts: usize) -> Vec<Batch> {
    assert!(batch.batch % parts == 0, "--micro must divide --batch");
    let rows = batch.batch / parts;
    let len = rows * batch.time;
    (0..parts)
        .map(|p| Batch {
            batch: rows,
            time: batch.time,
            inputs: batch.inputs[p * len..(p + 1) * len].to_vec(),
            targets: batch.targets[p * len..(p + 1) * len].to_vec(),
            mask: batch.mask[p * len..(p + 1) * len].to_vec(),
        })
        .collect()
}

/// Trains twice from the same seed and reports whether losses and weights repeat exactly.
fn determinism(config: &Config, args: &Args) {
    let run = || {
        let device = Device::flex().autodiff();
        device.seed(42);
        let model = Llama::init(config, &device);
        let mut trainer = trainer(model, &device);
        let batch = random_batch(config, args, 7);
        let losses: Vec<f32> = (0..args.steps)
            .map(|_| trainer.step(std::slice::from_ref(&batch)).loss)
            .collect();
        (losses, named_tensors(trainer.model()))
    };
    let (la, wa) = run();
    let (lb, wb) = run();
    let identical_losses = la.iter().zip(&lb).all(|(a, b)| a.to_bits() == b.to_bits());
    let mut worst = 0.0f32;
    let mut differing = 0usize;
    let mut total = 0usize;
    for (a, b) in wa.iter().zip(&wb) {
        for (x, y) in a.data.iter().zip(&b.data) {
            total += 1;
            if x.to_bits() != y.to_bits() {
                differing += 1;
                worst = worst.max((x - y).abs());
            }
        }
    }
    // FNV-1a over the weight bits, to compare runs across processes (e.g. thread counts).
    let checksum = wa
        .iter()
        .flat_map(|t| t.data.iter())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3)
        });
    println!("weights checksum {checksum:016x}");
    println!("run A losses {la:?}");
    println!("run B losses {lb:?}");
    println!(
        "determinism after {} steps: losses identical {identical_losses}; {differing} of {total} weights differ, largest difference {worst:e}",
        args.steps
    );
}

/// f32 GFLOP/s of a large square matmul through the same backend (gemm), on one thread and on
/// all of the pool's threads.
fn peak_matmul() {
    let device = Device::flex();
    let n: usize = 2048;
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
    let threads = rayon::current_num_threads();
    for t in [1, threads] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .expect("thread pool");
        let gflops = pool.install(|| {
            let _ = a.clone().matmul(b.clone()).into_data();
            let reps = 5;
            let start = Instant::now();
            for _ in 0..reps {
                let _ = a.clone().matmul(b.clone()).into_data();
            }
            let secs = start.elapsed().as_secs_f64();
            2.0 * (n * n * n) as f64 * reps as f64 / secs / 1e9
        });
        println!("peak f32 matmul {n}^3 on {t} thread(s): {gflops:.1} GFLOP/s");
    }
}

/// User plus system CPU time of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The high-water mark of resident memory (`VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

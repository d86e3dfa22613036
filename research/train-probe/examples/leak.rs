//! Does a forward pass on the autodiff device without a backward hold memory?
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use train_probe::model::{Config, Llama};

fn rss() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<f64>()
        .unwrap()
        / 1024.0
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let config = Config::small();
    let device = Device::flex().autodiff();
    let model = Llama::init(&config, &device);
    let model = if mode == "valid" {
        model.valid()
    } else {
        model
    };
    let ids: Vec<i64> = (0..16 * 256).map(|i| (i * 7 % 8192) as i64).collect();
    for i in 0..6 {
        let t = std::time::Instant::now();
        let x = Tensor::<2, Int>::from_data(
            TensorData::new(ids.clone(), [16, 256]),
            &model.model.embed_tokens.weight.val().device(),
        );
        let logits = model.forward_flat(x);
        let _ = logits.into_data();
        println!(
            "{mode} forward {i}: {:.0} ms, rss {:.0} MiB",
            t.elapsed().as_secs_f64() * 1e3,
            rss()
        );
    }
}

//! Does multiplying by a transposed weight view cost more than a contiguous [in, out] weight?
use burn::tensor::{Device, Distribution, Tensor};
use std::time::Instant;

fn time(label: &str, f: impl Fn() -> Tensor<2>) {
    let _ = f().into_data();
    let start = Instant::now();
    for _ in 0..5 {
        let _ = f().into_data();
    }
    println!(
        "{label}: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3 / 5.0
    );
}

fn main() {
    train_probe::train::retain_freed_memory();
    let d = Device::flex();
    for (n, k, m) in [
        (4096, 256, 8192),
        (4096, 256, 688),
        (4096, 688, 256),
        (4096, 256, 256),
    ] {
        let x = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &d);
        let w_out_in = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &d);
        let w_in_out = w_out_in.clone().transpose().into_data();
        let w_in_out = Tensor::<2>::from_data(w_in_out, &d);
        println!("[{n},{k}] x [{k},{m}]");
        time("  x · Wᵀ (HF layout view)", || {
            x.clone().matmul(w_out_in.clone().transpose())
        });
        time("  x · W  (contiguous [in,out])", || {
            x.clone().matmul(w_in_out.clone())
        });
        // backward shapes: grad_x = g · W ; grad_W = gᵀ · x
        let g = Tensor::<2>::random([n, m], Distribution::Normal(0.0, 1.0), &d);
        time("  gᵀ · x (weight grad)", || {
            g.clone().transpose().matmul(x.clone())
        });
    }
}

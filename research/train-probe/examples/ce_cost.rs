//! Cost of the cross-entropy forward + backward on [4096, 8192] logits alone, and of an lm_head
//! matmul forward + backward, on the autodiff Flex device.
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use std::time::Instant;
use train_probe::loss::{cross_entropy_sum, masked_cross_entropy};

fn main() {
    train_probe::train::retain_freed_memory();
    let d = Device::flex().autodiff();
    let (n, v, h) = (4096, 8192, 256);
    let targets: Vec<i64> = (0..n as i64).map(|i| i * 37 % v as i64).collect();
    let mut ce = vec![];
    let mut plain = vec![];
    let mut head = vec![];
    for _ in 0..6 {
        let logits = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 1.0), &d).require_grad();
        let t = Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [n]), &d);
        let s = Instant::now();
        let loss = cross_entropy_sum(logits.clone(), t.clone());
        let g = loss.for_backward.backward();
        let _ = (
            logits.grad(&g).unwrap().into_data(),
            loss.value.into_scalar::<f32>(),
        );
        ce.push(s.elapsed().as_secs_f64() * 1e3);

        let s = Instant::now();
        let loss = masked_cross_entropy(logits.clone(), t, Tensor::ones([n], &d), n);
        let g = loss.backward();
        let _ = (
            logits.grad(&g).unwrap().into_data(),
            loss.into_scalar::<f32>(),
        );
        plain.push(s.elapsed().as_secs_f64() * 1e3);

        let x = Tensor::<2>::random([n, h], Distribution::Normal(0.0, 1.0), &d).require_grad();
        let w = Tensor::<2>::random([v, h], Distribution::Normal(0.0, 1.0), &d).require_grad();
        let s = Instant::now();
        let y = x.clone().matmul(w.clone().transpose()).sum();
        let g = y.backward();
        let _ = (
            x.grad(&g).unwrap().into_data(),
            w.grad(&g).unwrap().into_data(),
        );
        head.push(s.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "fused-gradient cross-entropy fwd+bwd on [{n},{v}]: {:?} ms",
        ce.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
    println!(
        "plain (composed) cross-entropy fwd+bwd: {:?} ms",
        plain.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
    println!(
        "lm_head matmul fwd+bwd (+ a sum): {:?} ms",
        head.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
}

//! The check every fused op's tests make: values and gradients against the same layer written
//! with burn's own ops.

use burn::tensor::{Device, Distribution, Tensor};

pub(super) fn device() -> Device {
    Device::flex().autodiff()
}

pub(super) fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad()
}

pub(super) fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

pub(super) fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>, tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f32, |m, w| m.max(w.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tolerance * scale,
        "{what}: worst difference {worst} (largest value {scale})"
    );
}

/// Values of `fused(inputs)` and `reference(inputs)`, and the gradients of a random linear
/// function of each output with respect to every input, agree.
pub(super) fn check<const N: usize, const D: usize>(
    what: &str,
    inputs: [Tensor<2>; N],
    fused: impl Fn([Tensor<2>; N]) -> Tensor<D>,
    reference: impl Fn([Tensor<2>; N]) -> Tensor<D>,
    tolerance: f32,
) {
    let device = inputs[0].device();
    let leaves = || inputs.clone().map(|t| t.detach().require_grad());
    let (fused_in, reference_in) = (leaves(), leaves());
    let out_fused = fused(fused_in.clone());
    let out_reference = reference(reference_in.clone());
    let weights = Tensor::<D>::random(out_fused.dims(), Distribution::Normal(0.0, 1.0), &device);
    assert_close(
        &format!("{what} values"),
        flat(out_fused.clone()),
        flat(out_reference.clone()),
        tolerance,
    );
    let grads_fused = out_fused.mul(weights.clone()).sum().backward();
    let grads_reference = out_reference.mul(weights).sum().backward();
    for (i, (a, b)) in fused_in.iter().zip(&reference_in).enumerate() {
        let (Some(ga), Some(gb)) = (a.grad(&grads_fused), b.grad(&grads_reference)) else {
            panic!("{what}: input {i} got no gradient");
        };
        assert_close(
            &format!("{what} gradient {i}"),
            flat(ga),
            flat(gb),
            tolerance,
        );
    }
}

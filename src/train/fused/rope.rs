//! Rotary positions (rotate-half, as Llama applies them) on one head's row, and their transpose
//! for the backward pass; the attention op ([`super::attention`]) applies them while it gathers
//! the heads.

/// Rotary tables for positions `0..time`, `[time, dim]` each.
pub(super) struct RopeTables<'a> {
    pub(super) cos: &'a [f32],
    pub(super) sin: &'a [f32],
}

impl RopeTables<'_> {
    pub(super) fn row(&self, pos: usize, dim: usize) -> (&[f32], &[f32]) {
        (&self.cos[pos * dim..][..dim], &self.sin[pos * dim..][..dim])
    }
}

/// Rotate-half rotary embedding of one head's row: `x·cos + rot(x)·sin`, `rot(x) = (−x₂, x₁)`.
pub(super) fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    for i in 0..half {
        out1[i] = x1[i] * cos[i] - x2[i] * sin[i];
        out2[i] = x2[i] * cos[half + i] + x1[i] * sin[half + i];
    }
}

/// The transpose of [`rotate`] (its gradient): `g·cos + rotᵀ(g·sin)`, `rotᵀ(z) = (z₂, −z₁)`.
pub(super) fn unrotate(g: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = g.len() / 2;
    let (g1, g2) = g.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    for i in 0..half {
        out1[i] = g1[i] * cos[i] + g2[i] * sin[half + i];
        out2[i] = g2[i] * cos[half + i] - g1[i] * sin[i];
    }
}

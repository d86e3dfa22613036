//! A probe of kaiwa's training core on burn's Flex CPU backend.
//!
//! `model` is the Llama decoder as a trainable module, `weights` reads and writes it as a Hugging
//! Face `model.safetensors`, `loss` is the masked next-token cross-entropy, `optim` the AdamW
//! recipe (schedule, decay groups, global-norm clipping) and `train` one optimizer step with
//! gradient accumulation. The modules are meant to move into kaiwa's `src/train/` as they are.

pub mod loss;
pub mod model;
pub mod optim;
pub mod train;
pub mod weights;

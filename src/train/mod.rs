//! Building a model from a corpus: the tokenizer ([`tokenizer`], `kaiwa train-tokenizer`) and,
//! from the texts both read ([`text`]), the transformer (`kaiwa train`, [`run`]).
//!
//! The transformer is trained with burn on its Flex CPU backend: [`model`] is the Llama decoder
//! as a trainable module (its norms, gate and attention are the fused ops of [`fused`]),
//! [`convert`] moves it to and from [`crate::model::LlamaWeights`],
//! [`loss`] is the masked next-token cross-entropy, [`optim`] the AdamW recipe, [`step`] one
//! optimizer step with gradient accumulation, [`data`] the packed token rows, and [`run`] the
//! loop with checkpoints, resume, metrics and the loss curve ([`plot`]).

pub mod bpe;
pub mod convert;
pub mod data;
pub mod fused;
pub mod init;
pub mod loss;
pub mod model;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod run;
pub mod step;
pub mod tokenizer;

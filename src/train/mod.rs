//! Building a model from a corpus: the tokenizer ([`tokenizer`], `kaiwa train-tokenizer`) and,
//! from the texts both read ([`text`]), the transformer.

pub mod data;
pub mod text;
pub mod tokenizer;

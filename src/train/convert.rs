//! The trainable model ⇄ [`LlamaWeights`], the plain weights every other part of kaiwa reads.
//!
//! The burn module's paths are the Hugging Face tensor names (see [`super::model`]), so the
//! weights come out by walking the parameters; they go back in through
//! [`Llama::from_weights`]. Saving then goes through [`LlamaWeights::save`], the one writer of
//! `model.safetensors`, so a checkpoint is a model directory `export-onnx` and the runtime read.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

use super::model::Llama;
use crate::model::weights::Param as WeightParam;
use crate::model::{LlamaConfig, LlamaWeights, ModelError};

/// The current values of `model`'s parameters as [`LlamaWeights`], checked against `config`.
pub fn to_weights(model: &Llama, config: &LlamaConfig) -> Result<LlamaWeights, ModelError> {
    let mut collector = Collector::default();
    model.visit(&mut collector);
    LlamaWeights::from_named(config, collector.tensors, Path::new("<training>"))
}

/// Gives every parameter the id of its position in module order (1, 2, …).
///
/// burn keys the optimizer state by parameter id, and fresh ids are random; numbering them
/// makes the ids of a model rebuilt from a checkpoint equal those of the model that was saved,
/// so the saved optimizer state attaches to the right parameters on `--resume`.
pub fn number_params(model: Llama) -> Llama {
    renumber(model, 1, false)
}

/// Gives the parameters of `model` the ids `first, first + 1, …` in module order. With
/// `new_leaves`, each also becomes a new autodiff leaf over the same memory (see
/// `train::step`'s shadow models).
pub(crate) fn renumber(model: Llama, first: u64, new_leaves: bool) -> Llama {
    model.map(&mut Numberer {
        next: first,
        new_leaves,
    })
}

#[derive(Default)]
struct Collector {
    path: Vec<String>,
    tensors: HashMap<String, WeightParam>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data();
        let shape = data.shape().to_vec();
        // Parameters are f32 on the Flex backend. Should a read ever fail, the tensor is left
        // out and `from_named` names it as missing.
        if let Ok(values) = data.convert::<f32>().try_into_vec::<f32>() {
            self.tensors
                .insert(self.path.join("."), WeightParam::new(shape, values));
        }
    }
}

struct Numberer {
    next: u64,
    new_leaves: bool,
}

impl ModuleMapper for Numberer {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (_, value, mapper) = param.consume();
        let id = ParamId::from(self.next);
        self.next += 1;
        let value = if self.new_leaves {
            value.detach().require_grad()
        } else {
            value
        };
        Param::from_mapped_value(id, value, mapper)
    }
}

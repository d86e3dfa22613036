//! `config.json` and `generation_config.json`: the Hugging Face description of a Llama decoder.
//!
//! kaiwa writes exactly the fields that `transformers`' `LlamaConfig` reads, so a kaiwa model
//! directory loads in the wider ecosystem, and reads the same fields back (unknown ones are kept
//! out of the way, so a config written by `transformers` also loads here).

use serde::{Deserialize, Serialize};

use super::ModelError;

/// The architecture of a Llama-family decoder, as `LlamaConfig` names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` means grouped-query attention. Absent means equal.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Absent means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_torch_dtype")]
    pub torch_dtype: String,
    #[serde(default)]
    pub initializer_range: Option<f64>,
}

/// `eos_token_id` is a single id or a list of ids in Hugging Face configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_torch_dtype() -> String {
    "float32".into()
}

/// The named sizes `kaiwa init-model --preset` and the trainer start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// About 0.1 M parameters, grouped-query attention, tied embeddings: for tests.
    Tiny,
    /// About 256 wide and 4 layers (about 7 M parameters): the benchmark size and the default model.
    Small,
}

impl LlamaConfig {
    /// The architecture of a preset, before the tokenizer fixes `vocab_size` and the special ids.
    pub fn preset(preset: Preset) -> Self {
        let (vocab, hidden, inter, layers, heads, kv, ctx, tie) = match preset {
            Preset::Tiny => (512, 64, 176, 2, 4, 2, 256, true),
            Preset::Small => (8192, 256, 688, 4, 4, 4, 512, false),
        };
        LlamaConfig {
            architectures: default_architectures(),
            model_type: default_model_type(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: None,
            max_position_embeddings: ctx,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: tie,
            bos_token_id: None,
            eos_token_id: None,
            hidden_act: default_hidden_act(),
            attention_bias: false,
            mlp_bias: false,
            torch_dtype: default_torch_dtype(),
            initializer_range: Some(0.02),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks the relations between sizes that the forward pass relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::InvalidConfig(what));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        if self.num_attention_heads == 0 || self.kv_heads() == 0 {
            return bad("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for rotary positions",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act {:?} is not supported (only \"silu\")",
                self.hidden_act
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return bad("attention_bias and mlp_bias are not supported".into());
        }
        Ok(())
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

/// `generation_config.json`: the sampling defaults a model ships with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl GenerationConfig {
    /// What the file says of sampling; `do_sample: false` is greedy decoding (temperature 0).
    pub fn sampling(&self) -> Sampling {
        let mut s = self.sampling;
        if self.do_sample == Some(false) {
            s.temperature = Some(0.0);
        }
        s
    }
}

/// The six sampling settings as one layer says them, each unset unless it does. The layers are
/// a model's `generation_config.json`, then a suite file (`kaiwa eval`), then the environment
/// (the daemon) or the command line; [`Sampling::over`] stacks two, and
/// `GenerateOptions::overridden_by` applies the result to resolved options. The one
/// declaration of these settings: the file, the suites, the settings and the flags all fill it.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 is greedy decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// Classifier-free guidance (Hugging Face's name): 1 or unset is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f32>,
}

impl Sampling {
    /// This layer over `under`: each setting from `self` when it gives one, else from `under`.
    pub fn over(self, under: Sampling) -> Sampling {
        Sampling {
            temperature: self.temperature.or(under.temperature),
            top_k: self.top_k.or(under.top_k),
            top_p: self.top_p.or(under.top_p),
            repetition_penalty: self.repetition_penalty.or(under.repetition_penalty),
            max_new_tokens: self.max_new_tokens.or(under.max_new_tokens),
            guidance_scale: self.guidance_scale.or(under.guidance_scale),
        }
    }
}

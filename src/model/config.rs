//! `config.json` and `generation_config.json`: the Hugging Face description of a Llama decoder.
//!
//! kaiwa writes exactly the fields that `transformers`' `LlamaConfig` reads, so a kaiwa model
//! directory loads in the wider ecosystem, and reads the same fields back. Configs written by
//! `transformers` load too: Llama, and the two families that differ from it only in what kaiwa
//! implements ([`Family`]). [`LlamaConfig::validate`] refuses, naming the field, every setting
//! of theirs that would change the computation and that kaiwa does not implement.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::ModelError;

/// The architecture of a Llama-family decoder, as `LlamaConfig` names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The `transformers` classes the weights are for; absent or `null` means the one of
    /// `model_type`.
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
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
    /// The RoPE base where `transformers` 4 writes it; version 5 writes it in `rope_parameters`.
    /// Read through [`LlamaConfig::rope_base`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `transformers` 5's RoPE settings: `rope_type`, `rope_theta` and a scaling's own fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Map<String, Value>>,
    /// `transformers` 4's RoPE scaling; `null` or absent is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// The share of each head that is rotated (1 in every family kaiwa runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Mistral's (and Qwen2's, when it uses one) attention window: each position sees at most
    /// this many keys, itself included. See [`LlamaConfig::context_len`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` applies (to the layers `layer_types` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// `transformers` 5: each layer's attention, `full_attention` or `sliding_attention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
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

/// The decoder families kaiwa exports and runs: Llama, and two that differ from it only in
/// what kaiwa implements. Anything else is refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM` (kaiwa's own models).
    Llama,
    /// `Qwen2ForCausalLM`: biases on the query, key and value projections (none on the output).
    Qwen2,
    /// `MistralForCausalLM`: a Llama whose attention may have a `sliding_window`.
    Mistral,
}

impl Family {
    const ALL: [Family; 3] = [Family::Llama, Family::Qwen2, Family::Mistral];

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
        }
    }

    /// The `transformers` class of the causal LM, as `architectures` names it.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
        }
    }

    /// Whether the q, k and v projections have biases.
    pub fn qkv_bias(self) -> bool {
        self == Family::Qwen2
    }
}

/// The RoPE kaiwa implements: `rope_type` "default", the unscaled rotary positions of Llama.
const DEFAULT_ROPE: &str = "default";
/// The RoPE base when a config names none (Llama's, Qwen2's and Mistral's default).
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

fn default_architectures() -> Vec<String> {
    vec![Family::Llama.architecture().into()]
}
fn default_model_type() -> String {
    Family::Llama.model_type().into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
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
    /// The shape of SmolLM2-135M (576 wide, 30 layers, 9 heads over 3 KV heads, a 49,152-token
    /// vocabulary, tied embeddings, 2,048 positions, rotary base 100,000): a model of the size
    /// people deploy, for benchmarks. Its weights are random.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

impl LlamaConfig {
    /// The architecture of a preset, before the tokenizer fixes `vocab_size` and the special ids.
    pub fn preset(preset: Preset) -> Self {
        let (vocab, hidden, inter, layers, heads, kv, ctx, tie) = match preset {
            Preset::Tiny => (512, 64, 176, 2, 4, 2, 256, true),
            Preset::Small => (8192, 256, 688, 4, 4, 4, 512, false),
            Preset::Smollm2_135m => (49152, 576, 1536, 30, 9, 3, 2048, true),
        };
        let rope_theta = match preset {
            Preset::Smollm2_135m => 100_000.0,
            Preset::Tiny | Preset::Small => DEFAULT_ROPE_THETA,
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
            rope_theta: Some(rope_theta),
            rope_parameters: None,
            rope_scaling: None,
            partial_rotary_factor: None,
            sliding_window: None,
            use_sliding_window: None,
            layer_types: None,
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

    /// The family `model_type` and `architectures` name; anything kaiwa does not run is refused.
    pub fn family(&self) -> Result<Family, ModelError> {
        let family = Family::ALL
            .into_iter()
            .find(|f| f.model_type() == self.model_type)
            .ok_or_else(|| {
                ModelError::InvalidConfig(format!(
                    "model_type {:?} is not supported (kaiwa runs {})",
                    self.model_type,
                    Family::ALL.map(Family::model_type).join(", ")
                ))
            })?;
        if let Some(other) = self
            .architectures
            .iter()
            .find(|a| *a != family.architecture())
        {
            return Err(ModelError::InvalidConfig(format!(
                "architectures names {other:?}, which kaiwa does not run (for model_type {:?} \
                 only {:?})",
                self.model_type,
                family.architecture()
            )));
        }
        Ok(family)
    }

    /// Whether the q, k and v projections have biases (Qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.family().is_ok_and(Family::qkv_bias)
    }

    /// The RoPE base: `rope_parameters.rope_theta` (`transformers` 5), else the top-level
    /// `rope_theta` (`transformers` 4), else the families' default 10 000. [`Self::validate`]
    /// refuses a config where they disagree.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// The attention window, where the family applies one: Mistral's `sliding_window`, and
    /// Qwen2's when `use_sliding_window` is set or a layer is a `sliding_attention` one. (A
    /// config of a family kaiwa does not know keeps its window: a shorter context is safe.)
    pub fn sliding_window(&self) -> Option<usize> {
        let applies = match self.family() {
            Ok(Family::Llama) => false,
            Ok(Family::Mistral) | Err(_) => true,
            Ok(Family::Qwen2) => {
                self.use_sliding_window == Some(true)
                    || self
                        .layer_types
                        .iter()
                        .flatten()
                        .any(|t| t == "sliding_attention")
            }
        };
        self.sliding_window.filter(|_| applies)
    }

    /// The positions kaiwa runs the model on: `max_position_embeddings`, or the attention
    /// window when it is shorter. Within the window a sliding window masks nothing, so kaiwa's
    /// full causal attention is exact there; the exported graph has rotary tables for these
    /// positions only, so it cannot run past them.
    pub fn context_len(&self) -> usize {
        match self.sliding_window() {
            Some(window) => window.min(self.max_position_embeddings),
            None => self.max_position_embeddings,
        }
    }

    /// Checks that kaiwa computes what `transformers` would for this config: the family and
    /// every setting kaiwa does not implement are refused by name, and the relations between
    /// sizes that the forward pass relies on are checked.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::InvalidConfig(what));
        self.family()?;
        self.validate_rope()?;
        if self.sliding_window() == Some(0) {
            return bad("sliding_window 0 leaves attention nothing to see".into());
        }
        if let Some(other) = self
            .layer_types
            .iter()
            .flatten()
            .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
        {
            return bad(format!(
                "layer_types {other:?} is not supported (only \"full_attention\" and \
                 \"sliding_attention\")"
            ));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
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

    /// Refuses RoPE settings other than the unscaled default, naming the field and its value.
    fn validate_rope(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::InvalidConfig(what));
        if let Some(p) = &self.rope_parameters {
            check_rope("rope_parameters", p)?;
        }
        match &self.rope_scaling {
            None => {}
            Some(Value::Object(scaling)) => check_rope("rope_scaling", scaling)?,
            Some(other) => {
                return bad(format!(
                    "rope_scaling {other} is not supported: kaiwa implements no RoPE scaling"
                ))
            }
        }
        check_rotary_factor("partial_rotary_factor", self.partial_rotary_factor)?;
        // The base, wherever it is given, must be one number.
        let thetas = [
            ("rope_theta", self.rope_theta),
            (
                "rope_parameters.rope_theta",
                rope_field_f64(&self.rope_parameters, "rope_theta"),
            ),
            (
                "rope_scaling.rope_theta",
                self.rope_scaling
                    .as_ref()
                    .and_then(|s| s.get("rope_theta"))
                    .and_then(Value::as_f64),
            ),
        ];
        let given: Vec<(&str, f64)> = thetas
            .into_iter()
            .filter_map(|(name, v)| v.map(|v| (name, v)))
            .collect();
        if let Some(((a, x), (b, y))) = given
            .iter()
            .zip(given.iter().skip(1))
            .find(|((_, x), (_, y))| x != y)
        {
            return bad(format!(
                "{a} ({x}) and {b} ({y}) disagree: which RoPE base the model uses is unclear"
            ));
        }
        let base = self.rope_base();
        if !(base.is_finite() && base > 1.0) {
            return bad(format!("rope_theta {base} is not a usable RoPE base"));
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

fn rope_field_f64(map: &Option<Map<String, Value>>, key: &str) -> Option<f64> {
    map.as_ref()
        .and_then(|m| m.get(key))
        .and_then(Value::as_f64)
}

/// A RoPE dictionary (`rope_parameters` or `rope_scaling`, named `field`) must describe the
/// default, unscaled rotary positions: a scaling changes every angle, and kaiwa implements none.
fn check_rope(field: &str, rope: &Map<String, Value>) -> Result<(), ModelError> {
    let bad = |what: String| Err(ModelError::InvalidConfig(what));
    // The type first, so that a YaRN or Llama 3 scaling is refused by its name.
    for key in ["rope_type", "type"] {
        match rope.get(key) {
            None => {}
            Some(Value::String(t)) if t == DEFAULT_ROPE => {}
            Some(other) => {
                return bad(format!(
                    "{field}.{key} {other} is not supported: kaiwa implements only the \
                     {DEFAULT_ROPE:?} rotary positions, no RoPE scaling (rope_scaling)"
                ))
            }
        }
    }
    for (key, value) in rope {
        match key.as_str() {
            "rope_type" | "type" => {}
            "rope_theta" => {
                if !value.is_number() {
                    return bad(format!("{field}.rope_theta {value} is not a number"));
                }
            }
            "partial_rotary_factor" => check_rotary_factor(
                &format!("{field}.{key}"),
                Some(value.as_f64().unwrap_or(f64::NAN)),
            )?,
            _ => {
                return bad(format!(
                    "{field}.{key} ({value}) is not supported: kaiwa implements only the \
                     {DEFAULT_ROPE:?} rotary positions, no RoPE scaling (rope_scaling)"
                ))
            }
        }
    }
    Ok(())
}

fn check_rotary_factor(field: &str, factor: Option<f64>) -> Result<(), ModelError> {
    match factor {
        None => Ok(()),
        Some(1.0) => Ok(()),
        Some(f) => Err(ModelError::InvalidConfig(format!(
            "{field} {f} is not supported: kaiwa rotates whole heads (1.0)"
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny config as `transformers` 5 writes it, with `fields` over it.
    fn config(fields: Value) -> Result<LlamaConfig, ModelError> {
        let mut json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 96,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        });
        for (k, v) in fields.as_object().unwrap() {
            json[k] = v.clone();
        }
        let config: LlamaConfig = serde_json::from_value(json).unwrap();
        config.validate().map(|()| config)
    }

    fn refusal(fields: Value) -> String {
        match config(fields.clone()) {
            Ok(c) => panic!("{fields} was accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_rope_base_is_read_where_transformers_5_writes_it() {
        let c = config(serde_json::json!({})).unwrap();
        assert_eq!(c.rope_base(), 500_000.0);
        let c =
            config(serde_json::json!({"rope_parameters": null, "rope_theta": 250000.0})).unwrap();
        assert_eq!(c.rope_base(), 250_000.0, "transformers 4: at the top level");
        let c = config(serde_json::json!({"rope_parameters": null})).unwrap();
        assert_eq!(c.rope_base(), 10_000.0, "neither: the default");
        let c = config(serde_json::json!({"rope_theta": 500000.0, "rope_scaling": null})).unwrap();
        assert_eq!(c.rope_base(), 500_000.0, "both, agreeing");
    }

    #[test]
    fn rope_scaling_is_refused_naming_the_field_and_the_type() {
        let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16});
        let msg = refusal(serde_json::json!({"rope_scaling": yarn}));
        assert!(msg.contains("rope_scaling.rope_type \"yarn\""), "{msg}");
        let msg = refusal(
            serde_json::json!({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0}}),
        );
        assert!(
            msg.contains("rope_parameters.rope_type \"llama3\""),
            "{msg}"
        );
        assert!(msg.contains("rope_scaling"), "{msg}");
        let msg = refusal(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}));
        assert!(msg.contains("rope_scaling.type \"linear\""), "{msg}");
        // A scaling field under the default type changes nothing in transformers, but kaiwa
        // does not guess.
        let msg = refusal(
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}}),
        );
        assert!(msg.contains("rope_parameters.factor"), "{msg}");
        let msg = refusal(serde_json::json!({"rope_scaling": "yarn"}));
        assert!(msg.contains("rope_scaling \"yarn\""), "{msg}");
        let msg = refusal(
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
        );
        assert!(msg.contains("partial_rotary_factor 0.5"), "{msg}");
        let msg = refusal(serde_json::json!({"partial_rotary_factor": 0.25}));
        assert!(msg.contains("partial_rotary_factor 0.25"), "{msg}");
    }

    #[test]
    fn a_rope_base_given_twice_must_agree() {
        let msg = refusal(serde_json::json!({"rope_theta": 10000.0}));
        assert!(
            msg.contains("rope_theta (10000)")
                && msg.contains("rope_parameters.rope_theta (500000)"),
            "{msg}"
        );
        let msg = refusal(serde_json::json!({"rope_parameters": {"rope_theta": "big"}}));
        assert!(msg.contains("rope_parameters.rope_theta \"big\""), "{msg}");
    }

    #[test]
    fn only_llama_qwen2_and_mistral_are_accepted() {
        for (model_type, architecture) in [
            ("llama", "LlamaForCausalLM"),
            ("qwen2", "Qwen2ForCausalLM"),
            ("mistral", "MistralForCausalLM"),
        ] {
            let c = config(
                serde_json::json!({"model_type": model_type, "architectures": [architecture]}),
            )
            .unwrap();
            assert_eq!(c.family().unwrap().architecture(), architecture);
            assert_eq!(c.qkv_bias(), model_type == "qwen2");
        }
        let c = config(serde_json::json!({"model_type": "qwen2", "architectures": null})).unwrap();
        assert_eq!(c.family().unwrap(), Family::Qwen2);
        let msg = refusal(
            serde_json::json!({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}),
        );
        assert!(msg.contains("model_type \"gemma2\""), "{msg}");
        let msg = refusal(serde_json::json!({"architectures": ["LlamaForSequenceClassification"]}));
        assert!(
            msg.contains("architectures names \"LlamaForSequenceClassification\""),
            "{msg}"
        );
        let msg = refusal(serde_json::json!({"model_type": "qwen2"}));
        assert!(
            msg.contains("\"LlamaForCausalLM\""),
            "a Qwen2 that claims Llama's class: {msg}"
        );
        let msg = refusal(serde_json::json!({"attention_bias": true}));
        assert!(msg.contains("attention_bias"), "{msg}");
    }

    #[test]
    fn a_sliding_window_bounds_the_context() {
        let mistral =
            serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"]});
        let with = |extra: Value| {
            let mut fields = mistral.clone();
            fields
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            fields
        };
        let c = config(with(serde_json::json!({"sliding_window": 16}))).unwrap();
        assert_eq!((c.sliding_window(), c.context_len()), (Some(16), 16));
        let c = config(with(serde_json::json!({"sliding_window": 4096}))).unwrap();
        assert_eq!(
            c.context_len(),
            64,
            "a window longer than the positions changes nothing"
        );
        let c = config(with(serde_json::json!({"sliding_window": null}))).unwrap();
        assert_eq!(c.context_len(), 64);
        let msg = refusal(with(serde_json::json!({"sliding_window": 0})));
        assert!(msg.contains("sliding_window 0"), "{msg}");

        // Qwen2 applies its window only when it says so.
        let qwen = |extra: Value| {
            let mut fields = serde_json::json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 8});
            fields
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            config(fields)
        };
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": false}))
                .unwrap()
                .context_len(),
            64
        );
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": true}))
                .unwrap()
                .context_len(),
            8
        );
        let layers = serde_json::json!({"layer_types": ["full_attention", "sliding_attention"]});
        assert_eq!(qwen(layers).unwrap().context_len(), 8);
        let msg = qwen(serde_json::json!({"layer_types": ["chunked_attention", "full_attention"]}))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("layer_types \"chunked_attention\""), "{msg}");

        // Llama has no window: the field means nothing to transformers there.
        assert_eq!(
            config(serde_json::json!({"sliding_window": 8}))
                .unwrap()
                .context_len(),
            64
        );
    }

    #[test]
    fn kaiwa_configs_are_written_as_before() {
        let json = serde_json::to_value(LlamaConfig::preset(Preset::Tiny)).unwrap();
        assert_eq!(json["rope_theta"], 10_000.0);
        assert_eq!(json["architectures"][0], "LlamaForCausalLM");
        for absent in [
            "rope_parameters",
            "rope_scaling",
            "sliding_window",
            "layer_types",
        ] {
            assert!(json.get(absent).is_none(), "{absent} written");
        }
        let back: LlamaConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, LlamaConfig::preset(Preset::Tiny));
        back.validate().unwrap();
    }
}

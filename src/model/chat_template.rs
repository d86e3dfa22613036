//! Chat templates: how a conversation becomes the one string a model was trained to continue.
//!
//! A chat model does not see "messages"; it sees text with role markers, and each model family
//! has its own markers (ChatML's `<|im_start|>user\n...<|im_end|>\n`, Llama 3's
//! `<|start_header_id|>`, ...). Hugging Face ships that format with the model as a Jinja
//! template, in `tokenizer_config.json` or, in newer `transformers`, in `chat_template.jinja`.
//! Rendering the model's own template exactly as `transformers` does is what makes a prompt
//! match what the model saw in training, so [`ChatTemplate`] mimics the `transformers`
//! environment: `trim_blocks`/`lstrip_blocks`, Python string methods (`.strip()`,
//! `.startswith()`), a Python-style `tojson`, and `raise_exception`.
//!
//! kaiwa's own models use ChatML ([`CHATML_TEMPLATE`]) and write their
//! `tokenizer_config.json` through [`TokenizerConfig::chatml`].

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Deserializer, Serialize};

use super::tokenizer::{BOS_TOKEN, IM_END};
use super::{read_json, write_json, ModelError, CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE};

/// Processors of multimodal models keep their template here (`{"chat_template": "..."}`).
const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";

/// The name the template is registered under. No file extension, so minijinja applies no
/// auto-escaping (it would HTML-escape `<|im_start|>`).
const TEMPLATE_NAME: &str = "chat_template";

pub use crate::domain::ChatMessage;

/// ChatML, the format of kaiwa's own models (and of Qwen): every message is
/// `<|im_start|>{role}\n{content}<|im_end|>\n`, and the generation prompt opens an assistant
/// turn. Unlike Qwen's template it injects no default system prompt.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
";

/// A compiled chat template, ready to render conversations. Compile once, render per request.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// Not derived: the environment's debug form lists every filter, test and function.
impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`, a Hugging Face chat template. `bos_token` and `eos_token` are the
    /// values templates see as `bos_token` / `eos_token` (undefined, so empty, when `None`).
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        // transformers renders with `ImmutableSandboxedEnvironment(trim_blocks=True,
        // lstrip_blocks=True)`; templates are written for that whitespace handling.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates call Python methods on strings and dicts (`content.strip()`, `.items()`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::Template(format!("cannot compile the chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Reads the chat template and special tokens of a model directory (see
    /// [`TokenizerConfig::load`]) and compiles it.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let config = TokenizerConfig::load(dir)?;
        let source = config.chat_template().ok_or_else(|| {
            ModelError::Template(format!("{}: the model has no chat template", dir.display()))
        })?;
        Self::new(
            source,
            config.bos_token().map(str::to_string),
            config.eos_token().map(str::to_string),
        )
    }

    /// Renders `messages` into the prompt text, with the opening of an assistant turn at the
    /// end if `add_generation_prompt`. Fails with the template's own message when it calls
    /// `raise_exception` (e.g. for a role it does not support).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let mut context: BTreeMap<&str, Value> = BTreeMap::new();
        context.insert("messages", Value::from_serialize(messages));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // transformers always passes these, as None when there are none; templates test
        // `tools is not none`, which an undefined value would pass.
        context.insert("tools", Value::from(()));
        context.insert("documents", Value::from(()));
        // Absent tokens stay undefined, as in transformers (a `none` would render as "none").
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token", Value::from(eos.as_str()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        template
            .render(context)
            .map_err(|e| ModelError::Template(describe(&e)))
    }
}

/// A minijinja error with its causes, on one line.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `raise_exception(msg)`: templates call it to reject a conversation they cannot render.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)`. minijinja's built-in differs in
/// ways a model notices: it writes `{"a":1}` where Python writes `{"a": 1}`, and HTML-escapes
/// `<`, `>`, `&` and `'`. (Keys always come out sorted: minijinja maps are ordered by key.)
fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    // Accepted for compatibility; keys are sorted anyway.
    let _sort_keys = kwargs.get::<Option<bool>>("sort_keys")?;
    kwargs.assert_all_used()?;

    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item_separator, key_separator)",
            ))
        }
        // Python's defaults: no space before a newline when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            "tojson: cannot serialise the value",
        )
        .with_source(e)
    })?;
    let style = JsonStyle {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
    };
    let mut out = String::new();
    style.write(&mut out, &json, 0);
    if ensure_ascii {
        out = escape_non_ascii(&out);
    }
    Ok(Value::from_safe_string(out))
}

/// How Python's `json.dumps` lays out JSON.
struct JsonStyle<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
}

impl JsonStyle<'_> {
    fn write(&self, out: &mut String, value: &serde_json::Value, level: usize) {
        use serde_json::Value as J;
        match value {
            J::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push(']');
            }
            J::Object(map) if !map.is_empty() => {
                out.push('{');
                for (i, (key, item)) in map.iter().enumerate() {
                    self.separate(out, i, level + 1);
                    out.push_str(&J::String(key.clone()).to_string());
                    out.push_str(self.key_sep);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push('}');
            }
            // Scalars and empty containers: serde_json escapes strings as Python does with
            // ensure_ascii=False (\n, \t, \", \\, \u00XX for other control characters).
            other => out.push_str(&other.to_string()),
        }
    }

    fn separate(&self, out: &mut String, index: usize, level: usize) {
        if index > 0 {
            out.push_str(self.item_sep);
        }
        self.newline(out, level);
    }

    fn newline(&self, out: &mut String, level: usize) {
        if let Some(indent) = self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }
}

/// `ensure_ascii=True`: every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF).
/// Non-ASCII characters only occur inside JSON strings, so this is safe on the whole text.
fn escape_non_ascii(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// A chat template as `tokenizer_config.json` may hold it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    Single(String),
    /// Models with several templates (e.g. `default` and `tool_use`).
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl TemplateField {
    /// The template transformers uses when none is named: `default`, or the only one.
    fn default_template(&self) -> Option<&str> {
        match self {
            TemplateField::Single(t) => Some(t),
            TemplateField::Named(list) => list
                .iter()
                .find(|t| t.name == "default")
                .or(if list.len() == 1 { list.first() } else { None })
                .map(|t| t.template.as_str()),
        }
    }
}

/// A special token as `tokenizer_config.json` may hold it: a plain string, or the serialised
/// `AddedToken` object (`{"content": "<s>", "lstrip": false, ..., "__type": "AddedToken"}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added {
        content: String,
        #[serde(flatten)]
        rest: serde_json::Map<String, serde_json::Value>,
    },
}

impl TokenField {
    fn content(&self) -> &str {
        match self {
            TokenField::Text(t) => t,
            TokenField::Added { content, .. } => content,
        }
    }
}

/// `tokenizer_config.json`: the chat template, the special tokens and the settings
/// `transformers` needs to load a tokenizer. Reading is tolerant of what the various versions
/// of `transformers` write; fields kaiwa does not use are kept, so a loaded config saves back
/// with them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_template: Option<TemplateField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bos_token: Option<TokenField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token: Option<TokenField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pad_token: Option<TokenField>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "max_length"
    )]
    model_max_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokenizer_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    add_bos_token: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    add_eos_token: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clean_up_tokenization_spaces: Option<bool>,
    /// Everything else (`added_tokens_decoder`, `padding_side`, ...), kept as it was.
    #[serde(flatten)]
    extra: serde_json::Map<String, serde_json::Value>,
}

/// `model_max_length`, where transformers writes `1000000000000000019884624838656` (an integer
/// too large for u64) to mean "no limit".
fn max_length<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(n) if n < 1 << 40 => usize::try_from(n).ok(),
            _ => None,
        },
        _ => None,
    })
}

impl TokenizerConfig {
    /// The configuration of kaiwa's own ChatML models, loadable by `transformers`'
    /// `AutoTokenizer` (the tokens themselves are in `tokenizer.json`).
    pub fn chatml() -> Self {
        TokenizerConfig {
            chat_template: Some(TemplateField::Single(CHATML_TEMPLATE.to_string())),
            bos_token: Some(TokenField::Text(BOS_TOKEN.to_string())),
            eos_token: Some(TokenField::Text(IM_END.to_string())),
            pad_token: Some(TokenField::Text(BOS_TOKEN.to_string())),
            model_max_length: None,
            tokenizer_class: Some("PreTrainedTokenizerFast".to_string()),
            // ChatML prompts carry their own markers; nothing is added around the text.
            add_bos_token: Some(false),
            add_eos_token: Some(false),
            // Byte-level BPE decodes exactly; "cleaning" would remove spaces before punctuation.
            clean_up_tokenization_spaces: Some(false),
            extra: serde_json::Map::new(),
        }
    }

    /// Reads the tokenizer configuration of a model directory and resolves its chat template.
    ///
    /// The template comes from `chat_template.jinja` if present (newer transformers save it
    /// there, and it takes precedence over the config when loading), else from the config's
    /// `chat_template` (a string, or a list of named templates of which `default` is used),
    /// else from `chat_template.json`. A directory with no template at all is an error.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let mut config: TokenizerConfig = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Self::empty()
        };

        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let json_path = dir.join(CHAT_TEMPLATE_JSON_FILE);
        if jinja_path.is_file() {
            let source =
                std::fs::read_to_string(&jinja_path).map_err(|e| ModelError::io(&jinja_path, e))?;
            config.chat_template = Some(TemplateField::Single(source));
        } else if config.chat_template.is_none() && json_path.is_file() {
            #[derive(Deserialize)]
            struct TemplateJson {
                chat_template: Option<TemplateField>,
            }
            let parsed: TemplateJson = read_json(&json_path)?;
            config.chat_template = parsed.chat_template;
        }

        match &config.chat_template {
            None => Err(ModelError::Template(format!(
                "{}: no chat template: expected a \"chat_template\" in {TOKENIZER_CONFIG_FILE} \
                 or a {CHAT_TEMPLATE_FILE} file",
                dir.display()
            ))),
            Some(field @ TemplateField::Named(list)) if field.default_template().is_none() => {
                let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
                Err(ModelError::Template(format!(
                    "{}: \"chat_template\" lists templates {names:?} but none is named \"default\"",
                    config_path.display()
                )))
            }
            Some(_) => Ok(config),
        }
    }

    /// Writes `tokenizer_config.json` into `dir`, with the chat template inline.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        write_json(&dir.join(TOKENIZER_CONFIG_FILE), self)
    }

    fn empty() -> Self {
        TokenizerConfig {
            chat_template: None,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            model_max_length: None,
            tokenizer_class: None,
            add_bos_token: None,
            add_eos_token: None,
            clean_up_tokenization_spaces: None,
            extra: serde_json::Map::new(),
        }
    }

    /// The chat template source (the `default` one when the config lists several).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template
            .as_ref()
            .and_then(TemplateField::default_template)
    }

    pub fn set_chat_template(&mut self, source: impl Into<String>) {
        self.chat_template = Some(TemplateField::Single(source.into()));
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_ref().map(TokenField::content)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_ref().map(TokenField::content)
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_ref().map(TokenField::content)
    }

    /// The longest input the tokenizer is meant for; `None` when the config sets no real limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    pub fn set_model_max_length(&mut self, tokens: usize) {
        self.model_max_length = Some(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::system("あなたは親切なアシスタントです。"),
            ChatMessage::user("今日の天気は？"),
            ChatMessage::assistant("晴れです。"),
            ChatMessage::user("Thanks!"),
        ]
    }

    #[test]
    fn chatml_renders_exactly() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, Some(BOS_TOKEN.into()), Some(IM_END.into()))
            .unwrap();
        let expected = "<|im_start|>system\nあなたは親切なアシスタントです。<|im_end|>\n\
                        <|im_start|>user\n今日の天気は？<|im_end|>\n\
                        <|im_start|>assistant\n晴れです。<|im_end|>\n\
                        <|im_start|>user\nThanks!<|im_end|>\n";
        assert_eq!(t.render(&conversation(), false).unwrap(), expected);
        assert_eq!(
            t.render(&conversation(), true).unwrap(),
            format!("{expected}<|im_start|>assistant\n")
        );
        // No system prompt is made up, and content is not escaped or trimmed.
        let raw = [ChatMessage::user("  <b>&'\"x\"</b>\n")];
        assert_eq!(
            t.render(&raw, true).unwrap(),
            "<|im_start|>user\n  <b>&'\"x\"</b>\n<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.render(&[], true).unwrap(), "<|im_start|>assistant\n");
    }

    /// The shape of Qwen2.5's template (without tools).
    const QWEN_LIKE: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {%- if message.content.startswith('/no_think') %}
            {{- '<|im_start|>' + message.role + '\n[quiet]<|im_end|>\n' }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + message.content.strip() + '<|im_end|>' + '\n' }}
        {%- endif %}
    {%- elif message.role not in ['system'] %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    #[test]
    fn hugging_face_style_template_renders_and_raises() {
        let t = ChatTemplate::new(QWEN_LIKE, None, Some("<|im_end|>".into())).unwrap();
        let messages = [
            ChatMessage::user("  こんにちは  \n"),
            ChatMessage::assistant("/no_think hi"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nこんにちは<|im_end|>\n\
             <|im_start|>assistant\n[quiet]<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let with_system = [ChatMessage::system("S"), ChatMessage::user("U")];
        assert_eq!(
            t.render(&with_system, false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
        let err = t
            .render(&[ChatMessage::new("robot", "beep")], true)
            .unwrap_err();
        assert!(
            matches!(&err, ModelError::Template(m) if m.contains("Unsupported role: robot")),
            "{err}"
        );
    }

    #[test]
    fn whitespace_control_and_special_tokens_follow_transformers() {
        // Without `-` markers: lstrip_blocks removes the indentation before a block tag and
        // trim_blocks the newline after it.
        let source = "{{ bos_token }}{% for m in messages %}\n    {% if m.role == 'user' %}\n[U] {{ m.content }}\n    {% endif %}\n{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())).unwrap();
        let out = t
            .render(
                &[ChatMessage::user("a"), ChatMessage::assistant("b")],
                false,
            )
            .unwrap();
        assert_eq!(out, "<s>[U] a\n</s>");
        // Tokens that are not set are undefined, hence empty, not "none".
        let t = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("a")], false).unwrap(),
            "[U] a\n"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let source = "{{ messages[0] | tojson }}|{{ [1, 'é', none, true] | tojson }}|\
                      {{ messages[0] | tojson(indent=2) }}|{{ 'é<>' | tojson(ensure_ascii=true) }}|\
                      {{ {'a': [], 'b': {}} | tojson(separators=[',', ':']) }}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let out = t
            .render(&[ChatMessage::user("it's <b>\"x\"</b>\n😀")], false)
            .unwrap();
        assert_eq!(
            out,
            "{\"content\": \"it's <b>\\\"x\\\"</b>\\n😀\", \"role\": \"user\"}|[1, \"é\", null, true]|\
             {\n  \"content\": \"it's <b>\\\"x\\\"</b>\\n😀\",\n  \"role\": \"user\"\n}|\
             \"\\u00e9<>\"|{\"a\":[],\"b\":{}}"
        );
        let bad = ChatTemplate::new("{{ 1 | tojson(color=1) }}", None, None).unwrap();
        assert!(bad.render(&[], false).is_err());
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, ModelError::Template(_)), "{err}");
    }

    #[test]
    fn chatml_config_saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = TokenizerConfig::chatml();
        config.set_model_max_length(512);
        config.save(dir.path()).unwrap();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(json["tokenizer_class"], "PreTrainedTokenizerFast");
        assert_eq!(json["bos_token"], BOS_TOKEN);
        assert_eq!(json["eos_token"], IM_END);
        assert_eq!(json["add_bos_token"], false);
        assert_eq!(json["clean_up_tokenization_spaces"], false);
        assert_eq!(json["model_max_length"], 512);
        assert_eq!(json["chat_template"], CHATML_TEMPLATE);

        let loaded = TokenizerConfig::load(dir.path()).unwrap();
        assert_eq!(loaded.chat_template(), Some(CHATML_TEMPLATE));
        assert_eq!(loaded.bos_token(), Some(BOS_TOKEN));
        assert_eq!(loaded.eos_token(), Some(IM_END));
        assert_eq!(loaded.model_max_length(), Some(512));
        let t = ChatTemplate::from_dir(dir.path()).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("hi")], true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hugging_face_config_forms_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_CONFIG_FILE);
        // Object-form tokens, null pad, the "no limit" max length, a list of named templates,
        // and fields kaiwa does not know.
        std::fs::write(
            &path,
            r#"{
              "add_prefix_space": false,
              "added_tokens_decoder": {"0": {"content": "<s>", "special": true}},
              "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
              "eos_token": {"content": "</s>", "lstrip": false},
              "pad_token": null,
              "unk_token": "<unk>",
              "model_max_length": 1000000000000000019884624838656,
              "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
              ],
              "tokenizer_class": "LlamaTokenizer"
            }"#,
        )
        .unwrap();
        let config = TokenizerConfig::load(dir.path()).unwrap();
        assert_eq!(config.bos_token(), Some("<s>"));
        assert_eq!(config.eos_token(), Some("</s>"));
        assert_eq!(config.pad_token(), None);
        assert_eq!(config.model_max_length(), None);
        assert_eq!(
            config.chat_template(),
            Some("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}")
        );
        let t = ChatTemplate::from_dir(dir.path()).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("x")], false).unwrap(),
            "<s>x</s>"
        );

        // Saving keeps what kaiwa does not use.
        let out = tempfile::tempdir().unwrap();
        config.save(out.path()).unwrap();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join(TOKENIZER_CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(json["unk_token"], "<unk>");
        assert_eq!(json["bos_token"]["__type"], "AddedToken");
        assert_eq!(json["added_tokens_decoder"]["0"]["content"], "<s>");

        // A list without "default" (and more than one entry) is ambiguous.
        std::fs::write(&path, r#"{"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}"#)
            .unwrap();
        let err = TokenizerConfig::load(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("default") && err.to_string().contains(TOKENIZER_CONFIG_FILE),
            "{err}"
        );
    }

    #[test]
    fn separate_chat_template_jinja_is_found_and_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG_FILE),
            r#"{"eos_token": "<|im_end|>", "chat_template": "OLD"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), CHATML_TEMPLATE).unwrap();
        let config = TokenizerConfig::load(dir.path()).unwrap();
        assert_eq!(config.chat_template(), Some(CHATML_TEMPLATE));
        assert_eq!(config.eos_token(), Some("<|im_end|>"));

        // Only the .jinja file, no tokenizer_config.json at all.
        std::fs::remove_file(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap();
        let config = TokenizerConfig::load(dir.path()).unwrap();
        assert_eq!(config.chat_template(), Some(CHATML_TEMPLATE));
        assert_eq!(config.bos_token(), None);

        // chat_template.json, as processors of multimodal models write it.
        std::fs::remove_file(dir.path().join(CHAT_TEMPLATE_FILE)).unwrap();
        std::fs::write(
            dir.path().join(CHAT_TEMPLATE_JSON_FILE),
            r#"{"chat_template": "J"}"#,
        )
        .unwrap();
        assert_eq!(
            TokenizerConfig::load(dir.path()).unwrap().chat_template(),
            Some("J")
        );
    }

    #[test]
    fn missing_template_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG_FILE),
            r#"{"eos_token": "</s>"}"#,
        )
        .unwrap();
        let err = TokenizerConfig::load(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ModelError::Template(_)));
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(
            text.contains(TOKENIZER_CONFIG_FILE) && text.contains(CHAT_TEMPLATE_FILE),
            "{text}"
        );

        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), "{broken").unwrap();
        let err = TokenizerConfig::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, ModelError::Json { .. })
                && err.to_string().contains(TOKENIZER_CONFIG_FILE),
            "{err}"
        );
    }
}

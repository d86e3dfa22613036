//! Running a causal LM exported to ONNX through tract, with a KV cache.
//!
//! [`OnnxDecoder`] loads any graph in the decoder-with-past convention of Hugging Face Optimum
//! (kaiwa's own export, or `optimum-cli export onnx --task text-generation-with-past`): inputs
//! and outputs are bound by name, never by position, `position_ids` and `attention_mask` are
//! optional, and the number of layers, KV heads and head size are read from the graph. The graph
//! is optimised once, with the sequence and past lengths left symbolic, and shared across
//! threads; each conversation being generated owns a [`DecoderSession`] holding its cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{DimLike, Factoid};

use super::threads::{default_threads, StepPool};
use super::ModelError;

/// Gives each matrix product reading a large shared constant its own constant node, and
/// returns how many it rewired.
///
/// tract packs a constant operand of a product once, at optimisation, unless the constant is
/// larger than its folding budget (4 MiB) and read by other nodes too: then it packs it again on
/// every run. Tied embeddings are that case (the table is read by the token lookup and, as the
/// output projection, by the last product): on the default model the 8 MiB table was re-packed
/// every decode step, a third of the step. A node of its own (sharing the same tensor) lets the
/// product's copy be packed once, as an untied head's is; it costs the packed copy's memory.
fn untie_shared_weights(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::konst::Const;
    let mut rewired = Vec::new();
    for node in model.nodes() {
        let Some(konst) = node.op_as::<Const>() else {
            continue;
        };
        let successors = &node.outputs[0].successors;
        let large = konst.val().len() * konst.val().datum_type().size_of()
            > tract_onnx::tract_core::optim::CONST_FOLD_MEM_BUDGET as usize;
        if successors.len() < 2 || !large {
            continue;
        }
        for inlet in successors {
            if model.node(inlet.node).op_is::<EinSum>() {
                rewired.push((node.id, *inlet));
            }
        }
    }
    for (i, &(konst, inlet)) in rewired.iter().enumerate() {
        let op = model.node(konst).op.clone();
        let name = format!("{}.for_product_{i}", model.node(konst).name);
        let fact = model.outlet_fact(konst.into())?.clone();
        let own = model.add_node(name, op, tvec!(fact))?;
        model.add_edge(own.into(), inlet)?;
    }
    Ok(rewired.len())
}

/// The name of the input [`keep_last_rows`] adds: a `bool` tensor of `[rows]` whose length
/// says how many of the last positions get logits.
const ROWS_INPUT: &str = "kaiwa.logits_rows";

/// Makes the output projection compute the logits of the last `R` positions only, `R` being
/// the length of a new input ([`ROWS_INPUT`]), when `logits` is a product of the final hidden
/// states `[batch, seq, hidden]` with a weight that does not depend on the sequence (every
/// Llama-style export). Returns the new input's index, or `None` (the graph left as it is).
///
/// A prefill of `n` tokens otherwise projects all `n` rows onto the vocabulary and keeps one:
/// on the default model that is a quarter of the prefill's products, and more on models with a
/// large vocabulary. The row count is an input's length rather than a number in the graph so
/// that one optimised plan (one packed copy of the weights) serves generation (1 row), reply
/// scoring (the reply's rows) and the held-out scorer (every row).
fn keep_last_rows(model: &mut TypedModel, logits: OutletId) -> TractResult<Option<usize>> {
    use tract_onnx::tract_core::ops::array::Slice;
    let Some((einsum_id, hidden, seq)) = sliceable_product(model, logits)? else {
        return Ok(None);
    };
    let rows = model.sym("R");
    let source = model.add_source(ROWS_INPUT, bool::fact([rows.to_dim()]))?;
    let sliced = model.wire_node(
        format!("{ROWS_INPUT}.slice"),
        Slice::new(1, seq.clone() - rows.to_dim(), seq),
        &[hidden],
    )?;
    model.add_edge(sliced[0], InletId::new(einsum_id, 0))?;
    model.refresh_output_facts()?;
    Ok(Some(
        model
            .input_outlets()?
            .iter()
            .position(|o| *o == source)
            .expect("just added"),
    ))
}

/// `(node, hidden states, sequence length)` when `logits` is a product of the hidden states
/// `[batch, seq, hidden]` (seq symbolic) with a weight of fixed shape that keeps the hidden
/// states' axis 1 as its own axis 1: slicing the hidden states then slices the logits.
fn sliceable_product(
    model: &TypedModel,
    logits: OutletId,
) -> TractResult<Option<(usize, OutletId, TDim)>> {
    use tract_onnx::tract_core::internal::InOut;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    let node = model.node(logits.node);
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if node.inputs.len() != 2 || einsum.q_params.is_some() || logits.slot != 0 {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let seq = match model.outlet_fact(logits)?.shape.dims() {
        [_, seq, _] => seq.clone(),
        _ => return Ok(None),
    };
    let axis = einsum.axes.axis((InOut::Out(0), 1))?;
    let from_hidden = axis.inputs[0].as_slice() == [1];
    let in_weight = !axis.inputs[1].is_empty();
    let weight_varies = facts[1].shape.iter().any(|d| d.to_usize().is_err());
    let ok = facts[0].rank() == 3
        && from_hidden
        && !in_weight
        && !weight_varies
        && seq.to_usize().is_err();
    Ok(ok.then(|| (node.id, node.inputs[0], seq)))
}

/// How the graph's inputs and outputs map onto the convention.
#[derive(Debug, Clone)]
struct Binding {
    input_ids: usize,
    attention_mask: Option<usize>,
    position_ids: Option<usize>,
    /// `(key, value)` input indices per layer.
    past: Vec<(usize, usize)>,
    logits: usize,
    /// The input that says how many of the last positions get logits ([`keep_last_rows`]).
    rows: Option<usize>,
    /// `(key, value)` output indices per layer.
    present: Vec<(usize, usize)>,
    input_count: usize,
}

/// A causal LM graph, optimised and ready to run; cheap to share (`Arc`) between threads.
#[derive(Debug)]
pub struct OnnxDecoder {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    binding: Binding,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    /// Threads for the matrix products, when more than one.
    pool: Option<StepPool>,
    /// Attention nodes run by kaiwa's kernel (`model::attention`).
    fused_attention: usize,
    /// Products given their own copy of a shared weight (see `untie_shared_weights`).
    untied_weights: usize,
    /// Products run on int8 weights (`model::quantized`).
    int8_products: usize,
    /// The positions the graph can run, where known ([`OnnxDecoder::with_positions`]).
    positions: Option<usize>,
}

impl OnnxDecoder {
    /// Loads and optimises an ONNX graph, to run on [`default_threads`] threads. `fallback`
    /// supplies `(kv_heads, head_dim)` when the graph leaves them symbolic (usually they are
    /// concrete in the graph).
    pub fn load(path: &Path, fallback: Option<(usize, usize)>) -> Result<Self, ModelError> {
        Self::load_with_threads(path, fallback, default_threads())
    }

    /// [`OnnxDecoder::load`] with an explicit number of threads (1: no thread pool).
    pub fn load_with_threads(
        path: &Path,
        fallback: Option<(usize, usize)>,
        threads: usize,
    ) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::NotAModelDir {
                path: path.to_path_buf(),
                reason: "ONNX file not found".into(),
            });
        }
        let load_err = |e: TractError| ModelError::OnnxLoad {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        };
        let mut onnx = tract_onnx::onnx();
        super::quantized::register(&mut onnx);
        let mut model = onnx.model_for_path(path).map_err(load_err)?;
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(load_err)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(load_err)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .unwrap_or(&model.node(o.node).name)
                    .to_string()
            })
            .collect();
        let binding =
            bind(&input_names, &output_names).map_err(|reason| ModelError::OnnxInterface {
                path: path.to_path_buf(),
                reason,
            })?;

        let (kv_heads, head_dim) = declared_kv_shape(&model, binding.past[0].0)
            .or(fallback)
            .ok_or_else(|| ModelError::OnnxInterface {
                path: path.to_path_buf(),
                reason: "the past_key_values inputs do not declare the number of KV heads and the \
                         head size, and no config.json gives them"
                    .into(),
            })?;

        // Batch is fixed to 1 (one conversation per session); sequence and past stay symbolic.
        let s = model.sym("S");
        let p = model.sym("P");
        let ids_shape = tvec![1.to_dim(), s.to_dim()];
        let total = tvec![1.to_dim(), TDim::from(p.clone()) + TDim::from(s.clone())];
        let kv_shape = tvec![1.to_dim(), kv_heads.to_dim(), p.to_dim(), head_dim.to_dim()];
        let mut set = |ix: usize, fact: InferenceFact| model.set_input_fact(ix, fact);
        set(
            binding.input_ids,
            InferenceFact::dt_shape(i64::datum_type(), ids_shape.clone()),
        )
        .map_err(load_err)?;
        if let Some(ix) = binding.attention_mask {
            set(ix, InferenceFact::dt_shape(i64::datum_type(), total)).map_err(load_err)?;
        }
        if let Some(ix) = binding.position_ids {
            set(ix, InferenceFact::dt_shape(i64::datum_type(), ids_shape)).map_err(load_err)?;
        }
        for &(k, v) in &binding.past {
            for ix in [k, v] {
                set(
                    ix,
                    InferenceFact::dt_shape(f32::datum_type(), kv_shape.clone()),
                )
                .map_err(load_err)?;
            }
        }
        let mut typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(load_err)?;
        let fused = super::attention::fuse_attention(&mut typed).map_err(load_err)?;
        let untied = untie_shared_weights(&mut typed).map_err(load_err)?;
        let mut binding = binding;
        let logits_outlet = typed.output_outlets().map_err(load_err)?[binding.logits];
        binding.rows = keep_last_rows(&mut typed, logits_outlet).map_err(load_err)?;
        binding.input_count += usize::from(binding.rows.is_some());
        let int8 = super::quantized::fuse_q8(&mut typed).map_err(load_err)?;
        tracing::debug!(
            path = %path.display(),
            fused,
            untied,
            last_rows_only = binding.rows.is_some(),
            int8,
            "attention nodes run by kaiwa's kernel; products given their own shared weight; \
             logits computed for the positions asked only; products on int8 weights"
        );
        let typed = typed.into_optimized().map_err(load_err)?;
        let vocab_size = typed
            .output_fact(binding.logits)
            .ok()
            .and_then(|f| f.shape.last().and_then(|d| d.to_usize().ok()))
            .ok_or_else(|| ModelError::OnnxInterface {
                path: path.to_path_buf(),
                reason: "the vocabulary size (last axis of `logits`) is not a known number".into(),
            })?;
        let plan = typed.into_runnable().map_err(load_err)?;
        Ok(OnnxDecoder {
            path: path.to_path_buf(),
            plan,
            binding,
            kv_heads,
            head_dim,
            vocab_size,
            pool: StepPool::new(threads)?,
            fused_attention: fused,
            untied_weights: untied,
            int8_products: int8,
            positions: None,
        })
    }

    /// Bounds the sequences this decoder runs to `positions` tokens (a kaiwa graph has rotary
    /// tables for [`LlamaConfig::context_len`](super::LlamaConfig::context_len) positions
    /// only): feeding past them is an error instead of an index out of the tables' range.
    pub fn with_positions(mut self, positions: usize) -> Self {
        self.positions = Some(positions);
        self
    }

    /// The positions this decoder runs, where known.
    pub fn positions(&self) -> Option<usize> {
        self.positions
    }

    /// Threads the matrix products run on inside [`OnnxDecoder::parallel`].
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, StepPool::threads)
    }

    /// Runs `f`, typically a whole generation with a [`DecoderSession`] of this decoder, with
    /// the graph's matrix products split over the decoder's threads (see `model::threads`).
    /// Outside it, sessions run on the calling thread alone.
    pub fn parallel<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.run(f),
            None => f(),
        }
    }

    /// How many of the graph's attention nodes run through kaiwa's own kernel: every layer's
    /// for a graph with standard `Attention` nodes (kaiwa's export), none for one that writes
    /// attention out in `MatMul`s (which tract runs as it is).
    pub fn fused_attention(&self) -> usize {
        self.fused_attention
    }

    /// How many matrix products read a large weight that the graph shares with other nodes
    /// (tied embeddings) and were given a copy of their own, packed once at load.
    pub fn untied_weights(&self) -> usize {
        self.untied_weights
    }

    /// How many matrix products run on int8 weights (a graph exported with `--quantize int8`).
    pub fn int8_products(&self) -> usize {
        self.int8_products
    }

    /// Whether the output projection computes only the rows a session asks for (see
    /// `keep_last_rows`): true for kaiwa's export and Optimum-style Llama graphs; otherwise
    /// every position's logits are computed and the rows asked for are copied out.
    pub fn projects_asked_rows_only(&self) -> bool {
        self.binding.rows.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_layers(&self) -> usize {
        self.binding.past.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Whether the graph takes `position_ids` (Optimum's Llama exports do; some others do not).
    pub fn takes_position_ids(&self) -> bool {
        self.binding.position_ids.is_some()
    }

    /// A fresh session with an empty cache.
    pub fn session(self: &Arc<Self>) -> Result<DecoderSession, ModelError> {
        let empty = Tensor::zero::<f32>(&[1, self.kv_heads, 0, self.head_dim])
            .map_err(|e| ModelError::Inference(format!("{e:#}")))?;
        let state = self
            .plan
            .spawn()
            .map_err(|e| ModelError::Inference(format!("{e:#}")))?;
        Ok(DecoderSession {
            decoder: Arc::clone(self),
            state,
            past: vec![(empty.clone(), empty); self.num_layers()],
            past_len: 0,
        })
    }
}

/// One sequence being decoded: the KV cache and the number of tokens it covers.
pub struct DecoderSession {
    decoder: Arc<OnnxDecoder>,
    state: TypedSimpleState,
    past: Vec<(Tensor, Tensor)>,
    past_len: usize,
}

impl std::fmt::Debug for DecoderSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderSession")
            .field("past_len", &self.past_len)
            .finish()
    }
}

impl DecoderSession {
    /// Tokens already in the cache.
    pub fn past_len(&self) -> usize {
        self.past_len
    }

    /// A new session that starts from this one's cache, so a prompt fed once can be continued
    /// several ways.
    pub fn fork(&self) -> Result<DecoderSession, ModelError> {
        let mut s = self.decoder.session()?;
        s.past = self.past.clone();
        s.past_len = self.past_len;
        Ok(s)
    }

    /// Feeds `tokens` after the cached ones and returns the logits of the last one.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        // Only the last row is computed (or, for a graph kaiwa cannot slice, copied out): a
        // prefill's other rows are never looked at.
        let last = self.forward_last(tokens, 1)?;
        Ok(last.into_iter().next().unwrap_or_default())
    }

    /// Feeds `tokens` after the cached ones and returns the logits of every one of them.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_last(tokens, tokens.len())
    }

    /// Feeds `tokens` after the cached ones and returns the logits of the last `rows` of them
    /// (at most all of them, at least one).
    pub fn forward_last(
        &mut self,
        tokens: &[u32],
        rows: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Inference("no tokens to feed".into()));
        }
        let rows = rows.clamp(1, tokens.len());
        let err = |e: TractError| ModelError::Inference(format!("{e:#}"));
        let b = &self.decoder.binding;
        let n = tokens.len();
        let total = self.past_len + n;
        if let Some(max) = self.decoder.positions.filter(|&max| total > max) {
            return Err(ModelError::Inference(format!(
                "{total} tokens are more than the model's {max} positions"
            )));
        }
        let mut inputs: Vec<Option<TValue>> = vec![None; b.input_count];
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        inputs[b.input_ids] = Some(Tensor::from_shape(&[1, n], &ids).map_err(err)?.into());
        if let Some(ix) = b.attention_mask {
            inputs[ix] = Some(
                Tensor::from_shape(&[1, total], &vec![1i64; total])
                    .map_err(err)?
                    .into(),
            );
        }
        if let Some(ix) = b.position_ids {
            let pos: Vec<i64> = (self.past_len as i64..total as i64).collect();
            inputs[ix] = Some(Tensor::from_shape(&[1, n], &pos).map_err(err)?.into());
        }
        if let Some(ix) = b.rows {
            inputs[ix] = Some(
                Tensor::from_shape(&[rows], &vec![true; rows])
                    .map_err(err)?
                    .into(),
            );
        }
        // The logits the graph gives: the rows asked for, or every position's.
        let given = if b.rows.is_some() { rows } else { n };
        let past = std::mem::take(&mut self.past);
        for (&(k, v), (pk, pv)) in b.past.iter().zip(past) {
            inputs[k] = Some(pk.into());
            inputs[v] = Some(pv.into());
        }
        let inputs: TVec<TValue> = inputs
            .into_iter()
            .map(|t| t.ok_or_else(|| ModelError::Inference("unbound input".into())))
            .collect::<Result<_, _>>()?;
        let mut outputs = match self.state.run(inputs) {
            Ok(o) => o,
            Err(e) => {
                // The cache was moved into the failed run: start over rather than decode garbage.
                self.reset()?;
                return Err(err(e));
            }
        };
        let logits = outputs[b.logits]
            .to_plain_array_view::<f32>()
            .map_err(err)?;
        let vocab = self.decoder.vocab_size;
        let flat = logits
            .as_slice()
            .ok_or_else(|| ModelError::Inference("logits are not contiguous".into()))?;
        if flat.len() != given * vocab {
            return Err(ModelError::Inference(format!(
                "logits cover {} values, expected {given} positions of {vocab}",
                flat.len()
            )));
        }
        let rows = flat[(given - rows) * vocab..]
            .chunks_exact(vocab)
            .map(<[f32]>::to_vec)
            .collect::<Vec<_>>();
        self.past = b
            .present
            .iter()
            .map(|&(k, v)| {
                let k = std::mem::replace(&mut outputs[k], Tensor::default().into()).into_tensor();
                let v = std::mem::replace(&mut outputs[v], Tensor::default().into()).into_tensor();
                (k, v)
            })
            .collect();
        self.past_len = total;
        Ok(rows)
    }

    /// Empties the cache.
    pub fn reset(&mut self) -> Result<(), ModelError> {
        let d = &self.decoder;
        let empty = Tensor::zero::<f32>(&[1, d.kv_heads, 0, d.head_dim])
            .map_err(|e| ModelError::Inference(format!("{e:#}")))?;
        self.past = vec![(empty.clone(), empty); d.num_layers()];
        self.past_len = 0;
        Ok(())
    }
}

/// Matches input and output names against the convention, or says what is missing.
fn bind(inputs: &[String], outputs: &[String]) -> Result<Binding, String> {
    let find = |names: &[String], name: &str| names.iter().position(|n| n == name);
    let mut problems = Vec::new();
    let input_ids = find(inputs, "input_ids");
    if input_ids.is_none() {
        problems.push("no `input_ids` input".to_string());
    }
    let logits = find(outputs, "logits");
    if logits.is_none() {
        problems.push("no `logits` output".to_string());
    }
    let mut past = Vec::new();
    let mut present = Vec::new();
    for l in 0.. {
        let pk = find(inputs, &format!("past_key_values.{l}.key"));
        let pv = find(inputs, &format!("past_key_values.{l}.value"));
        let ok = find(outputs, &format!("present.{l}.key"));
        let ov = find(outputs, &format!("present.{l}.value"));
        match (pk, pv, ok, ov) {
            (Some(a), Some(b), Some(c), Some(d)) => {
                past.push((a, b));
                present.push((c, d));
            }
            (None, None, None, None) => break,
            _ => {
                problems.push(format!(
                    "layer {l} lacks one of past_key_values.{l}.key/.value inputs or \
                     present.{l}.key/.value outputs"
                ));
                break;
            }
        }
    }
    if past.is_empty() {
        problems.push("no `past_key_values.N.key` / `.value` inputs (export with past)".into());
    }
    let known = |n: &String| {
        n == "input_ids"
            || n == "attention_mask"
            || n == "position_ids"
            || n.starts_with("past_key_values.")
    };
    let unknown: Vec<&String> = inputs.iter().filter(|n| !known(n)).collect();
    if !unknown.is_empty() {
        problems.push(format!("unexpected inputs {unknown:?}"));
    }
    if !problems.is_empty() {
        return Err(format!(
            "{}. Expected inputs input_ids, attention_mask, [position_ids], \
             past_key_values.N.key/.value and outputs logits, present.N.key/.value; found \
             inputs {inputs:?} and outputs {outputs:?}",
            problems.join("; ")
        ));
    }
    Ok(Binding {
        input_ids: input_ids.unwrap_or_default(),
        attention_mask: find(inputs, "attention_mask"),
        position_ids: find(inputs, "position_ids"),
        past,
        logits: logits.unwrap_or_default(),
        rows: None,
        present,
        input_count: inputs.len(),
    })
}

/// `(kv_heads, head_dim)` when the graph declares them as numbers on a past input.
fn declared_kv_shape(model: &InferenceModel, input: usize) -> Option<(usize, usize)> {
    let fact = model.input_fact(input).ok()?;
    let dims: Vec<Option<usize>> = fact
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
        .collect();
    match dims.as_slice() {
        [_, Some(heads), _, Some(dim)] => Some((*heads, *dim)),
        _ => None,
    }
}

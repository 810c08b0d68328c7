//! The Llama decoder: RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP,
//! with parameters named exactly as in Hugging Face's `LlamaForCausalLM`.
//!
//! Every projection is a [`Projection`] trait object so that adapters (LoRA) and quantised
//! frozen bases (NF4) can replace a dense layer by name without touching the model code.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor, nn};

use crate::config::ModelConfig;

/// A linear map `y = x Wᵀ` as the model sees it. The dense layer implements it; a LoRA
/// adapter wraps another projection and adds its low-rank update; an NF4 layer dequantises.
/// `Any` lets an adapter ask what it wraps (a dense weight can absorb a merge, NF4 cannot).
pub trait Projection: std::fmt::Debug + Send + std::any::Any {
    /// Applies the map to the last dimension of `x`.
    fn forward(&self, x: &Tensor) -> Tensor;
}

/// A dense weight of shape `[out, in]` without bias, as every Llama projection is.
#[derive(Debug)]
pub struct Dense {
    /// The weight, registered in the model's variable store under the HF name.
    pub weight: Tensor,
}

impl Dense {
    /// Creates `<path>.weight` of shape `[out, in]`, initialised N(0, 0.02) like `transformers`.
    pub fn new(path: &nn::Path, in_features: i64, out_features: i64) -> Self {
        Self {
            weight: path.randn("weight", &[out_features, in_features], 0.0, 0.02),
        }
    }
}

impl Projection for Dense {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.weight.tr())
    }
}

/// Root-mean-square layer norm, computed in f32 whatever the weights' dtype, as `transformers` does.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(path: &nn::Path, size: i64, eps: f64) -> Self {
        Self {
            weight: path.ones("weight", &[size]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let mean_square = x.square().mean_dim(-1, true, Kind::Float);
        let normed = x * (mean_square + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

/// Keys and values of earlier positions, one pair per layer, each `[batch, kv_heads, past, head_dim]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| None).collect(),
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|layer| layer.as_ref())
            .map_or(0, |(keys, _)| keys.size()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows in `rows` (e.g. after some sequences finished).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for (keys, values) in self.layers.iter_mut().flatten() {
            *keys = keys.index_select(0, rows);
            *values = values.index_select(0, rows);
        }
    }

    /// Pads every layer on the left with `extra` zero positions, so the cache can be stacked
    /// with a longer one; the caller masks the new positions out.
    pub fn pad_left(&mut self, extra: i64) {
        if extra <= 0 {
            return;
        }
        for (keys, values) in self.layers.iter_mut().flatten() {
            *keys = keys.constant_pad_nd([0, 0, extra, 0]);
            *values = values.constant_pad_nd([0, 0, extra, 0]);
        }
    }

    /// Drops the `count` oldest positions (columns no row attends to any more).
    pub fn narrow_front(&mut self, count: i64) {
        for (keys, values) in self.layers.iter_mut().flatten() {
            let keep = keys.size()[2] - count;
            *keys = keys.narrow(2, count, keep);
            *values = values.narrow(2, count, keep);
        }
    }

    /// Appends the rows of `other` (same length, same model) after this cache's rows.
    pub fn append_rows(&mut self, other: &KvCache) {
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            match (mine.as_mut(), theirs) {
                (Some((keys, values)), Some((other_keys, other_values))) => {
                    *keys = Tensor::cat(&[&*keys, other_keys], 0);
                    *values = Tensor::cat(&[&*values, other_values], 0);
                }
                (None, Some((other_keys, other_values))) => {
                    *mine = Some((other_keys.shallow_clone(), other_values.shallow_clone()));
                }
                _ => {}
            }
        }
    }
}

/// Self-attention with rotary positions and grouped key/value heads.
#[derive(Debug)]
pub struct Attention {
    /// Query projection, `[heads * head_dim, hidden]`.
    pub q_proj: Box<dyn Projection>,
    /// Key projection, `[kv_heads * head_dim, hidden]`.
    pub k_proj: Box<dyn Projection>,
    /// Value projection, `[kv_heads * head_dim, hidden]`.
    pub v_proj: Box<dyn Projection>,
    /// Output projection, `[hidden, heads * head_dim]`.
    pub o_proj: Box<dyn Projection>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

/// How attention may look back, computed once per forward pass and shared by all layers.
#[derive(Debug)]
enum Mask {
    /// Plain causal attention over a fresh sequence: the kernel's own causal path.
    Causal,
    /// Every query may see every cached key (a single new token without padding).
    None,
    /// An explicit `[batch, 1, queries, keys]` boolean mask, true where attention is allowed.
    Explicit(Tensor),
}

/// `rotate_half` as `transformers` defines it: the halves swap and the new first half is negated.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let first = x.narrow(-1, 0, half);
    let second = x.narrow(-1, half, half);
    Tensor::cat(&[second.neg(), first], -1)
}

impl Attention {
    fn new(path: &nn::Path, config: &ModelConfig, make: &mut Builder<'_>) -> Self {
        let (hidden, heads, kv_heads, head_dim) = (
            config.hidden_size,
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim(),
        );
        Self {
            q_proj: make.projection(path, "q_proj", hidden, heads * head_dim),
            k_proj: make.projection(path, "k_proj", hidden, kv_heads * head_dim),
            v_proj: make.projection(path, "v_proj", hidden, kv_heads * head_dim),
            o_proj: make.projection(path, "o_proj", heads * head_dim, hidden),
            heads,
            kv_heads,
            head_dim,
        }
    }

    /// Repeats each key/value head for the query heads that share it: `[b, kv, t, d]` to `[b, h, t, d]`.
    fn repeat_kv(&self, x: Tensor) -> Tensor {
        let repeats = self.heads / self.kv_heads;
        if repeats == 1 {
            return x;
        }
        let size = x.size();
        x.unsqueeze(2)
            .expand([size[0], self.kv_heads, repeats, size[2], size[3]], false)
            .reshape([size[0], self.heads, size[2], size[3]])
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &(Tensor, Tensor),
        mask: &Mask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (batch, time) = (x.size()[0], x.size()[1]);
        let split = |projected: Tensor, heads: i64| {
            projected
                .view([batch, time, heads, self.head_dim])
                .transpose(1, 2)
        };
        let (cos, sin) = rotary;
        let rotate = |t: Tensor| &t * cos + rotate_half(&t) * sin;
        let queries = rotate(split(self.q_proj.forward(x), self.heads));
        let mut keys = rotate(split(self.k_proj.forward(x), self.kv_heads));
        let mut values = split(self.v_proj.forward(x), self.kv_heads);

        if let Some(slot) = cache {
            if let Some((past_keys, past_values)) = slot.as_ref() {
                keys = Tensor::cat(&[past_keys, &keys], 2);
                values = Tensor::cat(&[past_values, &values], 2);
            }
            *slot = Some((keys.shallow_clone(), values.shallow_clone()));
        }

        let keys = self.repeat_kv(keys);
        let values = self.repeat_kv(values);
        let (explicit, is_causal) = match mask {
            Mask::Causal => (None, true),
            Mask::None => (None, false),
            Mask::Explicit(mask) => (Some(mask), false),
        };
        let attended = Tensor::scaled_dot_product_attention(
            &queries, &keys, &values, explicit, 0.0, is_causal, None, false,
        );
        self.o_proj.forward(&attended.transpose(1, 2).reshape([
            batch,
            time,
            self.heads * self.head_dim,
        ]))
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// Gate projection, `[intermediate, hidden]`.
    pub gate_proj: Box<dyn Projection>,
    /// Up projection, `[intermediate, hidden]`.
    pub up_proj: Box<dyn Projection>,
    /// Down projection, `[hidden, intermediate]`.
    pub down_proj: Box<dyn Projection>,
}

impl Mlp {
    fn new(path: &nn::Path, config: &ModelConfig, make: &mut Builder<'_>) -> Self {
        let (hidden, inner) = (config.hidden_size, config.intermediate_size);
        Self {
            gate_proj: make.projection(path, "gate_proj", hidden, inner),
            up_proj: make.projection(path, "up_proj", hidden, inner),
            down_proj: make.projection(path, "down_proj", inner, hidden),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// One pre-norm decoder block.
#[derive(Debug)]
pub struct DecoderLayer {
    /// The attention sub-block.
    pub self_attn: Attention,
    /// The feed-forward sub-block.
    pub mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(path: &nn::Path, config: &ModelConfig, make: &mut Builder<'_>) -> Self {
        Self {
            self_attn: make.nested("self_attn", |make| {
                Attention::new(&(path / "self_attn"), config, make)
            }),
            mlp: make.nested("mlp", |make| Mlp::new(&(path / "mlp"), config, make)),
            input_layernorm: RmsNorm::new(
                &(path / "input_layernorm"),
                config.hidden_size,
                config.rms_norm_eps,
            ),
            post_attention_layernorm: RmsNorm::new(
                &(path / "post_attention_layernorm"),
                config.hidden_size,
                config.rms_norm_eps,
            ),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &(Tensor, Tensor),
        mask: &Mask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let x = x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x), rotary, mask, cache);
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}

/// Optional inputs of a forward pass beyond the token ids.
#[derive(Debug, Default)]
pub struct ForwardOptions<'a> {
    /// `[batch, past + time]`, 1 for real tokens and 0 for padding, covering cached positions
    /// too (the `transformers` convention). `None` means no padding anywhere.
    pub attention_mask: Option<&'a Tensor>,
    /// `[batch, time]` rotary positions. `None` means `past .. past + time` for every row.
    pub position_ids: Option<&'a Tensor>,
}

/// A Llama causal language model. Parameters live in the `nn::VarStore` passed to
/// [`Llama::new`], under the Hugging Face names.
#[derive(Debug)]
pub struct Llama {
    config: ModelConfig,
    embed_tokens: Tensor,
    /// The decoder blocks, in order.
    pub layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The output projection; `None` when tied to the embedding.
    pub lm_head: Option<Box<dyn Projection>>,
    inverse_frequencies: Tensor,
}

/// Makes each projection while a model is built, knowing the Hugging Face module name it is
/// building (e.g. `model.layers.0.self_attn.q_proj`): whatever the caller's factory supplies,
/// else a fresh dense layer in the variable store.
struct Builder<'a> {
    prefix: String,
    factory: &'a mut ProjectionFactory<'a>,
}

/// Called with a projection's module name, its variable-store path and its `in` and `out`
/// sizes; `None` means "a fresh dense layer".
type ProjectionFactory<'a> =
    dyn FnMut(&str, &nn::Path, i64, i64) -> Option<Box<dyn Projection>> + 'a;

impl Builder<'_> {
    fn projection(
        &mut self,
        path: &nn::Path,
        name: &str,
        in_features: i64,
        out_features: i64,
    ) -> Box<dyn Projection> {
        let full_name = if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        };
        let path = path / name;
        (self.factory)(&full_name, &path, in_features, out_features)
            .unwrap_or_else(|| Box::new(Dense::new(&path, in_features, out_features)))
    }

    fn nested<T>(&mut self, segment: &str, build: impl FnOnce(&mut Self) -> T) -> T {
        let outer = self.prefix.len();
        if self.prefix.is_empty() {
            self.prefix.push_str(segment);
        } else {
            self.prefix.push('.');
            self.prefix.push_str(segment);
        }
        let built = build(self);
        self.prefix.truncate(outer);
        built
    }
}

impl Llama {
    /// Builds the model's parameters under `root` (normally `var_store.root()`), freshly
    /// initialised; load weights into the store to use trained ones.
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Self {
        Self::build(root, config, |_, _, _, _| None)
    }

    /// Builds the model as [`Llama::new`] does, except that `factory` may supply any projection
    /// itself: it is called with the module name, the variable-store path and the `in` and
    /// `out` sizes, and returns `None` for "a fresh dense layer". Projections it supplies never
    /// exist as dense weights; this is how a QLoRA base is loaded one tensor at a time,
    /// quantised as it is read, without the whole f32 model in memory.
    pub fn build(
        root: &nn::Path,
        config: &ModelConfig,
        mut factory: impl FnMut(&str, &nn::Path, i64, i64) -> Option<Box<dyn Projection>>,
    ) -> Self {
        let mut make = Builder {
            prefix: String::new(),
            factory: &mut factory,
        };
        let model = root / "model";
        let head_dim = config.head_dim();
        // HF: inv_freq = 1 / theta^(2i / d), i = 0 .. d/2, computed in f32.
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let inverse_frequencies = Tensor::from(config.rope_theta as f32)
            .pow(&exponents)
            .reciprocal()
            .to_device(root.device());
        Self {
            embed_tokens: (&model / "embed_tokens").randn(
                "weight",
                &[config.vocab_size, config.hidden_size],
                0.0,
                0.02,
            ),
            layers: (0..config.num_hidden_layers)
                .map(|index| {
                    make.nested(&format!("model.layers.{index}"), |make| {
                        DecoderLayer::new(&(&model / "layers" / index), config, make)
                    })
                })
                .collect(),
            norm: RmsNorm::new(&(&model / "norm"), config.hidden_size, config.rms_norm_eps),
            lm_head: (!config.tie_word_embeddings)
                .then(|| make.projection(root, "lm_head", config.hidden_size, config.vocab_size)),
            config: config.clone(),
            inverse_frequencies,
        }
    }

    /// The parameters [`Llama::new`] creates for `config`, by Hugging Face name, with their
    /// shapes, computed from the config alone: a checkpoint's headers can be checked against
    /// them without building the model, which for a large config would allocate all of it.
    pub fn parameter_shapes(config: &ModelConfig) -> BTreeMap<String, Vec<i64>> {
        let (hidden, inner, vocab) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let (queries, keys) = (
            config.num_attention_heads * config.head_dim(),
            config.kv_heads() * config.head_dim(),
        );
        let mut shapes = BTreeMap::from([
            ("model.embed_tokens.weight".to_owned(), vec![vocab, hidden]),
            ("model.norm.weight".to_owned(), vec![hidden]),
        ]);
        if !config.tie_word_embeddings {
            shapes.insert("lm_head.weight".to_owned(), vec![vocab, hidden]);
        }
        for index in 0..config.num_hidden_layers {
            let layer = format!("model.layers.{index}");
            // Projections are `[out, in]`.
            for (name, shape) in [
                ("self_attn.q_proj", vec![queries, hidden]),
                ("self_attn.k_proj", vec![keys, hidden]),
                ("self_attn.v_proj", vec![keys, hidden]),
                ("self_attn.o_proj", vec![hidden, queries]),
                ("mlp.gate_proj", vec![inner, hidden]),
                ("mlp.up_proj", vec![inner, hidden]),
                ("mlp.down_proj", vec![hidden, inner]),
                ("input_layernorm", vec![hidden]),
                ("post_attention_layernorm", vec![hidden]),
            ] {
                shapes.insert(format!("{layer}.{name}.weight"), shape);
            }
        }
        shapes
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The token embedding matrix, `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Replaces projections by their Hugging Face module name (e.g.
    /// `model.layers.0.self_attn.q_proj`): `wrap` receives each current projection and
    /// returns its replacement. This is how LoRA adapters and quantised layers are slotted in.
    pub fn map_projections(
        &mut self,
        mut wrap: impl FnMut(&str, Box<dyn Projection>) -> Box<dyn Projection>,
    ) {
        let mut replace = |name: String, slot: &mut Box<dyn Projection>| {
            let current = std::mem::replace(slot, Box::new(Placeholder));
            *slot = wrap(&name, current);
        };
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{index}");
            let attention = &mut layer.self_attn;
            replace(format!("{prefix}.self_attn.q_proj"), &mut attention.q_proj);
            replace(format!("{prefix}.self_attn.k_proj"), &mut attention.k_proj);
            replace(format!("{prefix}.self_attn.v_proj"), &mut attention.v_proj);
            replace(format!("{prefix}.self_attn.o_proj"), &mut attention.o_proj);
            replace(format!("{prefix}.mlp.gate_proj"), &mut layer.mlp.gate_proj);
            replace(format!("{prefix}.mlp.up_proj"), &mut layer.mlp.up_proj);
            replace(format!("{prefix}.mlp.down_proj"), &mut layer.mlp.down_proj);
        }
        if let Some(head) = self.lm_head.as_mut() {
            replace("lm_head".to_string(), head);
        }
    }

    /// Cosine and sine tables for `positions` `[batch, time]`, each `[batch, 1, time, head_dim]`.
    fn rotary(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let angles = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inverse_frequencies;
        let angles = Tensor::cat(&[&angles, &angles], -1).unsqueeze(1);
        (angles.cos().to_kind(kind), angles.sin().to_kind(kind))
    }

    fn mask(&self, batch: i64, time: i64, past: i64, attention_mask: Option<&Tensor>) -> Mask {
        let device = self.embed_tokens.device();
        if attention_mask.is_none() {
            if past == 0 && time > 1 {
                return Mask::Causal;
            }
            if time == 1 {
                return Mask::None;
            }
        }
        let total = past + time;
        let query_positions = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1);
        let key_positions = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
        let causal = key_positions
            .le_tensor(&query_positions)
            .view([1, 1, time, total]);
        let allowed = match attention_mask {
            Some(padding) => causal.logical_and(
                &padding
                    .to_device(device)
                    .to_kind(Kind::Bool)
                    .view([batch, 1, 1, total]),
            ),
            None => causal,
        };
        // A padding query sees no key at all, and a softmax over nothing is NaN; letting it see
        // itself keeps every row finite. Its output is never used.
        let diagonal = key_positions
            .eq_tensor(&query_positions)
            .view([1, 1, time, total]);
        Mask::Explicit(allowed.logical_or(&diagonal))
    }

    /// Final hidden states `[batch, time, hidden]` after the last norm.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        options: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (batch, time) = (input_ids.size()[0], input_ids.size()[1]);
        let past = cache.as_ref().map_or(0, |cache| cache.len());
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let positions = match options.position_ids {
            Some(positions) => positions.shallow_clone(),
            None => Tensor::arange_start(past, past + time, (Kind::Int64, x.device()))
                .unsqueeze(0)
                .expand([batch, time], false),
        };
        let rotary = self.rotary(&positions, x.kind());
        let mask = self.mask(batch, time, past, options.attention_mask);
        if let Some(cache) = cache.as_deref_mut()
            && cache.layers.len() != self.layers.len()
        {
            *cache = KvCache::new(self.layers.len());
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|cache| &mut cache.layers[index]);
            x = layer.forward(&x, &rotary, &mask, slot);
        }
        self.norm.forward(&x)
    }

    /// What the blocks need for a pass over fresh rows (no cache): `options` as for
    /// [`Llama::forward`].
    pub fn prepare(&self, input_ids: &Tensor, options: &ForwardOptions) -> BlockInputs {
        let (batch, time) = (input_ids.size()[0], input_ids.size()[1]);
        let embedded = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let positions = match options.position_ids {
            Some(positions) => positions.to_device(embedded.device()),
            None => Tensor::arange(time, (Kind::Int64, embedded.device()))
                .unsqueeze(0)
                .expand([batch, time], false),
        };
        BlockInputs {
            rotary: self.rotary(&positions, embedded.kind()),
            mask: self.mask(batch, time, 0, options.attention_mask),
            embedded,
        }
    }

    /// What the blocks need for packed rows: several documents back to back in each row,
    /// `document_ids` `[batch, time]` keeping attention inside each document (padding gets an
    /// id of its own) and `position_ids` restarting at every document, so each document is
    /// computed as if it were alone.
    pub fn prepare_packed(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        document_ids: &Tensor,
    ) -> BlockInputs {
        let time = input_ids.size()[1];
        let device = self.embed_tokens.device();
        let order = Tensor::arange(time, (Kind::Int64, device));
        let causal = order
            .unsqueeze(0)
            .le_tensor(&order.unsqueeze(1))
            .view([1, 1, time, time]);
        let documents = document_ids.to_device(device);
        let same_document = documents
            .unsqueeze(2)
            .eq_tensor(&documents.unsqueeze(1))
            .unsqueeze(1);
        let embedded = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        BlockInputs {
            rotary: self.rotary(&position_ids.to_device(device), embedded.kind()),
            mask: Mask::Explicit(causal.logical_and(&same_document)),
            embedded,
        }
    }

    /// Runs every block and the final norm over `inputs`, keeping the autograd graph when
    /// gradients are on. With `layer_seed`, libtorch's generator is reseeded before each block
    /// (`seed + index`) and before the head (`seed + layers`), so adapter dropout draws the
    /// same masks here as in [`Llama::backward_checkpointed`].
    pub fn run_blocks(&self, inputs: &BlockInputs, layer_seed: Option<i64>) -> Tensor {
        let mut x = inputs.embedded.shallow_clone();
        for (index, layer) in self.layers.iter().enumerate() {
            reseed(layer_seed, index);
            x = layer.forward(&x, &inputs.rotary, &inputs.mask, None);
        }
        reseed(layer_seed, self.layers.len());
        self.norm.forward(&x)
    }

    /// Gradient checkpointing (Chen et al., 2016, "Training deep nets with sublinear memory
    /// cost"): computes `loss_of_hidden(run_blocks(inputs))` and accumulates its gradients into
    /// every parameter that requires them, while keeping only each block's input between the
    /// forward and the backward pass. Each block is run again, with a graph, when the backward
    /// pass reaches it, and its gradient is pulled back through it alone. The gradients are
    /// those of `run_blocks` followed by `backward()` (same seeds, same masks); the price is
    /// one more forward pass, the saving every block's activations and, under an NF4 base,
    /// every dequantised weight. Returns the loss, detached.
    pub fn backward_checkpointed(
        &self,
        inputs: &BlockInputs,
        layer_seed: Option<i64>,
        loss_of_hidden: impl FnOnce(&Tensor) -> Tensor,
    ) -> Tensor {
        let mut block_inputs = Vec::with_capacity(self.layers.len());
        let mut x = inputs.embedded.detach();
        tch::no_grad(|| {
            for (index, layer) in self.layers.iter().enumerate() {
                reseed(layer_seed, index);
                let output = layer.forward(&x, &inputs.rotary, &inputs.mask, None);
                block_inputs.push(std::mem::replace(&mut x, output));
            }
        });
        let last = x.set_requires_grad(true);
        reseed(layer_seed, self.layers.len());
        let loss = loss_of_hidden(&self.norm.forward(&last));
        loss.backward();
        let mut gradient = last.grad();
        drop(last);
        for (index, layer) in self.layers.iter().enumerate().rev() {
            let Some(saved) = block_inputs.pop() else {
                break;
            };
            let input = saved.set_requires_grad(true);
            reseed(layer_seed, index);
            let output = layer.forward(&input, &inputs.rotary, &inputs.mask, None);
            // d(Σ output ⊙ g)/dθ = gᵀ ∂output/∂θ: the chain rule one block at a time.
            (output * &gradient).sum(Kind::Float).backward();
            gradient = input.grad();
        }
        if inputs.embedded.requires_grad() {
            (&inputs.embedded * &gradient).sum(Kind::Float).backward();
        }
        loss.detach()
    }

    /// Logits `[batch, time, vocab]` for packed rows (see [`Llama::prepare_packed`]).
    pub fn forward_packed(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        document_ids: &Tensor,
    ) -> Tensor {
        let inputs = self.prepare_packed(input_ids, position_ids, document_ids);
        self.logits_from_hidden(&self.run_blocks(&inputs, None))
    }

    /// Projects hidden states to vocabulary logits.
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(&self.embed_tokens.tr()),
        }
    }

    /// Logits `[batch, time, vocab]` for `input_ids` `[batch, time]`, appending to `cache`
    /// when one is given.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        options: &ForwardOptions,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        self.logits_from_hidden(&self.hidden_states(input_ids, options, cache))
    }
}

/// What every block of one pass over fresh rows shares: the embedded tokens, the rotary
/// tables and the attention mask. Made by [`Llama::prepare`] or [`Llama::prepare_packed`].
#[derive(Debug)]
pub struct BlockInputs {
    embedded: Tensor,
    rotary: (Tensor, Tensor),
    mask: Mask,
}

fn reseed(layer_seed: Option<i64>, index: usize) {
    if let Some(seed) = layer_seed {
        tch::manual_seed(seed.wrapping_add(index as i64));
    }
}

/// Stands in for a projection for the instant [`Llama::map_projections`] moves it out.
#[derive(Debug)]
struct Placeholder;

impl Projection for Placeholder {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.shallow_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_shapes_are_the_parameters_the_model_builds() {
        // Tied (tiny) and untied with grouped-query attention: the two ways the list differs.
        let tiny = ModelConfig::preset("tiny").expect("a preset");
        let mut untied = tiny.clone();
        untied.tie_word_embeddings = false;
        for config in [tiny, untied] {
            let var_store = nn::VarStore::new(Device::Cpu);
            let _model = Llama::new(&var_store.root(), &config);
            let built: BTreeMap<String, Vec<i64>> = var_store
                .variables()
                .into_iter()
                .map(|(name, tensor)| (name, tensor.size()))
                .collect();
            assert_eq!(Llama::parameter_shapes(&config), built);
        }
    }
}

"""LongLLaMA (Focused Transformer) configuration for transformers, written by fot_jax.

`fot-jax export` copies this file beside the weights, so that
`AutoConfig.from_pretrained(directory, trust_remote_code=True)` needs nothing but transformers.
A LLaMA decoder (grouped-query attention, RoPE in the HF layout) with memory layers: the layers in
`mem_layers` also attend to a memory of earlier windows' keys and values (every entry, or each
query's `mem_top_k` best), in the same softmax as their local keys.
"""

from transformers import PretrainedConfig

QK_NORM_MODES = ("none", "memory", "all")
MEM_ATTENTION = ("joint", "gated")


class LongLlamaConfig(PretrainedConfig):
    """LLaMA fields, and:

    mem_layers: 0-based indices of the memory layers.
    mem_positionals: True (LongLLaMA): memory keys are stored un-rotated, as if at position 0;
        False: memory layers use no rotary embedding at all.
    mem_dtype: precision of the memory store ("bfloat16", "float16", "float32").
    last_context_length: the last tokens of a prompt kept as local context; the rest is read in
        windows of `max_position_embeddings` tokens into memory.
    mem_top_k: memory entries each query attends to (None: every entry, dense memory).
    mem_capacity: entries a memory layer holds per sequence (None: unbounded); beyond it the oldest
        are dropped (FIFO).
    mem_logn_base: a memory layer's logits are multiplied by max(1, ln n / ln mem_logn_base), n the
        keys a query sees (0: off).
    qk_norm: "none" | "memory" | "all": L2-normalised queries and keys with a learnable per-head
        temperature (the FoT paper's small models), in memory layers or everywhere.
    mem_attention: "joint" (FoT: memory and local keys in one softmax) | "gated" (Memorizing
        Transformer: the two attentions mixed by a learnt per-head gate).
    """

    # an export's config.json says "llama", so that stock transformers, without trust_remote_code,
    # loads it as a plain LLaMA (AutoModelForCausalLM, AutoTokenizer) and asks nothing
    model_type = "llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
        mem_layers=(),
        mem_positionals=True,
        mem_dtype="bfloat16",
        last_context_length=1024,
        mem_top_k=None,
        mem_capacity=None,
        mem_logn_base=0,
        qk_norm="none",
        mem_attention="joint",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.mem_layers = [int(i) for i in mem_layers]
        self.mem_positionals = bool(mem_positionals)
        self.mem_dtype = mem_dtype
        self.last_context_length = last_context_length
        self.mem_top_k = mem_top_k
        self.mem_capacity = mem_capacity
        self.mem_logn_base = mem_logn_base
        self.qk_norm = qk_norm
        self.mem_attention = mem_attention
        if hidden_act != "silu" or attention_bias or mlp_bias:
            raise ValueError("LongLlamaConfig: only hidden_act='silu' without attention or MLP biases")
        if qk_norm not in QK_NORM_MODES:
            raise ValueError(f"LongLlamaConfig: qk_norm {qk_norm!r} is not one of {QK_NORM_MODES}")
        if mem_attention not in MEM_ATTENTION:
            raise ValueError(
                f"LongLlamaConfig: mem_attention {mem_attention!r} is not one of {MEM_ATTENTION}"
            )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

"""LongLLaMA (Focused Transformer) for transformers, written by fot_jax.

`fot-jax export` copies this file and `configuration_longllama.py` beside the weights, so that

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    model.generate(input_ids, max_new_tokens=32)

reads a prompt of any length with memory, offline, with nothing but torch and transformers.

A LLaMA decoder (grouped-query attention, RoPE in the HF `rotate_half` layout). The layers in
`config.mem_layers` are memory layers. A prompt of L tokens is read as LongLLaMA reads it: its
first P = max(L - C, 0) tokens (C = `last_context_length`) in windows of W =
`max_position_embeddings` tokens, positions restarting at 0 in each; every layer attends causally
within the window and memory layers also attend to the memory, in the same softmax; after a
window its memory-layer keys and values are written to memory (un-rotated: as if at position 0).
The last L - P tokens, and then the generated ones, form the local context (positions from 0);
when it would exceed W the whole of it moves to memory. A memory layer attends to every memory
entry (`mem_top_k` None) or to each query's `mem_top_k` best by inner product. Non-memory layers
never see earlier windows.

Memory settings are config fields and keyword arguments of `forward` and `generate`:
`mem_top_k`, `mem_capacity` (entries per sequence; beyond it the oldest go, FIFO),
`mem_logn_base` (log-n scaling of memory-layer logits), `last_context_length`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_longllama import LongLlamaConfig

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cache_name() -> str:
    """What generate calls the state a model hands back: `cache` from transformers 5 (which renames
    `past_key_values` to it), `past_key_values` before."""
    from transformers.utils import generic

    return "cache" if hasattr(generic, "_rename_kwargs_for_bc") else "past_key_values"


CACHE_NAME = _cache_name()


@dataclass
class MemorySettings:
    """How memory is read: `top_k` entries per query (None: all), `capacity` entries per sequence
    (None: unbounded, else FIFO), `logn_base` (0: off), the store's `dtype` and the prompt's last
    `last_context_length` tokens kept local."""

    top_k: Optional[int]
    capacity: Optional[int]
    logn_base: float
    dtype: torch.dtype
    last_context_length: int

    @classmethod
    def resolve(
        cls, config, top_k="config", capacity="config", logn_base=None, last_context_length=None, dtype=None
    ):
        top_k = config.mem_top_k if isinstance(top_k, str) and top_k == "config" else top_k
        capacity = config.mem_capacity if isinstance(capacity, str) and capacity == "config" else capacity
        logn_base = config.mem_logn_base if logn_base is None else logn_base
        c = config.last_context_length if last_context_length is None else last_context_length
        dt = dtype or config.mem_dtype
        window = config.max_position_embeddings
        if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(
                f"mem_top_k must be a positive integer (or None: every memory entry), got {top_k!r}"
            )
        if capacity is not None and (not isinstance(capacity, int) or capacity < window):
            raise ValueError(
                f"mem_capacity {capacity!r} is below one window (max_position_embeddings="
                f"{window}): a window's keys must fit the memory; give at least {window}, or None"
            )
        if logn_base and logn_base < 2:
            raise ValueError(f"mem_logn_base must be 0 (off) or at least 2, got {logn_base!r}")
        if not isinstance(c, int) or c <= 0:
            raise ValueError(f"last_context_length must be a positive integer, got {c!r}")
        if isinstance(dt, str):
            if dt not in STORE_DTYPES:
                raise ValueError(f"mem_dtype {dt!r} is not one of {sorted(STORE_DTYPES)}")
            dt = STORE_DTYPES[dt]
        return cls(top_k, capacity, float(logn_base or 0), dt, min(c, window))


class _Row:
    """One sequence's state: the local cache of every layer (slot j at position j; keys as the
    layer attends to them, rotated where it uses RoPE), the memory layers' un-rotated cache keys
    (what moves to memory), and each memory layer's store (float32 copies of `dtype`-rounded
    entries, [Hkv, N, D])."""

    def __init__(self, model, device, dtype):
        c = model.config
        w, hkv, d = c.max_position_embeddings, c.num_key_value_heads, c.head_dim
        self.cache = [
            (
                torch.zeros(w, hkv, d, dtype=dtype, device=device),
                torch.zeros(w, hkv, d, dtype=dtype, device=device),
            )
            for _ in range(c.num_hidden_layers)
        ]
        self.cache_raw = {i: torch.zeros(w, hkv, d, dtype=dtype, device=device) for i in c.mem_layers}
        self.cache_len = 0
        self.memory = {
            i: (torch.zeros(hkv, 0, d, device=device), torch.zeros(hkv, 0, d, device=device))
            for i in c.mem_layers
        }
        self.dropped = 0

    def memory_size(self) -> int:
        return next(iter(self.memory.values()))[0].shape[1] if self.memory else 0


class LongLlamaMemoryCache:
    """The state `generate` carries between steps: per row its local cache and memory, and how
    many input columns it has consumed (`get_seq_length`). Passed as `cache` / `past_key_values`."""

    is_compileable = False
    is_linear = (False,)

    def __init__(self, settings: MemorySettings, rows: list):
        self.settings, self.rows, self.consumed = settings, rows, 0
        self.warned = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.consumed

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None

    def __len__(self):
        return len(self.rows)


if CACHE_NAME == "cache":

    @dataclass
    class LongLlamaOutput(ModelOutput):
        """`logits` [B, T, V] (float32) of the positions asked for; `cache`: the memory state to
        continue from."""

        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        cache: Optional[LongLlamaMemoryCache] = None
        last_hidden_state: Optional[torch.FloatTensor] = None
else:

    @dataclass
    class LongLlamaOutput(ModelOutput):
        """`logits` [B, T, V] (float32) of the positions asked for; `past_key_values`: the memory
        state to continue from."""

        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        past_key_values: Optional[LongLlamaMemoryCache] = None
        last_hidden_state: Optional[torch.FloatTensor] = None


def _output(state, **fields) -> LongLlamaOutput:
    return LongLlamaOutput(**fields, **{CACHE_NAME: state})


def state_of(output) -> LongLlamaMemoryCache:
    """The memory state a model output carries (under `cache` or `past_key_values`)."""
    return output[CACHE_NAME]


def _rms(x, weight, eps):
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one kernel (torch >= 2.4), same formula
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class LongLlamaRMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return _rms(x, self.weight, self.eps)


class LongLlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        e, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(e, i, bias=False)
        self.up_proj = nn.Linear(e, i, bias=False)
        self.down_proj = nn.Linear(i, e, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LongLlamaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        e, h, hkv, d = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.heads, self.kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(e, h * d, bias=False)
        self.k_proj = nn.Linear(e, hkv * d, bias=False)
        self.v_proj = nn.Linear(e, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, e, bias=False)
        self.is_memory = layer_idx in config.mem_layers
        self.qk_norm = config.qk_norm == "all" or (config.qk_norm == "memory" and self.is_memory)
        if self.qk_norm:
            self.qk_temperature = nn.Parameter(torch.ones(h))
        if self.is_memory and config.mem_attention == "gated":
            self.mem_gate = nn.Parameter(torch.zeros(h))
        self.use_rope = not (self.is_memory and not config.mem_positionals)


class LongLlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = LongLlamaAttention(config, layer_idx)
        self.mlp = LongLlamaMLP(config)
        self.input_layernorm = LongLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LongLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)


class LongLlamaPreTrainedModel(PreTrainedModel):
    config_class = LongLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LongLlamaDecoderLayer"]
    supports_gradient_checkpointing = False
    _supports_cache_class = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, LongLlamaRMSNorm):
            module.weight.data.fill_(1.0)


def _rope(x, cos, sin):
    """x [T, H, D] rotated by cos/sin [T, 1, D] (HF rotate_half layout; `sin` with its first half
    negated, so rotate_half(x) * sin = roll(x, D/2) * sin), computed in float32, in x's dtype."""
    xf = x.float()
    return (xf * cos + torch.roll(xf, x.shape[-1] // 2, -1) * sin).to(x.dtype)


def _sdpa(q, keys, vals, mask, groups):
    """scaled_dot_product_attention of q [H, T, D] over keys/values [Hkv, S, D] (grouped query
    heads), logits unscaled (q is scaled already)."""
    try:
        return F.scaled_dot_product_attention(
            q[None], keys[None], vals[None], attn_mask=mask, scale=1.0, enable_gqa=groups > 1
        )[0]
    except TypeError:  # torch < 2.5: no enable_gqa
        if groups > 1:
            keys, vals = keys.repeat_interleave(groups, 0), vals.repeat_interleave(groups, 0)
        return F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=mask, scale=1.0)[0]


def _attend(q, keys, vals, pos0, mem, top_k, select_dtype, gate=None):
    """Attention of q [H, T, D] (scaled, float32) over the local keys/values [Hkv, S+T, D]
    (causal: query j sees slots up to pos0 + j) and, with mem = (k, v) [Hkv, N, D], over memory:
    every entry (`top_k` None or >= N) or each query's `top_k` best (selected by scores in
    `select_dtype`, the store's precision, then scored in float32). Joint (`gate` None): one
    softmax over memory and local keys; gated: the memory-only and local-only outputs mixed by
    sigmoid(gate) [H]."""
    h, t, d = q.shape
    hkv = keys.shape[0]
    g = h // hkv
    n_local = keys.shape[1]
    causal = None  # one query (decoding) sees every local slot
    if t > 1:
        causal = (
            torch.arange(n_local, device=q.device)[None, :]
            <= pos0 + torch.arange(t, device=q.device)[:, None]
        )
    dense = mem is not None and (top_k is None or top_k >= mem[0].shape[1])
    if mem is None or (dense and t > 1 and gate is None):
        if mem is not None:  # one softmax over [memory; local]: memory is visible to every query
            keys, vals = torch.cat([mem[0], keys], 1), torch.cat([mem[1], vals], 1)
            if causal is not None:
                ones = torch.ones(t, mem[0].shape[1], dtype=torch.bool, device=q.device)
                causal = torch.cat([ones, causal], 1)
        return _sdpa(q, keys, vals, causal, g)
    qg = q.view(hkv, g, t, d)
    s = torch.einsum("hgtd,hsd->hgts", qg, keys)
    if causal is not None:
        s = s.masked_fill(~causal, float("-inf"))
    mk, mv = mem
    if dense:
        sm = torch.einsum("hgtd,hnd->hgtn", qg, mk)
        mvals = None
    else:
        sel = torch.einsum(
            "hgtd,hnd->hgtn", qg if select_dtype == torch.float32 else qg.to(select_dtype).float(), mk
        )
        idx = torch.topk(sel, top_k, dim=-1).indices  # [Hkv, G, T, k]
        mvals = mv[torch.arange(hkv, device=q.device)[:, None, None, None], idx]
        sm = torch.einsum(
            "hgtd,hgtkd->hgtk", qg, mk[torch.arange(hkv, device=q.device)[:, None, None, None], idx]
        )
    if gate is None:
        p = torch.softmax(torch.cat([sm, s], -1), -1)
        pm, pl = p[..., : sm.shape[-1]], p[..., sm.shape[-1] :]
        out = torch.einsum("hgts,hsd->hgtd", pl, vals)
        out = out + (
            torch.einsum("hgtn,hnd->hgtd", pm, mv)
            if mvals is None
            else torch.einsum("hgtk,hgtkd->hgtd", pm, mvals)
        )
        return out.reshape(h, t, d)
    local = torch.einsum("hgts,hsd->hgtd", torch.softmax(s, -1), vals)
    pm = torch.softmax(sm, -1)
    mem_out = (
        torch.einsum("hgtn,hnd->hgtd", pm, mv)
        if mvals is None
        else torch.einsum("hgtk,hgtkd->hgtd", pm, mvals)
    )
    w = torch.sigmoid(gate.float()).view(hkv, g, 1, 1)
    return (w * mem_out + (1 - w) * local).reshape(h, t, d)


class LongLlamaModel(LongLlamaPreTrainedModel):
    """The decoder with its memory. `forward(input_ids)` reads each row (left padding removed by
    `attention_mask`) into a fresh memory state, or continues `cache`; returns the final hidden
    states of the positions asked for and the state."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [LongLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LongLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_memory(
        self,
        batch: int = 1,
        mem_top_k="config",
        mem_capacity="config",
        mem_logn_base=None,
        last_context_length=None,
        mem_dtype=None,
        device=None,
    ) -> LongLlamaMemoryCache:
        """An empty memory state for `batch` sequences (settings checked here: a ValueError names a
        setting that cannot work); pass it as `cache` to read a prompt into it."""
        s = MemorySettings.resolve(
            self.config, mem_top_k, mem_capacity, mem_logn_base, last_context_length, mem_dtype
        )
        dt = self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        return LongLlamaMemoryCache(s, [_Row(self, device, dt) for _ in range(batch)])

    # -- one row, one piece of tokens -------------------------------------------------------------
    def _cos_sin(self, pos):
        """cos and sin [T, 1, D] of positions `pos` (sin's first half negated, as `_rope` takes it)."""
        d = self.config.head_dim
        inv_freq = getattr(self, "_inv_freq", None)
        if inv_freq is None or inv_freq.device != pos.device:
            inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, d, 2, device=pos.device).float() / d)
            self._inv_freq = inv_freq
        ang = pos.float()[:, None] * inv_freq[None]
        sign = torch.ones(d, device=pos.device)
        sign[: d // 2] = -1.0
        return torch.cat([ang, ang], -1).cos()[:, None], (torch.cat([ang, ang], -1).sin() * sign)[:, None]

    def _piece(self, tokens, pos0, cache, memory, s: MemorySettings):
        """Tokens [T] at positions pos0.. of a local cache (per layer (k, v) [W, Hkv, D]; the new
        keys/values are written into slots pos0.. in place). Returns the final hidden states
        [T, E] (normed) and per memory layer the raw keys and values [T, Hkv, D]."""
        c = self.config
        h, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        t = tokens.shape[0]
        pos = pos0 + torch.arange(t, device=tokens.device)
        cos, sin = self._cos_sin(pos)
        x = self.embed_tokens(tokens)
        raw = {}
        logn = {}  # memory size -> log-n scale per position (every memory layer holds as many entries)
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            hx = layer.input_layernorm(x)
            q = att.q_proj(hx).view(t, h, d)
            k = att.k_proj(hx).view(t, hkv, d)
            v = att.v_proj(hx).view(t, hkv, d)
            if att.qk_norm:
                q = q * torch.rsqrt(q.float().pow(2).sum(-1, keepdim=True) + 1e-6).to(q.dtype)
                q = q * att.qk_temperature.to(q.dtype)[:, None]
                k = k * torch.rsqrt(k.float().pow(2).sum(-1, keepdim=True) + 1e-6).to(k.dtype)
            else:
                q = q * d**-0.5
            mem = memory.get(i) if att.is_memory else None
            if att.is_memory:
                raw[i] = (k, v)
                if s.logn_base:
                    size = 0 if mem is None else mem[0].shape[1]
                    if size not in logn:
                        scale = torch.log((size + pos + 1).float()) / math.log(s.logn_base)
                        logn[size] = torch.clamp(scale, min=1.0).to(q.dtype)[:, None, None]
                    q = q * logn[size]
            if att.use_rope:
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            ck, cv = cache[i]
            ck[pos0 : pos0 + t], cv[pos0 : pos0 + t] = k, v
            keys, vals = ck[: pos0 + t].transpose(0, 1).float(), cv[: pos0 + t].transpose(0, 1).float()
            if mem is not None and mem[0].shape[1] == 0:
                mem = None
            gate = getattr(att, "mem_gate", None) if mem is not None else None
            out = _attend(q.transpose(0, 1).float(), keys, vals, pos0, mem, s.top_k, s.dtype, gate)
            x = x + att.o_proj(out.transpose(0, 1).reshape(t, h * d).to(x.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x), raw

    def _write(self, row: _Row, layer: int, k, v, s: MemorySettings, cache: LongLlamaMemoryCache):
        """k, v [T, Hkv, D] appended to a memory layer's store, rounded to the store's dtype; beyond
        `capacity` the oldest entries go (once per generation, a warning says so)."""
        mk, mv = row.memory[layer]
        mk = torch.cat([mk, k.transpose(0, 1).to(s.dtype).float()], 1)
        mv = torch.cat([mv, v.transpose(0, 1).to(s.dtype).float()], 1)
        if s.capacity is not None and mk.shape[1] > s.capacity:
            if not cache.warned:
                warnings.warn(
                    f"LongLLaMA memory: the input holds more than mem_capacity={s.capacity} tokens "
                    "of memory; the oldest entries are dropped (FIFO)",
                    stacklevel=3,
                )
                cache.warned = True
            mk, mv = mk[:, -s.capacity :].contiguous(), mv[:, -s.capacity :].contiguous()
        row.memory[layer] = (mk, mv)

    def _extend(self, row: _Row, tokens, s, cache, keep: int):
        """Tokens after what the row holds: into its local cache (the whole cache moves to memory
        when full). Returns hidden states of the last `keep` tokens (0: all)."""
        w = self.config.max_position_embeddings
        outs, i, n_total = [], 0, len(tokens)
        while i < n_total:
            if row.cache_len == w:
                for layer in self.config.mem_layers:
                    self._write(row, layer, row.cache_raw[layer], row.cache[layer][1], s, cache)
                row.cache_len = 0
            n = min(n_total - i, w - row.cache_len)
            hidden, raw = self._piece(tokens[i : i + n], row.cache_len, row.cache, row.memory, s)
            for layer, (k, _) in raw.items():
                row.cache_raw[layer][row.cache_len : row.cache_len + n] = k
            row.cache_len += n
            if not keep or i + n > n_total - keep:
                outs.append(hidden)
            i += n
        out = torch.cat(outs) if outs else tokens.new_zeros((0, self.config.hidden_size), dtype=torch.float32)
        return out[-keep:] if keep else out

    def _ingest(self, row: _Row, tokens, s, cache, keep: int):
        """A fresh row reads a prompt: windows into memory, the last `last_context_length` tokens
        local. Hidden states of the last `keep` tokens (0: all)."""
        w = self.config.max_position_embeddings
        n_prefix = max(len(tokens) - s.last_context_length, 0)
        n_tail = len(tokens) - n_prefix
        outs = []
        if n_prefix:
            dt = self.embed_tokens.weight.dtype
            hkv, d = self.config.num_key_value_heads, self.config.head_dim
            scratch = [
                (
                    torch.empty(w, hkv, d, dtype=dt, device=tokens.device),
                    torch.empty(w, hkv, d, dtype=dt, device=tokens.device),
                )
                for _ in self.layers
            ]
            for start in range(0, n_prefix, w):
                end = min(start + w, n_prefix)
                hidden, raw = self._piece(tokens[start:end], 0, scratch, row.memory, s)
                if not keep or end > len(tokens) - keep:
                    outs.append(hidden)
                for layer, (k, v) in raw.items():
                    self._write(row, layer, k, v, s, cache)
        outs.append(self._extend(row, tokens[n_prefix:], s, cache, min(keep, n_tail) if keep else 0))
        out = torch.cat(outs)
        return out[-keep:] if keep else out

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache=None,
        past_key_values=None,
        use_cache=True,
        mem_top_k="config",
        mem_capacity="config",
        mem_logn_base=None,
        last_context_length=None,
        logits_to_keep=0,
        return_dict=True,
        **kwargs,
    ):
        """input_ids [B, T]: each row's new tokens (with a fresh state: the whole prompt, left
        padding marked by attention_mask). Returns `LongLlamaOutput` with last_hidden_state
        [B, T or logits_to_keep, E] and the state (`cache`)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("LongLLaMA reads token ids (input_ids), not inputs_embeds")
        state = cache if isinstance(cache, LongLlamaMemoryCache) else past_key_values
        b, t = input_ids.shape
        if not isinstance(state, LongLlamaMemoryCache):
            state = self.new_memory(
                b,
                mem_top_k=mem_top_k,
                mem_capacity=mem_capacity,
                mem_logn_base=mem_logn_base,
                last_context_length=last_context_length,
                device=input_ids.device,
            )
        fresh = state.consumed == 0  # an empty state reads a prompt; a used one continues it
        if len(state) != b:
            raise ValueError(
                f"the memory state holds {len(state)} rows, input_ids has {b} (beam search and "
                "changing batches are not supported with memory)"
            )
        s = state.settings
        keep = int(logits_to_keep) if isinstance(logits_to_keep, int) else 0
        width = keep or t
        out = torch.zeros(b, width, self.config.hidden_size, dtype=torch.float32, device=input_ids.device)
        for r in range(b):
            ids = input_ids[r]
            if attention_mask is not None:
                ids = ids[attention_mask[r, -t:].bool()]
            if len(ids) == 0:
                continue
            hidden = (self._ingest if fresh else self._extend)(state.rows[r], ids, s, state, keep)
            out[r, width - hidden.shape[0] :] = hidden.float()
        state.consumed += t
        return _output(state, last_hidden_state=out)


class LongLlamaForCausalLM(LongLlamaPreTrainedModel, GenerationMixin):
    """LongLLaMA with its language-model head; `generate()` reads prompts of any length with memory
    (memory settings as generate keyword arguments: mem_top_k, mem_capacity, mem_logn_base,
    last_context_length)."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.model = LongLlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return getattr(self, "lm_head", None)

    def new_memory(self, batch: int = 1, **settings) -> LongLlamaMemoryCache:
        """An empty memory state (`LongLlamaModel.new_memory`)."""
        return self.model.new_memory(batch, **settings)

    def _head(self, hidden):
        w = self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight
        return F.linear(hidden.to(w.dtype), w).float()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache=None,
        past_key_values=None,
        labels=None,
        use_cache=True,
        mem_top_k="config",
        mem_capacity="config",
        mem_logn_base=None,
        last_context_length=None,
        logits_to_keep=0,
        num_logits_to_keep=None,
        return_dict=True,
        **kwargs,
    ):
        keep = num_logits_to_keep if num_logits_to_keep is not None else logits_to_keep
        if labels is not None:
            keep = 0
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            past_key_values=past_key_values,
            mem_top_k=mem_top_k,
            mem_capacity=mem_capacity,
            mem_logn_base=mem_logn_base,
            last_context_length=last_context_length,
            logits_to_keep=keep,
            **kwargs,
        )
        logits = self._head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return _output(state_of(out), loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, past_key_values=None, attention_mask=None, **kwargs
    ):
        """The tokens the memory state has not read yet (all of them at the first step), the state,
        and the memory settings given to `generate`."""
        state = cache if isinstance(cache, LongLlamaMemoryCache) else past_key_values
        if not isinstance(state, LongLlamaMemoryCache):
            state = None  # a fresh generation (or a cache object generate made for us)
        consumed = state.consumed if state is not None else 0
        inputs = {
            "input_ids": input_ids[:, consumed:],
            "cache": state,
            "past_key_values": state,
            "attention_mask": attention_mask,
            "logits_to_keep": 1,
        }
        for name in ("mem_top_k", "mem_capacity", "mem_logn_base", "last_context_length"):
            if name in kwargs:
                inputs[name] = kwargs[name]
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):
        raise ValueError("beam search is not supported with LongLLaMA memory; use greedy or sampling")

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False

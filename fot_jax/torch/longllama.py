"""PyTorch LongLLaMA runtime (DESIGN "Memory attention", "Checkpoints and interop").

`load(directory)` reads a directory written by `fot-jax export` (or any LongLLaMA / LLaMA HF
directory in float32/bfloat16 safetensors) into `LongLlama`. `MemoryGenerator(model, top_k=...)`
ingests documents of any length by the LongLLaMA windowing: windows of W tokens with positions
restarting at 0, memory layers reading memory (top-k, or all of it) in the same softmax as their
causal local keys and then writing the window to memory; the last `last_context_length` tokens
stay as a local cache for generation, and the whole cache moves to memory when it would exceed W.
Memory keys are stored un-rotated (`mem_positionals` true: as if at position 0; false: memory
layers use no rotary embedding at all).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope(x, pos, theta):
    """x [T, H, D] at positions pos [T]: HF rotate_half layout."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


class LongLlama(torch.nn.Module):
    """Weights in HF layout ([out, in] matrices) and the config.json dict of an exported model."""

    def __init__(self, config: dict, tensors: dict, dtype=torch.float32):
        super().__init__()
        self.config = c = config
        ext = c.get("fot_jax") or {}
        self.qk_norm = ext.get("qk_norm", "none")
        if ext.get("mem_attention", "joint") != "joint":
            raise ValueError("fot_jax.torch runs joint (FoT) memory attention only; this model is gated")
        self.heads, self.kv_heads = (
            c["num_attention_heads"],
            c.get("num_key_value_heads") or c["num_attention_heads"],
        )
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.layers = c["num_hidden_layers"]
        self.mem_layers = set(c.get("mem_layers") or [])
        self.mem_positionals = bool(c.get("mem_positionals", True))
        self.theta = float(c.get("rope_theta", 10000.0))
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.window = int(c["max_position_embeddings"])
        self.last_context_length = int(c.get("last_context_length", 1024))
        self.w = {k: v.to(dtype) for k, v in tensors.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        for i in range(self.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                key = f"model.layers.{i}.self_attn.{name}.weight"
                if key not in self.w:
                    raise ValueError(f"tensor '{key}' missing from the checkpoint")

    def _p(self, i, name):
        return self.w[f"model.layers.{i}.{name}"]

    def forward_tokens(self, tokens, pos0, cache, memory, top_k, select_dtype=torch.float32, logn_base=0):
        """One document's new tokens [T] at positions pos0.. ; cache: per layer (k, v) buffers
        [W, Hkv, D] whose first pos0 slots hold the earlier tokens (slot j at position j), keys as
        the layer attends to them (rotated at their positions where it uses RoPE: the cache is
        never rotated again); the new tokens' keys and values are written into slots pos0.. in
        place. memory: per memory layer (k [Hkv,N,D], v) or None. Returns logits [T, V] (float32)
        and per layer the new tokens' raw keys [T, Hkv, D] (what memory stores) and values.
        `select_dtype`: the precision top-k selection scores queries in (the store's dtype, as
        fot_jax's exact search does); the selected entries' scores are float32. `logn_base`: a
        memory layer's queries x max(1, ln n / ln logn_base), n the memory entries and local keys
        a query sees (0: off)."""
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        t = tokens.shape[0]
        pos = pos0 + torch.arange(t)
        x = self.w["model.embed_tokens.weight"][tokens]
        new_kv = []
        for i in range(self.layers):
            hx = _rms(x, self._p(i, "input_layernorm.weight"), self.eps)
            q = (hx @ self._p(i, "self_attn.q_proj.weight").T).view(t, h, d)
            k = (hx @ self._p(i, "self_attn.k_proj.weight").T).view(t, hkv, d)
            v = (hx @ self._p(i, "self_attn.v_proj.weight").T).view(t, hkv, d)
            is_mem = i in self.mem_layers
            if self.qk_norm == "all" or (self.qk_norm == "memory" and is_mem):
                temp = self._p(i, "self_attn.qk_temperature")
                q = q * torch.rsqrt(q.float().pow(2).sum(-1, keepdim=True) + 1e-6).to(q.dtype) * temp[:, None]
                k = k * torch.rsqrt(k.float().pow(2).sum(-1, keepdim=True) + 1e-6).to(k.dtype)
            else:
                q = q * d ** -0.5
            new_kv.append((k, v))
            mem = memory.get(i) if (memory is not None and is_mem) else None
            if is_mem and logn_base:
                n = (0 if mem is None else mem[0].shape[1]) + pos + 1
                scale = torch.log(n.float()) / torch.log(torch.tensor(float(logn_base)))
                q = q * torch.clamp(scale, min=1.0).to(q.dtype)[:, None, None]
            if not (is_mem and not self.mem_positionals):
                q, k = _rope(q, pos, self.theta), _rope(k, pos, self.theta)
            ck, cv = cache[i]
            ck[pos0: pos0 + t], cv[pos0: pos0 + t] = k, v
            keys, vals = ck[: pos0 + t].transpose(0, 1).float(), cv[: pos0 + t].transpose(0, 1).float()
            if mem is not None and mem[0].shape[1] == 0:
                mem = None
            out = _attend(q.transpose(0, 1).float(), keys, vals, pos0, mem, top_k, select_dtype)  # [H, T, D]
            out = out.transpose(0, 1).reshape(t, h * d).to(x.dtype)
            x = x + out @ self._p(i, "self_attn.o_proj.weight").T
            hm = _rms(x, self._p(i, "post_attention_layernorm.weight"), self.eps)
            x = (
                x
                + (
                    F.silu(hm @ self._p(i, "mlp.gate_proj.weight").T)
                    * (hm @ self._p(i, "mlp.up_proj.weight").T)
                )
                @ self._p(i, "mlp.down_proj.weight").T
            )
        x = _rms(x, self.w["model.norm.weight"], self.eps)
        return (x @ self.w["lm_head.weight"].T).float(), new_kv


def _attend(q, keys, vals, pos0, mem, top_k, select_dtype=torch.float32):
    """Attention of q [H, T, D] (scaled, float32) over the local keys/values [Hkv, S+T, D]
    (causal: query j sees slots up to pos0 + j) and, with mem = (k, v) [Hkv, N, D], over memory
    in the same softmax: every entry (top_k None or >= N) or each query's top_k entries.
    Dense and memory-free attention run through `scaled_dot_product_attention`; a decode step
    (T = 1) scores memory in place rather than copy it beside the cache."""
    h, t, d = q.shape
    hkv = keys.shape[0]
    g = h // hkv
    n_local = keys.shape[1]
    causal = torch.arange(n_local)[None, :] <= pos0 + torch.arange(t)[:, None]          # [T, S+T]
    dense = mem is not None and (top_k is None or top_k >= mem[0].shape[1])
    if mem is None or (dense and t > 1):
        if mem is not None:      # one softmax over [memory; local]: memory is visible to every query
            keys, vals = torch.cat([mem[0], keys], 1), torch.cat([mem[1], vals], 1)
            causal = torch.cat([torch.ones(t, mem[0].shape[1], dtype=torch.bool), causal], 1)
        return F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=causal, scale=1.0,
                                              enable_gqa=g > 1)[0]
    qg = q.view(hkv, g, t, d)
    s = torch.einsum("hgtd,hsd->hgts", qg, keys).masked_fill(~causal, float("-inf"))
    mk, mv = mem
    sm = torch.einsum("hgtd,hnd->hgtn", qg, mk)
    if dense:
        p = torch.softmax(torch.cat([sm, s], -1), -1)
        out = torch.einsum("hgtn,hnd->hgtd", p[..., : sm.shape[-1]], mv)
    else:  # top-k: gather the chosen values, [Hkv, G, T, k, D] (k small)
        sel = (
            sm
            if select_dtype == torch.float32
            else torch.einsum("hgtd,hnd->hgtn", qg.to(select_dtype).float(), mk)
        )
        idx = torch.topk(sel, top_k, dim=-1).indices
        sm = torch.gather(sm, -1, idx)
        mvals = mv[torch.arange(hkv)[:, None, None, None], idx]
        p = torch.softmax(torch.cat([sm, s], -1), -1)
        out = torch.einsum("hgtn,hgtnd->hgtd", p[..., :top_k], mvals)
    out = out + torch.einsum("hgts,hsd->hgtd", p[..., -n_local:], vals)
    return out.reshape(h, t, d)


def load(directory: str, dtype=torch.float32) -> LongLlama:
    """An exported directory (config.json + model.safetensors or shards with an index)."""
    from safetensors.torch import load_file
    config = json.load(open(os.path.join(directory, "config.json")))
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (
        sorted(set(json.load(open(index))["weight_map"].values()))
        if os.path.exists(index)
        else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(directory, f)))
    return LongLlama(config, tensors, dtype)


class MemoryGenerator:
    """One document at a time: ingest (LongLLaMA windowing), then generate. `top_k=None`: dense
    memory attention (every entry); `capacity`: FIFO size of each memory layer's store."""

    def __init__(self, model: LongLlama, top_k: int | None = None, capacity: int | None = None,
                 last_context_length: int | None = None, mem_dtype=None, logn_base: int | None = None):
        self.model, self.top_k, self.capacity = model, top_k, capacity
        recorded = (model.config.get("fot_jax_memory") or {}).get("logn_base", 0)
        self.logn_base = int(recorded if logn_base is None else logn_base)
        self.c = min(last_context_length or model.last_context_length, model.window)
        dt = mem_dtype or model.config.get("mem_dtype", "bfloat16")
        self.mem_dtype = getattr(torch, dt) if isinstance(dt, str) else dt
        self.reset()

    def reset(self):
        m = self.model
        self.memory = {l: (torch.zeros(m.kv_heads, 0, m.head_dim), torch.zeros(m.kv_heads, 0, m.head_dim))
                       for l in m.mem_layers}
        dt = m.w["model.embed_tokens.weight"].dtype
        # per layer (k, v) [W, Hkv, D]: keys as the layer attends to them (rotated where RoPE)
        self.cache = [(torch.zeros(m.window, m.kv_heads, m.head_dim, dtype=dt),
                       torch.zeros(m.window, m.kv_heads, m.head_dim, dtype=dt)) for _ in range(m.layers)]
        self.cache_raw = {l: torch.zeros(m.window, m.kv_heads, m.head_dim, dtype=dt) for l in m.mem_layers}
        self.cache_len = 0

    def _write(self, layer, k, v):
        """k, v [T, Hkv, D] -> appended to the layer's store (the oldest dropped beyond capacity).
        Entries are rounded to `mem_dtype` (the store's precision) and kept as float32, so that no
        step converts the whole store again."""
        mk, mv = self.memory[layer]
        mk = torch.cat([mk, k.transpose(0, 1).to(self.mem_dtype).float()], 1)
        mv = torch.cat([mv, v.transpose(0, 1).to(self.mem_dtype).float()], 1)
        if self.capacity is not None and mk.shape[1] > self.capacity:
            mk, mv = mk[:, -self.capacity:].contiguous(), mv[:, -self.capacity:].contiguous()
        self.memory[layer] = (mk, mv)

    def _window_cache(self):
        m = self.model
        dt = m.w["model.embed_tokens.weight"].dtype
        return [(torch.empty(m.window, m.kv_heads, m.head_dim, dtype=dt),
                 torch.empty(m.window, m.kv_heads, m.head_dim, dtype=dt)) for _ in range(m.layers)]

    @torch.no_grad()
    def ingest(self, tokens, return_logits: bool = False):
        """A document's tokens (memory reset first). Returns the last token's logits [V] (or all
        logits [L, V])."""
        self.reset()
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        w = self.model.window
        n_prefix = max(len(tokens) - self.c, 0)
        outs = []
        scratch = self._window_cache() if n_prefix else None   # a window's own keys, dropped after it
        for s in range(0, n_prefix, w):
            logits, kv = self.model.forward_tokens(tokens[s: min(s + w, n_prefix)], 0, scratch, self.memory,
                                                   self.top_k, self.mem_dtype, self.logn_base)
            outs.append(logits)
            for l in self.model.mem_layers:
                self._write(l, *kv[l])
        logits = self.extend(tokens[n_prefix:])
        outs.append(logits)
        return torch.cat(outs) if return_logits else outs[-1][-1]

    @torch.no_grad()
    def extend(self, tokens):
        """More tokens after what was ingested (one piece per fit in the window). Returns logits [T, V]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        outs = []
        i = 0
        while i < len(tokens):
            if self.cache_len == self.model.window:  # the whole cache moves to memory (raw keys)
                for l in self.model.mem_layers:
                    self._write(l, self.cache_raw[l], self.cache[l][1])
                self.cache_len = 0
            n = min(len(tokens) - i, self.model.window - self.cache_len)
            logits, kv = self.model.forward_tokens(tokens[i: i + n], self.cache_len, self.cache,
                                                   self.memory, self.top_k, self.mem_dtype, self.logn_base)
            for l in self.model.mem_layers:
                self.cache_raw[l][self.cache_len: self.cache_len + n] = kv[l][0]
            self.cache_len += n
            outs.append(logits)
            i += n
        return torch.cat(outs) if outs else torch.zeros(0, self.model.w["lm_head.weight"].shape[0])

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, seed: int = 0):
        """Greedy (temperature 0) or nucleus sampling after ingesting `tokens`. Returns token ids."""
        gen = torch.Generator().manual_seed(seed)
        eos = self.model.config.get("eos_token_id") if eos_token_id is None else eos_token_id
        logits = self.ingest(tokens)
        out = []
        vocab = self.model.config["vocab_size"]
        for _ in range(max_new_tokens):
            lg = logits[:vocab].float()
            if temperature == 0:
                nxt = int(torch.argmax(lg))
            else:
                probs = torch.softmax(lg / temperature, -1)
                sp, order = torch.sort(probs, descending=True)
                keep = (torch.cumsum(sp, -1) - sp) < top_p
                sp = torch.where(keep, sp, torch.zeros_like(sp))
                nxt = int(order[torch.multinomial(sp / sp.sum(), 1, generator=gen)])
            out.append(nxt)
            if nxt == eos:
                break
            logits = self.extend([nxt])[-1]
        return out

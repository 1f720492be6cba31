"""fot_jax.torch: exported models under PyTorch, as a thin layer over the transformers model that
every export carries (`modeling_longllama.py`, the same file `AutoModelForCausalLM` loads with
`trust_remote_code=True`): one implementation of LongLLaMA memory in PyTorch.

`load(directory)` reads an exported directory (or any LongLLaMA / LLaMA HF directory in
safetensors) into `LongLlamaForCausalLM`. `MemoryGenerator(model, top_k=...)` reads one document
at a time: `ingest` (windows into memory, the last `last_context_length` tokens local), `extend`,
and greedy or nucleus `generate`.
"""
from __future__ import annotations

import torch
import transformers

from fot_jax.torch.configuration_longllama import LongLlamaConfig
from fot_jax.torch.modeling_longllama import LongLlamaForCausalLM


def dtype_kwargs(dtype) -> dict:
    """`from_pretrained`'s dtype argument under this transformers (`dtype` from 5, `torch_dtype`
    before)."""
    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": dtype}


def load(directory: str, dtype=torch.float32) -> LongLlamaForCausalLM:
    """An exported directory (config.json + safetensors) as `LongLlamaForCausalLM`, in eval mode."""
    config = LongLlamaConfig.from_pretrained(directory)
    model = LongLlamaForCausalLM.from_pretrained(directory, config=config, **dtype_kwargs(dtype))
    return model.eval()


class MemoryGenerator:
    """One document at a time: ingest (LongLLaMA windowing), extend, generate. `top_k=None`: dense
    memory attention (every entry); `capacity`: FIFO size of each memory layer's store;
    `logn_base` None: the model's (`mem_logn_base`, which the export records)."""

    def __init__(self, model: LongLlamaForCausalLM, top_k: int | None = None, capacity: int | None = None,
                 last_context_length: int | None = None, mem_dtype=None, logn_base: int | None = None):
        self.model = model
        self.settings = dict(mem_top_k=top_k, mem_capacity=capacity, mem_logn_base=logn_base,
                             last_context_length=last_context_length)
        self.mem_dtype = mem_dtype
        self.state = None

    def _run(self, tokens, keep: int, fresh: bool):
        ids = torch.as_tensor(tokens, dtype=torch.long)[None]
        if fresh:
            self.state = self.model.new_memory(1, mem_dtype=self.mem_dtype, **self.settings)
        return self.model(ids, cache=self.state, logits_to_keep=keep).logits[0]

    @torch.no_grad()
    def ingest(self, tokens, return_logits: bool = False):
        """A document's tokens (memory reset first). Returns the last token's logits [V] (or all
        logits [L, V])."""
        logits = self._run(tokens, 0 if return_logits else 1, fresh=True)
        return logits if return_logits else logits[-1]

    @torch.no_grad()
    def extend(self, tokens):
        """More tokens after what was read. Returns their logits [T, V]."""
        return self._run(tokens, 0, fresh=False)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, seed: int = 0):
        """Greedy (temperature 0) or nucleus sampling after ingesting `tokens`. Returns token ids."""
        gen = torch.Generator().manual_seed(seed)
        eos = self.model.config.eos_token_id if eos_token_id is None else eos_token_id
        logits = self.ingest(tokens)
        out = []
        for _ in range(max_new_tokens):
            lg = logits.float()
            if temperature == 0:
                nxt = int(torch.argmax(lg))
            else:
                probs = torch.softmax(lg / temperature, -1)
                sp, order = torch.sort(probs, descending=True)
                keep = (torch.cumsum(sp, -1) - sp) < top_p
                sp = torch.where(keep, sp, torch.zeros_like(sp))
                nxt = int(order[torch.multinomial(sp / sp.sum(), 1, generator=gen)])
            out.append(nxt)
            if nxt == eos or len(out) == max_new_tokens:
                break
            logits = self.extend([nxt])[-1]
        return out

"""`fot-jax generate`: ingest prompts of any length into a workdir's model (memory layers fill their
stores window by window) and generate, streaming text for a single text prompt."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from fot_jax.errors import UsageError


@dataclasses.dataclass
class GenerateRequest:
    """What to generate from; the fields are `fot-jax generate`'s flags."""

    workdir: str
    prompt: list[str] | None = None          # texts, through the tokenizer
    prompt_file: list[str] | None = None     # text files
    tokens: list[str] | None = None          # token ids as text: '1 5 9'
    tokens_file: list[str] | None = None     # token ids as text, or .npy
    chat: bool = False
    tokenizer: str | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def compilation_cache() -> None:
    """JAX's persistent compilation cache ($FOT_JAX_COMPILATION_CACHE, default ~/.cache/fot_jax/xla;
    "" turns it off): a second `fot-jax generate` with the same shapes skips compiling."""
    path = os.environ.get(
        "FOT_JAX_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fot_jax", "xla")
    )
    if not path:
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _token_prompts(req: GenerateRequest) -> list[np.ndarray]:
    from fot_jax.data.tokenizer import parse_token_ids
    prompts = [parse_token_ids(item) for item in req.tokens or []]
    for path in req.tokens_file or []:
        if path.endswith(".npy"):
            prompts.append(np.load(path).astype(np.int32).reshape(-1))
        else:
            with open(path) as f:
                prompts.append(parse_token_ids(f.read()))
    return prompts


def text_prompts(req: GenerateRequest, cfg):
    """(tokenizer, token ids) of the text prompts (with `chat`, through the model's chat template)."""
    from fot_jax.data.text import workdir_tokenizer
    from fot_jax.data.tokenizer import apply_chat_template, chat_template, check_vocab
    tok, source = workdir_tokenizer(req.workdir, cfg, req.tokenizer)
    check_vocab(tok, cfg.model)
    texts = list(req.prompt or [])
    for path in req.prompt_file or []:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    template = chat_template(tok.path) if req.chat else None
    if req.chat and template is None:
        raise UsageError(f"--chat, but the tokenizer in {source} has no chat template "
                         "(chat_template.jinja or tokenizer_config.json); leave out --chat")
    ids = []
    for text in texts:
        if template is not None:
            # the template writes bos (and any eos) where the model wants them
            ids.append(tok.encode_with_special_tokens(apply_chat_template(template, tok, text)))
        else:
            ids.append(tok.encode(text, bos=True))
    return tok, [np.asarray(i, np.int32) for i in ids]


def run_generate(req: GenerateRequest, overrides=(), out=None, log=None) -> list[np.ndarray]:
    """Generates for every prompt of `req` and prints the result to `out`: the text as it grows for
    one text prompt, a JSON line per prompt otherwise; timings go to `log` (default: standard output
    and standard error). Returns the new ids."""
    out = out or sys.stdout
    log = log or sys.stderr
    from fot_jax.checkpoint import load_model
    from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
    texts = bool(req.prompt or req.prompt_file)
    if not (req.tokens or req.tokens_file or texts):
        raise UsageError("give a prompt: --prompt TEXT, --prompt-file FILE, or token ids with "
                         "--tokens '1 3 7 ...' / --tokens-file")
    if texts and (req.tokens or req.tokens_file):
        raise UsageError("give either text prompts (--prompt, --prompt-file) or token ids "
                         "(--tokens, --tokens-file), not both")
    prompts = _token_prompts(req)
    cfg, model = load_model(req.workdir, overrides=overrides)
    tok = None
    if texts:
        tok, prompts = text_prompts(req, cfg)
    rt = MemoryRuntime(model, len(prompts), MemorySettings.from_config(cfg))
    start = time.perf_counter()
    first = []
    stream = tok is not None and len(prompts) == 1
    shown = {"ids": [], "text": ""}

    def on_token(row, token):
        if not first:
            first.append(time.perf_counter() - start)
        if stream:                        # print the decoded text as it grows
            shown["ids"].append(token)
            text = tok.decode([t for t in shown["ids"] if t != cfg.model.eos_token_id])
            print(text[len(shown["text"]):], end="", flush=True, file=out)
            shown["text"] = text

    outs = rt.generate(prompts, req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                       seed=req.seed, on_token=on_token)
    total = time.perf_counter() - start
    n = sum(len(o) for o in outs)
    if stream:
        print(file=out)
    elif tok is not None:
        for o in outs:
            print(json.dumps({"generated_text": tok.decode([t for t in o if t != cfg.model.eos_token_id])}),
                  file=out)
    else:
        for prompt, o in zip(prompts, outs):
            print(json.dumps({"prompt_tokens": int(prompt.size), "generated": o.tolist()}), file=out)
    if first:
        after = total - first[0]
        rate = f", then {(n - len(outs)) / after:.1f} tokens/s" if n > len(outs) and after > 0 else ""
        print(f"fot-jax generate: {n} tokens in {total:.2f} s; first token after {first[0]:.2f} s "
              f"(prompt ingest and compilation){rate}", file=log)
    return outs

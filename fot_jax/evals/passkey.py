"""Passkey retrieval (the LongLLaMA / landmark-attention prompt).

A task line, filler ("The grass is green. ..." repeated), the needle "The pass key is {K}.
Remember it. {K} is the pass key." at a chosen depth, more filler, and the question "What is the
pass key? The pass key is". K is drawn from 1..50000 and the depth from [0, 1) per seed. Prompts
are sized by token count (within one filler sentence below the target). The model generates
greedily; a hit is when its first tokens equal the tokens of " K" as they follow the prompt.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from fot_jax.infer.runtime import MemoryRuntime, MemorySettings

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def _text(n_before: int, n_after: int, key: int) -> str:
    return " ".join([TASK] + [FILLER] * n_before + [NEEDLE.format(key=key)] + [FILLER] * n_after + [QUESTION])


def make_prompt(tokenizer, length: int, depth: float, key: int, bos: bool = True):
    """(prompt ids, answer ids): the longest prompt of at most `length` tokens with the needle
    after a `depth` share of the filler."""
    per = max(len(tokenizer.encode(" ".join([FILLER] * 8))) / 8.0, 1.0)
    fixed = len(tokenizer.encode(_text(0, 0, key)))
    total = max(int((length - fixed - int(bos)) / per), 0)
    while True:
        before = int(round(total * depth))
        ids = tokenizer.encode(_text(before, total - before, key), bos=bos)
        if len(ids) <= length or total == 0:
            break
        total -= 1
    if len(ids) > length:
        raise ValueError(f"a passkey prompt needs at least {len(ids)} tokens; {length} is too short")
    with_answer = tokenizer.encode(_text(before, total - before, key) + f" {key}", bos=bos)
    answer = with_answer[len(ids):] if with_answer[: len(ids)] == ids else tokenizer.encode(f" {key}")
    return np.asarray(ids, np.int32), [int(a) for a in answer]


def prompts(tokenizer, length: int, seeds: int):
    """The passkey prompts of one length: [(prompt ids, answer ids, key)], seed s drawing its key and
    depth from rng([length, s]), so every runtime reads the same prompts."""
    out = []
    for s in range(seeds):
        rng = np.random.default_rng([int(length), s])
        key, depth = int(rng.integers(1, 50001)), float(rng.random())
        ids, ans = make_prompt(tokenizer, length, depth, key)
        out.append((ids, ans, key))
    return out


def _capacity(length: int, window: int) -> int:
    return max(-(-int(length) // window) * window, window)


def _row(length, batch, outs, seconds, tokenizer, log, engine=""):
    hits, samples = 0, []
    for (ids, ans, key), out in zip(batch, outs):
        out = [int(t) for t in out]
        ok = out[: len(ans)] == ans
        hits += ok
        samples.append({"key": key, "generated": out, "hit": bool(ok)})
        log(f"  passkey {length}{engine}: key {key}, generated {tokenizer.decode(out)!r} "
            f"{'hit' if ok else 'miss'}")
    log(f"passkey {length:>7,} tokens{engine}: {hits}/{len(batch)} ({seconds:.1f}s)")
    return {"length": int(length), "prompt_tokens": int(max(len(p[0]) for p in batch)), "hits": hits,
            "trials": len(batch), "accuracy": hits / len(batch), "seconds": seconds, "samples": samples}


def _progress(log, length: int, first: int, batch: int, seeds: int, every: float = 60.0):
    """A progress callback for one batch of prompts: at most one line per `every` seconds with the
    windows read, tokens/s and the time left for this length."""
    start, last = time.perf_counter(), [time.perf_counter()]

    def report(done: int, total: int):
        now = time.perf_counter()
        if now - last[0] < every and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)                       # windows per second
        left = (total - done) / rate + (seeds - first - batch) / batch * total / rate
        tokens = done * length / max(total, 1) * batch
        log(f"  passkey {length:,}: prompts {first + 1}-{first + batch} of {seeds}, window {done}/{total}, "
            f"{tokens / (now - start):,.0f} tokens/s, about {left / 60:.0f} min left for this length")
    return report


def passkey(model, tokenizer, settings: MemorySettings, lengths, seeds: int = 5, batch: int | None = None,
            log=print) -> list[dict]:
    """Rows {length, prompt_tokens, hits, trials, accuracy, seconds, samples} (one per length;
    samples: key, generated ids and hit per seed). Each length runs with a memory that holds its
    whole prompt (capacity: the prompt rounded up to windows), so no needle is ever dropped by FIFO
    and no store is larger than it needs to be."""
    if settings.mode != "single_doc":
        raise ValueError("passkey needs memory.mode='single_doc' (each prompt starts with an empty memory)")
    rows = []
    runtimes = {}
    window = model.config.max_position_embeddings
    for length in lengths:
        needed = dataclasses.replace(settings, capacity=_capacity(length, window))
        start = time.perf_counter()
        todo = prompts(tokenizer, length, seeds)
        outs = []
        b = batch or seeds
        for i in range(0, seeds, b):
            chunk = todo[i: i + b]
            if (len(chunk), needed.capacity) not in runtimes:  # one runtime per shape: compiled once
                runtimes = {(len(chunk), needed.capacity): MemoryRuntime(model, len(chunk), needed)}
            rt = runtimes[(len(chunk), needed.capacity)]
            report = _progress(log, length, i, len(chunk), seeds)
            outs += rt.generate([p[0] for p in chunk], max(len(p[1]) for p in chunk), stop_token=-1,
                                progress=report)
        rows.append(_row(length, todo, outs, time.perf_counter() - start, tokenizer, log))
    return rows


def passkey_torch(export_dir: str, tokenizer, settings: MemorySettings, lengths, seeds: int = 5,
                  threads: int | None = None, log=print) -> list[dict]:
    """The same prompts through an export's own modeling code, the way a transformers user runs it:
    `AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)` in float32 and greedy
    `generate()` with the memory settings as keyword arguments (one prompt at a time)."""
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    model.config.mem_dtype = settings.dtype        # the store's precision is a config field
    window = model.config.max_position_embeddings
    rows = []
    for length in lengths:
        start = time.perf_counter()
        todo = prompts(tokenizer, length, seeds)
        outs = []
        for ids, ans, _ in todo:
            with torch.no_grad():
                out = model.generate(
                    torch.as_tensor(ids, dtype=torch.long)[None], max_new_tokens=len(ans), do_sample=False,
                    eos_token_id=None, pad_token_id=0,
                    mem_top_k=None if settings.search == "dense" else settings.top_k,
                    mem_capacity=_capacity(length, window), mem_logn_base=settings.logn_base,
                    last_context_length=settings.last_context_length)
            outs.append(out[0, len(ids):].tolist())
        rows.append(_row(length, todo, outs, time.perf_counter() - start, tokenizer, log, " (PyTorch)"))
    return rows


def plot_passkey(results: dict, path: str):
    """results: label -> rows of `passkey`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in results.items():
        ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

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


def passkey(model, tokenizer, settings: MemorySettings, lengths, seeds: int = 5, batch: int | None = None,
            log=print) -> list[dict]:
    """Rows {length, prompt_tokens, hits, trials, accuracy, seconds} (one per length). Each length
    runs with a memory that holds its whole prompt (capacity: the prompt rounded up to windows),
    so no needle is ever dropped by FIFO and no store is larger than it needs to be."""
    if settings.mode != "single_doc":
        raise ValueError("passkey needs memory.mode='single_doc' (each prompt starts with an empty memory)")
    rows = []
    runtimes = {}
    window = model.config.max_position_embeddings
    for length in lengths:
        needed = dataclasses.replace(settings, capacity=max(-(-int(length) // window) * window, window))
        start = time.perf_counter()
        prompts, answers, keys = [], [], []
        for s in range(seeds):
            rng = np.random.default_rng([int(length), s])
            key, depth = int(rng.integers(1, 50001)), float(rng.random())
            ids, ans = make_prompt(tokenizer, length, depth, key)
            prompts.append(ids)
            answers.append(ans)
            keys.append(key)
        hits = 0
        b = batch or seeds
        for i in range(0, seeds, b):
            chunk = prompts[i: i + b]
            if (len(chunk), needed.capacity) not in runtimes:  # one runtime per shape: compiled once
                runtimes = {(len(chunk), needed.capacity): MemoryRuntime(model, len(chunk), needed)}
            rt = runtimes[(len(chunk), needed.capacity)]
            outs = rt.generate(chunk, max(len(a) for a in answers[i: i + b]), stop_token=-1)
            for out, ans, key in zip(outs, answers[i: i + b], keys[i: i + b]):
                ok = list(out[: len(ans)]) == ans
                hits += ok
                log(
                    f"  passkey {length}: key {key}, generated {tokenizer.decode(out)!r} "
                    f"{'hit' if ok else 'miss'}"
                )
        rows.append({"length": int(length), "prompt_tokens": int(max(len(p) for p in prompts)), "hits": hits,
                     "trials": seeds, "accuracy": hits / seeds, "seconds": time.perf_counter() - start})
        log(f"passkey {length:>7,} tokens: {hits}/{seeds} ({time.perf_counter() - start:.1f}s)")
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

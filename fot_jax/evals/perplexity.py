"""Long-document perplexity against memory size (the paper's tables of perplexity vs context).

For held-out documents, the scored tokens are the last `c = last_context_length` tokens of spans
that end at several points of each long document. With memory size M the model reads the M
tokens before the span (windows of W through the memory layers, into a store that holds them all)
and then the span itself as its local cache; M = 0 reads the span alone. Every M scores the same
tokens, so the perplexities compare directly. Single-doc: the memory holds only the span's own
document. Multi-doc (`mode="multi_doc"`): before the document, the store also holds `M` tokens of
other held-out documents (the memory is never cleared), so retrieval has to find the right
document among others, as in the paper's multi-document setting.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from fot_jax.infer.runtime import MemoryRuntime, MemorySettings

DEFAULT_MEMORY_SIZES = (0, 2048, 8192, 32768)


def spans(docs, need: int, per_doc: int, stride: int):
    """(doc index, end) of up to `per_doc` spans per document, each with `need` tokens before its end."""
    out = []
    for i, d in enumerate(docs):
        end = len(d)
        for _ in range(per_doc):
            if end < need:
                break
            out.append((i, end))
            end -= stride
    return out


def _nll(logits, targets):
    logits = logits.astype(np.float64)
    mx = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - mx).sum(-1)) + mx[:, 0]
    return logz - logits[np.arange(len(targets)), targets]


def perplexity_vs_memory(cfg, model, docs, memory_sizes=DEFAULT_MEMORY_SIZES, per_doc: int = 4,
                         batch: int = 4, mode: str = "single_doc", top_k: int | None = None,
                         span_memory: int | None = None, log=print) -> list[dict]:
    """Rows {memory_tokens, perplexity, tokens_scored, spans, seconds, span_nll} (span_nll: each span's
    mean negative log-likelihood, the same spans at every size) and, after the first size,
    `change` (perplexity / the first size's - 1) with `change_se`, its standard error from the
    paired per-span differences (the same tokens scored at both sizes). The spans are those with room
    for `span_memory` tokens of memory (default: the largest size), so runs split over several
    processes (`--sizes 0,2048 --span-memory 32768` and `--sizes 32768`) score the same tokens."""
    if mode not in ("single_doc", "multi_doc"):
        raise ValueError(f"mode must be single_doc or multi_doc, got {mode!r}")
    w = int(cfg.model.max_position_embeddings)
    c = min(int(cfg.model.last_context_length), w)   # the runtime's local cache holds at most a window
    top = max(memory_sizes) if span_memory is None else int(span_memory)
    if top < max(memory_sizes):
        raise ValueError(f"span_memory {top} is below the largest memory size {max(memory_sizes)}")
    chosen = spans(docs, top + c + 1, per_doc, stride=max(c * 8, 1024))
    if not chosen:
        longest = max((len(d) for d in docs), default=0)
        raise ValueError(f"no held-out document has {top + c + 1} tokens (memory {top} + scored {c} + 1); "
                         f"the longest has {longest}: lower the largest memory size")
    rows = []
    others_of = {}   # multi-doc: the other documents' tokens, per document
    for m in memory_sizes:
        t0 = time.perf_counter()
        base = MemorySettings.from_config(cfg)
        extra = m if mode == "multi_doc" else 0
        settings = dataclasses.replace(base, capacity=m + extra + w, mode="single_doc", overflow="fifo",
                                       top_k=top_k or base.top_k)
        total, count, span_nll = 0.0, 0, []
        rows_b = min(batch, len(chosen))
        rt = MemoryRuntime(model, rows_b, settings)   # one runtime (compiled once) per memory size
        for start in range(0, len(chosen), rows_b):
            group = chosen[start: start + rows_b]
            real = len(group)
            group = group + [group[-1]] * (rows_b - real)   # pad the last batch; padding is not scored
            inputs, targets = [], []
            for k, (i, end) in enumerate(group):
                d = np.asarray(docs[i], np.int32)
                # m + c inputs whose last c logits predict the scored tokens d[end - c: end]
                x = d[end - c - m - 1: end - 1]
                if extra:
                    # multi-doc: other held-out documents' tokens first, then this one's
                    if i not in others_of:
                        others_of[i] = np.concatenate([np.asarray(docs[j], np.int32)
                                                       for j in range(len(docs)) if j != i])
                    others = others_of[i]
                    off = (k * 7919 + start) % max(len(others) - extra, 1)
                    x = np.concatenate([others[off: off + extra], x])
                inputs.append(x)
                targets.append(d[end - c: end])
            _, tail = rt.ingest(inputs, return_logits="tail")
            for lg, tg in zip(tail[:real], targets[:real]):
                lg = np.asarray(lg)[-c:]
                nll = _nll(lg, tg)
                total += float(nll.sum())
                count += len(tg)
                span_nll.append(float(nll.mean()))
        ppl = math.exp(total / count)
        row = {"memory_tokens": m, "perplexity": ppl, "tokens_scored": count, "spans": len(chosen),
               "seconds": time.perf_counter() - t0, "span_nll": span_nll}
        change = ""
        if rows:
            diff = np.array(span_nll) - np.array(rows[0]["span_nll"])
            se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
            row["change"] = ppl / rows[0]["perplexity"] - 1
            row["change_se"] = math.exp(float(diff.mean())) * se     # delta method on exp(mean)
            change = f", {row['change']:+.1%} ± {row['change_se']:.1%} vs {rows[0]['memory_tokens']:,}"
        rows.append(row)
        log(f"memory {m:>7,} tokens ({mode}): perplexity {ppl:.3f} over {count} tokens "
            f"({len(chosen)} spans, {row['seconds']:.0f} s{change})")
    return rows


def plot_perplexity(results: dict, path: str):
    """results: {label: rows}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in results.items():
        xs = [max(r["memory_tokens"], 1) for r in rows]
        ax.plot(xs, [r["perplexity"] for r in rows], marker="o", label=label)
    ax.set_xscale("symlog", linthresh=1024)
    ax.set_xlabel("tokens in memory (0: the scored window alone)")
    ax.set_ylabel("perplexity of the last window")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

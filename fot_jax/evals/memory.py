"""The paper's memory results at CPU scale (FoT arXiv 2307.03170).

`memory_scaling`: dictionary lookup accuracy against the number of dictionary tokens in memory
(the paper's "Accuracy vs number of dictionary tokens"). A document of `M` definition tokens and
a query window; the FoT model reads the definitions window by window into memory (LongLLaMA
windowing, `fot_jax.infer.runtime`) and answers the queries from its top-k retrievals. A baseline
without memory sees what its context holds: the last `W_b` tokens.

`distraction`: the share of a memory layer's attention that falls on the document's own previous
context (the paper's "positive attention mass") when that context is in memory with `d - 1`
contexts of other documents, for models trained with different crossbatch ranges.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot_jax.data import dictionary
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings, store_bytes
from fot_jax.model.rope import apply_rope, rope_cos_sin

DEFAULT_SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)


def _doc(cfg, index, definition_tokens, split, seed):
    """A dictionary document whose definitions (bos included) span `definition_tokens` tokens,
    then `query_length` query tokens (eos included). Returns tokens [L], loss mask [L]."""
    d = cfg.data
    q = d.query_length
    out = dictionary.make_document(seed, split, index, doc_length=definition_tokens + q, query_length=q,
                                   key_length=d.key_length, value_length=d.value_length)
    tokens = np.concatenate([[dictionary.BOS], out["tokens"], [dictionary.EOS]]).astype(np.int32)
    mask = np.concatenate([[0], out["loss_mask"], [0]]).astype(bool)
    return tokens, mask


def _records(tokens: np.ndarray, marker: int, key_length: int = 4, value_length: int = 4):
    """(keys [n, key_length], values [n, value_length]) of the records that start with `marker`."""
    record = key_length + value_length + 2
    starts = np.flatnonzero(tokens == marker)
    starts = starts[starts + record <= tokens.size]
    idx = starts[:, None] + np.arange(record)[None, :]
    rec = tokens[idx]
    return rec[:, 1:1 + key_length], rec[:, 2 + key_length:]


def _query_window(keys, values, query_length: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A query region (query_length tokens, eos last) asking distinct defined keys, laid out as the
    dictionary builder lays out a document's query region; returns tokens and the value-token mask."""
    key_len, value_len = keys.shape[1], values.shape[1]
    record = key_len + value_len + 2
    n = min((query_length - 1) // record, len(keys))
    asked = rng.choice(len(keys), size=n, replace=False)
    rec = np.empty((n, record), np.int32)
    rec[:, 0], rec[:, 1:1 + key_len], rec[:, 1 + key_len] = dictionary.QUERY, keys[asked], dictionary.VALUE
    rec[:, 2 + key_len:] = values[asked]
    tokens = np.full(query_length, dictionary.PAD, np.int32)
    mask = np.zeros(query_length, bool)
    tokens[:rec.size], tokens[-1] = rec.reshape(-1), dictionary.EOS
    mask[:rec.size] = np.tile(np.arange(record) >= 2 + key_len, n)
    return tokens, mask


LAYOUTS = ("windows", "stream")


def record_starts(size: int, record: int, window: int | None = None) -> np.ndarray:
    """Where the records of definitions of `size` tokens start (bos at 0, then records back to
    back). With a `window`, each `window`-token window (as `MemoryRuntime.ingest` reads the
    definitions) holds whole records only, and padding after them: no boundary cuts a record."""
    if window is None:
        return 1 + record * np.arange((size - 1) // record)
    if window < record:
        raise ValueError(f"a window of {window} tokens cannot hold one {record}-token record")
    return np.concatenate([max(s, 1) + record * np.arange((min(s + window, size) - max(s, 1)) // record)
                           for s in range(0, size, window)]).astype(np.int64)


def lay_out(keys, values, size: int, window: int | None = None) -> tuple[np.ndarray, int]:
    """Definitions of `size` tokens: bos, `<k> key <v> value` records at `record_starts`, padding.
    Returns the tokens and the number of records laid out (the first ones of `keys`)."""
    key_len, value_len = keys.shape[1], values.shape[1]
    record = key_len + value_len + 2
    starts = record_starts(size, record, window)
    n = min(len(starts), len(keys))
    rec = np.empty((n, record), np.int32)
    rec[:, 0], rec[:, 1:1 + key_len], rec[:, 1 + key_len] = dictionary.KEY, keys[:n], dictionary.VALUE
    rec[:, 2 + key_len:] = values[:n]
    defs = np.full(size, dictionary.PAD, np.int32)
    defs[0] = dictionary.BOS
    defs[starts[:n, None] + np.arange(record)[None, :]] = rec
    return defs, n


def _documents(cfg, size, num_docs, windows, split, seed, layout="stream"):
    """Per document: its definitions (bos included, `size` tokens) and `windows` query windows
    [(tokens, value mask)] asking distinct defined keys. `layout` "stream": the dictionary
    builder's document (records back to back); the first query window is the builder's own query
    region. "windows": the builder's records laid out whole in each model window (`lay_out`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    q = cfg.data.query_length
    out = []
    for i in range(num_docs):
        tokens, mask = _doc(cfg, i, size, split, seed)
        defs = tokens[:-q]
        keys, values = _records(defs, dictionary.KEY, cfg.data.key_length, cfg.data.value_length)
        rng = np.random.default_rng([seed, dictionary.SPLIT_IDS[split], i, 1])
        if layout == "windows":
            defs, n = lay_out(keys, values, size, cfg.model.max_position_embeddings)
            keys, values = keys[:n], values[:n]
            out.append((defs, [_query_window(keys, values, q, rng) for _ in range(windows)]))
        else:
            more = [_query_window(keys, values, q, rng) for _ in range(windows - 1)]
            out.append((defs, [(tokens[-q:], mask[-q:])] + more))
    return out


def _cut_keys(defs, window: int, key_length: int = 4, value_length: int = 4) -> set:
    """Keys of the records in `defs` that a window boundary cuts (key and values not all in one
    window)."""
    record = key_length + value_length + 2
    starts = np.flatnonzero(defs == dictionary.KEY)
    starts = starts[starts + record <= defs.size]
    cut = starts[starts // window != (starts + record - 1) // window]
    return {tuple(defs[s + 1:s + 1 + key_length]) for s in cut}


def _cut_values(cut_keys: set, tokens, key_length: int = 4, value_length: int = 4) -> np.ndarray:
    """[len(tokens)] bool: the value tokens of the query records in `tokens` that ask one of
    `cut_keys` (`_cut_keys`)."""
    record = key_length + value_length + 2
    cut = np.zeros(len(tokens), bool)
    for s in np.flatnonzero(tokens == dictionary.QUERY):
        if s + record <= len(tokens) and tuple(tokens[s + 1:s + 1 + key_length]) in cut_keys:
            cut[s + 2 + key_length:s + record] = True
    return cut


def _hits(logits, tokens, mask):
    """Correct next-token predictions on `mask` for a window's logits [q, V] of `tokens` [q] (the
    first token is predicted by what comes before it and is never a value token)."""
    pred = np.argmax(logits[:-1], axis=-1)
    m = mask[1:]
    return int((pred[m] == tokens[1:][m]).sum()), int(m.sum())


def memory_scaling(cfg, model, sizes=DEFAULT_SIZES, num_docs: int = 4, top_k: int = 32, baseline=None,
                   split: str = "test", seed: int = 0, search: str = "exact", mem_dtype: str = "bfloat16",
                   mesh=None, log=print, query_windows: int = 1, generate: bool = False,
                   layout: str = "windows") -> list[dict]:
    """Rows {tokens_in_memory, fot_accuracy, baseline_accuracy, queries, seconds, ...} per size.

    Each of `num_docs` documents holds `size` tokens of definitions, read window by window into
    memory (LongLLaMA windowing, `fot_jax.infer.runtime`), and `query_windows` query windows of
    `query_length` tokens, each read on top of that memory (`MemoryRuntime.rewind` between them):
    accuracy of the value tokens, teacher-forced. `baseline` is (cfg, model) of a model without
    memory, evaluated on the last window it can hold. With a mesh that has a `memory` axis, the
    stores are sharded over it. `generate`: also greedy answers (`MemoryRuntime.generate`) to
    as many questions on documents built independently of the training data (`own_documents`).

    `layout` "windows" (the default) lays the definitions out whole in each model window;
    "stream" reads them back to back, so that window boundaries cut some records in two (about
    one in 25 at W = 256). A model whose memory layers have only local layers below them cannot
    answer a cut record: its value tokens never saw their key in a local context, so no memory
    entry ties the two. With "stream" the rows also give the share of questions about cut records
    (`cut_queries`) and the accuracy on the others (`whole_accuracy`)."""
    w, q = cfg.model.max_position_embeddings, cfg.data.query_length
    rows = []
    for size in sizes:
        start = time.perf_counter()
        unit = w * (mesh.shape["memory"] if mesh is not None else 1)
        capacity = -(-max(size, w) // unit) * unit
        settings = MemorySettings(top_k=top_k, capacity=capacity, search=search, dtype=mem_dtype,
                                  last_context_length=q, logn_base=cfg.memory.logn_base)
        rt = MemoryRuntime(model, num_docs, settings, mesh=mesh)   # refuses stores that cannot fit
        docs = _documents(cfg, size, num_docs, query_windows, split, seed, layout)
        hits = total = whole_hits = whole = 0
        kl, vl = cfg.data.key_length, cfg.data.value_length
        cut_keys = [_cut_keys(d, w, kl, vl) for d, _ in docs] if layout == "stream" else None
        _, tails = rt.ingest([np.concatenate([d, win[0][0]]) for d, win in docs], return_logits="tail")
        ingest_s = time.perf_counter() - start
        mark = rt.mark() - q                       # each row's position after its definitions
        for j in range(query_windows):
            if j:
                rt.rewind(mark)
                _, tails = rt.extend([win[j][0] for _, win in docs], return_logits=True)
            for i, ((_, win), lg) in enumerate(zip(docs, tails)):
                tokens, mask = win[j]
                h, n = _hits(lg, tokens, mask)
                hits, total = hits + h, total + n
                if cut_keys is not None:
                    h, n = _hits(lg, tokens, mask & ~_cut_values(cut_keys[i], tokens, kl, vl))
                    whole_hits, whole = whole_hits + h, whole + n
        row = {"tokens_in_memory": size, "fot_accuracy": hits / total,
               "queries": total // cfg.data.value_length}
        if cut_keys is not None:
            row["cut_queries"] = 1 - whole / total
            row["whole_accuracy"] = whole_hits / max(whole, 1)
        if baseline is not None:
            row["baseline_accuracy"] = _baseline_accuracy(baseline, docs)
        if generate:
            row.update(generation_accuracy(cfg, model, size, num_docs, row["queries"] // num_docs, settings,
                                           mesh=mesh, seed=seed, layout=layout))
        row["ingest_seconds"], row["seconds"] = ingest_s, time.perf_counter() - start
        row["store_gib"] = store_bytes(cfg.model, num_docs, capacity, mem_dtype) / 2 ** 30
        row["peak_rss_gib"] = peak_rss_gib()
        del rt
        log(f"memory {size:>10,} tokens: FoT accuracy {row['fot_accuracy']:.4f}"
            + (f", baseline {row['baseline_accuracy']:.4f}" if baseline is not None else "")
            + (f", generated {row['generate_accuracy']:.4f} (answers {row['generate_answers']:.4f})"
               if generate else "")
            + f" ({row['queries']} queries, {row['seconds']:.1f} s, ingest {ingest_s:.1f} s, "
              f"stores {row['store_gib']:.2f} GiB, peak RSS {row['peak_rss_gib']:.1f} GiB)")
        rows.append(row)
    return rows


def _baseline_accuracy(baseline, docs) -> float:
    """A model without memory on the last window it can hold of definitions + each query window."""
    bcfg, bmodel = baseline
    bw = bcfg.model.max_position_embeddings
    hits = total = 0
    for j in range(len(docs[0][1])):
        full = [np.concatenate([d[-bw:], win[j][0]]) for d, win in docs]
        window = np.stack([t[-bw:] if len(t) >= bw else np.pad(t, (bw - len(t), 0)) for t in full])
        logits = np.asarray(_plain_forward(bmodel, jnp.asarray(window)))[:, :, :bcfg.model.vocab_size]
        for (_, win), lg in zip(docs, logits):
            tokens, mask = win[j]
            h, n = _hits(lg[bw - len(tokens):], tokens, mask)
            hits, total = hits + h, total + n
    return hits / total


def own_documents(size: int, num_docs: int, queries: int, seed: int = 0, key_length: int = 4,
                  value_length: int = 4, window: int | None = None):
    """Dictionary documents built here, independently of the training builder: per document the
    definitions (`size` tokens: bos, then `<k> key <v> value` records with unique keys drawn one by
    one, then padding; with a `window`, whole records in each window, `lay_out`) and `queries`
    (key, value) pairs asked of them."""
    rng = np.random.default_rng([seed, 991])
    first = dictionary.FIRST_SYMBOL
    out = []
    for _ in range(num_docs):
        n = len(record_starts(size, key_length + value_length + 2, window))
        seen, keys = set(), []
        while len(keys) < n:
            k = tuple(int(t) for t in rng.integers(first, dictionary.VOCAB_SIZE, key_length))
            if k not in seen:
                seen.add(k)
                keys.append(k)
        keys = np.array(keys, np.int32).reshape(n, key_length)
        values = rng.integers(first, dictionary.VOCAB_SIZE, (n, value_length)).astype(np.int32)
        defs, _ = lay_out(keys, values, size, window)
        asked = rng.choice(n, size=min(queries, n), replace=False)
        out.append((defs, keys[asked], values[asked]))
    return out


def generation_accuracy(cfg, model, size, num_docs, queries, settings, mesh=None, seed=0,
                        layout: str = "windows") -> dict:
    """Greedy answers: the definitions are read into memory (ingested, then the last local window
    committed to memory too, so that a question starts a local context of its own, as queries do
    in training), each question `<q> key <v>` is appended and the value generated, and the runtime
    rewinds to the end of the definitions for the next question. Returns the share of value tokens
    generated right (as the teacher-forced accuracy counts them) and of answers wholly right."""
    vlen = cfg.data.value_length
    window = cfg.model.max_position_embeddings if layout == "windows" else None
    docs = own_documents(size, num_docs, queries, seed, cfg.data.key_length, vlen, window)
    rt = MemoryRuntime(model, num_docs, settings, mesh=mesh)
    rt.ingest([d for d, _, _ in docs])
    rt.commit()
    mark = rt.mark()
    right = answers = total = 0
    for i in range(min(len(k) for _, k, _ in docs)):
        prompts = [np.concatenate([[dictionary.QUERY], k[i], [dictionary.VALUE]]) for _, k, _ in docs]
        out = rt.generate(prompts, vlen, stop_token=-1, continue_documents=True)
        rt.rewind(mark)
        for (_, _, v), got in zip(docs, out):
            ok = got[:vlen] == v[i]
            right, answers, total = right + int(ok.sum()), answers + int(ok.all()), total + 1
    return {"generate_accuracy": right / (total * vlen), "generate_answers": answers / total}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


@nnx.jit
def _plain_forward(model, tokens):
    """The model without memory on one window (compiled once, reused across memory sizes)."""
    return model(tokens).logits


def distraction(cfg, model, ds=(1, 2, 4, 8, 16, 32, 64), num_docs: int = 8, split: str = "test",
                seed: int = 0) -> list[dict]:
    """Rows {d, positive_mass, positive_share}: for the first memory layer, over the query window's
    tokens and all heads, the attention mass (of its whole softmax: memory and local keys) on the
    document's own previous context, and that mass as a share of the memory's (all d contexts)."""
    m = cfg.model
    layer = list(m.mem_layers)[0]
    w = cfg.data.seq_len
    need = num_docs + max(ds)
    docs = [_doc(cfg, i, w, split, seed)[0] for i in range(need)]
    defs = jnp.asarray(np.stack([t[:w] for t in docs]))           # previous contexts (own and others)
    queries = jnp.asarray(np.stack([t[w: 2 * w] for t in docs[:num_docs]]))
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (need, w))

    @jax.jit
    def context_kv(tokens):
        cache = model(tokens, positions[: tokens.shape[0]], keys_through_layer=layer).cache.layer(layer)
        return cache.k, cache.v
    mem_k, _ = context_kv(defs)                                    # [need, T, Hkv, D] un-rotated
    loc_k, _ = context_kv(queries)
    captured = {}

    class Capture:
        """Stands in for the layer's memory view: records the queries it is read with."""
        scale = None

        def read(self, qm):
            captured["q"] = qm
            b, hkv, n, d = qm.shape
            return (jnp.full((b, hkv, n), -jnp.inf), jnp.zeros((b, hkv, n)), jnp.zeros((b, hkv, n, d)))

    class CaptureMemory:
        def views(self, positions, num_layers):
            return [Capture() if i == layer else None for i in range(num_layers)]
    model(queries, positions[:num_docs], memory=CaptureMemory())
    q = np.asarray(captured["q"], np.float64)                      # [B, Hkv, G*T, D] as the layer uses it
    attn = model.layers[layer].self_attn
    lk = np.asarray(loc_k, np.float64)
    if attn.use_rope:
        cos, sin = rope_cos_sin(positions[:num_docs], lk.shape[-1], m.rope_theta)
        lk = np.asarray(apply_rope(jnp.asarray(loc_k, jnp.float32), cos, sin), np.float64)
    mk = np.asarray(mem_k, np.float64)
    pad = np.asarray(queries != dictionary.PAD)
    return [_mass_at(d, q, mk, lk, pad, num_docs, w) for d in ds]


def _mass_at(d, q, mk, lk, pad, num_docs, w) -> dict:
    """Positive attention mass and share with d contexts in memory: the document's own previous
    context and d - 1 of other documents (float64, every query token that is not padding)."""
    hkv, g = lk.shape[2], q.shape[2] // w
    causal = np.tril(np.ones((w, w), bool))
    others = list(range(num_docs, num_docs + d - 1))
    mass, share = [], []
    for b in range(num_docs):
        keys = mk[[b] + others].reshape(d * w, hkv, -1)                # [d*T, Hkv, D], own context first
        for h in range(hkv):
            qh = q[b, h].reshape(g, w, -1)                             # [G, T, D]
            s_mem = np.einsum("gtd,nd->gtn", qh, keys[:, h])
            s_loc = np.where(causal, np.einsum("gtd,sd->gts", qh, lk[b, :, h]), -np.inf)
            top = np.maximum(s_mem.max(-1), s_loc.max(-1))[..., None]
            p_mem, p_loc = np.exp(s_mem - top), np.exp(s_loc - top)
            own = p_mem[..., :w].sum(-1)
            ok = pad[b][None].repeat(g, 0)
            mass.append((own / (p_mem.sum(-1) + p_loc.sum(-1)))[ok])
            share.append((own / p_mem.sum(-1))[ok])
    return {"d": d, "positive_mass": float(np.mean(np.concatenate(mass))),
            "positive_share": float(np.mean(np.concatenate(share)))}


def write_table(rows, path_base, title):
    """Writes rows as `<base>.json` and a markdown `<base>.md` table."""
    os.makedirs(os.path.dirname(os.path.abspath(path_base)), exist_ok=True)
    with open(path_base + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    keys = [k for k, v in rows[0].items() if not isinstance(v, (list, dict))]  # per-sample lists: json only
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append(
            "| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else f"{r[k]:,}" for k in keys) + " |"
        )
    with open(path_base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot_scaling(rows, path, chance=None, more=()):
    """FoT and baseline accuracy against tokens in memory; `more`: (label, rows) of other
    evaluations' FoT accuracy on the same axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["tokens_in_memory"] for r in rows]
    ax.plot(x, [r["fot_accuracy"] for r in rows], "o-", label="FoT (memory, top-k)")
    for label, other in more:
        ax.plot([r["tokens_in_memory"] for r in other], [r["fot_accuracy"] for r in other], ".-", label=label)
    if "baseline_accuracy" in rows[0]:
        ax.plot(x, [r["baseline_accuracy"] for r in rows], "s--", label="baseline (512-token context)")
    if chance:
        ax.axhline(chance, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dictionary tokens in memory")
    ax.set_ylabel("lookup accuracy (value tokens)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distraction(results: dict, path):
    """results: label -> rows of `distraction`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in results.items():
        ax.plot([r["d"] for r in rows], [r["positive_mass"] for r in rows], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("contexts in memory d (own + distractors)")
    ax.set_ylabel("attention mass on own previous context")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""In-context learning as the context grows (the paper's TREC / WebQS protocol).

A JSON-lines file holds examples with `input` and `label` fields; the label set is the file's
distinct labels. For each test example and context size, demonstrations (the other examples, in a
seeded order) are packed into the context as

    Input: <input>
    Label: <label>

until one more would not fit beside the test question `Input: <input>\\nLabel:` and the longest
label; the test example is never among its own demonstrations. The answer is the label with the
highest log-likelihood (`mode="classify"`, like TREC) or a greedy generation up to the end of the
line matched exactly (`mode="generate"`, like WebQS). The no-memory baseline reads the same
context cut to its last window of tokens: what the model sees without memory. Seeds change the
demonstrations' choice and order.
"""
from __future__ import annotations

import json

import numpy as np

from fot_jax.errors import FotError
from fot_jax.evals.scoring import Scorer

DEMO = "Input: {input}\nLabel: {label}\n\n"
QUESTION = "Input: {input}\nLabel:"
MODES = ("classify", "generate")


class FewShotError(FotError, ValueError):
    """A data file or setting the few-shot evaluation cannot use."""


def load_examples(path: str):
    """(examples [{input, label}], sorted label set) from a JSON-lines file."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or "input" not in row or "label" not in row:
                    raise FewShotError(f"{path}:{n}: each line needs 'input' and 'label' fields, got "
                                       f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
                examples.append({"input": str(row["input"]), "label": str(row["label"])})
    except FileNotFoundError:
        raise FewShotError(f"{path}: no such file; give a JSON-lines file with 'input' and 'label'") from None
    except json.JSONDecodeError as e:
        raise FewShotError(f"{path}: not JSON lines ({e})") from None
    labels = sorted({e["label"] for e in examples})
    if len(labels) < 2:
        raise FewShotError(f"{path}: needs at least two distinct labels, found {labels}")
    return examples, labels


def label_ids(tok, label: str) -> list[int]:
    """The ids a label takes after "Label:" (tokenised in place: a SentencePiece tokenizer would
    give a lone space piece to " label" encoded on its own)."""
    return tok.encode("Label: " + label)[len(tok.encode("Label:")):]


def pack(tok, examples, test: int, size: int, order) -> tuple[list[int], int]:
    """(context ids: bos, demonstrations, the test question; number of demonstrations) of at most
    `size` tokens including the longest label's continuation. `order`: demonstration indices."""
    question = QUESTION.format(input=examples[test]["input"])
    longest = max(len(label_ids(tok, e["label"])) for e in examples)
    room = size - len(tok.encode(question, bos=True)) - longest
    demos, used = [], 0
    for i in order:
        if i == test:
            continue
        n = len(tok.encode(DEMO.format(**examples[i])))
        if used + n > room:
            break
        demos.append(i)
        used += n
    while True:                     # tokenised together, the boundaries may merge differently
        ids = tok.encode("".join(DEMO.format(**examples[i]) for i in demos) + question, bos=True)
        if len(ids) + longest <= size or not demos:
            break
        demos.pop()
    if not demos:
        first = next(i for i in order if i != test)
        need = len(tok.encode(DEMO.format(**examples[first]) + question, bos=True)) + longest
        raise FewShotError(f"context size {size} is smaller than one demonstration plus the question "
                           f"({need} tokens); use larger --contexts")
    return ids, len(demos)


def _answers(scorer, tok, contexts, labels, mode, eos):
    """The predicted label of each context."""
    if mode == "classify":
        conts = [label_ids(tok, label) for label in labels]
        if all(len(k) == 1 for k in conts):    # one-token labels: one read of each context scores them all
            lp = scorer.next_token_logprobs(contexts)[:, [k[0] for k in conts]]
            return [labels[j] for j in lp.argmax(1)]
        seqs = [c + k for c in contexts for k in conts]
        starts = [len(c) for c in contexts for _ in conts]
        ll = np.array([s for s, _ in scorer.loglikelihoods(seqs, starts)]).reshape(len(contexts), len(labels))
        return [labels[j] for j in ll.argmax(1)]
    longest = max(len(label_ids(tok, label)) for label in labels)
    gens = scorer.generate(contexts, longest + 2, stop_token=eos)
    return [tok.decode([t for t in g if t != eos]).split("\n")[0].strip() for g in gens]


def evaluate(model, cfg, tok, settings, examples, labels, sizes, *, seeds: int = 1, num_tests: int = 50,
             mode: str = "classify", batch_size: int = 1, log=print) -> list[dict]:
    """Rows {context, demonstrations, accuracy, accuracy_std, baseline_accuracy} per context size:
    the mean over seeds (and its spread) with memory, and the window-only baseline."""
    if mode not in MODES:
        raise FewShotError(f"mode {mode!r} is not one of {MODES}")
    window = cfg.model.max_position_embeddings
    scorer = Scorer(model, settings, batch_size=batch_size)
    tests = np.random.default_rng(0).permutation(len(examples))[: min(num_tests, len(examples))]
    rows = []
    for size in sizes:
        acc, base, demos = [], [], []
        for seed in range(seeds):
            order = np.random.default_rng([seed, 1]).permutation(len(examples))
            packed = [pack(tok, examples, int(t), size, order) for t in tests]
            contexts = [ids for ids, _ in packed]
            cut = [c if len(c) <= window else c[:1] + c[len(c) - window + 1:] for c in contexts]
            want = [examples[int(t)]["label"] for t in tests]
            got = _answers(scorer, tok, contexts, labels, mode, cfg.model.eos_token_id)
            eos = cfg.model.eos_token_id
            got_base = got if cut == contexts else _answers(scorer, tok, cut, labels, mode, eos)
            acc.append(np.mean([g == w for g, w in zip(got, want)]))
            base.append(np.mean([g == w for g, w in zip(got_base, want)]))
            demos.append(np.mean([n for _, n in packed]))
        rows.append({"context": int(size), "demonstrations": float(np.mean(demos)),
                     "accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
                     "baseline_accuracy": float(np.mean(base))})
        log(f"few-shot {mode}, context {size}: {rows[-1]['demonstrations']:.1f} demonstrations, accuracy "
            f"{rows[-1]['accuracy']:.3f} (window-only baseline {rows[-1]['baseline_accuracy']:.3f})")
    return rows


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["context"] for r in rows]
    ax.errorbar(x, [r["accuracy"] for r in rows], yerr=[r["accuracy_std"] for r in rows], fmt="o-",
                label="with memory")
    ax.plot(x, [r["baseline_accuracy"] for r in rows], "s--", label="window only")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

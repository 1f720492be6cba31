"""Log-likelihoods and greedy continuations of token sequences of any length, read through memory
by the inference runtime (LongLLaMA windowing: windows of W go to memory, the last
`last_context_length` tokens stay as local context), in batches of rows.

Shared by the lm-evaluation-harness model (`fot_jax.evals.harness`) and the few-shot evaluation
(`fot_jax.evals.few_shot`)."""
from __future__ import annotations

import numpy as np

from fot_jax.infer.runtime import MemoryRuntime, MemorySettings


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Scorer:
    """Scores token sequences with one model: `loglikelihoods(seqs, starts)` gives, per sequence,
    the summed log-probability of its tokens from index `start` on (each predicted from all the
    tokens before it) and whether each of them is the greedy choice."""

    def __init__(self, model, settings: MemorySettings, batch_size: int = 1):
        self.model, self.settings, self.batch_size = model, settings, max(1, int(batch_size))
        self.vocab = model.config.vocab_size
        self._runtimes = {}

    def runtime(self, rows: int) -> MemoryRuntime:
        """One runtime per batch size: its programs compile once."""
        if rows not in self._runtimes:
            self._runtimes[rows] = MemoryRuntime(self.model, rows, self.settings)
        return self._runtimes[rows]

    def loglikelihoods(self, seqs, starts) -> list[tuple[float, bool]]:
        """seqs: token lists (bos included where wanted); starts[i] >= 1: the first scored index."""
        out = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))    # similar lengths share a batch
        for b in range(0, len(order), self.batch_size):
            idx = order[b: b + self.batch_size]
            docs = [np.asarray(seqs[i][:-1], np.int32) for i in idx]    # the inputs predict the next token
            tail = all(len(seqs[i]) - starts[i] <= self._tail_room(len(seqs[i]) - 1) for i in idx)
            rt = self.runtime(len(idx))
            _, logits = rt.ingest(docs, return_logits="tail" if tail else True)
            for row, i in enumerate(idx):
                lg = logits[row][:, : self.vocab]
                offset = len(docs[row]) - lg.shape[0]                   # logits cover docs[offset:]
                targets = np.asarray(seqs[i][starts[i]:])
                pred = lg[starts[i] - 1 - offset:]
                lp = log_softmax(pred)[np.arange(len(targets)), targets]
                out[i] = (float(lp.sum()), bool((pred.argmax(-1) == targets).all()))
        return out

    def _tail_room(self, length: int) -> int:
        """How many final positions `ingest(..., return_logits="tail")` returns for a document."""
        return min(length, self.settings.last_context_length)

    def next_token_logprobs(self, seqs) -> np.ndarray:
        """[N, V] log-probabilities of the token after each sequence (one read of each, no logits
        of the other positions leave the device)."""
        out = []
        for b in range(0, len(seqs), self.batch_size):
            chunk = [np.asarray(s, np.int32) for s in seqs[b: b + self.batch_size]]
            out.append(log_softmax(self.runtime(len(chunk)).ingest(chunk)[:, : self.vocab]))
        return np.concatenate(out, 0)

    def generate(self, prompts, max_new_tokens: int, stop_token: int | None = None) -> list[list[int]]:
        """Greedy continuations, a batch of rows at a time."""
        out = []
        for b in range(0, len(prompts), self.batch_size):
            chunk = [np.asarray(p, np.int32) for p in prompts[b: b + self.batch_size]]
            gens = self.runtime(len(chunk)).generate(chunk, max_new_tokens, stop_token=stop_token)
            out.extend(g.tolist() for g in gens)
        return out

"""Doc-aware batching with k-packing.

The global batch has `B = S * k` rows: `S` document streams, each spread over `k` consecutive rows
(row `b` = stream `b // k`, chunk `b % k`). A stream is its documents concatenated as
`bos doc eos bos doc eos ...`; each step a stream hands out its next `k * T` tokens, so one batch
row follows one stream across steps and the k rows of a stream are consecutive chunks.

Documents are assigned to streams by a seeded permutation per epoch: the n-th document of stream s
is `order_epoch[(n * S + s) % N]`. The pipeline's position is, per stream, (document ordinal,
token offset): small, exact, and enough to resume with the very batches an uninterrupted run
would have seen. A host reads only the streams of its own rows.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


class DocumentSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict: ...


@dataclasses.dataclass
class Batch:
    """Host-local batch: all arrays [rows, T]."""
    inputs: np.ndarray        # int32 tokens
    targets: np.ndarray       # int32 next tokens
    loss_mask: np.ndarray     # float32, 1 where the target counts
    segment_ids: np.ndarray   # int32 document id of each input token (unique per stream doc)

    def as_dict(self):
        return dataclasses.asdict(self)


class _Stream:
    def __init__(self, batcher: "DocBatcher", stream: int, doc_ordinal: int = 0, offset: int = 0):
        self.b, self.stream = batcher, stream
        self.doc_ordinal, self.offset = doc_ordinal, offset   # position of the next token handed out
        self._tokens = np.zeros(0, np.int32)
        self._mask = np.zeros(0, np.float32)
        self._segs = np.zeros(0, np.int32)
        self._loaded = doc_ordinal          # ordinal of the next document to append to the buffer

    def _append(self):
        tokens, mask = self.b.document(self.stream, self._loaded)
        seg = self._loaded * self.b.num_streams + self.stream + 1
        self._tokens = np.concatenate([self._tokens, tokens])
        self._mask = np.concatenate([self._mask, mask])
        self._segs = np.concatenate([self._segs, np.full(len(tokens), seg, np.int32)])
        self._loaded += 1

    def take(self, count: int):
        """The next `count` tokens (and one more as the last target); advances by `count`."""
        if self._tokens.size == 0:
            self._append()
            skip = self.offset
            self._tokens, self._mask, self._segs = (self._tokens[skip:], self._mask[skip:],
                                                    self._segs[skip:])
        while self._tokens.size < count + 1:
            self._append()
        out = (self._tokens[: count + 1], self._mask[: count + 1], self._segs[: count + 1])
        self._tokens, self._mask, self._segs = (self._tokens[count:], self._mask[count:],
                                                self._segs[count:])
        # Recompute the position of the next token: (document ordinal, offset within it).
        consumed = count + self.offset
        ordinal = self.doc_ordinal
        while consumed >= self.b.doc_len(self.stream, ordinal):
            consumed -= self.b.doc_len(self.stream, ordinal)
            ordinal += 1
        self.doc_ordinal, self.offset = ordinal, consumed
        return out


class DocBatcher:
    """Iterator of `Batch` for this host's rows. `state()` / `restore(state)` for exact resume."""

    def __init__(self, source: DocumentSource, *, batch_size: int, seq_len: int, k_packing: int,
                 bos: int, eos: int, seed: int = 0, shuffle: bool = True,
                 host_index: int = 0, host_count: int = 1, mask_eos: bool = False):
        if batch_size % k_packing:
            raise ValueError(f"batch_size {batch_size} is not a multiple of k_packing {k_packing}")
        self.source, self.num_docs = source, len(source)
        if self.num_docs == 0:
            raise ValueError("the document source is empty")
        self.num_streams = batch_size // k_packing
        if self.num_streams % host_count:
            raise ValueError(f"{self.num_streams} streams do not split over {host_count} hosts")
        self.seq_len, self.k = seq_len, k_packing
        self.bos, self.eos, self.seed, self.shuffle = bos, eos, seed, shuffle
        self.mask_eos = mask_eos
        per_host = self.num_streams // host_count
        self.streams = list(range(host_index * per_host, (host_index + 1) * per_host))
        self._orders: dict[int, np.ndarray] = {}
        self._lengths: dict[tuple[int, int], int] = {}
        self.step = 0
        self._state = {s: _Stream(self, s) for s in self.streams}

    def _doc_index(self, stream: int, ordinal: int) -> int:
        flat = ordinal * self.num_streams + stream
        epoch, pos = divmod(flat, self.num_docs)
        if not self.shuffle:
            return pos
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)}
        return int(self._orders[epoch][pos])

    def document(self, stream: int, ordinal: int):
        """bos + tokens + eos of a stream's n-th document, and its loss mask (on token positions)."""
        ex = self.source[self._doc_index(stream, ordinal)]
        tokens = np.asarray(ex["tokens"], np.int32)
        if "loss_mask" in ex:
            mask = np.asarray(ex["loss_mask"], np.float32)
            eos_mask = float(self.mask_eos)
        else:
            mask = np.ones(len(tokens), np.float32)
            eos_mask = 1.0
        tokens = np.concatenate([[self.bos], tokens, [self.eos]]).astype(np.int32)
        mask = np.concatenate([[0.0], mask, [eos_mask]]).astype(np.float32)
        self._lengths[(stream, ordinal)] = len(tokens)
        return tokens, mask

    def doc_len(self, stream: int, ordinal: int) -> int:
        if (stream, ordinal) not in self._lengths:
            self.document(stream, ordinal)
        return self._lengths[(stream, ordinal)]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        t, k = self.seq_len, self.k
        rows = len(self.streams) * k
        out = {name: np.empty((rows, t), dt) for name, dt in
               (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                ("segment_ids", np.int32))}
        for i, s in enumerate(self.streams):
            tokens, mask, segs = self._state[s].take(k * t)
            for c in range(k):
                row, lo = i * k + c, c * t
                out["inputs"][row] = tokens[lo: lo + t]
                out["targets"][row] = tokens[lo + 1: lo + t + 1]
                out["loss_mask"][row] = mask[lo + 1: lo + t + 1]
                out["segment_ids"][row] = segs[lo: lo + t]
            # Keep the length cache small: drop documents already passed.
            for key in [key for key in self._lengths if key[0] == s and key[1] < self._state[s].doc_ordinal]:
                del self._lengths[key]
        self.step += 1
        return Batch(**out)

    def state(self) -> dict:
        return {"step": self.step,
                "streams": {str(s): [st.doc_ordinal, st.offset] for s, st in self._state.items()}}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])
        self._state = {s: _Stream(self, s, *map(int, state["streams"][str(s)])) for s in self.streams}

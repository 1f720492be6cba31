"""Dictionary lookup documents, the tfds builder and doc-aware k-packed batching."""
import numpy as np
import pytest

from fot_jax.data import dictionary as D
from fot_jax.data.pipeline import DocBatcher


def _records(tokens, start, stop):
    rec = tokens[start:stop]
    rec = rec[: len(rec) // 10 * 10].reshape(-1, 10)
    return rec[rec[:, 0] != D.PAD]


@pytest.mark.parametrize("doc_length,query_length,defs", [(512, 256, 0), (2048, 256, 0), (512, 256, 3)])
def test_document_layout(doc_length, query_length, defs):
    doc = D.make_document(seed=1, split="train", index=7, doc_length=doc_length,
                          query_length=query_length, num_definitions=defs)
    tokens, mask = doc["tokens"], doc["loss_mask"]
    assert len(tokens) == doc_length - 2 and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < D.VOCAB_SIZE
    def_len, q_len = D.regions(doc_length, query_length)
    defs_rec = _records(tokens, 0, def_len)
    queries = _records(tokens, def_len, def_len + q_len)
    expected_defs = defs or def_len // 10
    assert len(defs_rec) == expected_defs
    assert np.all(defs_rec[:, 0] == D.KEY) and np.all(defs_rec[:, 5] == D.VALUE)
    assert np.all(queries[:, 0] == D.QUERY) and np.all(queries[:, 5] == D.VALUE)
    keys = {tuple(r[1:5]) for r in defs_rec}
    assert len(keys) == len(defs_rec), "keys unique within a document"
    table = {tuple(r[1:5]): tuple(r[6:10]) for r in defs_rec}
    asked = [tuple(r[1:5]) for r in queries]
    assert len(set(asked)) == len(asked) == min(q_len // 10, expected_defs), "distinct queries"
    for r in queries:
        assert table[tuple(r[1:5])] == tuple(r[6:10]), "query value equals the definition's"
    # loss only on the four value tokens of each query
    assert mask.sum() == 4 * len(queries)
    assert np.all(np.isin(tokens[mask == 1], np.arange(D.FIRST_SYMBOL, D.VOCAB_SIZE)))
    assert mask[:def_len].sum() == 0


def test_documents_are_deterministic_by_seed():
    a = D.make_document(3, "train", 11)
    b = D.make_document(3, "train", 11)
    c = D.make_document(4, "train", 11)
    d = D.make_document(3, "validation", 11)
    assert np.array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert not np.array_equal(a["tokens"], d["tokens"])


def test_tfds_builder_serves_the_documents(data_dir):
    src = D.data_source("validation", data_dir=data_dir, doc_length=128, query_length=64,
                        num_train=16, num_eval=12, seed=5)
    assert len(src) == 12
    got = sorted(tuple(src[i]["tokens"]) for i in range(len(src)))
    expected = sorted(tuple(D.make_document(5, "validation", i, 128, 64)["tokens"]) for i in range(12))
    assert got == expected
    ex = src[0]
    assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.uint8


class ListSource:
    def __init__(self, docs):
        self.docs = docs

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return {"tokens": np.asarray(self.docs[i], np.int32)}


def _source(n=11, seed=0):
    rng = np.random.default_rng(seed)
    # document i holds tokens 1000*i + (1..len), so every token names its document and position
    return ListSource([1000 * (i + 1) + np.arange(1, rng.integers(3, 30)) for i in range(n)])


def test_k_packing_rows_follow_streams():
    src = _source()
    B, T, k = 6, 5, 3
    batcher = DocBatcher(src, batch_size=B, seq_len=T, k_packing=k, bos=1, eos=2, seed=0)
    streams = {s: [] for s in range(B // k)}
    for _ in range(7):
        batch = next(batcher)
        for s in streams:
            rows = [batch.inputs[s * k + c] for c in range(k)]
            streams[s].extend(np.concatenate(rows).tolist())
            # targets are the next tokens of the stream
            flat_in = np.concatenate(rows)
            flat_tg = np.concatenate([batch.targets[s * k + c] for c in range(k)])
            assert np.array_equal(flat_in[1:], flat_tg[:-1])
    # Each stream is bos doc eos bos doc eos ... of the documents it was assigned.
    for s, toks in streams.items():
        docs, cur = [], None
        for tok in toks:
            if tok == 1:
                cur = []
            elif tok == 2:
                docs.append(cur)
                cur = None
            else:
                assert cur is not None, "every document starts with bos"
                cur.append(tok)
        for doc in docs:
            i = doc[0] // 1000 - 1
            assert doc == src[i]["tokens"].tolist()
        for a, b in zip(docs, docs[1:]):
            assert a[0] // 1000 != b[0] // 1000 or len(src) < 2


def test_segment_ids_and_loss_mask():
    src = _source()
    batcher = DocBatcher(src, batch_size=2, seq_len=8, k_packing=1, bos=1, eos=2, seed=0)
    batch = next(batcher)
    for row in range(2):
        for t in range(8):
            tok, seg = batch.inputs[row, t], batch.segment_ids[row, t]
            if tok not in (1, 2):
                same = batch.segment_ids[row][(batch.inputs[row] // 1000) == tok // 1000]
                assert np.all(same == seg)
        # no loss on predicting bos
        assert np.all(batch.loss_mask[row][batch.targets[row] == 1] == 0)
        assert np.all(batch.loss_mask[row][batch.targets[row] != 1] == 1)


def test_resume_gives_the_same_batches():
    src = _source(23)
    a = DocBatcher(src, batch_size=4, seq_len=7, k_packing=2, bos=1, eos=2, seed=3)
    ref = [next(a) for _ in range(12)]
    b = DocBatcher(src, batch_size=4, seq_len=7, k_packing=2, bos=1, eos=2, seed=3)
    for _ in range(5):
        next(b)
    state = b.state()
    c = DocBatcher(src, batch_size=4, seq_len=7, k_packing=2, bos=1, eos=2, seed=3)
    c.restore(state)
    for want in ref[5:]:
        got = next(c)
        for name in ("inputs", "targets", "loss_mask", "segment_ids"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), name


def test_hosts_split_the_rows():
    src = _source(17)
    one = DocBatcher(src, batch_size=8, seq_len=6, k_packing=2, bos=1, eos=2, seed=1)
    hosts = [DocBatcher(src, batch_size=8, seq_len=6, k_packing=2, bos=1, eos=2, seed=1,
                        host_index=h, host_count=2) for h in range(2)]
    for _ in range(6):
        whole = next(one)
        parts = [next(h) for h in hosts]
        assert np.array_equal(np.concatenate([p.inputs for p in parts]), whole.inputs)


def test_short_records_curriculum():
    """1-token keys: at most 58 unique keys exist; a long region holds that many, then padding."""
    doc = D.make_document(0, "train", 1, doc_length=512, query_length=256, key_length=1, value_length=1)
    def_len, _ = D.regions(512, 256)
    rec = doc["tokens"][:def_len][: def_len // 4 * 4].reshape(-1, 4)
    rec = rec[rec[:, 0] != D.PAD]
    assert len(rec) == D.NUM_SYMBOLS and len({r[1] for r in rec}) == D.NUM_SYMBOLS
    assert doc["loss_mask"].sum() == min(255 // 4, D.NUM_SYMBOLS)


def test_near_miss_keys_are_unique_hard_negatives():
    """near_miss: that share of keys differ from an earlier key of the document in one or two
    symbols; keys stay unique, queries still ask defined keys with their values, deterministic."""
    from itertools import combinations

    def keys_and_queries(doc):
        t = doc["tokens"]
        defs = t[:D.regions(512, 256)[0]][:250].reshape(-1, 10)
        qs = t[D.regions(512, 256)[0]:][:250].reshape(-1, 10)
        return defs[defs[:, 0] == D.KEY], qs[qs[:, 0] == D.QUERY]

    near = plain = 0
    for i in range(8):
        hard = D.make_document(0, "train", i, near_miss=0.5)
        assert np.array_equal(hard["tokens"], D.make_document(0, "train", i, near_miss=0.5)["tokens"])
        defs, qs = keys_and_queries(hard)
        assert len({tuple(r[1:5]) for r in defs}) == len(defs)
        table = {tuple(r[1:5]): tuple(r[6:10]) for r in defs}
        assert all(table[tuple(r[1:5])] == tuple(r[6:10]) for r in qs)
        near += sum((a[1:5] == b[1:5]).sum() >= 2 for a, b in combinations(defs, 2))
        d0, _ = keys_and_queries(D.make_document(0, "train", i))
        plain += sum((a[1:5] == b[1:5]).sum() >= 2 for a, b in combinations(d0, 2))
    assert near > 5 * max(plain, 1)

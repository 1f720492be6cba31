"""Real text through tfds builders: folders of files (optionally one document per directory in a
seeded order), the standard library, JSON lines, catalog datasets; host sharding and exact resume
over real documents; bad corpora."""
import json
import os

import numpy as np
import pytest

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.data import text
from fot_jax.data.pipeline import DocBatcher
from fot_jax.data.sources import document_source
from fot_jax.data.tokenizer import TokenizerError, load_tokenizer

TOK = text.builtin_tokenizer_path("open_llama_v2")


def _cfg(data_dir, task, source="", **data):
    c = config_lib.base_config()
    c.model.vocab_size = 32000
    c.model.max_position_embeddings = 64
    c.data.seq_len = 64
    c.data.batch_size = 8
    c.crossbatch.k_packing = 2
    c.data.task = task
    c.data.source = source
    c.data.data_dir = data_dir
    for k, v in data.items():
        c.data[k] = v
    checks.validate(c)
    return c


def _write_corpus(root):
    files = {"pkg_a/one.py": "def one():\n    return 1\n", "pkg_a/two.py": "def two():\n    return 2\n",
             "pkg_a/three.py": "THREE = 3\n", "pkg_b/x.py": "import os\nprint(os.getcwd())\n",
             "top.py": "# a single top-level module\nVALUE = 'top'\n", "pkg_a/notes.txt": "not code",
             "pkg_a/tests/test_one.py": "assert True\n"}
    for rel, body in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(body)
    return files


def _all_docs(cfg):
    out = {}
    for split in ("train", "validation"):
        if split == "validation" and cfg.data.held_out_percent == 0:
            with pytest.raises(text.DataError, match="no validation documents"):
                document_source(cfg, split)
            continue
        src = document_source(cfg, split)
        for i in range(len(src)):
            ex = src[i]
            out[ex["name"].decode() if isinstance(ex["name"], bytes) else ex["name"]] = np.asarray(
                ex["tokens"]
            )
    return out


def test_text_files_one_document_per_directory_in_seeded_order(tmp_path):
    root = tmp_path / "corpus"
    files = _write_corpus(root)
    tok = load_tokenizer(TOK)
    cfg = _cfg(str(tmp_path / "tfds"), "text_files", str(root), held_out_percent=0, seed=3)
    docs = _all_docs(cfg)
    assert sorted(docs) == ["pkg_a", "pkg_b", "top.py"]             # tests/ and .txt excluded
    order = text.file_groups(sorted(["pkg_a/one.py", "pkg_a/two.py", "pkg_a/three.py"]), True, 3)[0][1]
    expect = tok.encode("\n\n".join(files[f] for f in order))
    np.testing.assert_array_equal(docs["pkg_a"], expect)
    np.testing.assert_array_equal(docs["top.py"], tok.encode(files["top.py"]))
    # the order is seeded: some seed gives another order of the 3 files
    orders = {tuple(text.file_groups(sorted(order), True, s)[0][1]) for s in range(8)}
    assert len(orders) > 1
    # one document per file, a minimum length, and every group in exactly one split
    per_file = _all_docs(_cfg(str(tmp_path / "tfds"), "text_files", str(root), concat_by_directory=False,
                              held_out_percent=0, min_tokens=8))
    assert sorted(per_file) == ["pkg_a/one.py", "pkg_a/two.py", "pkg_b/x.py", "top.py"]  # three.py: 5 tokens
    assert all(len(t) >= 8 for t in per_file.values())
    half = _cfg(
        str(tmp_path / "tfds"), "text_files", str(root), concat_by_directory=False, held_out_percent=50
    )
    train, val = document_source(half, "train"), document_source(half, "validation")
    names = [train[i]["name"] for i in range(len(train))] + [val[i]["name"] for i in range(len(val))]
    assert len(names) == len(set(names)) == 5 and len(val) >= 1


def test_jsonl_and_its_errors(tmp_path):
    rows = [{"text": f"document number {i} " * (i + 1), "id": i} for i in range(12)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = load_tokenizer(TOK)
    docs = _all_docs(_cfg(str(tmp_path / "tfds"), "jsonl", str(path), held_out_percent=20))
    assert len(docs) == 12
    np.testing.assert_array_equal(docs["data.jsonl:3"], tok.encode(rows[2]["text"]))
    with pytest.raises(
        text.DataError, match=r"data.jsonl:1: no text field 'body' \(fields: \['id', 'text'\]\)"
    ):
        _all_docs(_cfg(str(tmp_path / "tfds2"), "jsonl", str(path), text_field="body"))
    with pytest.raises(text.DataError, match="no JSON-lines files match"):
        _all_docs(_cfg(str(tmp_path / "tfds3"), "jsonl", str(tmp_path / "nothing*.jsonl")))


def test_bad_corpora_are_clear_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(text.DataError, match="no files matching"):
        document_source(_cfg(str(tmp_path / "t1"), "text_files", str(empty)), "train")
    root = tmp_path / "corpus"
    _write_corpus(root)
    with pytest.raises(text.DataError, match="no document of at least 100000 tokens"):
        document_source(_cfg(str(tmp_path / "t2"), "text_files", str(root), min_tokens=100000), "train")
    (root / "pkg_b" / "latin1.py").write_bytes(b"# caf\xe9\n")
    with pytest.raises(
        text.DataError, match=r"latin1.py: bytes at offset 5 are not UTF-8.*decode_errors=skip"
    ):
        document_source(_cfg(str(tmp_path / "t3"), "text_files", str(root)), "train")
    docs = _all_docs(
        _cfg(str(tmp_path / "t4"), "text_files", str(root), decode_errors="skip", held_out_percent=0)
    )
    assert "pkg_b" in docs                                              # the other file of pkg_b is kept
    with pytest.raises(config_lib.ConfigError, match="data.source"):
        _cfg(str(tmp_path), "text_files", "")
    with pytest.raises(config_lib.ConfigError, match="data.decode_errors"):
        _cfg(str(tmp_path), "stdlib", decode_errors="ignore")
    with pytest.raises(config_lib.ConfigError, match="data.tokenizer"):
        _cfg(str(tmp_path), "stdlib", tokenizer=str(tmp_path / "missing.model"))
    # a tokenizer whose ids do not fit the model
    c = _cfg(str(tmp_path / "t5"), "text_files", str(root), decode_errors="skip")
    c.model.vocab_size = 1000
    with pytest.raises(TokenizerError, match="vocab"):
        document_source(c, "train")
    # a catalog dataset that is not prepared
    with pytest.raises(text.DataError, match=r"'pg19'.*not prepared.*tfds build pg19"):
        document_source(_cfg(str(tmp_path / "t6"), "tfds", "pg19"), "train")


def test_tokenizer_from_a_directory_or_the_fine_tuned_checkpoint(tmp_path):
    """data.tokenizer may name a directory (what `fot-jax import` writes: <out>/tokenizer/...), or be
    empty in a fine-tune, which then reads train.init_from's tokenizer: the same documents as the file."""
    import shutil
    root = tmp_path / "corpus"
    _write_corpus(root)
    imp = tmp_path / "imp" / "tokenizer"
    imp.mkdir(parents=True)
    shutil.copy(TOK, imp / "tokenizer.model")
    want = _all_docs(_cfg(str(tmp_path / "a"), "text_files", str(root), held_out_percent=0))
    by_dir = _all_docs(_cfg(str(tmp_path / "b"), "text_files", str(root), held_out_percent=0,
                            tokenizer=str(tmp_path / "imp")))
    c = _cfg(str(tmp_path / "c"), "text_files", str(root), held_out_percent=0)
    c.data.tokenizer, c.train.init_from = "", str(tmp_path / "imp")
    checks.validate(c)
    by_init = _all_docs(c)
    assert want.keys() == by_dir.keys() == by_init.keys() and want
    for name in want:
        np.testing.assert_array_equal(by_dir[name], want[name])
        np.testing.assert_array_equal(by_init[name], want[name])
    with pytest.raises(config_lib.ConfigError, match="data.tokenizer.*train.init_from"):
        _cfg(str(tmp_path), "text_files", str(root), tokenizer="")


def _stdlib_cfg(data_dir, **kw):
    # two packages of the standard library keep the test fast; the full corpus is the same code
    return _cfg(data_dir, "stdlib", file_patterns=["json/*.py", "email/*.py", "http/*.py", "urllib/*.py"],
                held_out_percent=0, **kw)


def test_stdlib_corpus_hosts_and_exact_resume(tmp_path):
    cfg = _stdlib_cfg(str(tmp_path / "tfds"))
    src = document_source(cfg, "train")
    names = sorted(src[i]["name"].decode() for i in range(len(src)))
    assert names == ["email", "http", "json", "urllib"]
    tok = load_tokenizer(TOK)
    json_doc = next(src[i] for i in range(len(src)) if src[i]["name"] == b"json")
    assert "JSONDecoder" in tok.decode(json_doc["tokens"].tolist())

    def batcher(**kw):
        return DocBatcher(src, batch_size=8, seq_len=64, k_packing=2, bos=1, eos=2, seed=0, **kw)

    # two hosts together read exactly what one host reads: rows of host 0 then host 1
    one, h0, h1 = batcher(), batcher(host_index=0, host_count=2), batcher(host_index=1, host_count=2)
    for _ in range(30):
        a, b, c = next(one), next(h0), next(h1)
        for field in ("inputs", "targets", "loss_mask", "segment_ids"):
            np.testing.assert_array_equal(
                getattr(a, field), np.concatenate([getattr(b, field), getattr(c, field)])
            )
    # each document once per epoch: the streams' first documents are a permutation
    firsts = [one._doc_index(s, n) for n in range(2) for s in range(4)]
    assert sorted(firsts[:4]) == [0, 1, 2, 3] and sorted(firsts[4:]) == [0, 1, 2, 3]
    # stop mid-epoch and resume: the same batches as the uninterrupted run
    straight, first = batcher(), batcher()
    for _ in range(7):
        next(straight), next(first)
    state = json.loads(json.dumps(first.state()))
    resumed = batcher()
    resumed.restore(state)
    for _ in range(20):
        np.testing.assert_array_equal(next(straight).inputs, next(resumed).inputs)


def test_training_on_the_stdlib_corpus(tmp_path):
    from fot_jax.train.loop import Trainer
    cfg = _stdlib_cfg(str(tmp_path / "tfds"))
    cfg.model.hidden_size = 32
    cfg.model.intermediate_size = 64
    cfg.model.num_heads = 2
    cfg.model.num_kv_heads = 2
    cfg.model.tie_embeddings = True
    cfg.train.steps = 3
    cfg.train.log_every = 1
    cfg.train.eval_batches = 1
    cfg.crossbatch.eval_ranges = [1]
    cfg.data.held_out_percent = 30
    summary = Trainer(cfg, str(tmp_path / "w"), quiet=True).run()
    assert summary["steps"] == 3 and np.isfinite(summary["eval"]["1"]["loss"])
    # the workdir keeps the tokenizer it trained with (for export, passkey, a further fine-tune)
    with open(TOK, "rb") as a, open(tmp_path / "w" / "tokenizer" / "tokenizer.model", "rb") as b:
        assert a.read() == b.read()
    assert load_tokenizer(str(tmp_path / "w")).encode("def f(x): return x") == load_tokenizer(TOK).encode(
        "def f(x): return x")
    assert summary["eval"]["1"]["loss"] < np.log(32000) + 1
    # perplexity of the held-out packages against memory size, from the command line
    from fot_jax import cli
    out = tmp_path / "eval"
    assert cli.main(["eval", "--workdir", str(tmp_path / "w"), "--task", "perplexity", "--sizes", "0,128",
                     "--num-docs", "1", "--mode", "both", "--out", str(out)]) == 0
    rows = json.load(open(out / "perplexity_single_doc.json"))
    assert [r["memory_tokens"] for r in rows] == [0, 128] and rows[0]["tokens_scored"] == rows[1][
        "tokens_scored"
    ]
    assert all(1 < r["perplexity"] < 32000 * 3 for r in rows)
    assert (out / "perplexity_multi_doc.json").exists() and (out / "perplexity.png").exists()


def test_a_corpus_with_one_bad_line_is_one_line_from_the_cli(tmp_path):
    """A data error raised while training starts: the command prints one line naming the file and
    line, exit 2, no traceback; the errors fot_jax raises share one base class."""
    import subprocess
    import sys

    from fot_jax.errors import FotError
    assert issubclass(text.DataError, FotError) and issubclass(text.DataError, ValueError)
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 50}) for i in range(6)]
    lines[3] = '{"text": "cut short'
    path.write_text("\n".join(lines) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(root, "configs", "stdlib_code.py")
    proc = subprocess.run(
        [sys.executable, "-m", "fot_jax.cli", "train", "--config", config,
         "--workdir", str(tmp_path / "run"), "--config.data.task=jsonl", f"--config.data.source={path}",
         f"--config.data.data_dir={tmp_path / 'tfds'}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "corpus.jsonl:4: not a JSON object" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

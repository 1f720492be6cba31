"""Tokenizers: the real OpenLLaMA v2 SentencePiece model (a test asset), tokenizer training, HF
tokenizer.json, and the vocabulary checks."""
import json
import os
import subprocess
import sys

import pytest

from fot_jax import config as config_lib
from fot_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    check_vocab,
    load_tokenizer,
    train_sentencepiece,
)

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fot_jax", "assets")
OPEN_LLAMA = os.path.join(ASSETS, "open_llama_v2.model")
TEXT = "def f(x):\n    return x  # über 42 \U0001F600\n"


def test_open_llama_sentencepiece():
    tok = load_tokenizer(OPEN_LLAMA)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.byte_fallback) == (32000, 1, 2, 0, True)
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids[1:-1]) == TEXT              # v2 round-trips code exactly, emoji by bytes
    assert tok.encode("Hello world") == [8479, 1173]    # the ids LLaMA-family models were trained on
    assert tok.encode_batch(["a b", TEXT]) == [tok.encode("a b"), tok.encode(TEXT)]


def test_vocab_checks():
    tok = load_tokenizer(OPEN_LLAMA)
    m = config_lib.base_config().model
    m.vocab_size = 64
    with pytest.raises(TokenizerError, match="32000 tokens but the model's vocabulary is 64"):
        check_vocab(tok, m)
    m.vocab_size = 32000
    check_vocab(tok, m)
    m.bos_token_id = 0
    with pytest.raises(TokenizerError, match="bos id 1 differs"):
        check_vocab(tok, m)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("/nonexistent/tokenizer.model")


def test_train_sentencepiece_and_cli(tmp_path):
    corpus = tmp_path / "corpus.txt"
    import random
    rnd = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value"] + [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 7)))
        for _ in range(300)
    ]
    corpus.write_text("\n".join(" ".join(rnd.choice(words) for _ in range(12)) for _ in range(2000)))
    path = train_sentencepiece([str(corpus)], str(tmp_path / "sp"), vocab_size=400)
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (400, 1, 2)
    text = "gamma delta über\n  return"
    assert tok.decode(tok.encode(text)) == text          # byte fallback covers unseen characters
    out = subprocess.run([sys.executable, "-m", "fot_jax.cli", "tokenizer", "encode", "--tokenizer", path,
                          "--text", "alpha beta", "--bos"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [1] + tok.encode("alpha beta")
    with pytest.raises(TokenizerError, match="missing"):
        train_sentencepiece([str(tmp_path / "nope.txt")], str(tmp_path / "x"), 400)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["hello world " * 50, "def f(x): return x"], trainer)
    d = tmp_path / "tok"
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(str(d))
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.decode(tok.encode("hello world")) == "hello world"

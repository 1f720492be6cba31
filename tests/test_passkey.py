"""Passkey prompts (the paper's wording, sized by tokens, needle at a depth) and the evaluation loop."""
import os

import pytest

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.data.tokenizer import load_tokenizer
from fot_jax.evals import passkey
from fot_jax.infer.runtime import MemorySettings
from fot_jax.model import llama

TOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fot_jax", "assets", "open_llama_v2.model")


@pytest.mark.parametrize("length,depth", [(512, 0.0), (2048, 0.5), (4096, 0.9)])
def test_prompt_layout(length, depth):
    tok = load_tokenizer(TOK)
    ids, answer = passkey.make_prompt(tok, length, depth, key=31337)
    per = len(tok.encode(passkey.FILLER + " "))
    assert length - 2 * per <= len(ids) <= length and ids[0] == tok.bos_id
    text = tok.decode(ids[1:])
    assert text.startswith(passkey.TASK) and text.endswith(passkey.QUESTION)
    needle = passkey.NEEDLE.format(key=31337)
    assert text.count(needle) == 1 and text.count("31337") == 2
    filler = len(text) - len(passkey.TASK) - len(needle) - len(passkey.QUESTION)
    share = (text.index(needle) - len(passkey.TASK)) / filler   # the needle's depth in the filler
    assert abs(share - depth) < 0.05
    assert tok.decode(answer).strip() == "31337"
    assert tok.encode(text + " 31337", bos=True) == list(ids) + answer


def test_passkey_loop_on_a_tiny_model(tmp_path):
    tok = load_tokenizer(TOK)
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 32000, 32, 48, 2
    m.max_position_embeddings, m.mem_layers = 128, [1]
    model = llama.create(m, seed=0)
    lines = []
    rows = passkey.passkey(model, tok, MemorySettings(top_k=8, capacity=1024, last_context_length=64),
                           [256, 320], seeds=2, batch=1, log=lines.append)
    assert [r["length"] for r in rows] == [256, 320]
    # a progress line when each prompt's windows are read (256 - 64 local tokens: 2 windows of 128)
    done = [ln for ln in lines if "window 2/2" in ln]
    assert len(done) == 4 and "prompts 2-2 of 2" in done[1] and "tokens/s" in done[0], lines
    for r in rows:
        assert r["trials"] == 2 and 0 <= r["hits"] <= 2 and r["accuracy"] == r["hits"] / 2
        assert r["length"] - 40 <= r["prompt_tokens"] <= r["length"]
    passkey.plot_passkey({"tiny": rows}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cli_passkey_uses_the_tokenizer_the_run_trained_with(tmp_path, capsys):
    """A training workdir holds no tokenizer of its own: `fot-jax eval --task passkey` reads the one its
    text data used (data.tokenizer, or train.init_from's for a fine-tune); a workdir of a run on
    synthetic data without one is a clear error."""
    from flax import nnx

    from fot_jax import cli
    from fot_jax.checkpoint import save_params
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 32000, 32, 48, 2
    m.max_position_embeddings, m.mem_layers, m.last_context_length = 128, [1], 64
    c.data.task, c.data.tokenizer, c.data.seq_len = "stdlib", "open_llama_v2", 128
    checks.validate(c)
    save_params(str(tmp_path / "run"), c, nnx.state(llama.create(m, seed=0), nnx.Param))
    assert cli.main(["eval", "--workdir", str(tmp_path / "run"), "--task", "passkey", "--sizes", "256",
                     "--num-docs", "1", "--out", str(tmp_path / "ev")]) == 0
    assert "| 256 |" in capsys.readouterr().out
    c.data.task = "dictionary_lookup"
    save_params(str(tmp_path / "synthetic"), c, nnx.state(llama.create(m, seed=0), nnx.Param))
    assert cli.main(["eval", "--workdir", str(tmp_path / "synthetic"), "--task", "passkey", "--sizes", "256",
                     "--out", str(tmp_path / "ev2")]) == 2
    assert "synthetic: no tokenizer.model or tokenizer.json" in capsys.readouterr().err

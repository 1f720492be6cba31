"""`fot-jax generate` with text in and text out: the workdir's tokenizer, streaming, the chat
template, a persistent compilation cache; the text equals the runtime's tokens decoded."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from fot_jax import config as config_lib
from fot_jax.checkpoint import save_params
from fot_jax.data.tokenizer import load_tokenizer
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
from fot_jax.model import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_MODEL = os.path.join(ROOT, "fot_jax", "assets", "open_llama_v2.model")
TEMPLATE = "{{ bos_token }}User: {{ messages[0]['content'] }}\nAssistant:"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random model over the OpenLLaMA vocabulary, with its tokenizer and a chat template."""
    wd = str(tmp_path_factory.mktemp("gen"))
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 32000, 32, 64, 2
    m.max_position_embeddings, m.mem_layers, m.last_context_length, m.init_std = 16, [1], 8, 0.5
    c.data.seq_len = 16
    model = llama.create(m, seed=0)
    save_params(wd, c, nnx.state(model, nnx.Param))
    os.makedirs(os.path.join(wd, "tokenizer"))
    shutil.copy(SP_MODEL, os.path.join(wd, "tokenizer", "tokenizer.model"))
    return wd, c, model


def _run(wd, *args, cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", FOT_JAX_COMPILATION_CACHE=cache or "")
    return subprocess.run([sys.executable, "-m", "fot_jax.cli", "generate", "--workdir", wd, *args],
                          capture_output=True, text=True, timeout=600, env=env)


def _expected(c, model, ids_list, n):
    rt = MemoryRuntime(model, len(ids_list), MemorySettings.from_config(c))
    return rt.generate([np.asarray(i, np.int32) for i in ids_list], n)


def test_text_prompt_streams_the_decoded_continuation(workdir, tmp_path):
    wd, c, model = workdir
    tok = load_tokenizer(SP_MODEL)
    prompt = (
        "def add(a, b):\n    return a + b\n\n# a prompt longer than the 16-token window, read through memory"
    )
    cache = str(tmp_path / "xla_cache")
    res = _run(wd, "--prompt", prompt, "--max-new-tokens", "6", cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    ids = tok.encode(prompt, bos=True)
    assert len(ids) > 16
    want = _expected(c, model, [ids], 6)[0]
    assert res.stdout == tok.decode([t for t in want if t != c.model.eos_token_id]) + "\n"
    assert "first token after" in res.stderr and "tokens in" in res.stderr
    assert os.listdir(cache)                              # compiled programs kept for the next run


def test_chat_template_and_a_batch_of_prompts(workdir, tmp_path):
    wd, c, model = workdir
    with open(os.path.join(wd, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE}, f)
    try:
        res = _run(
            wd,
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "4",
        )
    finally:
        os.remove(os.path.join(wd, "tokenizer", "tokenizer_config.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    tok = load_tokenizer(SP_MODEL)
    rendered = [f"<s>User: {q}\nAssistant:" for q in ("What is the capital of France?", "Hi")]
    ids = [[tok.bos_id] + tok.encode(r[len("<s>"):]) for r in rendered]   # the written <s> is the bos id
    want = _expected(c, model, ids, 4)
    got = [json.loads(line)["generated_text"] for line in res.stdout.splitlines()]
    assert got == [tok.decode([t for t in w if t != c.model.eos_token_id]) for w in want]


def test_bad_generate_requests_are_one_line_errors(workdir):
    wd, _, _ = workdir
    res = _run(wd, "--chat", "--prompt", "x")
    assert res.returncode != 0 and "has no chat template" in res.stderr
    res = _run(wd, "--prompt", "x", "--tokens", "1 2 3")
    assert res.returncode != 0 and "not both" in res.stderr
    res = _run(wd)
    assert res.returncode != 0 and "--prompt TEXT" in res.stderr

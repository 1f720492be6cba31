"""Retrieval-head scores (which heads copy a passkey from the context) against the attention
weights stock transformers reports for the same weights and prompt."""
import numpy as np
import pytest
from flax import nnx

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.checkpoint import save_params
from fot_jax.convert import api
from fot_jax.data import text
from fot_jax.data.tokenizer import load_tokenizer
from fot_jax.evals import passkey, retrieval_heads
from fot_jax.model import llama

torch = pytest.importorskip("torch", reason="needs torch: pip install 'fot_jax[torch]'")
transformers = pytest.importorskip("transformers", reason="needs transformers")


def test_scores_equal_transformers_attention_weights(tmp_path):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 32000, 32, 64, 3
    m.num_heads, m.num_kv_heads, m.max_position_embeddings, m.mem_layers = 4, 2, 256, []
    m.init_std = 0.2
    c.data.seq_len = 256
    checks.validate(c)
    model = llama.create(m, seed=2)
    save_params(str(tmp_path / "run"), c, nnx.state(model, nnx.Param))
    api.export_model(str(tmp_path / "run"), str(tmp_path / "hf"), log=lambda *_: None)
    tok = load_tokenizer(text.builtin_tokenizer_path("open_llama_v2"))
    scores, hits = retrieval_heads.retrieval_scores(model, tok, length=200, seeds=1)
    # the reference: transformers' eager attention weights at the same positions
    rng = np.random.default_rng([200, 0, 17])
    key, depth = int(rng.integers(10000, 50001)), float(rng.random())
    ids, answer = passkey.make_prompt(tok, 200, depth, key)
    src = retrieval_heads._needle_start(ids, answer) + np.arange(len(answer))
    q_pos = len(ids) - 1 + np.arange(len(answer))
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager")
    ref.eval()
    with torch.no_grad():
        att = ref(torch.tensor(np.concatenate([ids, answer]))[None], output_attentions=True).attentions
    want = np.stack([a[0][:, q_pos, src].numpy().mean(-1) for a in att])      # [layers, heads]
    np.testing.assert_allclose(scores, want, atol=1e-5)
    rows, layers = retrieval_heads.strongest(scores, top=3, layers=2)
    assert rows[0]["score"] == pytest.approx(want.max(), abs=1e-5) and len(layers) == 2
    assert 0 <= hits <= 1
    with pytest.raises(ValueError, match="model.max_position_embeddings"):
        retrieval_heads.retrieval_scores(model, tok, length=512, seeds=1)

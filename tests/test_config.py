"""Bad configs are refused before anything compiles, with errors that name the field."""
import os
import subprocess
import sys

import pytest

from fot_jax import checks
from fot_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def load(*overrides):
    return checks.load_config(TINY, list(overrides))


def test_all_shipped_configs_validate():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            cfg = checks.load_config(os.path.join(ROOT, "configs", name))
            assert cfg.model.num_layers > 0


def test_overrides_are_typed():
    cfg = load("--config.train.steps=7", "--config.train.learning_rate=1", "--config.model.mem_layers=[0,1]",
               "--config.crossbatch.stepping=false", "--config.model.mem_positionals=none")
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 1.0
    assert list(cfg.model.mem_layers) == [0, 1] and cfg.crossbatch.stepping is False
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        load("--config.train.steps=many")


def test_unknown_field_names_close_matches():
    with pytest.raises(config_lib.ConfigError, match=r"unknown config field 'train.step'.*train.steps"):
        load("--config.train.step=3")
    with pytest.raises(config_lib.ConfigError, match=r"crossbatch.range"):
        load("--config.crossbatch.rnage=3")


def test_memory_layer_out_of_range():
    with pytest.raises(
        config_lib.ConfigError, match=r"model.mem_layers.*index 2 out of range for num_layers=2"
    ):
        load("--config.model.mem_layers=[2]")


def test_range_larger_than_microbatch_rows():
    with pytest.raises(config_lib.ConfigError, match=r"crossbatch.range.*r=8 needs at least 9 rows"):
        load("--config.crossbatch.range=8")
    with pytest.raises(config_lib.ConfigError, match=r"r=3 needs at least 4 rows.*has 2"):
        load("--config.crossbatch.range=3", "--config.train.microbatches=4")


def test_sequence_the_data_cannot_fill():
    with pytest.raises(config_lib.ConfigError, match=r"data.seq_len.*do not fill whole steps"):
        load("--config.data.seq_len=48")
    with pytest.raises(config_lib.ConfigError, match=r"data.seq_len.*exceeds the model window"):
        load("--config.data.seq_len=128")


def test_other_bad_fields():
    with pytest.raises(config_lib.ConfigError, match="num_kv_heads"):
        load("--config.model.num_kv_heads=3")
    with pytest.raises(config_lib.ConfigError, match="mem_positionals"):
        load("--config.model.mem_positionals=alibi")
    with pytest.raises(config_lib.ConfigError, match="data.batch_size"):
        load("--config.data.batch_size=7")
    with pytest.raises(config_lib.ConfigError, match=r"data.near_miss.*\[0, 1\]"):
        load("--config.data.near_miss=1.5")
    with pytest.raises(config_lib.ConfigError, match=r"memory.logn_base.*at least 2 keys, got 1"):
        load("--config.memory.logn_base=1")


def stages(*specs, steps=20):
    return load(f"--config.train.steps={steps}", f"--config.stages={list(specs)!r}")


def test_stage_configs():
    cfg = stages(dict(name="short", until_step=5, data=dict(doc_length=32, batch_size=16)),
                 dict(name="wide", until_accuracy=0.9, crossbatch=dict(range=3, sample_range=True),
                      train=dict(learning_rate=5e-4, temperature_lr_scale=10.0)),
                 dict(name="last", until_step=20))
    a, b, c = config_lib.build_stages(cfg)
    # a stage's window and query region keep their share of its documents (128 -> 32: T 64 -> 16)
    assert (a.cfg.data.doc_length, a.cfg.data.seq_len, a.cfg.data.query_length, a.cfg.data.batch_size) == (
        32, 16, 16, 16)
    assert a.until_step == 5 and a.num_docs == 5 * 8 and a.lr_scale == 1.0
    assert b.cfg.crossbatch.range == 3 and b.cfg.crossbatch.sample_range and b.num_docs is None
    assert b.until_step == 20 and b.until_accuracy == 0.9       # an accuracy stage: at most to the end
    assert b.lr_scale == pytest.approx(0.5) and b.temperature_scale == 10.0
    assert c.cfg.crossbatch.range == 1 and c.cfg.data.doc_length == 128   # the run's own config
    assert cfg.data.doc_length == 128 and cfg.crossbatch.range == 1      # the run itself is unchanged
    assert config_lib.max_range(cfg) == 3
    assert [s.name for s in config_lib.build_stages(load())] == ["train"]  # no stages: one


def test_eta_weighs_each_stage_by_its_cost():
    """The progress ETA: remaining steps of each stage x its tokens a step x its FLOPs a token
    (document length, rows, crossbatch range), at the pace measured now."""
    from fot_jax.train.metrics import model_flops_per_token, remaining_seconds
    cfg = stages(dict(name="short", until_step=5, data=dict(doc_length=32, batch_size=16)),
                 dict(name="wide", until_step=12, crossbatch=dict(range=3)),
                 dict(name="last"))
    st = config_lib.build_stages(cfg)
    cost = [s.cfg.data.batch_size * s.cfg.data.seq_len
            * model_flops_per_token(s.cfg.model, s.cfg.data.seq_len, s.cfg.crossbatch.range) for s in st]
    assert cost[1] > cost[2] > cost[0]
    assert remaining_seconds(st, 2, 20, 1e9) == pytest.approx((3 * cost[0] + 7 * cost[1] + 8 * cost[2]) / 1e9)
    assert remaining_seconds(st[1:], 8, 20, 2e9) == pytest.approx((4 * cost[1] + 8 * cost[2]) / 2e9)
    assert remaining_seconds(st[2:], 20, 20, 1e9) == 0.0


@pytest.mark.parametrize("specs, match", [
    ([dict(name="a", until_step=5, crossbatch=dict(rnage=3))],
     r"stages\[0\]' \('a'\): 'crossbatch.rnage' is unknown field.*did you mean crossbatch.range"),
    ([dict(name="a", until_step=5, model=dict(hidden_size=8))], r"stages\[0\].*unknown key 'model'"),
    ([dict(name="a", until_step=5, train=dict(steps=8))], r"'train.steps' is a field a stage cannot change"),
    ([dict(name="a", until_step=5), dict(name="b", until_step=5)], r"stages\[1\]' \('b'\).*out of order"),
    ([dict(name="a", until_step=9), dict(name="b", until_step=4)], r"stages\[1\].*out of order"),
    ([dict(name="a", until_step=30)], r"until_step=30 is out of order.*train.steps=20"),
    ([dict(name="a", until_step=5, crossbatch=dict(range=8))],
     r"stages\[0\]' \('a'\): gives an invalid config: .*crossbatch.range.*r=8 needs at least 9 rows"),
    ([dict(name="a", until_step=5, data=dict(batch_size=7))], r"stages\[0\].*data.batch_size"),
    ([dict(name="a"), dict(name="b")], r"stages\[0\].*needs until_step or until_accuracy"),
    ([dict(until_step=5)], r"stages\[0\]': every stage needs a 'name'"),
    ([dict(name="a", until_step=5), dict(name="a")], r"stages\[1\].*name repeats"),
    ([dict(name="a", until_accuracy=1.5)], r"until_accuracy must lie in \[0, 1\]"),
    ([dict(name="a", until_step=5, crossbatch=dict(range="3"))], r"'crossbatch.range': expected a int"),
    (["oops"], r"stages\[0\]': a stage is a dict"),
])
def test_bad_stages_are_refused_naming_the_stage(specs, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        stages(*specs)


def test_earlier_schemas_curriculum_becomes_stages():
    stored = load().to_dict()
    stored.pop("stages")
    stored["data"]["curriculum"] = "10:2:1:1,20:0:4:4:32:16"
    stored["crossbatch"].update(switch_range=3, switch_accuracy=0.9)
    stored["train"]["steps"] = 40
    cfg = checks.from_dict(stored)
    got = [(s.name, s.until_step, s.until_accuracy, s.cfg.data.key_length, s.cfg.data.doc_length,
            s.cfg.data.batch_size, s.cfg.crossbatch.range) for s in config_lib.build_stages(cfg)]
    assert got == [("curriculum_0", 10, 0.0, 1, 128, 8, 1), ("curriculum_1", 20, 0.0, 4, 32, 16, 1),
                   ("r1", 40, 0.9, 4, 128, 8, 1), ("r3", 40, 0.0, 4, 128, 8, 3)]


def test_cli_reports_config_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fot_jax.cli", "train", "--config", TINY,
                           "--workdir", str(tmp_path), "--config.model.hiden_size=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config field 'model.hiden_size'" in proc.stderr
    assert "model.hidden_size" in proc.stderr


def test_config_reference_is_current_and_describes_every_field():
    """docs/reference/config.md is what `python -m fot_jax.config_reference` prints now; every field
    of the schema has a description, taken from its comment (continued lines and a comment block
    right above a field included)."""
    import ml_collections

    from fot_jax import config_reference
    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "reference", "config.md")
    with open(doc) as f:
        assert f.read() == config_reference.markdown(), (
            "docs/reference/config.md is stale: "
            "python -m fot_jax.config_reference > docs/reference/config.md")
    comments = {name: text for _, name, text in config_reference.field_comments(config_lib._model_fields)}
    assert comments["trained_context"].endswith("0: unknown. Set it to train a longer window on purpose")
    mem = {name: text for _, name, text in config_reference.field_comments(config_lib._memory_fields)}
    assert mem["logn_base"].startswith("log-n scaling")
    assert mem["top_k"] == "memory entries each query retrieves"

    def _fields():
        """Fields of `x`: a test section."""
        x = ml_collections.ConfigDict()
        # a note on the fields below
        x.a = 1   # described
        x.b = "#"
        # the comment of c
        x.c = 3
        return x

    assert config_reference.field_comments(_fields) == [
        ("note", "", "a note on the fields below"), ("field", "a", "described"), ("field", "b", ""),
        ("field", "c", "the comment of c")]
    with pytest.raises(RuntimeError, match="x.b has no comment"):
        config_reference.section_markdown("x", _fields, _fields())
    def _commented():
        """Fields of `x`: a test section."""
        x = ml_collections.ConfigDict()
        x.a = 1   # the comment of a
        return x

    assert config_reference.section_markdown("x", _commented, _commented()) == [
        "| field | default | meaning |", "| --- | --- | --- |", "| `x.a` | `1` | the comment of a |"]
    section = _commented()
    section.d = 4                    # a field the source does not assign
    with pytest.raises(RuntimeError, match=r"fields of x not found in its source: \['d'\]"):
        config_reference.section_markdown("x", _commented, section)

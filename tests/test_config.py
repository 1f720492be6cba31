"""Bad configs are refused before anything compiles, with errors that name the field."""
import os
import subprocess
import sys

import pytest

from fot_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def load(*overrides):
    return config_lib.load_config(TINY, list(overrides))


def test_all_shipped_configs_validate():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            cfg = config_lib.load_config(os.path.join(ROOT, "configs", name))
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
    with pytest.raises(config_lib.ConfigError, match="curriculum"):
        load("--config.data.curriculum=abc")
    with pytest.raises(config_lib.ConfigError, match=r"data.curriculum.*stage .*data.batch_size"):
        load("--config.data.curriculum=10:0:4:4:64:7")  # 7 rows do not hold k=2 chunks


def test_curriculum_stage_configs():
    cfg = load("--config.data.curriculum=10:2:1:1,20:0:4:4:32:16")
    stages = config_lib.parse_curriculum(cfg.data.curriculum)
    assert stages == [(10, 2, 1, 1, 0, 0), (20, 0, 4, 4, 32, 16)]
    a, b = (config_lib.stage_config(cfg, s) for s in stages)
    assert (a.data.num_definitions, a.data.key_length, a.data.doc_length) == (2, 1, 128)
    assert (b.data.doc_length, b.data.query_length, b.data.seq_len, b.data.batch_size) == (32, 16, 16, 16)
    assert cfg.data.doc_length == 128 and cfg.data.seq_len == 64  # the task itself is unchanged


def test_cli_reports_config_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fot_jax.cli", "train", "--config", TINY,
                           "--workdir", str(tmp_path), "--config.model.hiden_size=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config field 'model.hiden_size'" in proc.stderr
    assert "model.hidden_size" in proc.stderr

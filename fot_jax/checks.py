"""A config checked against the code above its schema: the data task's own fields (the task table,
`fot_jax.data.tasks`) and the attention backend (`fot_jax.model.kernels`), on a platform.

`fot_jax.config` is the schema at the bottom of the package (it imports nothing from it): defaults,
overrides, field ranges, stages. What depends on a task or a kernel is checked here, one floor up;
every entry point that runs work (train, eval, generate, import, plan, sweep) loads configs
through `load_config` / `from_dict` here, or calls `validate` before it compiles anything.
"""
from __future__ import annotations

from typing import Iterable

from fot_jax import config as config_lib
from fot_jax.data.tasks import TASKS
from fot_jax.errors import ConfigError
from fot_jax.model import kernels


def _task(cfg) -> None:
    """The data task's own fields, by the task's module."""
    if cfg.data.task not in TASKS:
        raise ConfigError(f"config field 'data.task': unknown task '{cfg.data.task}' ({', '.join(TASKS)})")
    TASKS[cfg.data.task].validate(cfg)


def _attention(cfg, platform: str | None) -> None:
    for field, message in kernels.check(cfg.model, cfg.data.seq_len, platform):
        raise ConfigError(f"config field '{field}': {message}")


def validate(cfg, platform: str | None = None) -> None:
    """Raises ConfigError naming the field for anything that cannot run: the schema's checks, then
    the attention backend (on `platform`: tpu, gpu, cpu, when given; `check_platform` checks the
    running one once JAX's backend may start) and the data task, for the run and for each stage."""
    config_lib.validate(cfg)
    _attention(cfg, platform)
    _task(cfg)
    if cfg.get("stages"):
        for stage in config_lib.build_stages(cfg):
            try:
                _attention(stage.cfg, None)
                _task(stage.cfg)
            except ConfigError as e:
                raise config_lib.stage_error(stage.index, stage.name,
                                             f"gives an invalid config: {e}") from None


def check_platform(cfg, platform: str | None = None) -> None:
    """The attention backend runs on `platform` (default: this process's; starts JAX's backend,
    so in a multi-host run only after `jax.distributed.initialize`)."""
    import jax
    _attention(cfg, platform or jax.default_backend())


def load_config(path: str, overrides: Iterable[str] = (), platform: str | None = None):
    """`fot_jax.config.load_config`, checked against the task and the attention backend."""
    cfg = config_lib.load_config(path, overrides)
    validate(cfg, platform)
    return cfg


def from_dict(stored: dict, overrides: Iterable[str] = (), platform: str | None = None):
    """`fot_jax.config.from_dict`, checked against the task and the attention backend."""
    cfg = config_lib.from_dict(stored, overrides)
    validate(cfg, platform)
    return cfg

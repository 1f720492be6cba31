"""Trainer: sharded state, accumulation, sharded == unsharded, metrics, errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.train import loop
from fot_jax.train.loop import Trainer, to_global

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def tiny(*overrides):
    return checks.load_config(TINY, list(overrides))


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    return {"inputs": rng.integers(0, 64, (B, T)).astype(np.int32),
            "targets": rng.integers(0, 64, (B, T)).astype(np.int32),
            "loss_mask": (rng.random((B, T)) < 0.5).astype(np.float32),
            "segment_ids": np.ones((B, T), np.int32)}


def _run_steps(trainer, batches, r):
    losses = []
    with mesh_lib.use_mesh(trainer.mesh):
        fn = trainer.train_step_fn(r)
        for b in batches:
            trainer.state, m = fn(trainer.state, to_global(b, trainer.mesh), jnp.int32(r))
            losses.append(float(m["loss"]))
    return losses, jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_state_is_sharded_by_logical_axes(tmp_path):
    cfg = tiny("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    tr = Trainer(cfg, str(tmp_path), quiet=True)
    params = tr.state["params"]
    q = params["stacks"][0]["layer"]["self_attn"]["q_proj"][...]     # [layers, embed, heads, head_dim]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    emb = params["embed_tokens"][...]                        # [vocab, embed]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    mu = tr.state["opt_state"][1][0].mu["stacks"][0]["layer"]["mlp"]["up_proj"][...]
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # each device holds a quarter of the up projection: sharded at creation, never whole
    assert mu.addressable_shards[0].data.shape == (
        mu.shape[0],
        cfg.model.hidden_size // 2,
        cfg.model.intermediate_size // 2,
    )


@pytest.mark.slow
def test_sharded_training_equals_single_device(tmp_path):
    batches = [_batch(tiny(), s) for s in range(3)]
    one = Trainer(tiny("--config.mesh.data=1"), str(tmp_path / "a"), devices=jax.devices()[:1], quiet=True)
    eight = Trainer(tiny("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"),
                    str(tmp_path / "b"), quiet=True)
    l1, p1 = _run_steps(one, batches, 1)
    l8, p8 = _run_steps(eight, batches, 1)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    _assert_trees_close(p1, p8, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_gradient_accumulation_equals_whole_batch(tmp_path, implementation):
    """4 microbatches of 2 streams (k=2) each == one step on all 8 rows (crossbatch within
    microbatches: r=1 with stepping only looks inside a stream)."""
    base = ["--config.crossbatch.implementation=" + implementation]
    batches = [_batch(tiny(), s) for s in range(2)]
    whole = Trainer(tiny(*base), str(tmp_path / "a"), quiet=True)
    micro = Trainer(tiny(*base, "--config.train.microbatches=4"), str(tmp_path / "b"), quiet=True)
    lw, pw = _run_steps(whole, batches, 1)
    lm, pm = _run_steps(micro, batches, 1)
    np.testing.assert_allclose(lw, lm, rtol=1e-5)
    _assert_trees_close(pw, pm, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["splash", "xla"])
def test_kernel_backend_training_equals_reference(tmp_path, backend):
    """Whole train steps on the 8-device mesh (one row per device; splash under shard_map in Pallas
    interpret mode) equal the reference backend: r = 3, k = 2 stepping, document mask with
    several documents per row."""
    over = [
        "--config.crossbatch.range=3",
        "--config.crossbatch.doc_mask=true",
        "--config.model.attention_block_q=128",
        "--config.model.attention_block_kv=128",
    ]
    batches = [_batch(tiny(*over), s) for s in range(2)]
    for s, b in enumerate(batches):
        b["segment_ids"] = (np.cumsum(np.random.default_rng(s).random(b["inputs"].shape) < 0.05, axis=1)
                            .astype(np.int32))
    ref = Trainer(tiny(*over), str(tmp_path / "a"), checkpoints=False, quiet=True)
    ker = Trainer(tiny(*over, f"--config.model.attention_backend={backend}"), str(tmp_path / "b"),
                  checkpoints=False, quiet=True)
    assert ker.graphdef != ref.graphdef    # the backend is part of the model's static structure
    la, pa = _run_steps(ref, batches, 3)
    lb, pb = _run_steps(ker, batches, 3)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    _assert_trees_close(pa, pb, atol=2e-6)


@pytest.mark.slow
def test_blockwise_training_equals_dense(tmp_path):
    batches = [_batch(tiny("--config.data.batch_size=8"), s) for s in range(2)]
    a = Trainer(
        tiny("--config.crossbatch.range=3", "--config.crossbatch.stepping=false"),
        str(tmp_path / "a"),
        quiet=True,
    )
    b = Trainer(tiny("--config.crossbatch.range=3", "--config.crossbatch.stepping=false",
                     "--config.crossbatch.implementation=blockwise"), str(tmp_path / "b"), quiet=True)
    la, pa = _run_steps(a, batches, 3)
    lb, pb = _run_steps(b, batches, 3)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    _assert_trees_close(pa, pb, atol=2e-6)


@pytest.mark.slow
def test_train_end_to_end_writes_metrics_and_plot(tmp_path, data_dir):
    cfg = tiny("--config.train.steps=30", "--config.train.eval_every=15", "--config.train.learning_rate=0.01")
    summary = loop.train(cfg, str(tmp_path), quiet=True)
    assert summary["steps"] == 30
    assert set(summary["eval"]) == {"0", "1"}
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    # loss on the (masked) value tokens falls below uniform guessing over the 58 symbols
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert {r["split"] for r in rows} >= {"eval_r0", "eval_r1"}
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_nan_loss_stops_with_the_step(tmp_path, data_dir):
    cfg = tiny("--config.train.steps=10", "--config.train.learning_rate=1e30",
               "--config.train.warmup_steps=0", "--config.train.grad_clip=0.0")
    with pytest.raises(loop.TrainingError, match=r"loss is nan at step \d+"):
        loop.train(cfg, str(tmp_path), quiet=True)


def test_batch_not_divisible_by_mesh(tmp_path):
    cfg = tiny("--config.data.batch_size=4", "--config.crossbatch.range=1")
    with pytest.raises(config_lib.ConfigError, match="data-parallel size 8"):
        Trainer(cfg, str(tmp_path), quiet=True)


def test_mesh_must_fit_devices(tmp_path):
    cfg = tiny("--config.mesh.data=3")
    with pytest.raises(config_lib.ConfigError, match="mesh"):
        Trainer(cfg, str(tmp_path), quiet=True)


@pytest.mark.slow
def test_remat_policies_do_not_change_the_step(tmp_path):
    batches = [_batch(tiny(), 0)]
    base_loss, base_params = _run_steps(Trainer(tiny(), str(tmp_path / "a"), quiet=True), batches, 1)
    for policy in ("full", "dots"):
        loss, params = _run_steps(Trainer(tiny(f"--config.model.remat={policy}"), str(tmp_path / policy),
                                          quiet=True), batches, 1)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        _assert_trees_close(params, base_params, atol=1e-6)


@pytest.mark.slow
def test_sampled_range_compiles_once(tmp_path, data_dir):
    cfg = tiny("--config.train.steps=12", "--config.train.log_every=1", "--config.crossbatch.range=3",
               "--config.crossbatch.sample_range=true", "--config.crossbatch.range_min=0")
    trainer = Trainer(cfg, str(tmp_path), quiet=True)
    trainer.run()
    ranges = [json.loads(line)["range"] for line in open(tmp_path / "metrics.jsonl")
              if json.loads(line)["split"] == "train"]
    assert len(ranges) == 12 and len(set(ranges)) > 1 and set(ranges) <= {0, 1, 2, 3}
    assert [k[0] for k in trainer._train_steps] == [3]  # one program, r passed as a traced scalar


def test_stage_scales_equal_a_smaller_learning_rate(tmp_path):
    """A stage's lr_scale is the schedule's learning rate times the scale (AdamW's update is linear
    in it), and its temperature scale multiplies the qk_norm temperatures' updates on top: checked
    against optax run with the smaller learning rate itself."""
    batch = _batch(tiny())
    common = ("--config.model.qk_norm=memory", "--config.train.warmup_steps=0",
              "--config.train.weight_decay=0.1")
    a = Trainer(tiny("--config.train.learning_rate=1e-2", *common), str(tmp_path / "a"), quiet=True)
    b = Trainer(tiny("--config.train.learning_rate=2.5e-3", *common), str(tmp_path / "b"), quiet=True)
    p0 = jax.tree.map(np.asarray, jax.device_get(a.state["params"]))
    with mesh_lib.use_mesh(a.mesh):
        a.state, ma = a.train_step_fn(1)(a.state, to_global(batch, a.mesh), jnp.int32(1), 0.25, 4.0)
    with mesh_lib.use_mesh(b.mesh):
        b.state, mb = b.train_step_fn(1)(b.state, to_global(batch, b.mesh), jnp.int32(1))
    assert float(ma["learning_rate"]) == pytest.approx(float(mb["learning_rate"]))
    pa, pb = (jax.tree_util.tree_flatten_with_path(jax.device_get(t.state["params"]))[0] for t in (a, b))
    temperatures = 0
    for (path, x), (_, y), z in zip(pa, pb, jax.tree.leaves(p0)):
        if "qk_temperature" in jax.tree_util.keystr(path):
            temperatures += 1
            np.testing.assert_allclose(np.asarray(x) - z, 4.0 * (np.asarray(y) - z), rtol=1e-4, atol=1e-9)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)
    assert temperatures > 0


STAGED = ("--config.train.steps=9", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=0", "--config.stages=" + repr([
              dict(name="short", until_step=3, data=dict(doc_length=64, batch_size=16)),
              dict(name="until_acc", until_accuracy=1e-9),
              dict(name="wide", crossbatch=dict(range=3), train=dict(learning_rate=5e-4))]))


@pytest.mark.slow
def test_stages_run_in_order_and_resume_exactly(tmp_path, data_dir, capsys):
    """Stages end at their step or training accuracy, each with its data, range and learning rate;
    a run stopped inside a stage resumes it (data position and accuracy window) bit for bit."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = Trainer(tiny(*STAGED), a, quiet=True)
    summary = full.run()
    assert [(s["name"], s["start"], s["end"]) for s in summary["stages"]] == [
        ("short", 0, 3), ("until_acc", 3, 6), ("wide", 6, 9)]
    assert "train accuracy" in summary["stages"][1]["reason"] and summary["max_train_range"] == 3
    assert "warnings" not in summary
    rows = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["range"] for r in train] == [1] * 6 + [3] * 3
    assert [r["stage"] for r in train] == [0] * 3 + [1] * 3 + [2] * 3
    sched = full.schedule
    for r in train[6:]:
        assert r["learning_rate"] == pytest.approx(float(sched(r["step"] - 1)) * 0.5, rel=1e-6)
    first = Trainer(tiny(*STAGED), b, quiet=True)
    assert first.run(until=5)["steps"] == 5
    capsys.readouterr()
    second = Trainer(tiny(*STAGED), b)
    assert [(s["name"], s["end"]) for s in second.run()["stages"]] == [
        ("short", 3), ("until_acc", 6), ("wide", 9)]
    assert "stage 2/3 'until_acc' from step 3, resumed at step 5:" in capsys.readouterr().out
    la = [r["loss"] for r in train]
    lb = [json.loads(line)["loss"] for line in open(os.path.join(b, "metrics.jsonl"))
          if json.loads(line)["split"] == "train"]
    assert la == lb
    leaves = [jax.tree.leaves(jax.device_get(t.state)) for t in (full, second)]
    for x, y in zip(*leaves):
        np.testing.assert_array_equal(x, y)


def test_summary_warns_when_training_never_exceeded_r1(tmp_path, data_dir):
    summary = loop.train(tiny("--config.train.steps=2", "--config.train.eval_every=0"), str(tmp_path),
                         checkpoints=False, quiet=True)
    assert summary["max_train_range"] == 1
    assert "not expected to read large memories" in summary["warnings"][0]


def test_trainable_subset_freezes_the_rest_with_the_full_models_gradients(tmp_path):
    """train.trainable: the matching parameters take exactly the step full training gives them
    (same gradients; no clipping, no decay), the others stay bit for bit and hold no optimizer
    moments; the compiled step computes no gradient for layers below the lowest trainable one."""
    common = ("--config.train.grad_clip=0", "--config.train.warmup_steps=0",
              "--config.train.weight_decay=0.1", "--config.mesh.data=1")
    batch = _batch(tiny())
    full = Trainer(tiny(*common), str(tmp_path / "a"), devices=jax.devices()[:1], quiet=True)
    pattern = "--config.train.trainable=['^layers\\\\.1\\\\.self_attn']"
    part = Trainer(tiny(*common, pattern), str(tmp_path / "b"), devices=jax.devices()[:1], quiet=True)
    p0 = jax.tree.map(np.asarray, jax.device_get(full.state["params"]))
    _, pf = _run_steps(full, [batch], 1)
    _, pp = _run_steps(part, [batch], 1)
    moments = part.state["opt_state"]
    from fot_jax.model.layout import dotted, layer_names
    changed = 0
    flat = jax.tree_util.tree_flatten_with_path(pp)[0]
    names = layer_names(pp)                         # a stored (stacked) parameter's per-layer names
    for (path, x), y, z in zip(flat, jax.tree.leaves(pf), jax.tree.leaves(p0)):
        name = names[dotted(path)][0]
        if name.startswith("layers.1.self_attn"):
            changed += 1
            # the full model's update: Adam's first step moves each weight by about the learning
            # rate whatever its gradient's size, so an element whose gradient differs in the last
            # bits (another reduction order of the two compiled programs, as on AVX-512 CPUs) may
            # move differently by ~1e-7; a wrong gradient moves it by ~lr (1e-3)
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
            assert not np.array_equal(x, z)
        else:
            np.testing.assert_array_equal(x, z)                         # untouched, not even decayed
    assert changed == 4
    kept = [x for x in jax.tree.leaves(moments) if getattr(x, "ndim", 0) >= 2]
    assert len(kept) == 2 * 4                                           # mu and nu of the 4 projections
    # a pattern that names no parameter, and a pattern that is no regex: config errors
    with pytest.raises(config_lib.ConfigError, match="train.trainable.*matches no parameter"):
        Trainer(tiny("--config.train.trainable=['^layer\\\\.9']"), str(tmp_path / "c"), quiet=True)
    with pytest.raises(config_lib.ConfigError, match="train.trainable.*not a regular expression"):
        tiny("--config.train.trainable=['(']")


def test_flops_of_a_partly_frozen_step():
    """model_flops_per_token with train.trainable: forward everywhere, activation gradients from
    the top down to the lowest trainable layer, weight gradients of trainable layers only."""
    from fot_jax.train.metrics import model_flops_per_token
    m = tiny("--config.model.num_layers=4", "--config.model.mem_layers=[2]").model
    fwd = model_flops_per_token(m, 64, 1, training=False)
    assert model_flops_per_token(m, 64, 1) == pytest.approx(3 * fwd)
    e, i, h, kv = m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads
    d = m.hidden_size // m.num_heads
    dense = 2 * (e * d * (2 * h + 2 * kv) + 3 * e * i)
    head = 2 * e * config_lib.padded_vocab(m)
    attn = [4 * h * d * 64 * (2 if layer == 2 else 1) for layer in range(4)]
    # layers 2 and 3 train (embedding frozen): backward through them only
    want = fwd + head + sum(2 * dense + 2 * attn[layer] for layer in (2, 3))
    assert model_flops_per_token(m, 64, 1, trainable=(r"^layers\.[23]\.",)) == pytest.approx(want)
    # only layer 3's attention trains: activation gradients through layer 3, weights of layer 3
    want = fwd + head + dense * 2 + 2 * attn[3]
    assert model_flops_per_token(m, 64, 1, trainable=(r"^layers\.3\.self_attn",)) == pytest.approx(want)


def test_compiled_partly_frozen_step_does_the_flops_counted(tmp_path):
    """XLA's own count of the compiled train step falls with train.trainable as
    model_flops_per_token says (the backward of frozen layers is really gone)."""
    from fot_jax.train.metrics import model_flops_per_token
    counted, compiled = [], []
    for patterns in ([], ["^layers\\.1\\.self_attn"]):
        c = tiny("--config.mesh.data=1", f"--config.train.trainable={patterns!r}")
        t = Trainer(c, str(tmp_path / str(len(patterns))), devices=jax.devices()[:1], quiet=True,
                    checkpoints=False)
        with mesh_lib.use_mesh(t.mesh):
            exe = t.train_step_fn(1).lower(t.state, to_global(_batch(c), t.mesh), jnp.int32(1)).compile()
        cost = exe.cost_analysis()
        compiled.append((cost[0] if isinstance(cost, list) else cost)["flops"])
        counted.append(model_flops_per_token(c.model, c.data.seq_len, 1, trainable=tuple(patterns)))
    assert compiled[1] / compiled[0] == pytest.approx(counted[1] / counted[0], rel=0.15)
    assert compiled[1] < 0.75 * compiled[0]


def test_hooks_see_an_immutable_step_record_and_stop_a_run_by_raising(tmp_path, data_dir):
    """add_hook(fn, every): fn gets a read-only record of each due step (progress and evaluation
    when they ran after it); StopTraining ends the run at that step with a checkpoint and the
    normal summary, and the next run resumes from there."""
    import dataclasses
    cfg = tiny("--config.train.steps=8", "--config.train.log_every=2", "--config.train.eval_every=4",
               "--config.train.checkpoint_every=0")
    seen = []
    trainer = Trainer(cfg, str(tmp_path), quiet=True)
    trainer.add_hook(seen.append, every=3)
    everything = []

    def stop_after_five(record):
        everything.append(record)
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.step = 0
        with pytest.raises(TypeError):
            record.metrics["loss"] = 0.0
        if record.step == 5:
            raise loop.StopTraining("enough")

    trainer.add_hook(stop_after_five)
    summary = trainer.run()
    assert summary["steps"] == 5 and "preempted" not in summary
    assert [r.step for r in seen] == [3] and [r.step for r in everything] == [1, 2, 3, 4, 5]
    assert [r.progress is not None for r in everything] == [False, True, False, True, False]
    assert [r.eval is not None for r in everything] == [False, False, False, True, False]
    record = everything[3]
    assert record.total_steps == 8 and record.stage == "train" and record.r == cfg.crossbatch.range
    assert set(record.eval) == set(cfg.crossbatch.eval_ranges)
    assert record.progress["loss"] == pytest.approx(record.host_metrics()["loss"])
    assert summary["stages"][-1]["reason"] == "hook: enough"
    assert set(summary["eval"]) == {str(r) for r in cfg.crossbatch.eval_ranges}   # evaluated at the stop
    resumed = Trainer(cfg, str(tmp_path), quiet=True)
    steps = []
    resumed.add_hook(lambda r: steps.append(r.step))
    assert resumed.run()["steps"] == 8 and steps == [6, 7, 8]
    with pytest.raises(TypeError, match="not callable"):
        resumed.add_hook("print")
    with pytest.raises(ValueError, match="every must be >= 0"):
        resumed.add_hook(print, every=-1)


def test_goodput_arithmetic_on_events():
    """Goodput and badput from a hand-made log: two attempts, the first killed after step 3 with
    step 2 its last checkpoint, so step 3 is trained twice."""
    from fot_jax.train import goodput
    ev = [dict(event="job_start", time=100.0), dict(event="init", seconds=2.0, time=102.0),
          dict(event="restore", seconds=1.0, step=0, time=103.0),
          dict(event="step", step=1, seconds=5.0, data_seconds=0.5, compile=True, time=108.0),
          dict(event="step", step=2, seconds=1.5, data_seconds=0.5, compile=False, time=109.5),
          dict(event="checkpoint", step=2, seconds=0.5, time=110.0),
          dict(event="step", step=3, seconds=1.5, data_seconds=0.5, compile=False, time=111.5),
          dict(event="job_start", time=120.0), dict(event="init", seconds=2.0, time=122.0),
          dict(event="restore", seconds=1.0, step=2, time=123.0),
          dict(event="step", step=3, seconds=4.0, data_seconds=0.0, compile=True, time=127.0),
          dict(event="eval", step=3, seconds=1.0, time=128.0),
          dict(event="job_end", step=3, time=130.0)]
    s = goodput.summarize(ev)
    assert s["wall_seconds"] == 30.0 and s["attempts"] == 2 and s["steps_lost"] == 1 and s["finished"]
    # productive: steps 1-2 and the second step 3 at the typical (median non-compiling) 1.0 s; what
    # the compiling steps took beyond it is compile badput
    assert s["productive_seconds"] == pytest.approx(3.0)
    b = s["badput_seconds"]
    assert b["compile"] == pytest.approx(3.5 + 3.0) and b["data"] == pytest.approx(1.5)
    assert b["checkpoint"] == pytest.approx(2.5) and b["init"] == pytest.approx(4.0) and b["eval"] == 1.0
    assert b["restart"] == pytest.approx(1.0 + (120.0 - 111.5))     # the lost step and the dead time
    assert s["goodput"] + sum(s["badput"].values()) == pytest.approx(1.0)
    assert b["other"] == pytest.approx(30.0 - 3.0 - 6.5 - 1.5 - 2.5 - 4.0 - 1.0 - 9.5)
    assert "goodput: 10.0%" in goodput.report(s)


def test_goodput_goes_to_ml_goodput_measurement_where_it_and_a_cloud_exist(tmp_path, data_dir, monkeypatch,
                                                                          capsys):
    """A stand-in for ml-goodput-measurement's GoodputRecorder (its constructor and record_* calls,
    as the package defines them) receives job start, preparation, every step's start with its data
    loading, and job end, in order and in UTC; without a cloud, or without the package, the run
    says so once and records locally; a bucket workdir without either is refused."""
    import datetime
    import sys
    import types as pytypes

    from fot_jax.train import goodput

    calls = []

    class FakeRecorder:
        def __init__(self, job_name, logger_name, logging_enabled=False, cloud_logger=None):
            calls.append(("init", job_name, logger_name, logging_enabled))

        def __getattr__(self, name):
            if not name.startswith("record_"):
                raise AttributeError(name)
            return lambda *args: calls.append((name, *args))

    package = pytypes.ModuleType("ml_goodput_measurement")
    package.goodput = pytypes.SimpleNamespace(GoodputRecorder=FakeRecorder)
    monkeypatch.setitem(sys.modules, "ml_goodput_measurement", package)
    cfg = tiny("--config.train.steps=3", "--config.train.goodput=True", "--config.train.eval_every=0")
    Trainer(cfg, str(tmp_path / "run7"), quiet=True).run()
    assert calls[0] == ("init", "run7", "goodput_run7", True)
    names = [c[0] for c in calls[1:]]
    assert names[0] == "record_job_start_time" and names[-1] == "record_job_end_time"
    assert names[1:3] == ["record_training_preparation_start_time", "record_training_preparation_end_time"]
    steps = [c[1] for c in calls if c[0] == "record_step_start_time"]
    assert steps == [0, 1, 2]
    times = [c[-1] for c in calls[1:]]
    assert all(t.tzinfo == datetime.timezone.utc for t in times)
    starts = [c[2] for c in calls if c[0] == "record_step_start_time"]
    assert starts == sorted(starts) and "record_data_loading_start_time" in names
    assert len(goodput.read(str(tmp_path / "run7"))) > 0                  # and the local log

    def no_cloud(**kwargs):
        raise OSError("Your default credentials were not found")
    package.goodput = pytypes.SimpleNamespace(GoodputRecorder=no_cloud)
    capsys.readouterr()
    Trainer(cfg, str(tmp_path / "run8"), quiet=False).run()
    out = capsys.readouterr().out
    assert out.count("Cloud Logging is not reachable (OSError: Your default credentials") == 1
    assert goodput.summarize(goodput.read(str(tmp_path / "run8")))["finished"]
    with pytest.raises(goodput.GoodputError, match="no Cloud Logging recorder"):
        goodput.Recorder("gs://bucket/run", True, log=lambda m: None)
    monkeypatch.setitem(sys.modules, "ml_goodput_measurement", None)           # not installed
    messages = []
    assert goodput.cloud_recorder("x", messages.append) is None and "not installed" in messages[0]


def test_goodput_of_a_run_killed_and_restarted(tmp_path, data_dir, capsys):
    """A run that dies after step 6 (checkpoint at 4) and is restarted: its log has two attempts,
    two steps lost, and shares that add up to the wall time; `fot-jax goodput` prints it."""
    from fot_jax import cli
    from fot_jax.train import goodput
    cfg = tiny("--config.train.steps=8", "--config.train.checkpoint_every=4", "--config.train.goodput=True",
               "--config.train.eval_every=0")
    first = Trainer(cfg, str(tmp_path), quiet=True)

    def die(record):
        if record.step == 6:
            raise RuntimeError("the host died")

    first.add_hook(die)
    with pytest.raises(RuntimeError, match="the host died"):
        first.run()
    first.checkpoints.wait()
    assert Trainer(cfg, str(tmp_path), quiet=True).run()["steps"] == 8
    s = goodput.summarize(goodput.read(str(tmp_path)))
    assert s["attempts"] == 2 and s["steps_lost"] == 2 and s["finished"] and s["last_step"] == 8
    assert 0 < s["goodput"] < 1 and s["badput_seconds"]["compile"] > 0 and s["badput_seconds"]["restart"] > 0
    assert s["goodput"] + sum(s["badput"].values()) == pytest.approx(1.0, abs=1e-6)
    assert cli.main(["goodput", "--workdir", str(tmp_path)]) == 0
    assert "steps lost to restarts: 2" in capsys.readouterr().out
    assert cli.main(["goodput", "--workdir", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.goodput=True" in err[0]

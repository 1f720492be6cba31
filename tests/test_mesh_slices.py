"""Multi-slice meshes: each mesh axis is its DCN size (slices) times its ICI size (within a slice);
built with jax's hybrid device mesh, tested on fake devices that carry a slice index."""
import dataclasses

import numpy as np
import pytest

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def _mesh_cfg(**sizes):
    cfg = config_lib.base_config().mesh
    for k, v in sizes.items():
        cfg[k] = v
    return cfg


def test_two_slices_shard_data_over_dcn_and_fsdp_within_a_slice():
    # 2 slices x 8 chips (a 2 x v5e-8 stand-in): data spans the slices, fsdp the chips of one slice
    devices = [FakeDevice(i, i // 8) for i in range(16)]
    arr = mesh_lib.device_array(_mesh_cfg(data=1, fsdp=-1, tensor=1, dcn_data=2), devices)
    assert arr.shape == (2, 8, 1)
    slices = np.vectorize(lambda d: d.slice_index)(arr)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()        # one data index = one slice
    assert sorted(d.id for d in arr[1].ravel()) == list(range(8, 16))


def test_fsdp_across_slices_and_tensor_within():
    devices = [FakeDevice(i, i // 4) for i in range(8)]
    arr = mesh_lib.device_array(_mesh_cfg(data=1, fsdp=2, tensor=2, dcn_fsdp=2), devices)
    assert arr.shape == (1, 4, 2)
    slices = np.vectorize(lambda d: d.slice_index)(arr)[0]
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()      # fsdp: outer index = the slice


def test_slice_counts_that_do_not_match_are_errors():
    devices = [FakeDevice(i, i // 4) for i in range(8)]               # 2 slices
    with pytest.raises(config_lib.ConfigError, match="belong to 2 slice"):
        mesh_lib.device_array(_mesh_cfg(data=-1, dcn_data=4), devices)
    with pytest.raises(config_lib.ConfigError, match="do not split into 3 slices"):
        mesh_lib.mesh_shape(_mesh_cfg(data=-1, dcn_data=3), 8)
    cfg = config_lib.base_config()
    cfg.mesh.dcn_fsdp = 0
    with pytest.raises(config_lib.ConfigError, match="mesh.dcn_fsdp"):
        checks.validate(cfg)

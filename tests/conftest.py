import os
import tempfile

# 8 simulated CPU devices; must be set before JAX starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# transformers copies an export's modeling code (trust_remote_code) into HF_MODULES_CACHE, read
# when transformers is first imported: a temporary folder, never the user's cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="fot_jax_hf_modules_"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One tfds data_dir for the session (datasets are prepared once)."""
    path = tmp_path_factory.mktemp("tfds")
    os.environ["FOT_JAX_DATA_DIR"] = str(path)
    return str(path)


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

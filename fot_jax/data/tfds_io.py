"""tensorflow-datasets access shared by the data tasks: the (lazy) import and the data_dir."""
from __future__ import annotations

import os


def import_tfds():
    """tensorflow_datasets, quiet; imported on first use (it costs seconds)."""
    import logging

    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tfds


def default_data_dir(data_dir: str = "") -> str:
    return data_dir or os.environ.get("FOT_JAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")

"""``StageCache``: each stage's output on disk under ``checkpoint_dir/stages``, keyed by what it depends on.

A key hashes the model name, the training split (its user/item ids: dataset and split in one), the seed,
the config values the stage names, and the keys of the stages before it (change the CF backbone and every
later stage is rebuilt). Files are written to a temporary name and renamed, so a killed run never leaves a
half-written artifact, and a rerun skips finished stages. ``rebuild_stages=True`` recomputes them all.
"""
import hashlib
import json
import logging
import os
import tempfile

import numpy as np
import torch
from recbole.utils import init_seed, set_color

from recbole_llm.compat import torch_load

logger = logging.getLogger(__name__)


def split_fingerprint(dataset):
    """A hash of the training split's interactions (user and item ids): the dataset and the split."""
    h = hashlib.sha1()
    h.update(dataset.dataset_name.encode())
    for field in (dataset.uid_field, dataset.iid_field):
        h.update(np.ascontiguousarray(dataset.inter_feat[field].numpy()).tobytes())
    h.update(f"{dataset.user_num}-{dataset.item_num}".encode())
    return h.hexdigest()[:16]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class StageCache:
    def __init__(self, config, dataset):
        self.config = config
        self.root = os.path.join(config["checkpoint_dir"], "stages", f"{config['model']}-{config['dataset']}")
        self.rebuild = bool(config["rebuild_stages"])
        self.base = {"model": config["model"], "split": split_fingerprint(dataset), "seed": config["seed"]}
        self.parent_key = ""

    def key(self, stage):
        values = {k: (self.config[k] if k in self.config else None) for k in stage.config_keys}
        payload = json.dumps(_jsonable({"base": self.base, "stage": stage.name, "values": values,
                                        "parent": self.parent_key}), sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def path(self, stage):
        return os.path.join(self.root, f"{stage.name}-{self.key(stage)}.pt")

    def run(self, stage, *build_args):
        """Load the stage's artifact from the cache, or build it (seeded, so a resumed run matches) and save it."""
        path = self.path(stage)
        if os.path.isfile(path) and not self.rebuild:
            logger.info(set_color(f"stage {stage.name}", "green") + f": cached, loaded from {path}")
            artifact = torch_load(path, map_location="cpu")
        else:
            logger.info(set_color(f"stage {stage.name}", "green") + ": running")
            init_seed(self.config["seed"], self.config["reproducibility"])
            artifact = stage.build(*build_args)
            self.save(artifact, path)
            logger.info(set_color(f"stage {stage.name}", "green") + f": saved to {path}")
        self.parent_key = self.key(stage)
        stage.load(artifact)
        return artifact

    def save(self, artifact, path):
        if self.config["local_rank"] not in (0, None):  # one writer in multi-process runs
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(artifact, f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

"""A model's pipeline as declared stages, and ``StageCache``: each stage's output on disk, keyed by what it
depends on.

``Stage``       a computed artifact: ``build(trainer, train_data, valid_data) -> artifact``, ``load(artifact)``
                (profile texts, distilled embeddings, a pretrained CF backbone, codebooks).
``TrainStage``  training declared as data: which modules train, on which batches, with which loss, for how many
                epochs at which learning rate. ``LLMTrainer`` runs it; its artifact is the tensors it trained
                (``{parameter name: tensor}``), saved and reloaded without per-model code. A model's final stage
                is a ``TrainStage`` too, run by RecBole's fit loop (validation, early stopping, best checkpoint).

Keys are complete by construction. A key hashes the model name, the training split (its user/item ids: dataset
and split in one), the seed, the keys of the stages before it (change the CF backbone and every later stage is
rebuilt), the config values the stage names (``config_keys``, and a TrainStage's epochs / learning-rate keys),
and, added here rather than listed by each stage:
  - ``TRAINER_KEYS`` when the stage trains (learner, weight decay, clipping, accumulation, warm-up...);
  - ``LLM_KEYS`` when it uses the LLM (path, dtype as resolved on this machine, quantization, LoRA).
Files are written to a temporary name and renamed, so a killed run never leaves a half-written artifact, and a
rerun skips finished stages (and says so). ``rebuild_stages=True`` recomputes them all.
"""
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from recbole.utils import init_seed, set_color

from recbole_llm.compat import atomic_save, torch_load
from recbole_llm.errors import ConfigError

logger = logging.getLogger(__name__)

# Trainer settings that change what a training stage learns.
TRAINER_KEYS = ("learner", "weight_decay", "clip_grad_norm", "gradient_accumulation_steps", "warmup_steps",
                "llm_autocast", "train_batch_size")
# LLM settings that change what the LLM computes. ``llm_dtype`` enters as resolved (``auto`` differs by machine).
LLM_KEYS = ("llm_path", "llm_dtype", "llm_quantization", "lora_r", "lora_alpha", "lora_dropout",
            "lora_target_modules")


@dataclass
class Stage:
    """A computed artifact (see the module docstring). ``config_keys``: the config values it depends on beyond
    the dataset, split and seed; ``uses_llm``: its output depends on the LLM (adds ``LLM_KEYS``)."""

    name: str
    build: Callable
    load: Callable
    config_keys: List[str] = field(default_factory=list)
    uses_llm: bool = False

    trains = False

    def key_values(self, config):
        keys = list(self.config_keys) + (list(LLM_KEYS) if self.uses_llm else [])
        return {k: (config[k] if k in config else None) for k in keys}


@dataclass
class TrainStage(Stage):
    """Train the model's ``modules`` (attribute names; ``"llm"`` means its adapters and new-token rows only)
    for ``epochs`` passes over ``batches(train_data, epoch)`` with ``loss(batch)`` at ``learning_rate``.

    ``epochs`` / ``learning_rate``: a config key (its value is used and keyed) or a number.
    ``batches``: ``None`` trains on RecBole's train dataloader (Interactions); a model may build its own batches
    (e.g. prompts per user). ``loss`` may return a tuple of losses: they are summed and logged part by part.
    ``autocast``: run the loss in the LLM's dtype (LLM stages); non-LLM stages train in fp32.
    ``module_learning_rates``: ``{module: config key or number}``, a learning rate of their own for some of the
    ``modules`` (their own optimizer parameter group); a key whose value is null leaves the module at
    ``learning_rate``.
    """

    build: Optional[Callable] = None
    load: Optional[Callable] = None
    modules: List[str] = field(default_factory=list)
    loss: Optional[Callable] = None
    batches: Optional[Callable] = None
    epochs: Any = "epochs"
    learning_rate: Any = "learning_rate"
    uses_llm: bool = True
    autocast: Optional[bool] = None
    module_learning_rates: Dict[str, Any] = field(default_factory=dict)

    trains = True

    def __post_init__(self):
        if self.autocast is None:
            self.autocast = self.uses_llm

    def setting(self, config, name):
        return self._value(config, getattr(self, name))

    @staticmethod
    def _value(config, value):
        return (config[value] if value in config else None) if isinstance(value, str) else value

    def learning_rates(self, config):
        """``{module: learning rate}`` of the modules that do not train at ``learning_rate``."""
        rates = {}
        for name, key in self.module_learning_rates.items():
            rate = self._value(config, key)
            if rate is None:
                continue
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
                raise ConfigError(f"{key}: must be a positive number or null, got {rate!r}")
            rates[name] = float(rate)
        return rates

    def key_values(self, config):
        values = super().key_values(config)
        values.update({k: (config[k] if k in config else None) for k in TRAINER_KEYS})
        values.update(epochs=self.setting(config, "epochs"), learning_rate=self.setting(config, "learning_rate"),
                      modules=list(self.modules))
        rates = self.learning_rates(config)
        if rates:
            values["module_learning_rates"] = rates
        return values


def split_fingerprint(dataset):
    """A hash of the training split's interactions (user and item ids): the dataset and the split."""
    h = hashlib.sha1()
    h.update(dataset.dataset_name.encode())
    for field_name in (dataset.uid_field, dataset.iid_field):
        h.update(np.ascontiguousarray(dataset.inter_feat[field_name].numpy()).tobytes())
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
    def __init__(self, config, dataset, resolved=None):
        """``resolved``: config values as this run resolved them (e.g. ``{"llm_dtype": "torch.float32"}``)."""
        self.config = config
        self.root = os.path.join(config["checkpoint_dir"], "stages", f"{config['model']}-{config['dataset']}")
        self.rebuild = bool(config["rebuild_stages"])
        self.base = {"model": config["model"], "split": split_fingerprint(dataset), "seed": config["seed"]}
        self.resolved = dict(resolved or {})
        self.parent_key = ""

    def key(self, stage):
        values = stage.key_values(self.config)
        values.update({k: v for k, v in self.resolved.items() if k in values})
        payload = json.dumps(_jsonable({"base": self.base, "stage": stage.name, "values": values,
                                        "parent": self.parent_key}), sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def path(self, stage):
        return os.path.join(self.root, f"{stage.name}-{self.key(stage)}.pt")

    def run(self, stage, build, load):
        """Load the stage's artifact from the cache, or ``build()`` it (seeded, so a resumed run matches) and
        save it; then ``load(artifact)``."""
        path = self.path(stage)
        if os.path.isfile(path) and not self.rebuild:
            logger.info(set_color(f"stage {stage.name}", "green") + f": reused the finished stage {path}")
            artifact = torch_load(path, map_location="cpu")
        else:
            logger.info(set_color(f"stage {stage.name}", "green") + ": running")
            init_seed(self.config["seed"], self.config["reproducibility"])
            artifact = build()
            if self.config["local_rank"] in (0, None):  # one writer in multi-process runs
                atomic_save(artifact, path)
                logger.info(set_color(f"stage {stage.name}", "green") + f": saved to {path}")
        self.parent_key = self.key(stage)
        load(artifact)
        return artifact

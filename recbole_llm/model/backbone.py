"""The CF-backbone service: a RecBole model (MF/BPR, LightGCN, SASRec, our DCCF...) trained as an LLM model's
``cf_pretrain`` stage, then frozen, with ``embeddings()`` and ``logits()`` for the LLM model to use.

The backbone is trained by RecBole's own trainer on the LLM model's training split, validated on its
validation split (early stopping, best epoch kept), never on the test split. Its config is the LLM model's
(data, split, evaluation, seed, device) with RecBole's training defaults (``overall.yaml``), the backbone's
own YAML (RecBole's, then ours) and ``cf_config`` on top: ``--learning_rate`` meant for the LLM model does not
change the backbone, and with the same ``cf_config`` the backbone alone trains exactly like
``run_recbole_llm(model=<backbone>)`` (RecBole's ``run_recbole``) on the same dataset, split and seed.

A general backbone under a sequential LLM model trains on the split's plain user-item interactions, not on
the sequence-augmented rows, in the order RecBole's general split holds them. It is validated (early stopping,
best epoch) as RecBole validates that model alone: on the validation targets as plain interactions, by a
general ``FullSortEvalDataLoader`` that masks each user's training items (``eval_data``). The LLM model's own
sequential loader masks nothing, as RecBole does for sequential models; selecting a general model on it keeps
underfit checkpoints (issue #23: a popularity count's ml-100k HR@10 is 0.050 unmasked, 0.082 masked). The
held-out item of each user is the same in both splits when every user has at least 4 interactions (RecBole's
sequential split has no row for a user's first item: a user with 3 has no validation row there, one with 2 no
test row); ``eval_data`` follows the LLM model's split, the one its own rows are scored on. ``eval_data(valid, test)``
gives the test loader as well (training + validation items masked): "the backbone alone" for tables.
Negative sampling comes from the backbone's config (uniform, 1 negative for BPR / LightGCN; none for SASRec with
its CE loss), with samplers built as ``recbole.data.utils`` does. The stage's artifact is the backbone's state
dict (and its best validation result); loading it rebuilds the RecBole model, frozen, in eval mode.

``mask_history`` (the LLM model's ``cf_mask_history``, off by default as in TCA4Rec's reference code): ``logits``
sets the scores of each row's history items (``item_id_list``) to -inf, except the row's own target when the
batch has it, as RecBole masks a general model's seen items; for a teacher's soft labels.

    cf = CFBackbone(config, dataset, "LightGCN")     # in the LLM model's __init__ (dataset: its training split)
    stages = [cf.stage(on_load=...), ...]            # in its stages()
    user, item = cf.embeddings()                     # (n_users, d), (n_items, d); user is None for SASRec
    scores = cf.logits(interaction)                  # (B, n_items): RecBole's full_sort_predict
    valid, test = cf.eval_data(valid_data, test_data)  # RecBole's loaders for the backbone alone on this split
"""
import copy
import logging
import os
import uuid

import numpy as np
import torch
import torch.distributed as dist
import yaml
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.data.interaction import Interaction
from recbole.data.utils import create_samplers, get_dataloader
from recbole.utils import InputType, ModelType, init_seed

from recbole_llm.compat import torch_load
from recbole_llm.errors import ConfigError
from recbole_llm.registry import PROPERTIES_DIR, get_model
from recbole_llm.stages import Stage
from recbole_llm.utils import get_trainer

logger = logging.getLogger(__name__)

# What a backbone takes from RecBole's overall.yaml rather than from the LLM model's config.
TRAINING_KEYS = ("epochs", "train_batch_size", "learner", "learning_rate", "train_neg_sample_args", "eval_step",
                 "stopping_step", "clip_grad_norm", "weight_decay", "loss_decimal_place", "require_pow",
                 "enable_amp", "enable_scaler")


def _yaml_defaults(config, name):
    """RecBole's training defaults, then the backbone's YAML (RecBole's, then ours)."""
    import recbole

    recbole_properties = os.path.join(os.path.dirname(recbole.__file__), "properties")
    with open(os.path.join(recbole_properties, "overall.yaml"), encoding="utf-8") as f:
        overall = yaml.load(f, Loader=config.yaml_loader)  # RecBole's loader reads 1e-05 as a float
    values = {key: overall[key] for key in TRAINING_KEYS}
    for file in (os.path.join(recbole_properties, "model", f"{name}.yaml"),
                 os.path.join(PROPERTIES_DIR, "model", f"{name}.yaml")):
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                values.update(yaml.load(f, Loader=config.yaml_loader) or {})
    return values, overall["train_neg_sample_args"]


def backbone_config(config, name):
    """The backbone's Config: the LLM model's, with the backbone's training defaults and ``cf_config`` on top."""
    backbone_class = get_model(name)
    name = backbone_class.__name__
    values, default_neg = _yaml_defaults(config, name)
    values.update(dict(config["cf_config"] or {}))
    bconf = copy.copy(config)
    bconf.final_config_dict = copy.copy(config.final_config_dict)
    bconf.final_config_dict.update(values, model=name, MODEL_TYPE=backbone_class.type)
    # What RecBole's Config derives from these (with its own code where it has one): the negative sampling
    # arguments and the input type.
    neg = bconf["train_neg_sample_args"]
    bconf["train_neg_sample_args"] = dict(default_neg, **neg) if isinstance(neg, dict) else neg
    bconf._set_train_neg_sample_args()
    loss_type = bconf["loss_type"]
    sampled = bconf["train_neg_sample_args"]["distribution"] != "none"
    if backbone_class.type == ModelType.SEQUENTIAL and loss_type == "CE" and sampled:
        raise ConfigError(f"cf_config: {name} with loss_type CE trains without negatives: "
                          "set train_neg_sample_args: ~")
    bconf["MODEL_INPUT_TYPE"] = getattr(backbone_class, "input_type", None) or (
        InputType.POINTWISE if loss_type == "CE" else InputType.PAIRWISE)
    return bconf, backbone_class


def training_interactions(dataset):
    """The training split as plain user-item interactions (a general model's training data).

    A ``SequentialDataset`` split holds one augmented row per target: ``<i1..it-1> | it``. Its plain
    interactions are every row's target plus each user's first item (the history of the row of length 1), as
    RecBole's ``SequentialDataset.inter_matrix`` rebuilds them, in the order of RecBole's general leave-one-out
    split (``general_order``); other datasets are returned as they are.
    """
    return _plain_interactions(dataset, first_items=True)


def evaluation_interactions(dataset):
    """A sequential validation or test split as plain interactions: each row's user and target (the LLM model's
    held-out item), for RecBole's general evaluation loaders; other datasets are returned as they are."""
    return _plain_interactions(dataset, first_items=False)


def _plain_interactions(dataset, first_items):
    if not isinstance(dataset, SequentialDataset):
        return dataset
    feat, suffix = dataset.inter_feat, dataset.config["LIST_SUFFIX"]
    first = feat[feat[dataset.item_list_length_field] == 1]
    fields = {}
    for field in feat.columns:
        if field == dataset.item_list_length_field or field.endswith(suffix):
            continue
        if not first_items:
            fields[field] = feat[field]
            continue
        first_values = first[field + suffix][:, 0] if field + suffix in feat.columns else first[field]
        fields[field] = torch.cat([first_values, feat[field]])  # a first item precedes its user's targets
    plain = Dataset.__new__(Dataset)  # the same fields, ids and features, as a general dataset
    plain.__dict__.update(dataset.__dict__)
    plain.inter_feat = Interaction(fields)
    plain.sort(by=[f for f in (plain.uid_field, plain.time_field) if f in fields])
    general_order(plain)
    return plain


def general_order(dataset):
    """Reorder ``dataset`` (sorted by user, then time) in place as RecBole's general leave-one-out split holds
    its rows: ``Dataset.build`` sorts by time (stable), ``leave_one_out`` groups by user in order of first
    appearance. Each user's rows keep their order (time, ties as in the file: both RecBole sorts are stable);
    users come in the order of their first interaction (ties by id, RecBole's order of appearance in the file).
    The order matters: RecBole's training loader shuffles row indices and samples negatives batch by batch."""
    if dataset.time_field is None or dataset.time_field not in dataset.inter_feat:
        return
    users = dataset.inter_feat[dataset.uid_field].numpy()
    times = dataset.inter_feat[dataset.time_field].numpy().astype(np.float64)
    first = np.full(dataset.user_num, np.inf)
    np.minimum.at(first, users, times)
    rank = np.empty(dataset.user_num, dtype=np.int64)
    rank[np.lexsort((np.arange(dataset.user_num), first))] = np.arange(dataset.user_num)
    order = np.argsort(rank[users], kind="stable")
    dataset.inter_feat = dataset.inter_feat[torch.from_numpy(order)]


def _tables(model):
    """MF (BPR): the ID embedding tables."""
    return model.user_embedding.weight, model.item_embedding.weight


def _propagated(model):
    """Graph models: ``forward()`` propagates the ID embeddings over the training graph."""
    user, item = model.forward()[:2]
    return user, item


def _item_table(model):
    """Sequential models have no user table (a user is the history, encoded when scoring: ``logits``)."""
    return None, model.item_embedding.weight


# Per backbone class: how to read its (user, item) embeddings, and their width from its config.
EMBEDDINGS = {
    "BPR": (_tables, lambda c: c["embedding_size"]),
    "LightGCN": (_propagated, lambda c: c["embedding_size"]),
    "NGCF": (_propagated, lambda c: c["embedding_size"] + sum(c["hidden_size_list"])),
    "DCCF": (_propagated, lambda c: c["embedding_size"]),
    "SASRec": (_item_table, lambda c: c["hidden_size"]),
}


class CFBackbone:
    """A RecBole model trained as the ``cf_pretrain`` stage of an LLM model, then frozen.

    Args:
        config (Config): the LLM model's config (``cf_config`` overrides the backbone's training defaults).
        dataset (Dataset): the LLM model's training split (sequential for a sequential LLM model).
        name (str): the RecBole model class, e.g. ``BPR``, ``LightGCN``, ``SASRec``, ``DCCF``.
        mask_history (bool): ``logits`` sets each row's history items to -inf (see the module docstring).

    ``model`` is the frozen RecBole model once the stage is loaded (None before).
    """

    def __init__(self, config, dataset, name, mask_history=False):
        self.mask_history = bool(mask_history)
        self.config, self.model_class = backbone_config(config, name)
        self.name = self.model_class.__name__
        self.device = config["device"]
        sequential = self.model_class.type == ModelType.SEQUENTIAL
        if self.model_class.type not in (ModelType.GENERAL, ModelType.TRADITIONAL, ModelType.SEQUENTIAL):
            raise ConfigError(f"cf_backbone: {name} is a {self.model_class.type.name.lower()} model; "
                              "a backbone is a general or a sequential RecBole model")
        if sequential and not isinstance(dataset, SequentialDataset):
            raise ConfigError(f"cf_backbone: {name} is sequential and needs sequential data "
                              f"(this model's data is {config['MODEL_TYPE'].name.lower()})")
        # a general model on a sequential split: its plain interactions, and RecBole's general evaluation
        self.on_plain_data = not sequential and isinstance(dataset, SequentialDataset)
        if self.on_plain_data:
            self.config["repeatable"] = False  # the plain interactions: RecBole's setting for a general model
        self.dataset = dataset if sequential else training_interactions(dataset)
        self.model = None

    @property
    def embedding_size(self):
        """Width of ``embeddings()``, known before the stage runs."""
        return int(self._rule()[1](self.config))

    def stage(self, on_load=None, name="cf_pretrain", backbone_key="cf_backbone"):
        """The ``cf_pretrain`` stage; ``on_load()`` runs after the frozen backbone is loaded. ``backbone_key``:
        the option that chose this backbone (keyed; a model with a second backbone names it, and the stage)."""

        def load(artifact):
            self.load(artifact)
            if on_load is not None:
                on_load()

        stage = Stage(name, self.build, load, [backbone_key, "cf_config", "valid_metric"])
        if self.on_plain_data:  # validated on RecBole's general loader since issue #23: older artifacts are stale
            stage.key_values = lambda config: dict(Stage.key_values(stage, config), backbone_validation="general")
        return stage

    def eval_data(self, valid_data, test_data=None):
        """RecBole's evaluation loaders for this backbone alone on the LLM model's split: ``(valid, test)``.

        For a general backbone on sequential data: each split's targets as plain interactions, in the loaders
        ``run_recbole_llm(model=<backbone>)`` builds (the backbone's config, MODEL_TYPE general) with RecBole's
        samplers over (training, validation, test), so a user's training items are masked at validation and
        training + validation items at test. Otherwise the LLM model's loaders are already RecBole's for the
        backbone (same model type) and are returned as they are. ``test_data`` may be None (then so is ``test``).
        """
        if not self.on_plain_data:
            return valid_data, test_data
        config = self.config
        valid = evaluation_interactions(valid_data._dataset)
        test = evaluation_interactions(test_data._dataset) if test_data is not None else None
        _, valid_sampler, test_sampler = create_samplers(config, self.dataset,
                                                         [self.dataset, valid, valid if test is None else test])
        own_valid = get_dataloader(config, "valid")(config, valid, valid_sampler, shuffle=False)
        own_test = None if test is None else get_dataloader(config, "test")(config, test, test_sampler, shuffle=False)
        return own_valid, own_test

    def build(self, trainer, train_data, valid_data):
        """Train the backbone with RecBole's own trainer (early stopping on its validation loader, ``eval_data``
        of the LLM model's ``valid_data``; the LLM model's ``trainer`` and ``train_data`` are not used: the
        backbone has its own loaders and settings); return its best state."""
        config = self.config
        train_sampler, _, _ = create_samplers(config, self.dataset, [self.dataset] * 3)  # sees only the training split
        train_loader = get_dataloader(config, "train")(config, self.dataset, train_sampler, shuffle=config["shuffle"])
        valid_data, _ = self.eval_data(valid_data)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])  # as run_recbole does
        model = self.model_class(config, self.dataset).to(self.device)
        recbole_trainer = get_trainer(config["MODEL_TYPE"], self.name)(config, model)
        recbole_trainer.saved_model_file = _shared_checkpoint_path(config, self.name)
        try:
            best_score, best_result = recbole_trainer.fit(train_loader, valid_data, saved=True,
                                                          show_progress=config["show_progress"])
            if not config["single_spec"]:
                dist.barrier()  # rank 0 wrote the best checkpoint
            checkpoint = torch_load(recbole_trainer.saved_model_file, map_location="cpu")
        finally:
            if not config["single_spec"]:
                dist.barrier()
            if config["local_rank"] == 0 and os.path.exists(recbole_trainer.saved_model_file):
                os.remove(recbole_trainer.saved_model_file)
        logger.info(f"backbone {self.name}: best valid {dict(best_result or {})}")
        return {"backbone": self.name, "state_dict": checkpoint["state_dict"],
                "other_parameter": checkpoint.get("other_parameter"),
                "best_valid_score": best_score, "best_valid_result": dict(best_result or {})}

    def load(self, artifact):
        """Rebuild the RecBole model from the artifact: frozen, in eval mode."""
        if artifact.get("backbone") != self.name:
            raise ConfigError(f"cf_backbone: the artifact holds {artifact.get('backbone')}, not {self.name}")
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
            model = self.model_class(self.config, self.dataset)
        model.load_state_dict(artifact["state_dict"])
        model.load_other_parameter(artifact.get("other_parameter"))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.best_valid_result = artifact["best_valid_result"]

    def _rule(self):
        if self.name not in EMBEDDINGS:
            raise ConfigError(f"cf_backbone: no embeddings for {self.name} (known: {', '.join(EMBEDDINGS)}); "
                              "logits() works for every RecBole model")
        return EMBEDDINGS[self.name]

    def _loaded(self):
        if self.model is None:
            raise RuntimeError(f"backbone {self.name} is not trained yet: run its cf_pretrain stage first")
        return self.model

    @torch.no_grad()
    def embeddings(self):
        """(user, item) embeddings, float32 on the backbone's device: (n_users, d) or None, and (n_items, d).

        Graph models (LightGCN, NGCF, DCCF) give their propagated embeddings, MF (BPR) its tables, and SASRec
        ``(None, item table)``: it has no user table.
        """
        user, item = self._rule()[0](self._loaded())
        return (None if user is None else user.detach().float()), item.detach().float()

    @torch.no_grad()
    def logits(self, interaction):
        """RecBole's ``full_sort_predict``: (B, n_items) scores for a batch as RecBole's full-sort loaders give
        it (user ids; for a sequential backbone also the history). Column 0 is RecBole's padding item.

        With ``mask_history``, each row's history items (``item_id_list`` up to ``item_length``, when the batch
        has them) score -inf, except the row's own target (``item_id``, when the batch has it)."""
        model = self._loaded()
        scores = model.full_sort_predict(interaction.to(self.device)).view(-1, model.n_items)
        return self._mask_history(scores, interaction) if self.mask_history else scores

    def _mask_history(self, scores, interaction):
        iid = self.config["ITEM_ID_FIELD"]
        seq_field, len_field = iid + self.config["LIST_SUFFIX"], self.config["ITEM_LIST_LENGTH_FIELD"]
        if seq_field not in interaction or len_field not in interaction:
            return scores
        seq = interaction[seq_field].to(scores.device)
        seen = torch.arange(seq.shape[1], device=seq.device) < interaction[len_field].to(seq.device).view(-1, 1)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(1, seq.masked_fill(~seen, 0), True)
        mask[:, 0] = False  # the padding item (and the positions past the history) stay as they are
        if iid in interaction:  # a re-consumed target keeps its score
            mask.scatter_(1, interaction[iid].to(seq.device).view(-1, 1), False)
        return scores.masked_fill(mask, -torch.inf)


def _shared_checkpoint_path(config, name):
    """A temporary checkpoint path, the same on every rank (rank 0 writes the backbone's best epoch there)."""
    folder = os.path.join(config["checkpoint_dir"], "stages")
    os.makedirs(folder, exist_ok=True)
    path = [os.path.join(folder, f".tmp-{name}-{uuid.uuid4().hex}.pth")]
    if not config["single_spec"]:
        dist.broadcast_object_list(path, src=0)
    return path[0]

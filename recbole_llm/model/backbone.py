"""CF backbones (RecBole's MF/BPR, LightGCN, SASRec, and our DCCF) pretrained as a stage of an LLM model.

The backbone is a plain RecBole model trained by RecBole's own trainer on the LLM model's training split,
validated on its validation split (early stopping), never on the test split. Its config is the LLM model's
(data, split, metrics, seed, device) with RecBole's training defaults, the backbone's own YAML and the
``cf_config`` dict on top, so ``--learning_rate`` or ``train_batch_size`` meant for the LLM model do not
change the backbone.
"""
import copy
import logging
import os
import uuid

import torch
import torch.distributed as dist
import yaml
from recbole.data.dataloader import TrainDataLoader
from recbole.sampler import Sampler
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_llm.compat import torch_load
from recbole_llm.registry import PROPERTIES_DIR, get_model

logger = logging.getLogger(__name__)


TRAINING_KEYS = ("epochs", "train_batch_size", "learner", "learning_rate", "eval_step", "stopping_step",
                 "clip_grad_norm", "weight_decay", "require_pow", "enable_amp", "enable_scaler")


def _model_yaml(config, name):
    """RecBole's training defaults, then the backbone's YAML (RecBole's, then ours)."""
    import recbole

    recbole_properties = os.path.join(os.path.dirname(recbole.__file__), "properties")
    with open(os.path.join(recbole_properties, "overall.yaml"), encoding="utf-8") as f:
        overall = yaml.load(f, Loader=config.yaml_loader)
    files = [os.path.join(recbole_properties, "model", f"{name}.yaml"),
             os.path.join(PROPERTIES_DIR, "model", f"{name}.yaml")]
    values = {key: overall[key] for key in TRAINING_KEYS if key in overall}
    for file in files:
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                values.update(yaml.load(f, Loader=config.yaml_loader) or {})  # RecBole reads 1e-05 as a float
    return values


def backbone_config(config, name):
    backbone_class = get_model(name)
    bconf = copy.copy(config)
    bconf.final_config_dict = copy.copy(config.final_config_dict)
    bconf.final_config_dict.update(_model_yaml(config, name))
    bconf.final_config_dict.update(dict(config["cf_config"] or {}))
    bconf.final_config_dict.update(model=name, MODEL_TYPE=backbone_class.type,
                                   MODEL_INPUT_TYPE=backbone_class.input_type)
    bconf.final_config_dict["train_neg_sample_args"] = {
        "distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False, "candidate_num": 0}
    return bconf, backbone_class


def cf_embeddings(model):
    """(user, item) embedding tables of a trained backbone: propagated ones for graph models."""
    model.eval()
    with torch.no_grad():
        try:
            user, item = model.forward()  # LightGCN / DCCF propagate over the graph in forward()
        except TypeError:
            user, item = model.user_embedding.weight, model.item_embedding.weight
    return user.detach().float().cpu(), item.detach().float().cpu()


def _shared_checkpoint_path(config, name):
    """A temporary checkpoint path, the same on every rank (rank 0 writes the backbone's best epoch there)."""
    folder = os.path.join(config["checkpoint_dir"], "stages")
    os.makedirs(folder, exist_ok=True)
    path = [os.path.join(folder, f".tmp-{name}-{uuid.uuid4().hex}.pth")]
    if not config["single_spec"]:
        dist.broadcast_object_list(path, src=0)
    return path[0]


def pretrain_backbone(config, train_data, valid_data, name):
    """Train backbone ``name`` on the training split; return its embeddings and best validation result."""
    bconf, backbone_class = backbone_config(config, name)
    train_dataset = train_data._dataset
    sampler = Sampler(["train"], [train_dataset], "uniform", 1.0).set_phase("train")
    train_loader = TrainDataLoader(bconf, train_dataset, sampler, shuffle=True)
    model = backbone_class(bconf, train_dataset).to(config["device"])
    trainer = recbole_get_trainer(bconf["MODEL_TYPE"], name)(bconf, model)
    trainer.saved_model_file = _shared_checkpoint_path(config, name)
    try:
        best_score, best_result = trainer.fit(train_loader, valid_data, saved=True,
                                              show_progress=config["show_progress"], verbose=True)
        if not config["single_spec"]:
            dist.barrier()  # rank 0 wrote the best checkpoint
        checkpoint = torch_load(trainer.saved_model_file, map_location=config["device"])
        model.load_state_dict(checkpoint["state_dict"])
    finally:
        if not config["single_spec"]:
            dist.barrier()
        if config["local_rank"] == 0 and os.path.exists(trainer.saved_model_file):
            os.remove(trainer.saved_model_file)
    user, item = cf_embeddings(model)
    logger.info(f"backbone {name}: best valid {dict(best_result or {})}")
    return {"user_emb": user, "item_emb": item, "best_valid_result": dict(best_result or {}), "backbone": name}

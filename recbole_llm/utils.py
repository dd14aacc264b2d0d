"""Our ``get_model`` / ``get_trainer`` / ``create_dataset`` / ``data_preparation``: ours first, then RecBole's."""
import importlib
import importlib.util
import os
import re

from recbole.utils import ModelType

from recbole_llm.errors import ConfigError

import recbole_llm.properties

PROPERTIES_DIR = os.path.dirname(os.path.realpath(recbole_llm.properties.__file__))

_OUR_SUBMODULES = ["general_recommender", "sequential_recommender", "context_aware_recommender"]
_RECBOLE_SUBMODULES = ["general_recommender", "context_aware_recommender", "sequential_recommender",
                       "knowledge_aware_recommender", "exlib_recommender"]


def _model_files(package, submodules):
    """(submodule, file stem, path) of every model file, found without importing the modules."""
    spec = importlib.util.find_spec(package)
    root = os.path.dirname(spec.origin)
    for sub in submodules:
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and not name.startswith("_"):
                yield sub, name[:-3], os.path.join(folder, name)


def available_models():
    """Model class names, ours and RecBole's (RecBole's exlib models only if their libraries import)."""
    names = []
    for package, subs in (("recbole_llm.model", _OUR_SUBMODULES), ("recbole.model", _RECBOLE_SUBMODULES)):
        for sub, stem, path in _model_files(package, subs):
            if sub == "exlib_recommender" and not _exlib_importable():
                continue
            with open(path, encoding="utf-8") as f:
                classes = re.findall(r"^class (\w+)\(", f.read(), flags=re.M)
            names += [c for c in classes if c.lower() == stem]
    return sorted(set(names), key=str.lower)


def _exlib_importable():
    return all(importlib.util.find_spec(lib) is not None for lib in ("lightgbm", "xgboost"))


def get_model(model_name):
    """The model class named ``model_name``: recbole_llm's first, then RecBole's."""
    stem = model_name.lower()
    for package, subs in (("recbole_llm.model", _OUR_SUBMODULES), ("recbole.model", _RECBOLE_SUBMODULES)):
        for sub, file_stem, _ in _model_files(package, subs):
            if file_stem != stem:
                continue
            if sub == "exlib_recommender" and not _exlib_importable():
                raise ConfigError(f"model {model_name} needs lightgbm and xgboost: pip install lightgbm xgboost")
            module = importlib.import_module(f"{package}.{sub}.{stem}")
            for attr in dir(module):
                if attr.lower() == stem and isinstance(getattr(module, attr), type):
                    return getattr(module, attr)
    raise ConfigError(f"unknown model '{model_name}'; available: {', '.join(available_models())}")


def get_trainer(model_type, model_name):
    """``<Model>Trainer`` from recbole_llm.trainer, ``LLMTrainer`` for our LLM models, else RecBole's."""
    from recbole.utils import get_trainer as recbole_get_trainer

    from recbole_llm import trainer
    from recbole_llm.model.abstract import LLMRecommender

    if hasattr(trainer, model_name + "Trainer"):
        return getattr(trainer, model_name + "Trainer")
    if issubclass(get_model(model_name), LLMRecommender):
        return trainer.LLMTrainer
    return recbole_get_trainer(model_type, model_name)


def create_dataset(config):
    """``<Model>Dataset`` from recbole_llm.data if there is one, else RecBole's choice."""
    from recbole.data import create_dataset as recbole_create_dataset

    from recbole_llm import data

    dataset_class = getattr(data, config["model"] + "Dataset", None)
    if dataset_class is not None:
        return dataset_class(config)
    check_dataset(config)
    return recbole_create_dataset(config)


def check_dataset(config):
    """One clear line when the dataset has no atomic files (RecBole would try to download it)."""
    path = config["data_path"]
    if not os.path.isdir(path) or not any(f.endswith(".inter") for f in os.listdir(path)):
        raise ConfigError(
            f"dataset '{config['dataset']}' not found: no .inter file in {path} "
            "(set data_path, or convert raw data with `python -m dataset_converters.<name>`)")


def data_preparation(config, dataset):
    from recbole.data import data_preparation as recbole_data_preparation

    return recbole_data_preparation(config, dataset)


__all__ = ["get_model", "get_trainer", "create_dataset", "data_preparation", "available_models", "ModelType"]

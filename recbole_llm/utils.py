"""Our ``get_trainer`` / ``create_dataset`` / ``data_preparation``: ours first, then RecBole's.

``get_model``, ``available_models`` and ``PROPERTIES_DIR`` live in ``recbole_llm.registry`` (re-exported here).
"""
import os

from recbole.utils import ModelType

from recbole_llm.errors import ConfigError
from recbole_llm.registry import PROPERTIES_DIR, available_models, get_model


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
    """``<Model>Dataset`` from recbole_llm.data if there is one, else RecBole's choice. A dataset missing here
    that RecBole can download is downloaded first (``recbole_llm.data.download``)."""
    from recbole.data import create_dataset as recbole_create_dataset

    from recbole_llm import data
    from recbole_llm.data.download import prepare_dataset

    prepare_dataset(config)
    dataset_class = getattr(data, config["model"] + "Dataset", None)
    if dataset_class is not None:
        return dataset_class(config)
    check_dataset(config)
    return recbole_create_dataset(config)


def check_dataset(config):
    """One clear line when the dataset has no atomic files (``prepare_dataset`` has downloaded what RecBole can)."""
    path = config["data_path"]
    if not os.path.isdir(path) or not any(f.endswith(".inter") for f in os.listdir(path)):
        raise ConfigError(
            f"dataset '{config['dataset']}' not found: no .inter file in {path} "
            "(set data_path, or convert raw data with `python -m dataset_converters.<name>`)")


def data_preparation(config, dataset):
    from recbole.data import data_preparation as recbole_data_preparation

    return recbole_data_preparation(config, dataset)


__all__ = ["get_model", "get_trainer", "create_dataset", "data_preparation", "available_models", "check_dataset",
           "PROPERTIES_DIR", "ModelType"]

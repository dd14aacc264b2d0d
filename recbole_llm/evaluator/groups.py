"""Warm / cold item report: the run's metrics on the evaluated rows of items seen / not seen in training.

A cold item has no interaction in the training split (CTR papers such as SeLLaRec report it apart: an LLM
recommender should keep its accuracy there, where ID embeddings learned nothing). Usage, after testing::

    from recbole_llm.evaluator import warm_cold_report

    test_result = trainer.evaluate(test_data, load_best_model=saved)
    report = warm_cold_report(trainer, train_data.dataset, test_data)
    # {"all": {"auc": ..., "uauc": ..., "logloss": ...}, "warm": {...}, "cold": {...}}

With a model from ``load_data_and_model`` the trainer is ``get_trainer(config["MODEL_TYPE"],
config["model"])(config, model)``. In a multi-process run every rank calls it (the evaluation gathers rows).
"""
import numpy as np
import torch


def warm_cold_report(trainer, train_dataset, eval_data):
    """Evaluate ``eval_data`` whole and restricted to warm / cold item rows, with the trainer's metrics.

    Args:
        trainer (recbole.trainer.Trainer): holds the model to evaluate (as it is: no checkpoint is loaded).
        train_dataset (recbole.data.dataset.Dataset): the training split (``train_data.dataset``).
        eval_data (recbole.data.dataloader.AbstractDataLoader): a valid / test loader of the same run.

    Returns:
        dict: ``{"all": result, "warm": result, "cold": result}``, each RecBole's ``OrderedDict`` of metrics
        (``trainer.evaluate``), or ``None`` for a group without rows.
    """
    item_field = trainer.config["ITEM_ID_FIELD"]
    eval_dataset = eval_data._dataset
    warm_items = np.unique(train_dataset.inter_feat[item_field].numpy())
    is_warm = np.isin(eval_dataset.inter_feat[item_field].numpy(), warm_items)
    report = {"all": trainer.evaluate(eval_data, load_best_model=False)}
    for group, rows in (("warm", is_warm), ("cold", ~is_warm)):
        report[group] = _evaluate_rows(trainer, eval_data, np.flatnonzero(rows)) if rows.any() else None
    return report


def _evaluate_rows(trainer, eval_data, rows):
    """RecBole's evaluation of ``eval_data`` on some of its rows (a loader of the same class on a dataset copy)."""
    subset = eval_data._dataset.copy(eval_data._dataset.inter_feat[torch.from_numpy(rows)])
    loader = type(eval_data)(eval_data.config, subset, eval_data._sampler, shuffle=False)
    return trainer.evaluate(loader, load_best_model=False)

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
from recbole.evaluator.collector import DataStruct

from recbole_llm.evaluator.collector import ROW_KEYS


def warm_cold_report(trainer, train_dataset, eval_data, load_best_model=False, show_progress=False):
    """Evaluate ``eval_data`` whole and restricted to warm / cold item rows, with the trainer's metrics.

    The model scores every row once: RecBole's evaluation of the whole loader, whose collected rows (scores,
    labels, users, and each row's item) are then split by group and given to RecBole's evaluator again.

    Args:
        trainer (recbole.trainer.Trainer): holds the model to evaluate.
        train_dataset (recbole.data.dataset.Dataset): the training split (``train_data.dataset``).
        eval_data (recbole.data.dataloader.AbstractDataLoader): a valid / test loader of the same run.
        load_best_model (bool): load the trainer's saved checkpoint first, as ``trainer.evaluate`` does
            (the model as it is by default).
        show_progress (bool): RecBole's evaluation bar.

    Returns:
        dict: ``{"all": result, "warm": result, "cold": result}``, each RecBole's ``OrderedDict`` of metrics
        (``trainer.evaluate``), or ``None`` for a group of fewer than two rows (no AUC there: RecBole's metrics
        fail on a single row).
    """
    warm_items = torch.from_numpy(np.unique(train_dataset.inter_feat[trainer.config["ITEM_ID_FIELD"]].numpy()))
    collector = trainer.eval_collector
    collector.collect_items = True
    try:
        report = {"all": trainer.evaluate(eval_data, load_best_model=load_best_model, show_progress=show_progress)}
    finally:
        collector.collect_items = False
    struct, collector.last_struct = collector.last_struct, None
    is_warm = torch.isin(struct["data.item"], warm_items)
    for group, rows in (("warm", is_warm), ("cold", ~is_warm)):
        report[group] = trainer.evaluator.evaluate(_rows_of(struct, rows)) if rows.sum() >= 2 else None
    return report


def _rows_of(struct, rows):
    """A copy of RecBole's collected ``DataStruct`` with the per-row tensors cut to ``rows`` (a bool mask)."""
    out = DataStruct()
    for key, value in struct._data_dict.items():
        out.set(key, value[rows] if key in ROW_KEYS and torch.is_tensor(value) else value)
    return out

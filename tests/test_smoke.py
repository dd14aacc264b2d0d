"""Every LLM model end to end on tiny-random, found automatically: a new model file is picked up here.

Each model runs on the tiny data of its type (general: clustered; sequential: leave-one-out; context-aware:
labeled) with its own YAML defaults and a few generic overrides that keep the run small, is evaluated by
RecBole's evaluator, and its checkpoint reloads (``load_data_and_model``) to the same test metrics.
"""
import glob
import os

import pytest
from recbole.utils import ModelType

from recbole_llm.model.abstract import LLMRecommender
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm
from recbole_llm.registry import available_models, get_model
from recbole_llm.trainer import LLMTrainer
from tests import conftest

LLM_MODELS = [name for name in available_models() if issubclass(get_model(name), LLMRecommender)]
SMALL = {"llm_path": "tiny-random", "epochs": 1, "train_batch_size": 8, "eval_batch_size": 4096,
         "cf_config": {"epochs": 2}, "show_progress": False, "seed": 2020, "gen_max_tokens": 3,
         "item_text_fields": ["title", "genre"], "user_inter_num_interval": "[0,inf)",
         "item_inter_num_interval": "[0,inf)"}


def _data(model_type, root):
    """(data_path, config for that kind of data)."""
    if model_type == ModelType.SEQUENTIAL:
        # sequential data is ordered by time
        return conftest.write_sequential_dataset(root, name="smoke"), {"load_col": {"inter": ["user_id", "item_id",
                                                                                           "timestamp"]}}
    if model_type == ModelType.CONTEXT:
        root = conftest.write_labeled_dataset(root, name="smoke", n_items=30)[0]
        conftest._write_item_text(os.path.join(root, "smoke"), "smoke", n_items=30, n_clusters=3)
        labeled = conftest.labeled_config(root, name="smoke")
        return root, {k: labeled[k] for k in ("load_col", "unused_col", "threshold", "eval_args", "metrics",
                                              "valid_metric")}
    return conftest.write_tiny_dataset(root, name="smoke"), {}


def test_the_smoke_test_finds_the_llm_models():
    assert "GLTA" in LLM_MODELS


@pytest.mark.parametrize("model", LLM_MODELS)
def test_every_llm_model_runs_end_to_end_and_reloads(model, tmp_path):
    model_class = get_model(model)
    root, data_config = _data(model_class.type, str(tmp_path / "data"))
    config = dict(SMALL, **data_config, data_path=root, checkpoint_dir=str(tmp_path / "saved"))
    result = run_recbole_llm(model, "smoke", config_dict=config)
    assert result["test_result"] and all(0.0 <= v <= 1.0 for v in result["test_result"].values())

    checkpoint = glob.glob(os.path.join(str(tmp_path / "saved"), f"{model}-*.pth"))
    assert len(checkpoint) == 1
    cfg, reloaded, _, _, _, test = load_data_and_model(checkpoint[0])
    again = LLMTrainer(cfg, reloaded).evaluate(test, load_best_model=False)
    assert dict(again) == pytest.approx(dict(result["test_result"]))

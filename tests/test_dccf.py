"""DCCF: found by our model lookup, and a few epochs on a slice of ml-100k beat the untrained model."""
import sys

import pytest
from recbole.utils import init_seed

from recbole_llm.config import Config
from recbole_llm.quick_start import run_recbole_llm
from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer

# ml-100k's 5-star ratings only (about 21k interactions), large batches: a few seconds per epoch on CPU.
SMALL = {
    "val_interval": {"rating": "[5,5]"},
    "user_inter_num_interval": "[0,inf)",
    "train_batch_size": 4096,
    "epochs": 3,
    "learning_rate": 0.005,
    "stopping_step": 100,
    "show_progress": False,
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and log_tensorboard/ in the working directory
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # RecBole's Config reads --key=value from the command line
    return tmp_path


def test_dccf_is_found():
    from recbole_llm.model.general_recommender.dccf import DCCF

    assert get_model("DCCF") is DCCF


def test_dccf_trains_and_beats_untrained(workdir):
    config_dict = dict(SMALL, checkpoint_dir=str(workdir / "saved"))

    # untrained DCCF on the same split (run_recbole_llm seeds the same way before and after the split)
    config = Config(model="DCCF", dataset="ml-100k", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("DCCF")(config, train_data._dataset).to(config["device"])
    untrained = get_trainer(config["MODEL_TYPE"], "DCCF")(config, model).evaluate(test_data, load_best_model=False)

    result = run_recbole_llm("DCCF", "ml-100k", config_dict=config_dict)
    assert result["test_result"]["ndcg@10"] > untrained["ndcg@10"] + 0.02, (result["test_result"], untrained)

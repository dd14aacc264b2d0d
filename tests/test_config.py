"""Config overlay and model lookup."""
import os
import subprocess
import sys

import pytest

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.utils import PROPERTIES_DIR, available_models, get_model


def test_our_yaml_overlays_recbole_and_user_values_win():
    config = Config("GLTA", "ml-100k", config_dict={"gllm_k": 7})
    assert config["item_text_fields"] == ["movie_title", "release_year", "class"]  # properties/dataset/ml-100k.yaml
    assert config["cf_backbone"] == "LightGCN" and config["inference"] == "glta"  # properties/model/GLTA.yaml
    assert config["llm_path"] == "smollm2"  # properties/overall.yaml
    assert config["gllm_k"] == 7  # the user's value wins
    assert config["eval_args"]["mode"]["test"] == "full"  # RecBole's own defaults are still there


def test_recbole_presets_are_not_clobbered():
    config = Config("SASRec", "ml-100k", config_dict={"train_neg_sample_args": None})
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["repeatable"]  # sequential preset
    config = Config("FM", "ml-100k")
    assert config["threshold"] == {"rating": 4} and "class" in config["load_col"]["item"]  # context-aware preset
    assert config["llm_path"] == "smollm2"  # our overall.yaml only adds keys RecBole does not have


def test_model_lookup_prefers_ours_and_falls_back_to_recbole():
    assert get_model("GLTA").__module__ == "recbole_llm.model.general_recommender.glta"
    assert get_model("lightgcn").__module__ == "recbole.model.general_recommender.lightgcn"
    assert {"GLTA", "DCCF", "BPR", "LightGCN", "SASRec"} <= set(available_models())


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'Nope'; available: .*GLTA.*LightGCN"):
        get_model("Nope")


def test_the_yaml_files_ship_inside_the_package(tmp_path):
    """A wheel (not only an editable checkout) carries properties/ as recbole_llm/properties."""
    import subprocess
    import sys
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), root], check=True, capture_output=True)
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    for required in ["recbole_llm/properties/overall.yaml", "recbole_llm/properties/model/GLTA.yaml",
                     "recbole_llm/properties/dataset/ml-100k.yaml", "recbole_llm/properties/hyper/GLTA.hyper",
                     "dataset_converters/movielens.py"]:
        assert required in names
    assert os.path.isfile(os.path.join(PROPERTIES_DIR, "model", "GLTA.yaml"))


def test_dataset_yaml_never_overrides_a_model_type_preset(tmp_path):
    """properties/dataset/ml-1m.yaml asks for a random 8:1:1 split: a general model gets it, a sequential model
    keeps RecBole's leave-one-out preset, a context-aware model its labeled preset."""
    from recbole_llm.utils import create_dataset, data_preparation
    from tests.conftest import write_tiny_dataset

    write_tiny_dataset(str(tmp_path), name="ml-1m", n_users=10, n_items=30, per_user=6)
    sasrec = Config("SASRec", "ml-1m", config_dict={"data_path": str(tmp_path), "train_neg_sample_args": None})
    assert sasrec["eval_args"]["split"] == {"LS": "valid_and_test"} and sasrec["eval_args"]["order"] == "TO"
    assert sasrec["load_col"]["inter"] == ["user_id", "item_id", "rating", "timestamp"]  # the rest still applies
    _, valid_data, test_data = data_preparation(sasrec, create_dataset(sasrec))
    for split in (valid_data, test_data):  # leave-one-out: one held-out row per user
        users = split.dataset.inter_feat["user_id"].numpy()
        assert len(users) == len(set(users)) == 10

    bpr = Config("BPR", "ml-1m", config_dict={"data_path": str(tmp_path)})
    assert bpr["eval_args"]["split"] == {"RS": [0.8, 0.1, 0.1]} and bpr["eval_args"]["order"] == "RO"
    assert Config("FM", "ml-1m", config_dict={"data_path": str(tmp_path)})["eval_args"]["group_by"] is None
    # The user's values still win over the preset.
    user_split = {"split": {"RS": [0.6, 0.2, 0.2]}, "order": "TO", "mode": "full"}
    mine = Config("SASRec", "ml-1m", config_dict={"data_path": str(tmp_path), "train_neg_sample_args": None,
                                                  "eval_args": user_split})
    assert mine["eval_args"]["split"] == {"RS": [0.6, 0.2, 0.2]}


def test_model_lookup_imports_no_model():
    import subprocess
    import sys

    code = ("import sys, recbole_llm.registry, recbole_llm.utils, recbole_llm.config; "
            "print(sorted(m for m in sys.modules if m.startswith('recbole_llm.model')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def test_recbole_sequential_models_leave_anomaly_mode_off():
    """RecBole's sine.py turns autograd's anomaly mode on at import (every backward then checks every gradient
    for NaN); loading a RecBole sequential model through recbole_llm must leave it off."""
    code = ("import torch; from recbole_llm import compat; compat.apply(); "
            "from recbole_llm.utils import get_model; get_model('SASRec'); "
            "import recbole.model.sequential_recommender.sine; print(torch.is_anomaly_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False"

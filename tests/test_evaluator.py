"""UAUC (a registered RecBole metric, exact under 2 processes) and the warm / cold item report."""
import ast
import glob
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recbole_llm.config import Config
from recbole_llm.evaluator import UAUC, warm_cold_report
from recbole_llm.quick_start import run, run_recbole_llm
from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer
from tests.conftest import labeled_config, write_labeled_dataset
from tests.test_distributed import _free_port


@pytest.fixture(scope="module")
def labeled_data(tmp_path_factory):
    return write_labeled_dataset(str(tmp_path_factory.mktemp("labeled")))


@pytest.fixture(autouse=True)
def _no_cli_args(monkeypatch):
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # RecBole's Config reads --key=value from the command line


def _auc(scores, labels):
    """Hand AUC: the share of (positive, negative) pairs ordered right, ties counting one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_uauc_is_the_mean_user_auc_and_skips_one_class_users():
    uauc = UAUC(Config("FM", "ml-100k", config_dict={"metrics": ["AUC", "UAUC", "LogLoss"]}))
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.7, 0.4, 0.4, 0.6, 0.1])
    labels = np.array([1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0])
    users = np.array([1, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5])
    # user 1: 1.0; user 2: 0.0; user 3 (positives only) and user 5 (negatives only) skipped; user 4: a tie, 0.5.
    assert uauc.metric_info(scores, labels, users) == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    by_hand = np.mean([_auc(scores[users == u], labels[users == u]) for u in (1, 2, 4)])
    assert uauc.metric_info(scores, labels, users) == pytest.approx(by_hand)
    assert np.isnan(uauc.metric_info(scores[6:7], labels[6:7], users[6:7]))


def test_uauc_is_a_metric_recbole_config_accepts():
    config = Config("FM", "ml-100k", config_dict={"metrics": ["AUC", "UAUC", "LogLoss"], "valid_metric": "UAUC"})
    assert config["valid_metric_bigger"] and config["eval_type"].name == "VALUE"


def test_labeled_run_reports_auc_uauc_logloss(labeled_data, tmp_path):
    root, _ = labeled_data
    result = run_recbole_llm("FM", "labeled", config_dict=labeled_config(root, checkpoint_dir=str(tmp_path)))
    for split in ("best_valid_result", "test_result"):
        assert set(result[split]) == {"auc", "uauc", "logloss"}, result[split]
        assert 0 <= result[split]["uauc"] <= 1 and 0 <= result[split]["auc"] <= 1
    assert result["best_valid_score"] == result["best_valid_result"]["uauc"]


def test_warm_cold_report_option_logs_the_groups_of_the_test_pass(labeled_data, tmp_path, caplog):
    root, _ = labeled_data
    config = labeled_config(root, checkpoint_dir=str(tmp_path))
    plain = run_recbole_llm("FM", "labeled", config_dict=config)
    assert "test_result_groups" not in plain
    with caplog.at_level("INFO"):
        result = run_recbole_llm("FM", "labeled", config_dict=dict(config, warm_cold_report=True))
    assert result["test_result"] == plain["test_result"]  # the same model, tested once as before
    groups = result["test_result_groups"]
    assert set(groups) == {"warm", "cold"} and groups["warm"] != groups["cold"]
    for group in ("warm", "cold"):
        assert set(groups[group]) == {"auc", "uauc", "logloss"}
        assert any(f"test result ({group} items)" in r.getMessage() and str(groups[group]) in r.getMessage()
                   for r in caplog.records), group


def test_a_fresh_process_reloads_a_uauc_checkpoint(labeled_data, tmp_path):
    """``load_data_and_model`` unpickles the Config, so it must apply the RecBole fixes (UAUC's registration)
    itself: a new process that only reloads the checkpoint evaluates it to the run's test metrics."""
    root, _ = labeled_data
    result = run_recbole_llm("FM", "labeled", config_dict=labeled_config(root, checkpoint_dir=str(tmp_path)))
    (checkpoint,) = glob.glob(str(tmp_path / "FM-*.pth"))
    code = ("import sys; from recbole_llm.quick_start import load_data_and_model; "
            "from recbole_llm.utils import get_trainer; "
            "c, m, _, _, _, test = load_data_and_model(sys.argv[1]); "
            "print(dict(get_trainer(c['MODEL_TYPE'], c['model'])(c, m).evaluate(test, load_best_model=False)))")
    done = subprocess.run([sys.executable, "-c", code, checkpoint], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == pytest.approx(dict(result["test_result"]))


def test_two_processes_give_the_uauc_of_one(labeled_data, tmp_path):
    """With learning rate 0 both runs test rank 0's initial model (DDP broadcasts it), so the metrics must match
    exactly: each rank holds half of every user's rows (and rank 1 a padding row: 39 test rows)."""
    root, _ = labeled_data
    config = labeled_config(root, epochs=1, learning_rate=0.0)
    one = run("FM", "labeled", config_dict=dict(config, checkpoint_dir=str(tmp_path / "one")))["test_result"]
    two = run("FM", "labeled", config_dict=dict(config, checkpoint_dir=str(tmp_path / "two")), nproc=2,
              ip="localhost", port=_free_port())["test_result"]
    assert set(one) == {"auc", "uauc", "logloss"}
    for metric in one:
        assert two[metric] == pytest.approx(one[metric], abs=1e-4), (metric, one, two)


def test_warm_cold_report(labeled_data, tmp_path):
    root, cold_tokens = labeled_data
    config = Config("FM", "labeled", config_dict=labeled_config(root, checkpoint_dir=str(tmp_path)))
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model("FM")(config, train_data.dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "FM")(config, model)
    trainer.fit(train_data, valid_data, saved=False)

    scored, predict = [], model.predict
    model.predict = lambda interaction: (scored.append(len(interaction)), predict(interaction))[1]
    report = warm_cold_report(trainer, train_data.dataset, test_data)
    model.predict = predict
    assert sum(scored) == len(test_data.dataset.inter_feat)  # every row is scored once for the three groups
    assert report["all"] == trainer.evaluate(test_data, load_best_model=False)
    assert set(report["warm"]) == set(report["cold"]) == {"auc", "uauc", "logloss"}

    # The cold group is exactly the test rows of the items written to appear only at the end of the timeline.
    test_inter = test_data.dataset.inter_feat
    cold_ids = dataset.token2id("item_id", cold_tokens)
    is_cold = np.isin(test_inter["item_id"].numpy(), cold_ids)
    assert 0 < is_cold.sum() < len(is_cold)
    assert not np.isin(train_data.dataset.inter_feat["item_id"].numpy(), cold_ids).any()
    scores = model.predict(test_inter).detach().numpy()
    labels = test_inter["label"].numpy()
    for group, rows in (("cold", is_cold), ("warm", ~is_cold)):
        assert report[group]["auc"] == pytest.approx(_auc(scores[rows], labels[rows]), abs=1e-4), group
        users = test_inter["user_id"].numpy()[rows]
        by_hand = np.mean([_auc(scores[rows][users == u], labels[rows][users == u]) for u in np.unique(users)
                           if 0 < labels[rows][users == u].sum() < (users == u).sum()])
        assert report[group]["uauc"] == pytest.approx(by_hand, abs=1e-4), group

    # a group of one row (a tiny slice): no AUC there, and RecBole's metrics fail on one row: None
    values, counts = np.unique(test_inter["item_id"].numpy(), return_counts=True)
    single = values[counts == 1][0]
    one_cold = SimpleNamespace(inter_feat={"item_id": torch.from_numpy(values[values != single])})
    report = warm_cold_report(trainer, one_cold, test_data)
    assert report["cold"] is None and set(report["warm"]) == {"auc", "uauc", "logloss"}

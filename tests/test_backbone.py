"""The CF-backbone service (``recbole_llm.model.backbone``): the ``cf_pretrain`` stage trains a RecBole model
exactly as ``run_recbole_llm(model=<backbone>)`` does, then serves its embeddings and full-ranking logits."""
import os
import random
import sys

import pytest
import torch
from recbole.utils import init_seed

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.model.backbone import EMBEDDINGS, CFBackbone, training_interactions
from recbole_llm.quick_start import run_recbole_llm
from recbole_llm.stages import StageCache
from recbole_llm.utils import create_dataset, data_preparation, get_trainer
from tests.conftest import tiny_config

FAST = {"epochs": 12, "learning_rate": 0.01, "train_batch_size": 128, "eval_step": 2, "stopping_step": 2}
TIMES = {"load_col": {"inter": ["user_id", "item_id", "timestamp"]}}  # a sequential model orders by time
SEQUENTIAL = dict(TIMES, eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"})
EVALUATION = ("metrics", "topk", "valid_metric", "eval_args", "seed", "load_col")


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # RecBole's Config reads --key=value from the command line


def _llm_model_data(model, tiny_data, tmp_path, **overrides):
    """An LLM model's config and RecBole's loaders for it (``model``: GLTA, or SASRec for sequential data)."""
    config = Config(model, "tiny", config_dict=tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"),
                                                           **overrides))
    init_seed(config["seed"], config["reproducibility"])  # as run_recbole_llm does before the split
    return (config, *data_preparation(config, create_dataset(config)))


def _run_stage(config, train, valid, name):
    backbone = CFBackbone(config, train._dataset, name)
    stage = backbone.stage()  # run as LLMTrainer runs a Stage
    artifact = StageCache(config, train._dataset).run(stage, lambda: stage.build(None, train, valid), stage.load)
    return backbone, artifact


def _alone(name, config, tiny_data, tmp_path):
    """``run_recbole_llm(model=name)``: the same data, split, seed and evaluation, the backbone's cf_config."""
    config_dict = {k: config[k] for k in EVALUATION}
    config_dict.update(config["cf_config"], data_path=tiny_data, checkpoint_dir=str(tmp_path / "alone"),
                       show_progress=False, user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    return run_recbole_llm(name, "tiny", config_dict=config_dict)


@pytest.mark.parametrize("name", ["LightGCN", "BPR"])
def test_stage_equals_the_backbone_alone(tiny_data, tmp_path, name):
    config, train, valid, test = _llm_model_data("GLTA", tiny_data, tmp_path, cf_config=FAST)
    backbone, artifact = _run_stage(config, train, valid, name)
    test_result = get_trainer(backbone.config["MODEL_TYPE"], name)(backbone.config, backbone.model).evaluate(
        test, load_best_model=False)

    alone = _alone(name, config, tiny_data, tmp_path)
    assert artifact["best_valid_result"] == dict(alone["best_valid_result"])
    assert dict(test_result) == dict(alone["test_result"])
    assert alone["test_result"]["ndcg@10"] > 0.2  # trained: the clustered data is predictable


def test_sasrec_backbone_on_sequential_data(tiny_data, tmp_path):
    config, train, valid, test = _llm_model_data("SASRec", tiny_data, tmp_path, cf_config=FAST, **TIMES)
    backbone, artifact = _run_stage(config, train, valid, "SASRec")
    assert backbone.config["train_neg_sample_args"]["distribution"] == "none"  # CE over all items
    test_result = get_trainer(backbone.config["MODEL_TYPE"], "SASRec")(backbone.config, backbone.model).evaluate(
        test, load_best_model=False)
    alone = _alone("SASRec", config, tiny_data, tmp_path)
    assert artifact["best_valid_result"] == dict(alone["best_valid_result"])
    assert dict(test_result) == dict(alone["test_result"])

    user, item = backbone.embeddings()
    assert user is None and item.shape == (train._dataset.item_num, backbone.embedding_size)
    batch = next(iter(test))[0]
    logits = backbone.logits(batch)
    assert logits.shape == (len(batch), train._dataset.item_num)
    assert not logits.requires_grad and not backbone.model.training


def test_general_backbone_on_sequential_data_trains_on_plain_interactions(tiny_data, tmp_path):
    config, train, valid, test = _llm_model_data("SASRec", tiny_data, tmp_path, cf_config=dict(FAST, epochs=2),
                                                 **TIMES)
    plain = training_interactions(train._dataset)
    pairs = set(zip(plain.inter_feat["user_id"].tolist(), plain.inter_feat["item_id"].tolist()))
    general = Config("BPR", "tiny", config_dict=tiny_config(tiny_data, **SEQUENTIAL))
    general_train = data_preparation(general, create_dataset(general))[0]._dataset  # leave-one-out, by time
    expected = set(zip(general_train.inter_feat["user_id"].tolist(), general_train.inter_feat["item_id"].tolist()))
    assert len(plain) == len(general_train) > len(train._dataset)  # every user's first item is back
    assert pairs == expected

    backbone, _ = _run_stage(config, train, valid, "BPR")
    user, item = backbone.embeddings()
    assert user.shape == (plain.user_num, 64) and item.shape == (plain.item_num, 64)
    batch = next(iter(test))[0]
    assert backbone.logits(batch).shape == (len(batch), plain.item_num)


@pytest.mark.parametrize("name", [n for n in EMBEDDINGS if n != "SASRec"])
def test_embeddings_score_like_full_sort_predict(tiny_data, tmp_path, name):
    config, train, valid, test = _llm_model_data("GLTA", tiny_data, tmp_path, cf_config=dict(FAST, epochs=1))
    backbone, _ = _run_stage(config, train, valid, name)
    user, item = backbone.embeddings()
    assert user.shape == (train._dataset.user_num, backbone.embedding_size)
    assert item.shape == (train._dataset.item_num, backbone.embedding_size)
    batch = next(iter(test))[0]
    logits = backbone.logits(batch)
    assert logits.shape == (len(batch), train._dataset.item_num)
    assert torch.allclose(logits, user[batch["user_id"]] @ item.T, atol=1e-5)


def test_defaults_are_recboles_for_the_backbone(tiny_data, tmp_path):
    config, train, _, _ = _llm_model_data("GLTA", tiny_data, tmp_path, cf_config={})
    bconf = CFBackbone(config, train._dataset, "LightGCN").config
    assert (bconf["learning_rate"], bconf["train_batch_size"], bconf["epochs"], bconf["eval_step"],
            bconf["stopping_step"]) == (0.001, 2048, 300, 1, 10)  # RecBole's, not the LLM model's
    assert bconf["train_neg_sample_args"]["distribution"] == "uniform"
    assert bconf["train_neg_sample_args"]["sample_num"] == 1
    assert (config["learning_rate"], config["train_batch_size"]) == (0.01, 8)  # the LLM model's, untouched
    overridden = CFBackbone(Config("GLTA", "tiny", config_dict=tiny_config(
        tiny_data, cf_config={"learning_rate": 0.01, "embedding_size": 16})), train._dataset, "LightGCN")
    assert overridden.config["learning_rate"] == 0.01 and overridden.embedding_size == 16


def test_bad_backbones_name_the_option(tiny_data, tmp_path):
    config, train, _, _ = _llm_model_data("GLTA", tiny_data, tmp_path)
    with pytest.raises(ConfigError, match="cf_backbone: SASRec is sequential"):
        CFBackbone(config, train._dataset, "SASRec")
    with pytest.raises(ConfigError, match="cf_backbone: no embeddings for Pop"):
        CFBackbone(config, train._dataset, "Pop").embedding_size  # Pop trains, and has logits() only
    with pytest.raises(ConfigError, match="cf_backbone: DeepFM is a context model"):
        CFBackbone(config, train._dataset, "DeepFM")
    seq_config, seq_train, _, _ = _llm_model_data(
        "SASRec", tiny_data, tmp_path, cf_config={"train_neg_sample_args": {"distribution": "uniform"}}, **TIMES)
    with pytest.raises(ConfigError, match="cf_config: SASRec with loss_type CE"):
        CFBackbone(seq_config, seq_train._dataset, "SASRec")


# ----- a general backbone under a sequential LLM model: RecBole's general evaluation (issue #23) ----------------
@pytest.mark.parametrize("name", ["BPR", "LightGCN"])
def test_general_backbone_under_tca4rec_is_selected_and_scored_as_recbole_alone(tiny_data, tmp_path, name):
    """The cf_pretrain stage under TCA4Rec (sequential loaders, which mask nothing) selects its epoch on RecBole's
    general validation (training items masked), as ``run_recbole_llm(model=name)`` on the same split; its own
    test loader masks training + validation items, as RecBole does for the model alone."""
    config, train, valid, test = _llm_model_data("TCA4Rec", tiny_data, tmp_path, cf_config=FAST, **TIMES)
    backbone, artifact = _run_stage(config, train, valid, name)
    alone = _alone(name, config, tiny_data, tmp_path)
    assert alone["best_valid_result"]["ndcg@10"] > 0.2  # trained: the clustered data is predictable
    assert artifact["best_valid_result"] == dict(alone["best_valid_result"])

    own_valid, own_test = backbone.eval_data(valid, test)
    trainer = get_trainer(backbone.config["MODEL_TYPE"], name)(backbone.config, backbone.model)
    assert dict(trainer.evaluate(own_valid, load_best_model=False)) == dict(alone["best_valid_result"])
    assert dict(trainer.evaluate(own_test, load_best_model=False)) == dict(alone["test_result"])
    # the sequential loader ranks the user's training items too: the same model scores far lower there
    assert trainer.evaluate(test, load_best_model=False)["ndcg@10"] < alone["test_result"]["ndcg@10"] / 2


def test_plain_splits_are_recboles_general_split(tiny_data, tmp_path):
    """On a file out of time order with tied times: the plain training rows (in order), the held-out items and
    the masked histories of the backbone's loaders are those of RecBole's general leave-one-out split."""
    lines = open(f"{tiny_data}/tiny/tiny.inter").read().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    random.Random(3).shuffle(rows)  # users appear in the file in another order than in time
    os.makedirs(tmp_path / "shuffled" / "tiny")
    with open(tmp_path / "shuffled" / "tiny" / "tiny.inter", "w") as f:
        f.write("\n".join([lines[0]] + ["\t".join(r[:3] + [str(int(r[3]) // 4)]) for r in rows]) + "\n")  # ties
    data = str(tmp_path / "shuffled")
    seq_config, train, valid, test = _llm_model_data("SASRec", data, tmp_path, **TIMES)
    general = Config("BPR", "tiny", config_dict=tiny_config(data, **SEQUENTIAL))
    init_seed(general["seed"], general["reproducibility"])
    g_train, g_valid, g_test = data_preparation(general, create_dataset(general))

    def pairs(dataset):
        return list(zip(dataset.inter_feat["user_id"].tolist(), dataset.inter_feat["item_id"].tolist()))

    plain = training_interactions(train._dataset)
    assert pairs(plain) == pairs(g_train._dataset)  # the same rows in the same order (shuffle, negatives)
    assert plain.inter_feat["user_id"].tolist() != sorted(plain.inter_feat["user_id"].tolist())  # not by id
    backbone = CFBackbone(seq_config, train._dataset, "BPR")
    own_valid, own_test = backbone.eval_data(valid, test)
    for own, theirs in ((own_valid, g_valid), (own_test, g_test)):
        assert sorted(pairs(own._dataset)) == sorted(pairs(theirs._dataset))
        assert torch.equal(own.uid_list, theirs.uid_list)
        for u in theirs.uid_list.tolist():
            assert sorted(own.uid2history_item[u].tolist()) == sorted(theirs.uid2history_item[u].tolist())
    # a general LLM model's loaders are already RecBole's for a general backbone: returned as they are
    g_config, g_train_data, g_valid_data, g_test_data = _llm_model_data("GLTA", tiny_data, tmp_path)
    assert CFBackbone(g_config, g_train_data._dataset, "BPR").eval_data(g_valid_data, g_test_data) == \
        (g_valid_data, g_test_data)


def test_mask_history_sets_the_rows_seen_items_to_minus_infinity(tiny_data, tmp_path):
    config, train, valid, _ = _llm_model_data("SASRec", tiny_data, tmp_path, cf_config=dict(FAST, epochs=1),
                                              **TIMES)
    plain, artifact = _run_stage(config, train, valid, "BPR")
    masked = CFBackbone(config, train._dataset, "BPR", mask_history=True)
    masked.load(artifact)
    batch = next(iter(train))
    batch["item_id"][0] = batch["item_id_list"][0, 0]  # a re-consumed target keeps its score
    raw, scores = plain.logits(batch), masked.logits(batch)
    seen = torch.zeros_like(raw, dtype=torch.bool)
    for row, (seq, n) in enumerate(zip(batch["item_id_list"].tolist(), batch["item_length"].tolist())):
        seen[row, seq[:n]] = True
    seen[0, batch["item_id"][0]] = False
    assert seen.sum() > len(batch) and torch.isneginf(scores[seen]).all()
    assert torch.equal(scores[~seen], raw[~seen])

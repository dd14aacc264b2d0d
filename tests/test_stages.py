"""Declared stages, the stage cache and LLMTrainer on a dummy two-stage model (no real recommender logic).

The dummy: stage ``texts`` (uses the LLM, computes nothing expensive), stage ``warm_up`` (a TrainStage over
RecBole's own train dataloader with a tuple loss), and a final stage that trains another module.
"""
import logging
import os

import pytest
import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.loss import BPRLoss, EmbLoss
from recbole.utils import InputType, init_seed
from torch import nn

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.llm import load_llm
from recbole_llm.model.abstract import LLMRecommender, Stage, TrainStage
from recbole_llm.stages import LLM_KEYS, TRAINER_KEYS, StageCache
from recbole_llm.trainer import LLMTrainer
from recbole_llm.utils import create_dataset, data_preparation
from tests.conftest import tiny_config


class Dummy(LLMRecommender, GeneralRecommender):
    input_type = InputType.PAIRWISE
    seen_batches = []

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.user_embedding = nn.Embedding(self.n_users, 8)
        self.item_embedding = nn.Embedding(self.n_items, 8)
        self.item_bias = nn.Embedding(self.n_items, 1)
        self.llm = load_llm(config)[0] if config["lora_r"] else None
        self.texts = None
        self.builds = []

    def stages(self):
        warm_modules = ["user_embedding", "item_embedding"] + (["llm"] if self.llm is not None else [])
        return [Stage("texts", self.build_texts, self.load_texts, ["dummy_text"], uses_llm=True),
                TrainStage("warm_up", modules=warm_modules, loss=self.tuple_loss, epochs=2,
                           learning_rate=0.05, uses_llm=False)]

    def final_stage(self):
        return TrainStage("final", modules=["item_bias"], loss=self.calculate_loss)

    def build_texts(self, trainer, train_data, valid_data):
        self.builds.append("texts")
        return {"texts": [f"text {i}" for i in range(self.n_items)]}

    def load_texts(self, artifact):
        self.texts = artifact["texts"]

    def _scores(self, users, items):
        return (self.user_embedding(users) * self.item_embedding(items)).sum(-1) + self.item_bias(items)[:, 0]

    def tuple_loss(self, interaction):
        Dummy.seen_batches.append(type(interaction).__name__)
        users = interaction[self.USER_ID]
        pos, neg = interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        bpr = BPRLoss()(self._scores(users, pos), self._scores(users, neg))
        reg = 1e-4 * EmbLoss()(self.user_embedding(users), self.item_embedding(pos))
        if self.llm is not None:  # the adapter takes part, so it trains in the warm-up stage
            lora = [p for n, p in self.llm.named_parameters() if "lora_B" in n][0]
            reg = reg + (lora.sum() - 1) ** 2
        return bpr, reg

    def calculate_loss(self, interaction):
        return sum(self.tuple_loss(interaction))

    def predict(self, interaction):
        return self._scores(interaction[self.USER_ID], interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction):
        users = interaction[self.USER_ID]
        scores = self.user_embedding(users) @ self.item_embedding.weight.T + self.item_bias.weight[:, 0]
        return scores.reshape(-1)


def _setup(tiny_data, tmp_path, **overrides):
    config_dict = tiny_config(tiny_data, **dict(dict(
        checkpoint_dir=str(tmp_path / "saved"), epochs=1, train_batch_size=128, dummy_text="a",
        train_neg_sample_args={"distribution": "uniform", "sample_num": 1}), **overrides))
    config = Config(model=Dummy, dataset="tiny", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])  # the split is random: seeded as a run seeds it
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = Dummy(config, train._dataset).to(config["device"])
    return config, model, train, valid, test


def test_train_stage_runs_on_recbole_dataloaders_and_logs_tuple_losses(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config, model, train, valid, _ = _setup(tiny_data, tmp_path)
    Dummy.seen_batches = []
    before = model.item_embedding.weight.detach().clone()
    LLMTrainer(config, model).fit(train, valid, saved=False)
    assert Dummy.seen_batches and set(Dummy.seen_batches) == {"Interaction"}
    assert "stage warm_up epoch 1 loss 1:" in caplog.text and "loss 2:" in caplog.text  # part by part
    assert not torch.equal(before, model.item_embedding.weight)  # the warm-up stage trained it
    assert not model.item_embedding.weight.requires_grad and model.item_bias.weight.requires_grad  # final stage


def test_a_cached_train_stage_reloads_what_it_trained(tiny_data, tmp_path, caplog):
    config, model, train, valid, _ = _setup(tiny_data, tmp_path)
    LLMTrainer(config, model).fit(train, valid, saved=False)
    trained = model.item_embedding.weight.detach().clone()
    config, again, train, valid, _ = _setup(tiny_data, tmp_path)
    caplog.clear()
    caplog.set_level(logging.INFO)
    LLMTrainer(config, again).fit(train, valid, saved=False)
    assert "warm_up: reused the finished stage" in caplog.text and again.builds == []
    assert torch.equal(again.item_embedding.weight, trained)


def test_a_module_learning_rate_gets_its_own_parameter_group_and_key(tiny_data, tmp_path):
    config, model, train, valid, _ = _setup(tiny_data, tmp_path, bias_lr=0.5)
    stage = TrainStage("warm", modules=["user_embedding", "item_bias"], loss=model.calculate_loss,
                       module_learning_rates={"item_bias": "bias_lr", "user_embedding": "not_set"})
    trainer = LLMTrainer(config, model)
    groups = trainer._stage_optimizer(stage).param_groups
    assert [(g["lr"], [id(p) for p in g["params"]]) for g in groups] == [
        (config["learning_rate"], [id(model.user_embedding.weight)]), (0.5, [id(model.item_bias.weight)])]
    assert stage.key_values(config)["module_learning_rates"] == {"item_bias": 0.5}
    config["bias_lr"] = None  # null: everything at learning_rate, one group, the same key as without the option
    assert len(trainer._stage_optimizer(stage).param_groups) == 1
    assert "module_learning_rates" not in stage.key_values(config)


def _key(config, model, train, stage_name, **changes):
    for key, value in changes.items():
        config[key] = value
    cache = StageCache(config, train._dataset)
    keys = {}
    for stage in model.stages():
        keys[stage.name] = cache.key(stage)
        cache.parent_key = keys[stage.name]
    return keys[stage_name]


CHANGED = {"learner": "sgd", "weight_decay": 0.1, "clip_grad_norm": {"max_norm": 1.0},
           "gradient_accumulation_steps": 2, "warmup_steps": 3, "llm_autocast": False, "train_batch_size": 7,
           "llm_path": "/some/model", "llm_dtype": "fp16", "llm_quantization": "4bit", "lora_r": 8,
           "lora_alpha": 3, "lora_dropout": 0.3, "lora_target_modules": ["o_proj"]}


@pytest.mark.parametrize("option", TRAINER_KEYS + LLM_KEYS)
def test_every_trainer_and_llm_option_is_in_the_keys_of_the_stages_it_affects(tiny_data, tmp_path, option):
    config, model, train, _, _ = _setup(tiny_data, tmp_path)
    base = {name: _key(config, model, train, name) for name in ("texts", "warm_up")}
    config, model, train, _, _ = _setup(tiny_data, tmp_path)
    changed = {name: _key(config, model, train, name, **{option: CHANGED[option]}) for name in ("texts", "warm_up")}
    if option in LLM_KEYS:  # texts uses the LLM; warm_up does not, but comes after texts
        assert changed["texts"] != base["texts"] and changed["warm_up"] != base["warm_up"]
    else:  # warm_up trains; texts does not
        assert changed["texts"] == base["texts"] and changed["warm_up"] != base["warm_up"]


def test_a_changed_option_rebuilds_the_stage(tiny_data, tmp_path):
    config, model, train, valid, _ = _setup(tiny_data, tmp_path)
    LLMTrainer(config, model).fit(train, valid, saved=False)
    config, model, train, valid, _ = _setup(tiny_data, tmp_path, dummy_text="b")
    LLMTrainer(config, model).fit(train, valid, saved=False)
    assert model.builds == ["texts"]
    files = os.listdir(os.path.join(str(tmp_path / "saved"), "stages", "Dummy-tiny"))
    assert sorted(f.split("-")[0] for f in files) == ["texts", "texts", "warm_up", "warm_up"]


def test_checkpoint_keeps_adapters_an_earlier_stage_trained(tiny_data, tmp_path):
    """LoRA trains in the warm-up stage and is frozen in the final one: the checkpoint still holds it."""
    config, model, train, valid, _ = _setup(tiny_data, tmp_path, lora_r=2, llm_path="tiny-random")
    trainer = LLMTrainer(config, model)
    trainer.fit(train, valid, saved=True)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # trained (LoRA B starts at 0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # frozen now
    state = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
    assert set(lora_b) <= set(state)
    assert not any(k.startswith("llm.") and "lora_" not in k for k in state)  # no frozen LLM weights

    _, fresh, _, _, _ = _setup(tiny_data, tmp_path, lora_r=2, llm_path="tiny-random")
    fresh.load_state_dict(state)
    for name, value in lora_b.items():
        assert torch.equal(dict(fresh.named_parameters())[name], value)
    incomplete = {k: v for k, v in state.items() if "lora_" not in k}
    with pytest.raises(ConfigError, match="lacks the LLM's trained adapter"):
        fresh.load_state_dict(incomplete)


def test_eval_before_training_keeps_the_start_when_training_only_hurts(tiny_data, tmp_path, monkeypatch):
    """With ``eval_before_training`` the start is validated and checkpointed: when every trained epoch
    validates worse (scripted scores), the best model is the start, and that is what gets tested."""
    scores = iter([0.5, 0.3, 0.2])  # before training, epoch 0, epoch 1
    monkeypatch.setattr(LLMTrainer, "_valid_epoch", lambda self, data, show_progress=False: (
        next(scores), {"mrr@10": 0.0}))
    config, model, train, valid, test = _setup(tiny_data, tmp_path, epochs=2, eval_before_training=True)
    trainer = LLMTrainer(config, model)
    start = model.item_bias.weight.detach().clone()
    best_score, _ = trainer.fit(train, valid, saved=True)
    assert best_score == 0.5 and not torch.equal(model.item_bias.weight, start)  # trained, then...
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    assert checkpoint["epoch"] == -1 and torch.equal(checkpoint["state_dict"]["item_bias.weight"], start)
    trainer.evaluate(test, load_best_model=True)
    assert torch.equal(model.item_bias.weight, start)  # ...the start is what gets tested

    scores = iter([0.3, 0.2])
    config, model, train, valid, test = _setup(tiny_data, tmp_path / "off", epochs=2)
    trainer = LLMTrainer(config, model)
    assert trainer.fit(train, valid, saved=True)[0] == 0.3  # without it: the best trained epoch
    assert torch.load(trainer.saved_model_file, weights_only=False)["epoch"] == 0

"""GLTA with the tiny-random LLM on a tiny clustered dataset: every stage, variant and ablation."""
import glob
import os

import pytest
import torch

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.model.general_recommender.glta import ABLATIONS, GLTA
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm
from recbole_llm.utils import create_dataset, data_preparation, get_trainer
from tests.conftest import tiny_config, write_tiny_dataset

METRICS = ["precision@5", "precision@10", "ndcg@5", "ndcg@10"]
VARIANTS = dict(ABLATIONS, fl={"inference": "fl"}, ar={"inference": "ar"}, mean={"inference": "mean"},
                mf_backbone={"cf_backbone": "MF"})


@pytest.fixture(scope="module")
def shared_saved(tmp_path_factory):
    return str(tmp_path_factory.mktemp("saved"))  # variants share cached stages


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_runs_and_is_evaluated(tiny_data, shared_saved, variant):
    config = tiny_config(tiny_data, checkpoint_dir=shared_saved, **VARIANTS[variant])
    result = run_recbole_llm("GLTA", "tiny", config_dict=config)
    for metric in METRICS:
        assert 0.0 <= result["test_result"][metric] <= 1.0


def _untrained_and_trained(tiny_data, tmp_path):
    config = tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"))
    result = run_recbole_llm("GLTA", "tiny", config_dict=config)
    cfg = Config("GLTA", "tiny", config_dict=config)
    dataset = create_dataset(cfg)
    train, valid, test = data_preparation(cfg, dataset)
    untrained = GLTA(cfg, train._dataset).to(cfg["device"])
    trainer = get_trainer(cfg["MODEL_TYPE"], "GLTA")(cfg, untrained)
    return trainer.evaluate(test, load_best_model=False), result


def test_trained_beats_untrained_on_clustered_data(tiny_data, tmp_path):
    untrained, trained = _untrained_and_trained(tiny_data, tmp_path)
    assert trained["test_result"]["ndcg@10"] > untrained["ndcg@10"] + 0.2


def test_full_sort_predict_scores_every_item_in_slot_order(tiny_data, tmp_path):
    config = tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"))
    run_recbole_llm("GLTA", "tiny", config_dict=config)
    checkpoint = glob.glob(os.path.join(str(tmp_path / "saved"), "GLTA-*.pth"))[0]
    cfg, model, dataset, train, valid, test = load_data_and_model(checkpoint)
    users = torch.tensor([1, 2, 3])
    scores = model.full_sort_predict({model.USER_ID: users}).reshape(len(users), -1)
    assert scores.shape == (3, dataset.item_num)
    assert torch.isfinite(scores[:, 1:]).all()
    placed = (scores >= 1000).sum(1)
    assert (placed == cfg["gllm_k"]).all()  # k items placed by the slots, above every other item
    for row, u in enumerate(users.tolist()):
        assert not set(scores[row].topk(cfg["gllm_k"]).indices.tolist()) & set(model.user_items[u])


def test_resume_after_a_kill_mid_stage_reaches_the_same_metrics(tiny_data, tmp_path, monkeypatch):
    clean = run_recbole_llm("GLTA", "tiny", config_dict=tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "a")))

    killed_dir = str(tmp_path / "b")
    original = GLTA.item_text_loss

    def killed(self, *args):
        raise KeyboardInterrupt("killed mid-stage")

    monkeypatch.setattr(GLTA, "item_text_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        run_recbole_llm("GLTA", "tiny", config_dict=tiny_config(tiny_data, checkpoint_dir=killed_dir))
    stage_files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(killed_dir, "stages", "*", "*")))
    assert [f.split("-")[0] for f in stage_files] == ["cf_pretrain", "profile_generation"]  # nothing half-written

    monkeypatch.setattr(GLTA, "item_text_loss", original)
    resumed = run_recbole_llm("GLTA", "tiny", config_dict=tiny_config(tiny_data, checkpoint_dir=killed_dir))
    assert resumed["test_result"] == clean["test_result"]

    # --rebuild_stages recomputes every stage (and lands on the same result again).
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(killed_dir, "stages", "*", "*.pt"))}
    rebuilt = run_recbole_llm("GLTA", "tiny",
                              config_dict=tiny_config(tiny_data, checkpoint_dir=killed_dir, rebuild_stages=True))
    assert all(os.path.getmtime(p) > t for p, t in before.items())
    assert rebuilt["test_result"] == clean["test_result"]


def test_dataset_without_item_text_fails_with_one_clear_line(tmp_path):
    root = write_tiny_dataset(str(tmp_path / "data"), name="notext", item_text=False)
    with pytest.raises(ConfigError, match=r"needs item text.*notext\.item"):
        run_recbole_llm("GLTA", "notext", config_dict=tiny_config(root, checkpoint_dir=str(tmp_path / "saved")))


def test_unknown_text_field_names_the_field(tiny_data, tmp_path):
    config = tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"), item_text_fields=["title", "plot"])
    with pytest.raises(ConfigError, match="no field plot"):
        run_recbole_llm("GLTA", "tiny", config_dict=config)


@pytest.mark.parametrize("key,value", [("inference", "beam"), ("cf_backbone", "NGCF"), ("gllm_k", 0),
                                       ("gllm_init", "zeros"), ("cross_fit", 1.0),
                                       ("head_learning_rate", "fast")])
def test_bad_options_name_the_option(tiny_data, tmp_path, key, value, monkeypatch):
    monkeypatch.setattr(get_trainer("general", "GLTA"), "run_stages", lambda *a: pytest.fail("a stage ran"))
    config = tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"), **{key: value})
    with pytest.raises(ConfigError, match=key):
        run_recbole_llm("GLTA", "tiny", config_dict=config)


def test_k_larger_than_every_history_is_documented_behaviour(tiny_data, tmp_path, caplog):
    config = tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"), gllm_k=50)
    result = run_recbole_llm("GLTA", "tiny", config_dict=config)
    assert "exceeds every user's training history" in caplog.text
    assert result["test_result"]["ndcg@10"] >= 0


def test_a_user_without_training_items_is_scored_and_not_trained(tiny_data, tmp_path):
    config = tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"))
    cfg = Config("GLTA", "tiny", config_dict=config)
    dataset = create_dataset(cfg)
    train, valid, test = data_preparation(cfg, dataset)
    model = GLTA(cfg, train._dataset).to(cfg["device"])
    model.user_items[5] = []
    assert all(u != 5 for batch in model.train_batches(train, 0) for u, _, _ in batch)
    scores = model.full_sort_predict({model.USER_ID: torch.tensor([5])})
    assert scores.shape == (dataset.item_num,) and torch.isfinite(scores[1:]).all()


def test_item_text_is_recovered_exactly(tiny_data):
    from recbole_llm.data.item_text import load_item_texts

    cfg = Config("GLTA", "tiny", config_dict=tiny_config(tiny_data))
    dataset = create_dataset(cfg)
    texts = load_item_texts(cfg, dataset)
    internal = dataset.field2token_id[dataset.iid_field]["7"]
    assert texts[internal] == "Movie  number 7, Horror"  # two spaces kept: RecBole's token_seq would lose them


def _tiny_glta(tiny_data, **overrides):
    cfg = Config("GLTA", "tiny", config_dict=tiny_config(tiny_data, **overrides))
    train, _, _ = data_preparation(cfg, create_dataset(cfg))
    return cfg, train


def _devices(model):
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def test_glta_is_built_whole_on_the_llms_device(tiny_data, monkeypatch):
    """The LLM is loaded on config["device"]: GLTA's own buffers and layers must join it, even without .to()
    (on one GPU the LLM sat on CUDA, the CF buffers on CPU: 'indices should be either on cpu or on the same
    device'). The meta device stands in for the GPU here."""
    from recbole_llm.llm import load_llm
    from recbole_llm.model.general_recommender import glta

    meta = torch.device("meta")
    cfg, train = _tiny_glta(tiny_data)
    cfg["device"] = meta

    def llm_on_meta(config):
        llm, tokenizer = load_llm(config, device=torch.device("cpu"))
        return llm.to(meta), tokenizer

    monkeypatch.setattr(glta, "load_llm", llm_on_meta)
    monkeypatch.setattr(glta, "embedding_std", lambda llm: 0.02)  # reads a value: not on meta
    model = GLTA(cfg, train._dataset)
    assert _devices(model) == {meta} and model.device == meta
    assert model.user_token(3).device == meta and model.item_tokens(torch.tensor([1, 2])).device == meta


def test_moving_glta_moves_every_tensor_and_its_device(tiny_data):
    cfg, train = _tiny_glta(tiny_data)
    model = GLTA(cfg, train._dataset)
    assert _devices(model) == {cfg["device"]}
    model.to("meta")
    assert _devices(model) == {torch.device("meta")} and model.device == torch.device("meta")
    assert model.user_token(3).device.type == "meta"  # new indices are made where the model is
    model.to_empty(device="cpu")
    assert _devices(model) == {torch.device("cpu")} and model.device == torch.device("cpu")


def test_glta_runs_wholly_in_fp32_on_a_cpu_without_native_bf16(tiny_data, monkeypatch):
    """No hidden bf16 on the CPU path: generation, training loss and scoring all run in fp32."""
    from recbole_llm.llm.precision import autocast_context

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    cfg, train = _tiny_glta(tiny_data)
    model = GLTA(cfg, train._dataset).to(cfg["device"])
    assert model.llm_dtype == torch.float32
    seen = set()

    def record(module, args, kwargs, output):
        seen.add(output.last_hidden_state.dtype)
        seen.update(t.dtype for t in kwargs.values() if torch.is_tensor(t) and t.is_floating_point())

    model.llm.model.register_forward_hook(record, with_kwargs=True)
    texts = model.generate_profiles(None, train, None)
    assert len(texts["profile"]) == model.n_users
    with autocast_context(model.device, model.llm_dtype, cfg["llm_autocast"]):  # as the trainer does
        loss = model.calculate_loss(model.train_batches(train, 0)[0])
    assert loss.dtype == torch.float32
    model.full_sort_predict({model.USER_ID: torch.tensor([1, 2])})
    assert seen == {torch.float32}


def _model(tiny_data, tmp_path, **overrides):
    config = tiny_config(tiny_data, checkpoint_dir=str(tmp_path / "saved"), llm_dtype="fp32", **overrides)
    cfg = Config("GLTA", "tiny", config_dict=config)
    dataset = create_dataset(cfg)
    train, valid, test = data_preparation(cfg, dataset)
    model = GLTA(cfg, train._dataset)
    return cfg, model, train, valid, test


def test_mixed_slot_counts_are_scored_at_each_prompts_own_slots(tiny_data, tmp_path):
    """B2: a batch mixing slot counts (e.g. the last item-text group is shorter) reads each row at its slots."""
    cfg, model, *_ = _model(tiny_data, tmp_path, gllm_init="random")  # a head whose logits depend on the state
    model.eval()
    short = model._user_prompt(1, [2], n_slots=3)
    long = model._user_prompt(2, [3, 4, 5, 6, 7, 8], n_slots=1)  # the longest prompt: no padding in the batch
    assert len(long[0]) > len(short[0])
    with torch.no_grad():
        alone = model._slot_logits([long], None)[0, 0]
        mixed = model._slot_logits([short, long], None)[1, 0]
    assert torch.allclose(alone, mixed, atol=1e-4)


def test_training_targets_are_never_in_the_prompt(tiny_data, tmp_path):
    """B5: a user with <= k training items does not see the items it is trained to name."""
    cfg, model, train, *_ = _model(tiny_data, tmp_path)
    for u in (1, 2, 3):
        model.user_items[u] = model.user_items[u][:2] if u == 1 else model.user_items[u][:cfg["gllm_k"]]
    for epoch in range(3):
        for batch in model.train_batches(train, epoch):
            for u, shown, targets in batch:
                assert targets and not set(shown) & set(targets), (u, shown, targets)
                assert set(shown) | set(targets) <= set(model.user_items[u])


def test_final_stage_starts_exactly_at_the_backbone_ranking(tiny_data, tmp_path):
    """After every earlier stage (item-text alignment included) the final stage's step 0 ranks like the backbone:
    the item-text stage trains its own head and slots, the final head's gate starts at 0."""
    cfg, model, train, valid, test = _model(tiny_data, tmp_path)
    trainer = get_trainer(cfg["MODEL_TYPE"], "GLTA")(cfg, model)
    trainer.run_stages(train, valid)
    model.eval()
    assert model.head.gate.item() == 0 and model.head.closed_gate()
    users = torch.arange(1, model.n_users)
    backbone = (model.user_emb[users] @ model.item_emb.T).masked_fill(model._seen(users.tolist(), "cpu"), -1e9)
    backbone[:, 0] = -1e9
    skipped = model.full_sort_predict({model.USER_ID: users}).reshape(len(users), -1)  # closed gate: no LLM pass
    model.ranking.clear()
    model.head.closed_gate = lambda: False  # the same scores through the LLM and the head
    through_llm = model.full_sort_predict({model.USER_ID: users}).reshape(len(users), -1)
    for scores in (skipped, through_llm):
        assert torch.equal(scores.topk(10).indices, backbone.topk(10).indices)
    assert torch.allclose(skipped, through_llm, atol=1e-4)
    with torch.no_grad():
        model.head.gate.fill_(0.5)
    del model.head.closed_gate
    assert not model.head.closed_gate()


def test_other_training_items_are_left_out_of_each_slots_softmax(tiny_data, tmp_path):
    cfg, model, train, *_ = _model(tiny_data, tmp_path)
    batch = model.train_batches(train, 0)[0]
    losses = {}
    for masked in (True, False):
        model.mask_other_positives = masked
        with torch.no_grad():
            losses[masked] = model.calculate_loss(batch).item()
    assert losses[True] < losses[False]  # fewer competitors for every target


def test_cross_fitting_holds_targets_out_of_the_backbone(tiny_data, tmp_path):
    cfg, model, train, *_ = _model(tiny_data, tmp_path, cross_fit=0.2)
    split = model.cf.dataset  # what the backbone service trains on
    pairs = set(zip(split.inter_feat[model.USER_ID].tolist(), split.inter_feat[model.ITEM_ID].tolist()))
    held = {(u, i) for u, items in enumerate(model.held_out) for i in items}
    assert held and not pairs & held
    assert len(pairs) + len(held) == len(train._dataset.inter_feat)
    for batch in model.train_batches(train, 0):
        for u, shown, targets in batch:
            assert targets and set(targets) <= model.held_out[u] and not set(shown) & set(targets)


def test_the_test_pass_reuses_the_slot_states_of_a_validation_of_the_same_weights(tiny_data, tmp_path):
    """The LLM's slot states depend only on what feeds it: the test pass after a validation of the same weights
    runs no LLM pass and scores as a fresh computation does; changed weights are computed again."""
    cfg, model, train, valid, test = _model(tiny_data, tmp_path)
    trainer = get_trainer(cfg["MODEL_TYPE"], "GLTA")(cfg, model)
    trainer.run_stages(train, valid)
    with torch.no_grad():
        model.head.gate.fill_(0.5)  # an open gate: scores come through the LLM
    computed, slot_states = [], model._slot_states
    model._slot_states = lambda encoded: computed.append(len(encoded)) or slot_states(encoded)
    trainer.evaluate(valid, load_best_model=False, show_progress=False)
    assert sum(computed) == model.n_users - 1
    reused = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert sum(computed) == model.n_users - 1  # no second LLM pass
    model._states_key = None  # forget them (and the ranking cache): the same scores computed afresh
    model.ranking.clear()
    fresh = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert sum(computed) == 2 * (model.n_users - 1) and fresh == reused
    with torch.no_grad():
        next(model.user_proj.parameters()).add_(0.1)
    model.ranking.clear()
    trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert sum(computed) == 3 * (model.n_users - 1)


def test_head_learning_rate_gives_the_gllm_head_its_own_parameter_group(tiny_data, tmp_path):
    cfg, model, *_ = _model(tiny_data, tmp_path, head_learning_rate=0.05)
    trainer = get_trainer(cfg["MODEL_TYPE"], "GLTA")(cfg, model)
    groups = trainer._stage_optimizer(model.final_stage()).param_groups
    head = {id(p) for p in model.head.parameters()}
    assert [g["lr"] for g in groups] == [cfg["learning_rate"], 0.05]
    assert {id(p) for p in groups[1]["params"]} == head and not head & {id(p) for p in groups[0]["params"]}

"""SeLLaRec on tiny labeled data (tiny-random LLM): the score, the placeholder tokens, the projector warm start,
the variants' stages (paper Table 1), the month-window split and the label errors."""
import os
import sys

import numpy as np
import pytest
import torch

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.llm import decoder
from recbole_llm.model.context_aware_recommender.sellarec import ABLATIONS
from recbole_llm.quick_start import run_recbole_llm
from recbole_llm.data.prompts import collate
from recbole_llm.trainer import LLMTrainer
from recbole_llm.utils import create_dataset, data_preparation, get_model
from tests.conftest import _write_item_text, labeled_config, write_labeled_dataset

DAY = 24 * 3600


@pytest.fixture(scope="module")
def labeled_data(tmp_path_factory):
    root, _ = write_labeled_dataset(str(tmp_path_factory.mktemp("sellarec")), name="lab")
    _write_item_text(os.path.join(root, "lab"), "lab", n_items=30, n_clusters=2)
    return root


@pytest.fixture(autouse=True)
def _no_cli_args(monkeypatch):
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # RecBole's Config reads --key=value from the command line


def _config(root, tmp_path, **overrides):
    values = labeled_config(root, name="lab", llm_path="tiny-random", item_text_fields=["title", "genre"],
                            checkpoint_dir=str(tmp_path / "saved"), mf_epochs=3, sft_epochs=1, epochs=1,
                            train_batch_size=8, llm_eval_batch_size=8, min_history=1, llm_dtype="fp32")
    values.update(overrides)
    return values


def _build(root, tmp_path, **overrides):
    config = Config("SeLLaRec", "lab", config_dict=_config(root, tmp_path, **overrides))
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model("SeLLaRec")(config, train._dataset).to(config["device"])
    return config, model, train, valid, test


def test_the_score_is_p_yes_among_yes_and_no(labeled_data, tmp_path):
    config, model, _, _, test = _build(labeled_data, tmp_path)
    tokenizer = model.tokenizer
    assert model.answer_ids == [tokenizer(" Yes", add_special_tokens=False)["input_ids"][0],
                                tokenizer(" No", add_special_tokens=False)["input_ids"][0]]
    rows = test._dataset.inter_feat[torch.arange(6)]
    scores = model.predict(rows)
    assert scores.shape == (6,) and bool(((scores > 0) & (scores < 1)).all())

    # By hand: the full vocabulary logits after each prompt, restricted to Yes / No, softmax, Yes.
    encoded = model._prompts(rows, model.token_template, model.token_vectors(rows))
    input_ids, attention, placeholder, vectors, _ = collate(encoded, tokenizer.pad_token_id, "left")
    embeds = model.llm.get_input_embeddings()(input_ids).masked_scatter(placeholder.unsqueeze(-1), vectors)
    with torch.no_grad():
        logits = model.llm(inputs_embeds=embeds, attention_mask=attention).logits[:, -1]
    by_hand = torch.softmax(logits[:, model.answer_ids].float(), -1)[:, 0]
    assert torch.allclose(scores, by_hand, atol=1e-5)

    # predict() batches prompts of similar length together; the scores come back in the rows' order.
    model.config["llm_eval_batch_size"] = 2
    rows = test._dataset.inter_feat[torch.arange(12)]
    lengths = [len(ids) for ids, _, _ in model._encode(rows)]
    assert sorted(range(12), key=lengths.__getitem__) != list(range(12))  # the batching reorders these rows
    alone = torch.cat([model.predict(rows[row:row + 1]) for row in range(12)])
    assert torch.allclose(model.predict(rows), alone, atol=1e-5)


def test_placeholder_positions_receive_the_projected_vectors(labeled_data, tmp_path):
    _, model, train, _, _ = _build(labeled_data, tmp_path)
    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = decoder(model.llm).register_forward_pre_hook(capture, with_kwargs=True)
    rows = train._dataset.inter_feat[torch.arange(4)]
    model.choice_logits(rows)
    handle.remove()

    vectors = model.token_vectors(rows)
    encoded = model._prompts(rows, model.token_template, vectors)
    input_ids, _, placeholder, _, positions = collate(encoded, model.tokenizer.pad_token_id, "left")
    embeds = seen["embeds"]
    for row in range(4):
        for name in ("user", "item", "warm"):
            (position,) = positions[row][name]
            assert torch.allclose(embeds[row, position], vectors[name][row].detach(), atol=1e-6), (row, name)
    text = model.llm.get_input_embeddings()(input_ids)
    assert torch.equal(embeds[~placeholder], text[~placeholder].detach())
    assert placeholder.sum() == 4 * 3


def test_the_stage2_projector_warm_starts_stage3(labeled_data, tmp_path):
    def after_stages(**overrides):
        config, model, train, valid, _ = _build(labeled_data, tmp_path, **overrides)
        initial = {k: v.clone() for k, v in model.collab_proj.state_dict().items()}
        trainer = LLMTrainer(config, model)
        trainer.run_stages(train, valid)
        stage_dir = os.path.join(config["checkpoint_dir"], "stages", "SeLLaRec-lab")
        aligned = torch.load(next(os.path.join(stage_dir, f) for f in os.listdir(stage_dir)
                                  if f.startswith("collab_align")), weights_only=False)
        return model, initial, aligned

    model, initial, aligned = after_stages()
    w1, w2 = aligned["collab_proj.0.weight"], aligned["collab_proj.2.weight"]
    assert not torch.allclose(w1, initial["0.weight"])  # stage 2 trained the projector (InfoNCE)
    assert torch.equal(model.collab_proj[0].weight, w1)  # ... and stage 3 starts from it
    scale = (model.collab_proj[2].weight / w2).flatten()  # the last layer only rescaled to the token spread
    assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-4)

    random_model, _, aligned_again = after_stages(warm_start_projector=False)  # SeLLa-Proj
    assert torch.equal(aligned_again["collab_proj.0.weight"], w1)  # the cached stage 2 is reused
    assert not torch.allclose(random_model.collab_proj[0].weight, w1)


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_each_variant_trains_what_table1_says(variant, labeled_data, tmp_path):
    _, model, _, _, _ = _build(labeled_data, tmp_path, **ABLATIONS[variant])
    stages = [s.name for s in model.stages()]
    final = model.final_stage()
    expected = {
        "MF": ([], ["user_embedding", "item_embedding"]),
        "TALLRec": ([], ["llm"]),
        "SeLLa-w/o": (["tallrec", "collab_align", "projector_init"], ["user_embedding", "item_embedding",
                                                                      "collab_proj"]),
        "SeLLa-Warm": (["tallrec", "distill", "collab_align", "projector_init"],
                       ["user_embedding", "item_embedding", "collab_proj"]),
        "SeLLa-UI": (["tallrec", "distill", "collab_align", "projector_init"], ["semantic_embedding", "warm_proj"]),
        "SeLLa-W-UI": (["tallrec", "distill", "collab_align", "projector_init", "stage3_W-UI"],
                       ["user_embedding", "item_embedding", "collab_proj"]),
        "SeLLa-UI-W": (["tallrec", "distill", "collab_align", "projector_init", "stage3_UI-W"],
                       ["semantic_embedding", "warm_proj"]),
    }
    full = (["tallrec", "distill", "collab_align", "projector_init"],
            ["user_embedding", "item_embedding", "collab_proj", "semantic_embedding", "warm_proj"])
    assert (stages, final.modules) == expected.get(variant, full)
    if variant == "SeLLa-w/o":  # CoLLM: MF without the alignment term
        assert next(s for s in model.stages() if s.name == "collab_align").modules == ["user_embedding",
                                                                                       "item_embedding"]
    assert (model.llm is None) == (variant == "MF")


def test_month_windows_split_the_last_months(tmp_path):
    root, _ = write_labeled_dataset(str(tmp_path / "data"), name="months")
    _write_item_text(os.path.join(root, "months"), "months", n_items=30, n_clusters=2)
    inter = os.path.join(root, "months", "months.inter")
    lines = open(inter).read().splitlines()
    with open(inter, "w") as f:  # one interaction every two days: about 25 months
        f.write(lines[0] + "\n")
        for line in lines[1:]:
            *rest, t = line.split("\t")
            f.write("\t".join(rest + [str(int(t) * 2 * DAY)]) + "\n")
    config = Config("SeLLaRec", "months", config_dict=_config(root, tmp_path, dataset="months",
                                                              split_months=[10, 5, 5]))
    train, valid, test = create_dataset(config).build()
    times = [d.raw_times() for d in (train, valid, test)]
    month = 30.44 * DAY
    last = times[2].max()
    assert times[0].max() < times[1].min() and times[1].max() < times[2].min()
    assert last - times[2].min() < 5 * month <= last - times[1].max()
    assert last - times[0].min() < 20 * month  # older rows dropped
    assert len(train) + len(valid) + len(test) < len(lines) - 1


def test_a_dataset_without_labels_fails_in_one_line(labeled_data, tmp_path):
    with pytest.raises(ConfigError, match="threshold: lab.inter has no field 'rating'") as error:
        run_recbole_llm("SeLLaRec", "lab", config_dict=_config(labeled_data, tmp_path,
                                                              load_col={"inter": ["user_id", "item_id"]}))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="threshold: SeLLaRec needs 0/1 labels") as error:
        run_recbole_llm("SeLLaRec", "lab", config_dict=_config(labeled_data, tmp_path, threshold=None))
    assert "\n" not in str(error.value)

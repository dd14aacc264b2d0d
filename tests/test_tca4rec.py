"""TCA4Rec on tiny-random (fp32): the collaborative tokenizer's labels, the soft-label loss, constrained inference."""
import random

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.llm import ItemTrie
from recbole_llm.llm.alignment import IGNORE, SoftLabelLoss, soft_labels_loop
from recbole_llm.model.sequential_recommender.tca4rec import TCA4Rec, unique_titles
from recbole_llm.trainer import LLMTrainer
from recbole_llm.utils import create_dataset, data_preparation
from tests.conftest import tiny_config

END = 2  # an end marker for the hand-made tries
SEQUENTIAL = {"load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "llm_dtype": "fp32",
              "cf_config": {"epochs": 2}}


def build(data, **overrides):
    config = Config("TCA4Rec", "tinyseq", config_dict=tiny_config(data, **dict(SEQUENTIAL, **overrides)))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, TCA4Rec(config, train._dataset), train, valid, test


@pytest.fixture(scope="module")
def base(tiny_seq_data):
    """The base recommender (alpha 0: no backbone)."""
    return build(tiny_seq_data, alpha=0)


def random_trie(seed=0, n=80):
    """Items as random token sequences with shared prefixes; some are a prefix of another."""
    rng, sequences = random.Random(seed), {}
    while len(sequences) < n:
        seq = [rng.randrange(100, 110) for _ in range(rng.randint(1, 4))]
        if seq not in sequences.values():
            sequences[len(sequences) + 1] = seq
    return ItemTrie(sequences, END)


def targets_of(trie, items):
    """(B, L) token sequences of ``items`` (end marker included), padded with -100."""
    seqs = [trie.tokens(i) for i in items]
    targets = torch.full((len(seqs), max(map(len, seqs))), IGNORE)
    for row, seq in enumerate(seqs):
        targets[row, :len(seq)] = torch.tensor(seq)
    return targets


def test_cf_labels_sum_to_one_over_tokens_that_continue_an_item():
    trie = random_trie()
    targets = targets_of(trie, list(range(1, 81)))
    scores = torch.randn(len(targets), 81) * 3
    labels = trie.soft_labels(targets, scores, 120)[:, :-1]
    allowed = trie.next_token_mask(targets, 120, every_position=True)[:, :-1]
    keep = targets != IGNORE
    assert torch.allclose(labels.sum(-1)[keep], torch.ones(int(keep.sum())), atol=1e-6)
    assert (labels[~allowed] == 0).all()
    assert (labels[keep].gather(-1, targets[keep].unsqueeze(-1)) > 0).all()  # the truth always has mass


def test_vectorised_and_loop_builds_agree():
    trie = random_trie(seed=1)
    targets = targets_of(trie, [random.Random(2).randrange(1, 81) for _ in range(32)])
    scores = torch.randn(len(targets), 81) * 2
    fast = trie.soft_labels(targets, scores, 120)
    assert torch.allclose(fast, soft_labels_loop(trie, targets, scores, 120), atol=1e-6)


@pytest.mark.parametrize("kind", ["mixture", "soft_ce"])
def test_alpha_zero_is_next_token_prediction(kind):
    torch.manual_seed(0)
    trie = random_trie()
    targets = targets_of(trie, [3, 17, 42, 80, 5])
    logits = torch.randn(*targets.shape, 120) * 4
    scores = torch.randn(5, 81)
    ntp = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert SoftLabelLoss(trie, 0.0, kind)(logits, targets, scores).item() == pytest.approx(ntp.item(), abs=1e-6)
    # the full soft-label path tends to it as well (alpha -> 0, to fp32 rounding), and differs from it at alpha > 0
    tiny = SoftLabelLoss(trie, 1e-9, kind)(logits, targets, scores)
    assert tiny.item() == pytest.approx(ntp.item(), rel=1e-5)
    assert abs(SoftLabelLoss(trie, 0.3, kind)(logits, targets, scores).item() - ntp.item()) > 1e-3


def test_masked_softmax_and_temperature():
    """MSL: the softmax runs over the trie's children only; temperature divides the logits first."""
    trie = random_trie()
    targets = targets_of(trie, [3, 17, 42])
    logits = torch.randn(*targets.shape, 120) * 4
    allowed = trie.next_token_mask(targets, 120, every_position=True)[:, :-1]
    expected = F.cross_entropy((logits / 2).masked_fill(~allowed, -torch.inf).flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE)
    got = SoftLabelLoss(trie, 0.0, temperature=2.0, masked=True)(logits, targets)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.isfinite(SoftLabelLoss(trie, 0.3, "soft_ce", masked=True)(logits, targets, torch.randn(3, 81)))


def test_soft_labels_follow_the_cf_preference():
    """Items 1 = (100, 101), 2 = (100, 102), 3 = (103,): the CF model prefers item 2, then 3, then 1."""
    trie = ItemTrie({1: [100, 101], 2: [100, 102], 3: [103]}, END)
    scores = torch.tensor([[0.0, 0.0, 3.0, 1.0]])  # column 0: padding item
    labels = trie.soft_labels(torch.tensor([[100, 101, END]]), scores, 110)[0]  # truth: item 1
    p = torch.softmax(scores[0, 1:], 0)
    assert labels[0, 100] == pytest.approx(float(p[0] + p[1])) and labels[0, 103] == pytest.approx(float(p[2]))
    assert labels[1, 102] > labels[1, 101] > 0  # under the prefix (100,), item 2 beats the truth
    assert labels[2, END] == 1  # after the title only its end follows
    loss = SoftLabelLoss(trie, 0.5)
    targets = torch.tensor([[100, 101, END]])
    toward_cf, toward_truth = torch.zeros(1, 3, 110), torch.zeros(1, 3, 110)
    toward_cf[0, 1, 102], toward_truth[0, 1, 101] = 5.0, 5.0
    assert loss(toward_cf, targets, scores) < SoftLabelLoss(trie, 0.0)(toward_cf, targets, scores)


def test_unique_titles():
    assert unique_titles(["A", "B", "A", "", "A (2)"], ["1", "2", "3", "4", "5"]) == \
        ["A", "B", "A (2)", "item 4", "A (2) (2)"]


def test_model_loss_at_alpha_zero_is_the_llms_own_loss(base):
    config, model, train, _, _ = base
    batch = next(iter(train))
    prompts = model.prompts(batch)
    answers = [model.trie.tokens(i) for i in batch[model.POS_ITEM_ID].tolist()]
    ours = model.calculate_loss(batch)
    # HF's causal-LM loss over the answer tokens, one row at a time (no padding at all)
    total, count = 0.0, 0
    for p, a in zip(prompts, answers):
        ids = torch.tensor([p + a])
        labels = ids.clone()
        labels[0, :len(p)] = IGNORE
        total += model.llm(input_ids=ids, labels=labels).loss.item() * len(a)
        count += len(a)
    assert ours.item() == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("identifier", ["base", "semantic"])  # titles, AlignTokenRec's code tokens
def test_constrained_beam_search_emits_only_real_items(request, identifier):
    config, model, _, _, test = request.getfixturevalue(identifier)
    model.eval()
    batch = next(iter(test))[0]
    items, dense = model._score(batch, None)
    assert dense is None and items.shape == (len(batch), model.num_beams)
    assert ((items >= 1) & (items < model.n_items)).all()
    assert all(len(set(row)) == len(row) for row in items.tolist())
    scores = model.full_sort_predict(batch).view(len(batch), -1)
    assert torch.equal(scores.topk(model.num_beams).indices, items)


def test_training_rows_per_user_and_options(tiny_seq_data):
    config, model, train, _, _ = build(tiny_seq_data, alpha=0, train_rows_per_user=2, train_batch_size=7,
                                       train_format="rows")
    batches = model.train_batches(train, 0)
    users = torch.cat([b[model.USER_ID] for b in batches])
    assert sorted(users.tolist()) == sorted(2 * list(range(1, 41)))
    lengths = torch.cat([b[model.ITEM_SEQ_LEN] for b in batches])
    assert set(lengths.tolist()) == {6, 7}  # each user's last two training targets (10 items: histories 1..7)
    assert model.final_stage().batches == model.train_batches
    _, packed, _, _, _ = build(tiny_seq_data, alpha=0)
    assert packed.final_stage().batches == packed.packed_batches  # the default format
    _, every_row, _, _, _ = build(tiny_seq_data, alpha=0, train_rows_per_user=None, train_format="rows")
    assert every_row.final_stage().batches is None  # rows, ~: RecBole's own loop over every training row
    with pytest.raises(ConfigError, match="train_format: unknown 'stream'"):
        build(tiny_seq_data, train_format="stream")
    with pytest.raises(ConfigError, match="chunk_items: must be a positive integer"):
        build(tiny_seq_data, chunk_items=0)
    with pytest.raises(ConfigError, match="length_penalty: must be a number >= 0, got -1"):
        build(tiny_seq_data, length_penalty=-1)
    with pytest.raises(ConfigError, match="prompt: the history items follow the prompt"):
        build(tiny_seq_data, prompt="History: {history}. Next?")
    with pytest.raises(ConfigError, match="item_identifier: unknown 'isbn'"):
        build(tiny_seq_data, item_identifier="isbn")
    with pytest.raises(ConfigError, match="num_beams"):
        build(tiny_seq_data, num_beams=5)
    with pytest.raises(ConfigError, match="history_len: 12 items per prompt, but RecBole keeps MAX_ITEM_LIST_LENGTH=10"):
        build(tiny_seq_data, history_len=12, MAX_ITEM_LIST_LENGTH=10)


def test_tca4rec_trains_with_cf_labels_end_to_end(tiny_seq_data):
    """alpha > 0 over SASRec: the backbone's logits enter the loss (it differs from alpha 0 on the same batch)."""
    config, model, train, valid, _ = build(tiny_seq_data, alpha=0.3, cf_backbone="SASRec")
    trainer = LLMTrainer(config, model)
    trainer.run_stages(train, valid)
    batch = next(iter(train))
    with_cf = model.calculate_loss(batch).item()
    model.alignment.alpha = 0.0
    assert abs(with_cf - model.calculate_loss(batch).item()) > 1e-4
    assert isinstance(batch, Interaction)


# ----- item_identifier: semantic_id (AlignTokenRec's codes, model/semantic_ids.py) -----------------------------
SEMANTIC = {"item_identifier": "semantic_id", "codebook_levels": 3, "codebook_size": 8, "codebook_epochs": 2,
            "kmeans_iters": 5, "code_token_init": "mlp2", "train_rows_per_user": 1, "epochs": 1}


@pytest.fixture(scope="module")
def semantic(tiny_seq_data):
    """TCA4Rec over SASRec with semantic IDs from DCCF's codebooks, its stages run (and cached)."""
    config, model, train, valid, test = build(tiny_seq_data, alpha=0.3, cf_backbone="SASRec", **SEMANTIC)
    LLMTrainer(config, model).run_stages(train, valid)
    return config, model, train, valid, test


def test_semantic_id_items_are_code_sequences(semantic):
    config, model, train, _, _ = semantic
    assert [s.name for s in model.stages()] == ["cf_pretrain", "codebook_cf_pretrain", "codebook_init",
                                                 "alignment_tokenization", "item_codes"]
    assert model.cf.name == "SASRec" and model.code_cf.name == "DCCF"
    codes = model.code_ids.flatten().tolist()
    sequences = [tuple(model.trie.tokens(i)) for i in range(1, model.n_items)]
    assert len(set(sequences)) == model.n_items - 1  # unique: every item is one code sequence
    assert all(len(s) == 4 and s[-1] == model.eos and set(s[:3]) <= set(codes) for s in sequences)
    assert model.alignment.trie is model.trie
    # the prompt shows the history's code tokens, tokenized back to the same ids
    batch = next(iter(train))
    seq, n = batch[model.ITEM_SEQ][0].tolist(), int(batch[model.ITEM_SEQ_LEN][0])
    prompt = model.prompts(batch[:1])[0]
    assert "item code the user will watch next" in model.tokenizer.decode(prompt) and "title" not in model.tokenizer.decode(prompt)
    for item in seq[:n][-model.history_len:]:
        ids = model.item_token_ids(item)
        assert any(prompt[k:k + len(ids)] == ids for k in range(len(prompt)))
    # P_cf over the code trie: a distribution over the codes that continue a real item under the true prefix
    answers = [model.trie.tokens(i) for i in batch[model.POS_ITEM_ID].tolist()]
    targets = torch.tensor(answers)
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    labels = model.trie.soft_labels(targets, model.cf.logits(batch), vocab)[:, :-1]
    allowed = model.trie.next_token_mask(targets, vocab, every_position=True)[:, :-1]
    assert torch.allclose(labels.sum(-1), torch.ones(targets.shape), atol=1e-5) and (labels[~allowed] == 0).all()


def test_semantic_id_trains_one_step_and_evaluates(semantic):
    config, model, train, valid, test = semantic
    batch = next(iter(train))
    params = model.set_trainable(["llm"])
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.alignment.alpha = 0.0
    assert abs(model.calculate_loss(batch).item() - loss.item()) > 1e-4  # the CF labels enter the loss
    model.alignment.alpha = 0.3
    model.zero_grad(set_to_none=True)
    trainer = LLMTrainer(config, model)  # the stages are reused from the cache
    trainer.fit(train, valid, saved=False)
    result = trainer.evaluate(test, load_best_model=False)
    assert set(result) >= {"hit@1", "hit@10", "ndcg@10"} and 0 <= result["hit@10"] <= 1


# ----- exclude_seen_items: the beams leave the user's seen items out (issue #23) ---------------------------------
def _seen(model, train, batch):
    """(B, n_items) bool: each row's history and its user's training items (what RecBole masks for a general
    model), built here from the training split's plain interactions."""
    from recbole_llm.model.backbone import training_interactions

    plain = training_interactions(train._dataset).inter_feat
    seen = torch.zeros(len(batch), model.n_items, dtype=torch.bool)
    users = batch[model.USER_ID].tolist()
    for u, i in zip(plain[model.USER_ID].tolist(), plain[model.ITEM_ID].tolist()):
        for row in [r for r, v in enumerate(users) if v == u]:
            seen[row, i] = True
    for row, (seq, n) in enumerate(zip(batch[model.ITEM_SEQ].tolist(), batch[model.ITEM_SEQ_LEN].tolist())):
        seen[row, seq[:n]] = True
    return seen


def test_exclude_seen_items_leaves_the_users_history_out_of_the_top_k(tiny_seq_data, base):
    _, default, _, _, test = base
    config, model, train, _, _ = build(tiny_seq_data, alpha=0, exclude_seen_items=True)
    default.eval()
    model.eval()
    batch = next(iter(test))[0]
    seen = _seen(model, train, batch)
    expected = seen.clone()
    expected[:, 0] = True  # the padding item
    assert torch.equal(model.ranking.exclude(batch, "cpu"), expected)
    k = max(config["topk"])
    scores = model.full_sort_predict(batch).view(len(batch), -1)
    assert not seen.gather(1, scores.topk(k).indices).any()
    assert torch.isneginf(scores[seen]).all()
    items, _ = model._score(batch, model.ranking.exclude(batch, model.device))
    assert ((items >= 1) & (items < model.n_items)).all() and not seen.gather(1, items).any()
    # without the option (the default): nothing is left out, and the same LLM ranks seen items
    assert not default.ranking.exclude_seen and not default.ranking.exclude(batch, "cpu")[:, 1:].any()
    assert seen.gather(1, default.full_sort_predict(batch).view(len(batch), -1).topk(k).indices).any()
    with pytest.raises(ConfigError, match="exclude_seen_items"):
        build(tiny_seq_data, alpha=0, exclude_seen_items="yes")


def test_soft_labels_give_masked_items_no_mass():
    """cf_mask_history's -inf logits: a masked item takes no mass; a prefix whose items are all masked (a target
    in its own history) spreads its mass evenly rather than giving NaN."""
    trie = ItemTrie({1: [100, 101], 2: [100, 102], 3: [103]}, END)
    targets = torch.tensor([[100, 101, END]])
    labels = trie.soft_labels(targets, torch.tensor([[0.0, 1.0, -torch.inf, 2.0]]), 110)[0]
    assert labels[1, 102] == 0 and labels[1, 101] == 1
    labels = trie.soft_labels(targets, torch.tensor([[0.0, -torch.inf, -torch.inf, 2.0]]), 110)[0]
    assert torch.isfinite(labels).all() and labels[0, 100] == 0 and labels[0, 103] == 1
    assert labels[1, 101] == labels[1, 102] == 0.5 and labels[2, END] == 1


def test_cf_mask_history_reaches_the_teacher(tiny_seq_data):
    _, model, _, _, _ = build(tiny_seq_data, alpha=0.3, cf_backbone="MF", cf_mask_history=True)
    assert model.cf.mask_history and model.cf.on_plain_data  # MF on sequential data: RecBole's general scoring
    _, default, _, _, _ = build(tiny_seq_data, alpha=0.3, cf_backbone="MF")
    assert not default.cf.mask_history  # the reference's raw logits
    with pytest.raises(ConfigError, match="cf_mask_history"):
        build(tiny_seq_data, alpha=0.3, cf_mask_history="no")

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

END = 2  # SmolLM2's EOS: the trie's end marker
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
    config, model, train, _, _ = build(tiny_seq_data, alpha=0, train_rows_per_user=2, train_batch_size=7)
    batches = model.train_batches(train, 0)
    users = torch.cat([b[model.USER_ID] for b in batches])
    assert sorted(users.tolist()) == sorted(2 * list(range(1, 41)))
    lengths = torch.cat([b[model.ITEM_SEQ_LEN] for b in batches])
    assert set(lengths.tolist()) == {6, 7}  # each user's last two training targets (10 items: histories 1..7)
    assert model.final_stage().batches is not None
    _, every_row, _, _, _ = build(tiny_seq_data, alpha=0, train_rows_per_user=None)
    assert every_row.final_stage().batches is None  # ~: RecBole's own loop over every training row
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
    assert "item code only" in model.tokenizer.decode(prompt) and "title" not in model.tokenizer.decode(prompt)
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

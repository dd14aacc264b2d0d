"""Packed sequential training (``recbole_llm/trainer/packed.py``) through TCA4Rec on tiny-random, fp32.

The packed format must train on exactly RecBole's training targets, see nothing of the validation or test
items, and give each target the row format's logits where the two are the same computation: always without the
window (causal over the chunk, against rows with the chunk's history), and with the window for every target whose
window starts at the chunk's first item (against TCA4Rec's own row prompts).
"""
import pytest
import torch

from recbole_llm.llm.alignment import IGNORE
from recbole_llm.llm.scoring import answer_logits
from recbole_llm.trainer.packed import collate_packed, pack, packed_answer_logits, user_chunks
from tests.test_tca4rec import build as build_tca4rec

PACKED = {"history_len": 3, "chunk_items": 4, "alpha": 0}


def build(data, **overrides):
    return build_tca4rec(data, **dict(PACKED, **overrides))


@pytest.fixture(scope="module")
def packed_model(tiny_seq_data):
    return build(tiny_seq_data)


def _chunks(model, feat, rows_per_user=None):
    return user_chunks(feat, model.USER_ID, model.POS_ITEM_ID, model.ITEM_SEQ, model.ITEM_SEQ_LEN,
                       model.config["chunk_items"], model.history_len, rows_per_user)


def test_chunks_hold_every_training_target_once_and_no_held_out_item(packed_model):
    config, model, train, valid, test = packed_model
    feat = train._dataset.inter_feat
    chunks = _chunks(model, feat)
    rows = [r for c in chunks for r in c.rows]
    assert sorted(rows) == list(range(len(feat)))  # each RecBole training row is one target, once
    for c in chunks:
        assert len(c.rows) <= model.config["chunk_items"] and c.first <= model.history_len
        assert c.items[c.first:] == feat[model.POS_ITEM_ID][c.rows].tolist()  # a target is its row's item
        assert set(feat[model.USER_ID][c.rows].tolist()) == {c.user}
    held_out = {}
    for data in (valid, test):
        f = data._dataset.inter_feat
        for u, i in zip(f[model.USER_ID].tolist(), f[model.POS_ITEM_ID].tolist()):
            held_out.setdefault(u, set()).add(i)
    trained = {}
    for u, i in zip(feat[model.USER_ID].tolist(), feat[model.POS_ITEM_ID].tolist()):
        trained.setdefault(u, set()).add(i)
    for c in chunks:  # every item a chunk shows is a training interaction of its user, before a held-out one
        firsts = {int(feat[model.ITEM_SEQ][r][0]) for r in c.rows}
        assert set(c.items) <= trained[c.user] | firsts
        assert not set(c.items) & (held_out[c.user] - trained[c.user])
    last = _chunks(model, feat, rows_per_user=2)
    assert sorted(len(c.rows) for c in last) == [2] * len({c.user for c in chunks})


def _row_logits(model, prompts, answers):
    return answer_logits(model.llm, prompts, answers, model.tokenizer.pad_token_id, "cpu")


@torch.no_grad()
def test_without_the_window_each_target_has_the_row_formats_logits(packed_model):
    """Causal over the chunk: target k's logits equal the row format's with history x_s .. x_{k-1}."""
    config, model, train, _, _ = packed_model
    model.eval()
    chunks = _chunks(model, train._dataset.inter_feat)[:6]
    batch = collate_packed([pack(c, model.prompt_ids, model.trie.tokens, model.history_len, False) for c in chunks],
                           model.tokenizer.pad_token_id)
    packed = packed_answer_logits(model.llm, batch)
    prompts, answers = [], []
    for c in chunks:
        for k in range(c.first, len(c.items)):
            prompts.append(model.prompt_ids + [t for i in c.items[:k] for t in model.trie.tokens(i)])
            answers.append(model.trie.tokens(c.items[k]))
    rows = _row_logits(model, prompts, answers)
    assert len(answers) == len(batch) > len(chunks)
    for i, answer in enumerate(answers):
        assert batch.targets[i, :len(answer)].tolist() == answer and (batch.targets[i, len(answer):] == IGNORE).all()
        torch.testing.assert_close(packed[i, :len(answer)], rows[i, :len(answer)], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_with_the_window_targets_read_their_last_items_like_the_rows(packed_model):
    """The window mask: a target's tokens read the instruction, its last ``history_len`` items and themselves.
    Where the window starts at the chunk's first item, its logits are the row format's (TCA4Rec's own prompts of
    RecBole's rows); further on, the shared history states saw their own windows (they differ)."""
    config, model, train, _, _ = packed_model
    model.eval()
    feat = train._dataset.inter_feat
    chunks = _chunks(model, feat)[:12]
    laid = [pack(c, model.prompt_ids, model.trie.tokens, model.history_len, True) for c in chunks]
    # the mask, read directly: the keys of every target token
    head, L = len(model.prompt_ids), model.history_len
    for c, p in zip(chunks, laid):
        starts = [head + sum(len(model.trie.tokens(i)) for i in c.items[:j]) for j in range(len(c.items))]
        for k, (start, length) in zip(range(c.first, len(c.items)), p.spans):
            for t in range(length):
                query = start - 1 + t
                allowed = set(range(head)) | set(range(starts[max(0, k - L)], query + 1))
                assert set(torch.nonzero(p.mask[query]).flatten().tolist()) == allowed
    batch = collate_packed(laid, model.tokenizer.pad_token_id)
    packed = packed_answer_logits(model.llm, batch)
    rows = feat[batch.rows]
    answers = [model.trie.tokens(i) for i in rows[model.POS_ITEM_ID].tolist()]
    reference = _row_logits(model, model.prompts(rows), answers)
    exact, approximate, i = 0, 0, 0
    for c in chunks:
        for k in range(c.first, len(c.items)):
            n = len(answers[i])
            if k - L <= 0:  # the window starts at the chunk's first item
                torch.testing.assert_close(packed[i, :n], reference[i, :n], atol=1e-4, rtol=1e-4)
                exact += 1
            else:
                approximate += 1
            i += 1
    assert exact >= 3 and approximate >= 3


def test_packed_loss_trains_and_the_teacher_reads_each_targets_row(tiny_seq_data):
    """alpha > 0 over SASRec: the packed batch's teacher input is each target's RecBole row, the loss is finite,
    has gradients on LoRA, and the CF labels enter it."""
    from recbole_llm.trainer import LLMTrainer

    config, model, train, valid, _ = build(tiny_seq_data, alpha=0.3, cf_backbone="SASRec")
    LLMTrainer(config, model).run_stages(train, valid)
    (batch, *_) = model.packed_batches(train, 0)
    rows = train._dataset.inter_feat[batch.rows]
    targets = [model.trie.tokens(i) for i in rows[model.POS_ITEM_ID].tolist()]
    assert [t[t != IGNORE].tolist() for t in batch.targets] == targets
    params = model.set_trainable(["llm"])
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.alignment.alpha = 0.0
    assert abs(model.calculate_loss(batch).item() - loss.item()) > 1e-4
    assert sum(len(b) for b in model.packed_batches(train, 1)) == len(train._dataset.inter_feat)

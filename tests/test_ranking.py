"""Shared ranking: top-k -> RecBole scores, the top-K cache (keys, batching, clearing, memory), bug B1 in GLTA."""
import types

import numpy as np
import pytest
import torch
from recbole.utils import ModelType

from recbole_llm.config import Config
from recbole_llm.model.general_recommender.glta import GLTA
from recbole_llm.model.ranking import (PLACED_SCORE, Ranking, TopK, TopKCache, full_ranking_scores, pair_scores,
                                       top_k)
from recbole_llm.utils import create_dataset, data_preparation
from tests.conftest import tiny_config


def test_placed_items_first_in_order_then_the_fallback_then_ties():
    placed = torch.tensor([[5, 2, 7]])
    dense = torch.tensor([[0.0, -1.0, -9.0, -0.5, -3.0, -8.0, -2.0, -7.0, -4.0, -6.0]])
    exclude = torch.zeros(1, 10, dtype=torch.bool)
    exclude[0, [0, 3]] = True
    top = top_k(placed, 6, dense, exclude)
    assert top.items.tolist() == [[5, 2, 7, 1, 6, 4]]  # 3 is excluded: the best fallback item left out
    scores = full_ranking_scores(top, 10)
    assert scores.argsort(descending=True)[0, :6].tolist() == [5, 2, 7, 1, 6, 4]
    assert (scores[0, [5, 2, 7]] >= PLACED_SCORE).all() and (scores[0, [1, 6, 4]] < PLACED_SCORE).all()
    rest = [3, 8, 9]
    assert torch.isfinite(scores[0, 1:]).all() and (scores[0, rest] == scores[0, rest[0]]).all()
    assert (scores[0, rest] < scores[0, 4]).all() and scores[0, 0] == -np.inf
    items = torch.arange(1, 10)
    assert torch.equal(pair_scores(TopK(top.items.expand(9, 6), top.scores.expand(9, 6)), items), scores[0, 1:])


def test_beam_output_without_fallback_pads_and_ranks_everything_else_below():
    top = top_k(torch.tensor([[4, 1]]), 5)
    assert top.items.tolist() == [[4, 1, 0, 0, 0]] and torch.isinf(top.scores[0, 2:]).all()
    scores = full_ranking_scores(top, 6)
    assert scores[0, 4] > scores[0, 1] > scores[0, 2] == scores[0, 3] == scores[0, 5]


# ----- the cache through Ranking, with a stub scorer -------------------------------------------------------
N_USERS, N_ITEMS, K = 30, 200, 12


def _ranking(sequential=False, batch=8):
    config = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
              "ITEM_LIST_LENGTH_FIELD": "item_length", "ranking_top_k": K, "topk": [10],
              "llm_eval_batch_size": batch, "single_spec": True,
              "MODEL_TYPE": ModelType.SEQUENTIAL if sequential else ModelType.GENERAL}
    users = torch.arange(1, N_USERS).repeat_interleave(3)
    dataset = types.SimpleNamespace(uid_field="user_id", iid_field="item_id", user_num=N_USERS, item_num=N_ITEMS,
                                    inter_feat={"user_id": users, "item_id": users * 3 % (N_ITEMS - 1) + 1})
    calls = []

    def score(batch, exclude):
        calls.append(batch["user_id"].tolist())
        dense = torch.randn(len(exclude), N_ITEMS, generator=torch.Generator().manual_seed(sum(calls[-1])))
        return dense.masked_fill(exclude, -np.inf).topk(3).indices, dense

    return Ranking(config, dataset, score), calls


def _seq(user, history):
    return {"user_id": torch.tensor([user]), "item_id_list": torch.tensor([history + [0] * (5 - len(history))]),
            "item_length": torch.tensor([len(history)])}


def test_general_cache_is_keyed_by_user_and_scores_missing_users_in_batches():
    ranking, calls = _ranking(batch=8)
    first = ranking.full_sort_predict(_seq(3, [1, 2]), "cpu")
    assert calls == [list(range(3, 11))]  # one user asked, a full batch scored: the users asked for next
    again = ranking.full_sort_predict(_seq(3, [7]), "cpu")  # a general model's key ignores the sequence
    assert len(calls) == 1 and torch.equal(first, again)
    for u in range(1, N_USERS):  # RecBole's full-sort loader may hand over one user per call
        ranking.full_sort_predict({"user_id": torch.tensor([u])}, "cpu")
    assert sorted(sum(calls, [])) == list(range(1, N_USERS)) and len(calls) <= 1 + -(-N_USERS // 8)
    assert len(ranking.cache) == N_USERS - 1


def test_sequential_cache_is_keyed_by_user_and_history():
    ranking, calls = _ranking(sequential=True)
    a = ranking.full_sort_predict(_seq(3, [1, 2]), "cpu")
    assert len(ranking.cache) == 1 and len(calls) == 1
    ranking.full_sort_predict(_seq(3, [1, 2, 4]), "cpu")  # the same user, another history (e.g. test vs valid)
    assert len(ranking.cache) == 2 and len(calls) == 2
    assert torch.equal(ranking.full_sort_predict(_seq(3, [1, 2]), "cpu"), a) and len(calls) == 2  # a hit
    ranking.full_sort_predict(_seq(4, [1, 2]), "cpu")  # another user, the same history
    assert len(ranking.cache) == 3
    ranking.clear()
    assert len(ranking.cache) == 0


def test_predict_follows_the_full_ranking_rule():
    ranking, _ = _ranking()
    users = torch.tensor([2, 2, 5, 9])
    full = ranking.full_sort_predict({"user_id": users}, "cpu").view(len(users), -1)
    items = torch.tensor([full[0].argmax(), 17, full[2].argmax(), 150])
    assert torch.equal(ranking.predict({"user_id": users, "item_id": items}, "item_id", "cpu"),
                       full[torch.arange(4), items])


def test_cache_memory_is_users_times_k_whatever_the_items():
    cache = TopKCache(K)
    for n in (1000, 4000):
        cache.clear()
        cache.put(list(range(n)), top_k(torch.randint(1, 50, (n, 3)), K, torch.randn(n, 50)))
        assert len(cache) == n and cache.nbytes == n * K * 8
    ranking, _ = _ranking()
    ranking.full_sort_predict({"user_id": torch.arange(1, N_USERS)}, "cpu")
    assert ranking.cache.nbytes <= 2 * (N_USERS - 1) * K * 8 < N_USERS * N_ITEMS * 4


def test_ranking_top_k_below_topk_is_a_config_error():
    from recbole_llm.errors import ConfigError

    config = {"USER_ID_FIELD": "user_id", "MODEL_TYPE": ModelType.GENERAL, "ranking_top_k": 5, "topk": [5, 10]}
    with pytest.raises(ConfigError, match="ranking_top_k"):
        Ranking(config, None, None)


# ----- GLTA on the shared ranking (tiny-random LLM) ----------------------------------------------------------
@pytest.fixture(scope="module")
def glta(tiny_data, tmp_path_factory):
    cfg = Config("GLTA", "tiny", config_dict=tiny_config(tiny_data, checkpoint_dir=str(tmp_path_factory.mktemp("s"))))
    dataset = create_dataset(cfg)
    train, valid, test = data_preparation(cfg, dataset)
    return GLTA(cfg, train._dataset), train, valid, test


def _placed_after_recbole_masks(model, eval_data):
    """What RecBole's Trainer._full_sort_batch_eval ranks: scores with the loader's history set to -inf."""
    model.set_eval_data(eval_data)
    placed = []
    for interaction, history_index, _, _ in eval_data:
        scores = model.full_sort_predict(interaction).view(len(interaction), -1).clone()
        scores[history_index] = -np.inf
        placed += [set(torch.nonzero(row >= PLACED_SCORE).flatten().tolist()) for row in scores]
    return placed


def test_b1_placed_items_at_test_are_never_validation_items(glta):
    model, train, valid, test = glta
    # An untrained head scores E_u . E_i: make each user's validation items its favourites.
    assert model.item_emb.shape[1] >= model.n_items
    with torch.no_grad():
        model.user_emb.zero_()
        model.item_emb.copy_(torch.eye(model.n_items, model.item_emb.shape[1]))
        for u in valid.uid_list.tolist():
            model.user_emb[u, valid.uid2positive_item[u]] = 1.0
    k, positives = model.k, valid.uid2positive_item
    at_valid = _placed_after_recbole_masks(model, valid)
    assert all(len(p) == k for p in at_valid)
    for p, u in zip(at_valid, valid.uid_list.tolist()):  # at validation they are placed (the test below means it)
        assert len(p & set(positives[u].tolist())) == min(k, len(positives[u]))
    at_test = _placed_after_recbole_masks(model, test)
    assert all(len(p) == k for p in at_test)  # before the fix ~1.6 of 10 were validation items, masked by RecBole
    for p, u in zip(at_test, test.uid_list.tolist()):
        assert not p & set(positives[u].tolist() if positives[u] is not None else [])


def test_glta_cache_is_cleared_when_weights_change(glta):
    model, train, valid, test = glta
    model.set_eval_data(valid)
    users = torch.tensor([1, 2, 3])
    model.full_sort_predict({model.USER_ID: users})
    assert len(model.ranking.cache) > 0
    model.calculate_loss(model.train_batches(train, 0)[0])  # RecBole's restore_* idiom
    assert len(model.ranking.cache) == 0
    model.full_sort_predict({model.USER_ID: users})
    model.load_state_dict(model.state_dict())
    assert len(model.ranking.cache) == 0
    model.full_sort_predict({model.USER_ID: users})
    model.set_eval_data(test)  # another masked history
    assert len(model.ranking.cache) == 0

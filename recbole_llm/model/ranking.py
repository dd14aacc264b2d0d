"""Shared ranking: a model's top-k items -> RecBole's full-ranking scores, through a top-K cache.

An LLM recommender ranks a short list per user (GLTA's output slots, a constrained beam search), not every
item. ``Ranking`` turns that list into the (B, n_items) scores RecBole's full-sort evaluation ranks and the
pair scores its ``predict`` returns, with one rule for every model:

  placed items (the model's list, in order)  PLACED_SCORE + (P - t) for the item at position t of P placed
  the next items by a dense fallback score   that score, e.g. GLTA's best log-softmax over the slots (must be
  (optional, per scoring batch only)         below PLACED_SCORE)
  every other item                           1 below the row's lowest kept score: finite, all tied

Only the top ``ranking_top_k`` items (ids + scores, at least max(topk) of them) are kept per key, never a dense
users x items table: scoring all users of a 50k x 17k dataset holds 50k x K x 8 bytes (``bench/ranking_memory.py``).

History masking per model type: placement skips exactly what RecBole's evaluation will mask, so no placed item
is lost to the mask.
  general     the items RecBole masks in this evaluation, ``FullSortEvalDataLoader.uid2history_item``: the
              training items at validation, training + validation items at test. Bug B1 came from masking only
              the training items at test (validation items took ~1.6 of 10 placed slots and RecBole then removed
              them). RecBole hands this history to the trainer, not to ``full_sort_predict``: the trainer calls
              ``model.set_eval_data(eval_data)`` before it evaluates (``Ranking.set_eval_data``); until then,
              and for a negative-sampling loader (whose candidates never include used items), the training items.
  sequential  only the padding item: RecBole masks no history in sequential full ranking (items may recur).
              With ``exclude_seen`` (a model's ``exclude_seen_items``), also the user's seen items: the row's
              history (``item_id_list`` up to ``item_length``) and the user's training items, i.e. what RecBole
              masks for a general model (training items at validation, + the validation item at test); the
              model's scorer gets them in ``exclude`` (beams leave them out, through the trie), and the scores
              RecBole ranks give them -inf, so no seen item is ever in a top-K.

Cache keys: the user (general); the user and a digest of the history (``item_id_list`` up to ``item_length``)
(sequential), so a user's validation and test rows, whose histories differ under leave-one-out, are two
entries. RecBole's ``restore_*`` idiom keeps it fresh: the model calls ``clear()`` in ``calculate_loss`` and
when it loads weights; ``set_eval_data`` clears it when the masked history changes. Only keys missing from the
cache are scored, ``llm_eval_batch_size`` at a time; a general model's batch is filled with the users the
evaluation asks for next (RecBole's full-sort loader may hand over one user per call).
"""
import hashlib
from typing import NamedTuple

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.interaction import Interaction
from recbole.utils import ModelType
from tqdm import tqdm

from recbole_llm.errors import ConfigError
from recbole_llm.model.backbone import training_interactions

PLACED_SCORE = 1000.0


class TopK(NamedTuple):
    """A ranked list per row: ``items`` (B, K) item ids, best first; ``scores`` (B, K), descending.
    Rows with fewer than K items are padded with item 0 (RecBole's padding item) and score -inf."""

    items: torch.Tensor
    scores: torch.Tensor


def top_k(placed, k, dense=None, exclude=None):
    """``placed`` (B, P) items in their order, then, if ``dense`` (B, n_items) is given, the best k - P other
    items by it, skipping ``exclude`` (B, n_items bool): a ``TopK`` of width max(k, P)."""
    rows, n_placed = placed.shape
    order = torch.arange(n_placed, 0, -1, device=placed.device, dtype=torch.float32)
    items, scores = [placed], [(PLACED_SCORE + order).expand(rows, n_placed)]
    if dense is not None and k > n_placed:
        rest = dense.float().masked_fill(exclude, -np.inf) if exclude is not None else dense.float().clone()
        rest.scatter_(1, placed, -np.inf)
        best, idx = rest.topk(min(k - n_placed, rest.shape[1]), dim=1)
        items.append(idx.masked_fill(best == -np.inf, 0))
        scores.append(best)
    items, scores = torch.cat(items, 1), torch.cat(scores, 1)
    if items.shape[1] < k:
        pad = k - items.shape[1]
        items = torch.cat([items, items.new_zeros(rows, pad)], 1)
        scores = torch.cat([scores, scores.new_full((rows, pad), -np.inf)], 1)
    return TopK(items, scores)


def _floor(scores):
    """1 below each row's lowest finite score (0 for a row without one): what every unkept item scores."""
    lowest = scores.masked_fill(~torch.isfinite(scores), np.inf).min(dim=1).values
    return torch.where(torch.isfinite(lowest), lowest - 1, torch.zeros_like(lowest))


def full_ranking_scores(top, n_items):
    """RecBole's full-ranking scores (B, n_items) of a ``TopK``: kept items their score, the rest the floor."""
    scores = _floor(top.scores).unsqueeze(1).repeat(1, n_items)
    scores.scatter_(1, top.items, top.scores)
    scores[:, 0] = -np.inf  # the padding item (also where short rows point)
    return scores


def pair_scores(top, items):
    """Scores (B,) of one item per row under the same rule as ``full_ranking_scores``."""
    hit = top.items == items.unsqueeze(1)
    kept = top.scores.masked_fill(~hit, -np.inf).max(dim=1).values
    return torch.where(hit.any(dim=1), kept, _floor(top.scores))


def training_history(dataset):
    """Each user's items in ``dataset`` (a training split), as RecBole's ``uid2history_item``: an object array
    of LongTensors indexed by user id."""
    users = dataset.inter_feat[dataset.uid_field].numpy()
    items = dataset.inter_feat[dataset.iid_field].numpy()
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(dataset.user_num + 1))
    history = np.empty(dataset.user_num, dtype=object)
    for u in range(dataset.user_num):
        history[u] = torch.from_numpy(np.unique(items[order[bounds[u]:bounds[u + 1]]]))
    return history


class TopKCache:
    """Top-K item ids (int32) and scores (float32) per key, in two (capacity, K) tensors grown by doubling:
    memory is about keys x K x 8 bytes, whatever the number of items."""

    def __init__(self, k):
        self.k = k
        self.clear()

    def clear(self):
        self._rows = {}
        self._items = torch.zeros(0, self.k, dtype=torch.int32)
        self._scores = torch.zeros(0, self.k)

    def __len__(self):
        return len(self._rows)

    def __contains__(self, key):
        return key in self._rows

    @property
    def nbytes(self):
        return self._items.nbytes + self._scores.nbytes

    def put(self, keys, top):
        """Store row i of ``top`` under ``keys[i]`` (a key already present is overwritten)."""
        rows = []
        for key in keys:
            if key not in self._rows:
                self._rows[key] = len(self._rows)
            rows.append(self._rows[key])
        if len(self._rows) > len(self._items):
            capacity = max(len(self._rows), 2 * len(self._items))
            grow = capacity - len(self._items)
            self._items = torch.cat([self._items, self._items.new_zeros(grow, self.k)])
            self._scores = torch.cat([self._scores, self._scores.new_full((grow, self.k), -np.inf)])
        rows = torch.tensor(rows, dtype=torch.long)
        self._items[rows] = top.items.to("cpu", torch.int32)
        self._scores[rows] = top.scores.to("cpu", torch.float32)

    def get(self, keys):
        """The ``TopK`` of ``keys`` (every key must be cached)."""
        rows = torch.tensor([self._rows[key] for key in keys], dtype=torch.long)
        return TopK(self._items[rows].long(), self._scores[rows])


class Ranking:
    """What a model's ``full_sort_predict`` and ``predict`` defer to.

    ``score_fn(batch, exclude) -> (placed, dense)``: for an ``Interaction`` of B users (general) or B rows with
    histories (sequential) and the items it must not place, ``exclude`` (B, n_items bool), the placed items
    (B, P) in order and an optional dense fallback score (B, n_items) or None. Called without gradients, only
    for keys missing from the cache.
    """

    def __init__(self, config, dataset, score_fn, exclude_seen=False):
        self.k = int(config["ranking_top_k"] or 100)
        topk = config["topk"]
        need = max(topk) if isinstance(topk, (list, tuple)) else topk or 0
        if self.k < need:
            raise ConfigError(f"ranking_top_k: {self.k} keeps fewer items than topk needs ({need})")
        self.score_fn = score_fn
        self.n_items = dataset.item_num
        self.n_users = dataset.user_num
        self.uid_field = config["USER_ID_FIELD"]
        self.sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        if self.sequential:
            self.seq_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
            self.seq_len_field = config["ITEM_LIST_LENGTH_FIELD"]
        self.batch_size = int(config["llm_eval_batch_size"])
        self.show_progress = "show_progress" in config and bool(config["show_progress"])
        self.rank, self.world = (0, 1) if config["single_spec"] else (config["local_rank"], config["world_size"])
        self.cache = TopKCache(self.k)
        self.exclude_seen = bool(exclude_seen) and self.sequential  # a general model's history is masked anyway
        if self.sequential:
            self.train_history = training_history(training_interactions(dataset)) if self.exclude_seen else None
        else:
            self.train_history = training_history(dataset)
        self.history, self.order = (None, None) if self.sequential else (self.train_history, None)

    # ----- what is masked, and when the cache is stale ---------------------------------------------------------
    def clear(self):
        self.cache.clear()

    def set_eval_data(self, eval_data):
        """Mask what ``eval_data`` masks (general models; see the module docstring); called before evaluating."""
        if self.sequential:
            return  # what is excluded depends on the row and the user only: the cache keys hold both
        history, order = self.train_history, None
        if isinstance(eval_data, FullSortEvalDataLoader):
            history, order = eval_data.uid2history_item, eval_data.uid_list
        if history is not self.history:
            self.cache.clear()
        self.history, self.order = history, order

    def exclude(self, batch, device):
        """(B, n_items) bool: the padding item, and for general models each user's masked history (with
        ``exclude_seen``, for sequential models each row's history and its user's training items)."""
        mask = torch.zeros(len(batch[self.uid_field]), self.n_items, dtype=torch.bool)
        if not self.sequential or self.exclude_seen:
            for row, u in enumerate(batch[self.uid_field].tolist()):
                items = self.history[u] if self.history is not None and self.history[u] is not None \
                    else self.train_history[u]
                mask[row, items] = True
        if self.exclude_seen:
            seq, lens = batch[self.seq_field].cpu(), batch[self.seq_len_field].cpu()
            seen = torch.arange(seq.shape[1]) < lens.view(-1, 1)
            mask.scatter_(1, seq.masked_fill(~seen, 0), True)
        mask[:, 0] = True
        return mask.to(device)

    def keys(self, interaction):
        """Cache keys: user ids (general); digests of (user, history sequence) (sequential)."""
        users = interaction[self.uid_field].tolist()
        if not self.sequential:
            return users
        seqs, lens = interaction[self.seq_field].cpu(), interaction[self.seq_len_field].cpu().tolist()
        return [hashlib.blake2b(np.asarray([u] + seq[:n].tolist(), dtype=np.int64).tobytes(), digest_size=8).digest()
                for u, seq, n in zip(users, seqs, lens)]

    # ----- scoring -------------------------------------------------------------------------------------------
    def _upcoming(self, users, budget):
        """Up to ``budget`` uncached users the evaluation asks for after ``users`` (general models)."""
        order = self.order if self.order is not None else torch.arange(1, self.n_users)
        order = order[self.rank::self.world]  # RecBole's DistributedSampler shares users out this way
        start = int(torch.searchsorted(order, max(users), right=True))
        taken, upcoming = set(users), []
        while len(upcoming) < budget and start < len(order):
            window = order[start:start + 2 * budget].tolist()
            upcoming += [u for u in window if u not in self.cache and u not in taken][:budget - len(upcoming)]
            start += len(window)
        return upcoming

    @torch.no_grad()
    def _fill(self, interaction, keys, device):
        first = {}
        for row, key in enumerate(keys):
            if key not in self.cache and key not in first:
                first[key] = row
        if not first:
            return
        rows = list(first.values())
        if self.sequential:
            pending, missing = [interaction[torch.tensor(rows[i:i + self.batch_size])]
                                for i in range(0, len(rows), self.batch_size)], []
        else:
            missing = list(first)
            missing += self._upcoming(missing, -len(missing) % self.batch_size)
            pending = [Interaction({self.uid_field: torch.tensor(missing[i:i + self.batch_size])})
                       for i in range(0, len(missing), self.batch_size)]
        # RecBole's evaluation bar counts its batches (eval_batch_size users): one bar step can be every user
        bar = tqdm(pending, desc="Rank (LLM)", ncols=100, leave=False,
                   disable=not self.show_progress or len(pending) < 2)
        for batch in bar:
            batch = batch.to(device)
            exclude = self.exclude(batch, device)
            placed, dense = self.score_fn(batch, exclude)
            self.cache.put(self.keys(batch), top_k(placed, self.k, dense, exclude))

    def top(self, interaction, device):
        """The ``TopK`` of each row of ``interaction``, scoring only keys missing from the cache."""
        if not isinstance(interaction, Interaction):
            interaction = Interaction(dict(interaction))
        keys = self.keys(interaction)
        self._fill(interaction, keys, device)
        top = self.cache.get(keys)
        return TopK(top.items.to(device), top.scores.to(device))

    def full_sort_predict(self, interaction, device):
        """RecBole's ``full_sort_predict``: (B * n_items,) scores (with ``exclude_seen``, -inf on seen items)."""
        scores = full_ranking_scores(self.top(interaction, device), self.n_items)
        if self.exclude_seen:
            scores = scores.masked_fill(self.exclude(self._interaction(interaction), device), -np.inf)
        return scores.reshape(-1)

    def predict(self, interaction, item_field, device):
        """RecBole's ``predict``: (B,) scores of the (row, item) pairs, the same rule as full ranking."""
        items = interaction[item_field].to(device)
        scores = pair_scores(self.top(interaction, device), items)
        if self.exclude_seen:
            seen = self.exclude(self._interaction(interaction), device).gather(1, items.view(-1, 1)).squeeze(1)
            scores = scores.masked_fill(seen, -np.inf)
        return scores

    @staticmethod
    def _interaction(interaction):
        return interaction if isinstance(interaction, Interaction) else Interaction(dict(interaction))


class TopKRanked:
    """Mix-in for RecBole models that rank from top-K lists through ``self.ranking`` (a ``Ranking``, built in
    ``__init__``): RecBole's ``predict`` / ``full_sort_predict`` come from it, each evaluation tells it what
    RecBole will mask (``set_eval_data``), and loading weights clears its cache. List it before
    ``LLMRecommender``."""

    def set_eval_data(self, eval_data):
        self.ranking.set_eval_data(eval_data)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.ranking.clear()  # new weights: cached rankings are stale
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def predict(self, interaction):
        return self.ranking.predict(interaction, self.ITEM_ID, self.device)

    def full_sort_predict(self, interaction):
        return self.ranking.full_sort_predict(interaction, self.device)

"""Memory of scoring every user through the shared ranking path (``recbole_llm.model.ranking.Ranking``).

A synthetic general dataset (default 50k users x 17k items, ~20 training items per user) and a stub scorer in
place of the LLM: per batch of ``llm_eval_batch_size`` users it returns k placed items and dense (B, n_items)
fallback logits, as GLTA's slots do. Every user is then scored the way RecBole's full-sort evaluation asks for
it (``eval_batch_size // n_items`` users per ``full_sort_predict`` call: one user at 17k items), so the path
covers the prefetching batches, the top-K cache and the (B, n_items) score rows handed back.

Printed: the cache's own bytes, the RSS growth while scoring (sampled every 5 ms), the process's peak RSS, and
the dense users x items float32 table the old GLTA cache held (computed, never allocated).

    python bench/ranking_memory.py [--users 50000 --items 17000 --per-user 20 --top-k 100]
"""
import argparse
import os
import resource
import threading
import time
import types

import numpy as np
import torch
from recbole.utils import ModelType

from recbole_llm.model.ranking import Ranking

GB = 1024 ** 3


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def stop(self):
        self.running = False
        self.join()
        return max(self.peak, rss())


def synthetic_dataset(n_users, n_items, per_user, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(per_user, n_users - 1) + 1
    users = np.repeat(np.arange(1, n_users), counts)
    items = rng.integers(1, n_items, len(users))
    return types.SimpleNamespace(uid_field="user_id", iid_field="item_id", user_num=n_users, item_num=n_items,
                                 inter_feat={"user_id": torch.from_numpy(users), "item_id": torch.from_numpy(items)})


def stub_scorer(n_items, k):
    generator = torch.Generator().manual_seed(0)

    def score(batch, exclude):
        dense = torch.randn(len(exclude), n_items, generator=generator)
        return dense.masked_fill(exclude, -np.inf).topk(k).indices, dense.log_softmax(-1)

    return score


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=50000)
    parser.add_argument("--items", type=int, default=17000)
    parser.add_argument("--per-user", type=int, default=20, help="mean training items per user")
    parser.add_argument("--k", type=int, default=10, help="items the stub scorer places (GLTA's gllm_k)")
    parser.add_argument("--top-k", type=int, default=100, help="ranking_top_k: items kept per user")
    parser.add_argument("--score-batch", type=int, default=32, help="llm_eval_batch_size")
    parser.add_argument("--eval-batch", type=int, default=4096, help="RecBole's eval_batch_size")
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = synthetic_dataset(args.users, args.items, args.per_user)
    config = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "MODEL_TYPE": ModelType.GENERAL,
              "ranking_top_k": args.top_k, "topk": [10], "llm_eval_batch_size": args.score_batch,
              "single_spec": True}
    ranking = Ranking(config, dataset, stub_scorer(args.items, args.k))
    per_call = max(args.eval_batch // args.items, 1)  # users per full_sort_predict, as RecBole's loader batches

    before = rss()
    sampler = PeakSampler()
    sampler.start()
    start = time.time()
    placed_ok = 0
    for first in range(1, args.users, per_call):
        users = torch.arange(first, min(first + per_call, args.users))
        scores = ranking.full_sort_predict({"user_id": users}, "cpu").view(len(users), -1)
        placed_ok += int(((scores >= 1000).sum(1) == args.k).sum())
    seconds = time.time() - start
    peak = sampler.stop()

    n = args.users - 1
    print(f"users {n}, items {args.items}, training interactions {len(dataset.inter_feat['user_id'])}, "
          f"placed k {args.k}, kept top-K {args.top_k}, {per_call} user(s) per full_sort_predict call, "
          f"scorer batch {args.score_batch}")
    print(f"users with all k placed items on top: {placed_ok}/{n}; cached keys {len(ranking.cache)}")
    print(f"top-K cache (ids int32 + scores float32): {ranking.cache.nbytes / GB:.3f} GB "
          f"({ranking.cache.nbytes / 2 ** 20:.1f} MiB; {n} x {args.top_k} x 8 B = {n * args.top_k * 8 / 2 ** 20:.1f} "
          f"MiB, capacity grown by doubling)")
    print(f"RSS growth while scoring every user (cache + scoring path): {(peak - before) / GB:.3f} GB")
    print(f"process peak RSS (torch, synthetic data, histories included): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB:.3f} GB")
    print(f"old dense users x items float32 table (not allocated): {args.users} x {args.items} x 4 B = "
          f"{args.users * args.items * 4 / GB:.2f} GB ({args.users * args.items * 4 / 1e9:.2f} GB decimal)")
    print(f"wall time {seconds:.1f} s ({n / seconds:.0f} users/s, stub scorer)")


if __name__ == "__main__":
    main()

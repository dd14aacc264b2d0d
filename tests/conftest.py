"""Shared fixtures: tiny datasets written by the tests (general: clustered; sequential: leave-one-out with a
known next item; labeled: ratings and times for CTR) with item text, and a fast configuration (tiny-random LLM)."""
import importlib.util
import os
import random

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path, name):
    """A script of the repository (``run_hyper.py``, ``bench/...``) imported as a module, its ``main`` not run."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=60, n_clusters=3, per_user=12, seed=0, item_text=True):
    """Users of cluster c interact only with items of cluster c: the held-out items are predictable."""
    rng = random.Random(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        t = 0
        for u in range(1, n_users + 1):
            cluster = u % n_clusters
            items = [i for i in range(1, n_items + 1) if i % n_clusters == cluster]
            for i in rng.sample(items, min(per_user, len(items))):
                t += 1
                f.write(f"{u}\t{i}\t5\t{t}\n")
    if item_text:
        _write_item_text(folder, name, n_items, n_clusters)
    return root


def tiny_config(tmp, **overrides):
    config = {
        "data_path": str(tmp),
        "checkpoint_dir": os.path.join(str(tmp), "saved"),
        "llm_path": "tiny-random",
        "item_text_fields": ["title", "genre"],
        "cf_config": {"epochs": 30, "learning_rate": 0.01, "train_batch_size": 256, "eval_step": 10,
                      "stopping_step": 100},
        "gen_max_tokens": 3,
        "gen_history_len": 2,
        "gen_batch_size": 64,
        "ia_items_per_prompt": 4,
        "ia_epochs": 1,
        "ia_learning_rate": 0.01,
        "gllm_k": 3,
        "ua_history_len": 3,
        "epochs": 2,
        "learning_rate": 0.01,
        "train_batch_size": 8,
        "show_progress": False,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "seed": 2020,
        "log_wandb": False,
    }
    config.update(overrides)
    return config


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """RecBole writes log/ and log_tensorboard/ into the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("data")))


def write_sequential_dataset(root, name="tinyseq", n_users=40, n_items=30, length=12, seed=0, item_text=True):
    """Leave-one-out data with a known next item: user u walks the items of its cluster in a fixed cycle
    (item i is followed by the next item of its cluster), starting at a random point."""
    rng = random.Random(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    n_clusters = 3
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(1, n_users + 1):
            cycle = [i for i in range(1, n_items + 1) if i % n_clusters == u % n_clusters]
            start = rng.randrange(len(cycle))
            for step in range(min(length, len(cycle))):
                f.write(f"{u}\t{cycle[(start + step) % len(cycle)]}\t5\t{u * 1000 + step}\n")
    if item_text:
        _write_item_text(folder, name, n_items, n_clusters)
    return root


def _write_item_text(folder, name, n_items, n_clusters):
    genres = ["Comedy", "Horror", "Documentary", "Western", "Musical"]
    with open(os.path.join(folder, f"{name}.item"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\tgenre:token_seq\n")
        for i in range(1, n_items + 1):
            f.write(f"{i}\tMovie  number {i}\t{genres[i % n_clusters]}\n")


@pytest.fixture(scope="session")
def tiny_seq_data(tmp_path_factory):
    return write_sequential_dataset(str(tmp_path_factory.mktemp("seqdata")))


def write_labeled_dataset(root, name="labeled", n_users=30, n_items=30, per_user=12, n_cold=4, seed=0):
    """CTR data: ratings 1..5 (label ``threshold: {rating: 4}``, i.e. rating > 3) with timestamps for a
    time-ordered split (``eval_args: {split: {RS: [0.8, 0.1, 0.1]}, order: TO, group_by: ~, mode: labeled}``).

    User ``u`` rates items of the parity of ``u`` 4-5 and the others 1-3 (10 % flipped): the labels are
    learnable. The last ``n_cold`` items (an even number) are rated only at the end of the timeline, by the first
    ``n_users // 2`` users, each one cold item of either parity: they fall in the test split (cold items) and
    each of these users has both labels there. Returns ``(root, cold_item_tokens)``.
    """
    rng = random.Random(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    warm = list(range(1, n_items - n_cold + 1))
    cold = list(range(n_items - n_cold + 1, n_items + 1))

    def rating(u, i):
        liked = (u + i) % 2 == 0
        if rng.random() < 0.1:
            liked = not liked
        return rng.choice([4, 5]) if liked else rng.choice([1, 2, 3])

    rows = [(u, i) for u in range(1, n_users + 1) for i in rng.sample(warm, min(per_user, len(warm)))]
    rng.shuffle(rows)  # every user's warm rows spread over the whole timeline
    rows += [(u, cold[(u + k) % n_cold]) for u in range(1, n_users // 2 + 1) for k in range(2)]
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for t, (u, i) in enumerate(rows, start=1):
            f.write(f"{u}\t{i}\t{rating(u, i)}\t{t}\n")
    return root, [str(i) for i in cold]


def labeled_config(root, name="labeled", **overrides):
    """A fast labeled (CTR) run on ``write_labeled_dataset``'s data: time-ordered 8:1:1, AUC / UAUC / LogLoss."""
    config = {
        "dataset": name,
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "unused_col": {"inter": ["timestamp"]},  # ordering only, not a model feature
        "threshold": {"rating": 4},
        "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "labeled"},
        "metrics": ["AUC", "UAUC", "LogLoss"],
        "valid_metric": "UAUC",
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "epochs": 3,
        "learning_rate": 0.01,
        "train_batch_size": 64,
        "eval_batch_size": 16,
        "show_progress": False,
        "seed": 2020,
        "log_wandb": False,
    }
    config.update(overrides)
    return config

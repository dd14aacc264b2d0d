"""LightGCN (RecBole's own run and the cf_pretrain stage) vs DCCF on one protocol.

Protocol, the same for every row: RecBole's RO 8:1:1 split, seed 2020, full ranking, early stopping on valid
NDCG@10 (the project's validation metric, as in bench/glta_vs_backbone.py); every other setting is the model's
RecBole default (LightGCN: lr 1e-3, batch 2048, <= 300 epochs, stopping_step 10; DCCF: the paper's defaults in
properties/model/DCCF.yaml). Rows:
  LightGCN          ``run_recbole_llm(model='LightGCN')``: RecBole's own pipeline;
  LightGCN-stage    the CF-backbone service (``CFBackbone(...).stage()``) under an LLM model's config
                    (``--llm_model``, default GLTA: only its Config is built, no LLM is loaded);
                    it must equal the LightGCN row, and the script says whether it does;
  DCCF              ``run_recbole_llm(model='DCCF')`` with the paper's defaults.
Prints test recall / ndcg / hit / precision @10, the best valid NDCG@10 and wall time.

Why an earlier version of this bench reported LightGCN test N@10 0.2116 on ml-100k: it stopped early on RecBole's
default valid metric, MRR@10. That is RecBole's own result (RecBole's pipeline alone gives the same 0.2116):
valid MRR@10 peaks at epoch 14 (0.3162) and then wanders for 10 epochs (0.309 - 0.316) while valid NDCG@10 and
the loss still improve, so RecBole stops at epoch 24 with ~8 % of its epochs used; left to train, valid MRR@10
reaches 0.36 by epoch 110.

    python bench/dccf_vs_lightgcn.py                       # all rows, one after the other
    python bench/dccf_vs_lightgcn.py --models LightGCN-stage --output /tmp/stage.json

RecBole writes log/ and saved/ into the current folder, so the runs happen in a scratch folder (printed).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole.utils import init_logger, init_seed  # noqa: E402

from recbole_llm.config import Config  # noqa: E402
from recbole_llm.model.backbone import CFBackbone  # noqa: E402
from recbole_llm.quick_start import run_recbole_llm  # noqa: E402
from recbole_llm.stages import StageCache  # noqa: E402
from recbole_llm.utils import create_dataset, data_preparation, get_trainer  # noqa: E402

PROTOCOL = {
    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"},
    "seed": 2020,
    "metrics": ["Recall", "MRR", "NDCG", "Hit", "Precision"],
    "topk": [10],
    "valid_metric": "NDCG@10",
}
METRICS = ["recall@10", "ndcg@10", "hit@10", "precision@10"]


def backbone_stage(llm_model, name, dataset, config_dict):
    """The cf_pretrain stage of ``llm_model`` with backbone ``name``, run as LLMTrainer runs it; then its test."""
    config = Config(llm_model, dataset, config_dict=dict(config_dict, cf_backbone=name, cf_config={}))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    backbone = CFBackbone(config, train_data._dataset, name)
    stage = backbone.stage()
    artifact = StageCache(config, train_data._dataset).run(
        stage, lambda: stage.build(None, train_data, valid_data), stage.load)
    trainer = get_trainer(backbone.config["MODEL_TYPE"], name)(backbone.config, backbone.model)
    return {"best_valid_score": artifact["best_valid_score"], "best_valid_result": artifact["best_valid_result"],
            "test_result": trainer.evaluate(test_data, load_best_model=False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="LightGCN,LightGCN-stage,DCCF", help="comma-separated rows")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--llm_model", default="GLTA", help="the LLM model whose config the stage row uses")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier when shared)")
    parser.add_argument("--workdir", default=None, help="scratch folder for log/ and saved/")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line

    torch.set_num_threads(args.threads)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="dccf_bench_"))
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    print(f"scratch folder: {workdir}", flush=True)

    results = {}
    for row in args.models.split(","):
        config_dict = dict(PROTOCOL, show_progress=False, checkpoint_dir=os.path.join(workdir, "saved", row))
        start = time.time()
        if row.endswith("-stage"):
            result = backbone_stage(args.llm_model, row[:-len("-stage")], args.dataset, config_dict)
        else:
            result = run_recbole_llm(row, args.dataset, config_dict=config_dict)
        results[row] = {"valid": dict(result["best_valid_result"]), "test": dict(result["test_result"]),
                        "seconds": time.time() - start}
        print(f"{row}: {results[row]}", flush=True)

    print(f"\n{args.dataset}, seed 2020, RO 8:1:1, full ranking, early stopping on valid NDCG@10")
    print(f"{'model':<16}" + "".join(f"{m:>14}" for m in METRICS) + f"{'valid ndcg@10':>15}{'time (s)':>10}")
    for row, r in results.items():
        print(f"{row:<16}" + "".join(f"{r['test'][m]:>14.4f}" for m in METRICS)
              + f"{r['valid']['ndcg@10']:>15.4f}{r['seconds']:>10.0f}")
    if "LightGCN" in results and "LightGCN-stage" in results:
        same = all(results["LightGCN"][k] == results["LightGCN-stage"][k] for k in ("valid", "test"))
        print(f"LightGCN-stage equals RecBole's LightGCN (valid and test): {same}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

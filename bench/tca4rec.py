"""TCA4Rec on ml-100k (leave-one-out, RecBole's sequential preset, one seed): one table, and speed ratios.

    python bench/tca4rec.py [--users 100] [--rows 2] [--history 5] [--runs NAME,...] [--repeats 5]
                            [--identifier title|semantic_id] [--backbones SASRec,MF,...] [--no_speed | --speed_only]
                            [--output part.json] [--key=value ...]  (e.g. --eval_step=0: no validation pass)
    python bench/tca4rec.py --merge part1.json part2.json    (one table from parts run side by side)

Rows: RecBole's Pop and each CF backbone alone (SASRec, MF, LightGCN, DCCF, trained once as TCA4Rec's cached ``cf_pretrain`` stage
and scored as RecBole scores that model alone on the same split: ``CFBackbone.eval_data``), the base LLM
recommender (alpha 0), TCA4Rec over MF, LightGCN and SASRec with both losses, and an alpha sweep (0, 0.05, 0.1,
0.3) over SASRec with the mixture loss. Test HR / NDCG at 1, 5, 10; HR@10 against the base LLM user by user (users
hit by the run only / by the base only, and the two-sided sign test); the validation NDCG@10 each run was selected
on; whether the user's seen items are masked; wall time and peak RSS of each run (a process per run).

Seen items: RecBole masks a general model's history (training items at validation, + validation items at test),
not a sequential model's. So "MF alone" (general) is masked, "SASRec alone" and the LLM rows are not (unless
``--exclude_seen_items=true``: the beams leave seen items out); each general backbone also gets an
"alone, unmasked" row, the same model scored on the LLM's sequential loader: compare rows under the same rule.

``--identifier semantic_id`` runs the LLM rows with AlignTokenRec's codebook codes as item identifiers
(TCA4Rec's ``item_identifier``; the codebook stages run once, cached); the backbone rows do not depend on it.

Speed, measured in the same run on one batch of real prompts (interleaved repeats, medians):
  - a TCA4Rec training step (CF logits + soft labels + soft loss + backward) over a plain NTP step (alpha 0);
  - the soft-label build alone (``ItemTrie.soft_labels``) over the plain NTP step;
  - the vectorised build over the reference-style per-row, per-position Python loop (``soft_labels_loop``).

Scaled to this shared CPU (stated in the output): ``--users`` users sampled from ml-100k (every item they rated
stays; the catalog is the items of the sample), the last ``--rows`` training targets per user per epoch
(``train_rows_per_user``), one epoch, ``--history`` titles per prompt (history_len), SmolLM2-135M. Nothing is
chosen on the test split.
"""
import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKBONES = ["SASRec", "MF", "LightGCN", "DCCF", "Pop"]  # Pop: RecBole's, as a reference row (not a teacher)
RUNS = {"base LLM (alpha 0)": {"alpha": 0}}
for backbone in ("MF", "LightGCN", "SASRec"):
    for loss in ("mixture", "soft_ce"):
        RUNS[f"TCA4Rec {backbone} {loss} a=0.1"] = {"cf_backbone": backbone, "tca_loss": loss, "alpha": 0.1}
for alpha in (0.05, 0.3):
    RUNS[f"TCA4Rec SASRec mixture a={alpha}"] = {"cf_backbone": "SASRec", "tca_loss": "mixture", "alpha": alpha}
BASE_RUN = "base LLM (alpha 0)"
DEFAULT_RUN = "TCA4Rec SASRec mixture a=0.1"  # TCA4Rec's YAML defaults (scaled as stated)
COLUMNS = ["hit@1", "hit@5", "hit@10", "ndcg@1", "ndcg@5", "ndcg@10"]


def sample_dataset(folder, name, users, seed):
    """ml-100k restricted to ``users`` users drawn with ``seed`` (all their interactions), with its .item file."""
    import recbole

    source = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")
    target = os.path.join(folder, name)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(source, "ml-100k.inter")) as f:
        header, *lines = f.read().splitlines()
    all_users = sorted({line.split("\t")[0] for line in lines}, key=int)
    chosen = set(random.Random(seed).sample(all_users, min(users, len(all_users))))
    with open(os.path.join(target, f"{name}.inter"), "w") as f:
        f.write("\n".join([header] + [line for line in lines if line.split("\t")[0] in chosen]) + "\n")
    with open(os.path.join(source, "ml-100k.item")) as src, open(os.path.join(target, f"{name}.item"), "w") as dst:
        dst.write(src.read())
    return folder


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- one run per process --------------------------------------------------------------------------------------
def capture_first_hits():
    """Record, at each RecBole evaluation, every user's rank of the held-out item within the top 10 (1-10, 0 = not
    in it), in the evaluation's user order: the last call is the test pass. For paired comparisons of runs."""
    from recbole.evaluator import Evaluator

    captured, evaluate = {}, Evaluator.evaluate

    def recording(self, dataobject):
        hits = dataobject.get("rec.topk")[:, :10].bool()
        captured["first_hit"] = torch_first_hit(hits)
        return evaluate(self, dataobject)

    Evaluator.evaluate = recording
    return captured


def torch_first_hit(hits):
    import torch

    rank = torch.argmax(hits.int(), dim=1) + 1
    return torch.where(hits.any(dim=1), rank, torch.zeros_like(rank)).tolist()


def child_run(overrides):
    from recbole_llm.quick_start import run_recbole_llm

    captured = capture_first_hits()
    start = time.time()
    masked = bool(overrides.get("exclude_seen_items", False))
    result = run_recbole_llm("TCA4Rec", overrides.pop("dataset"), config_dict=overrides)
    return {"test": dict(result["test_result"]), "valid": dict(result["best_valid_result"] or {}),
            "seconds": time.time() - start, "rss_mb": peak_rss_mb(), "first_hit": captured.get("first_hit"),
            "masked": masked}


def child_backbones(overrides):
    """Each backbone's cf_pretrain stage (cached for the TCA4Rec runs), scored as RecBole scores it alone on valid
    and test (a general backbone: its own general loaders, seen items masked); a general backbone is also scored
    on the LLM's sequential loaders (nothing masked: "<name> unmasked")."""
    from recbole.trainer import Trainer

    from recbole_llm.config import Config
    from recbole_llm.model.backbone import CFBackbone
    from recbole_llm.model.sequential_recommender.tca4rec import BACKBONES as NAMES
    from recbole_llm.stages import StageCache
    from recbole_llm.utils import create_dataset, data_preparation

    captured = capture_first_hits()
    dataset_name, out = overrides.pop("dataset"), {}
    for backbone in overrides.pop("bench_backbones"):
        start = time.time()
        config = Config("TCA4Rec", dataset_name, config_dict=dict(overrides, cf_backbone=backbone, alpha=0.1))
        train, valid, test = data_preparation(config, create_dataset(config))
        cf = CFBackbone(config, train._dataset, NAMES.get(backbone, backbone))
        stage = cf.stage()
        StageCache(config, train._dataset).run(stage, lambda: stage.build(None, train, valid), stage.load)
        trainer = Trainer(cf.config, cf.model)
        own_valid, own_test = cf.eval_data(valid, test)  # RecBole's loaders for the backbone alone
        result = {"valid": dict(trainer.evaluate(own_valid, load_best_model=False)),
                  "test": dict(trainer.evaluate(own_test, load_best_model=False)),
                  "first_hit": captured.get("first_hit"), "masked": cf.on_plain_data}
        if cf.on_plain_data:  # the general loader's users come by id: pair them as the sequential loader has them
            hits = dict(zip(own_test.uid_list.tolist(), result["first_hit"]))
            result["first_hit"] = [hits[u] for u in test._dataset.inter_feat[test._dataset.uid_field].tolist()]
            out[f"{backbone} unmasked"] = {"valid": dict(trainer.evaluate(valid, load_best_model=False)),
                                           "test": dict(trainer.evaluate(test, load_best_model=False)),
                                           "first_hit": captured.get("first_hit"), "masked": False}
        out[backbone] = dict(result, seconds=time.time() - start, rss_mb=peak_rss_mb())
        if cf.on_plain_data:
            out[f"{backbone} unmasked"].update(seconds=out[backbone]["seconds"], rss_mb=out[backbone]["rss_mb"])
    return out


def child_speed(overrides):
    """Training-step times of one batch: NTP vs TCA4Rec; soft-label build vectorised vs loop."""
    import torch

    from recbole_llm.config import Config
    from recbole_llm.llm.alignment import IGNORE, answer_targets, soft_labels_loop, subtree_table
    from recbole_llm.model.sequential_recommender.tca4rec import TCA4Rec
    from recbole_llm.trainer import LLMTrainer
    from recbole_llm.utils import create_dataset, data_preparation

    repeats = overrides.pop("repeats")
    config = Config("TCA4Rec", overrides.pop("dataset"), config_dict=overrides)
    train, valid, _ = data_preparation(config, create_dataset(config))
    model = TCA4Rec(config, train._dataset)
    LLMTrainer(config, model).run_stages(train, valid)  # cf_pretrain (+ the codebook stages for semantic IDs)
    model.set_trainable(["llm"])
    model.train()
    batch = next(iter(train))
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    targets = answer_targets([model.trie.tokens(i) for i in batch[model.POS_ITEM_ID].tolist()])
    scores = model.cf.logits(batch)
    subtree = subtree_table(model.trie)
    autocast = torch.autocast("cpu", dtype=model.llm_dtype, enabled=model.llm_dtype == torch.bfloat16)

    def step(alpha):
        model.alignment.alpha = alpha
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model.calculate_loss(batch)
        loss.backward()

    timings = {"ntp_step": [], "tca_step": [], "build_vectorised": [], "build_loop": []}
    for r in range(repeats + 1):  # the first round warms up and is dropped
        for name, fn in (("ntp_step", lambda: step(0.0)), ("tca_step", lambda: step(config["alpha"])),
                         ("build_vectorised", lambda: model.trie.soft_labels(targets, scores, vocab)),
                         ("build_loop", lambda: soft_labels_loop(model.trie, targets, scores, vocab, subtree))):
            start = time.perf_counter()
            fn()
            if r:
                timings[name].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in timings.items()}
    out.update(batch=len(targets), answer_tokens=int((targets != IGNORE).sum()), vocab=vocab, repeats=repeats)
    return out


# ----- the table -----------------------------------------------------------------------------------------------
def spawn(kind, overrides):
    command = [sys.executable, os.path.abspath(__file__), f"--child={kind}", "--overrides", json.dumps(overrides)]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def paired(result, base):
    """HR@10 against the base LLM, user by user on the same test users: '+b / -c (p)', b users hit by this run
    only, c by the base only, p the two-sided sign-test (binomial) probability of a split at least that uneven."""
    mine, theirs = result.get("first_hit"), (base or {}).get("first_hit")
    if not mine or not theirs or len(mine) != len(theirs) or result is base:
        return "-"
    b = sum(1 for x, y in zip(mine, theirs) if x and not y)
    c = sum(1 for x, y in zip(mine, theirs) if y and not x)
    n = b + c
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2 ** n if n else 1.0
    return f"+{b} / -{c} (p {min(1.0, 2 * tail):.2f})"


def row(name, result, base=None):
    cells = " | ".join(f"{result['test'][c]:.4f}" for c in COLUMNS)
    valid = (result.get("valid") or {}).get("ndcg@10")
    valid = "-" if valid is None else f"{valid:.4f}"
    masked = {True: "yes", False: "no"}.get(result.get("masked"), "?")  # "?": a part written before the column
    return (f"| {name:<32} | {cells} | {paired(result, base)} | {valid:>6} | {masked:>4} | {result['seconds']:.0f} | "
            f"{result['rss_mb']:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2, help="train_rows_per_user (0: every training target)")
    parser.add_argument("--history", type=int, default=5, help="history_len")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the speed measurements")
    parser.add_argument("--identifier", default="title", choices=["title", "semantic_id"],
                        help="item_identifier of the LLM rows")
    parser.add_argument("--runs", default=None, help="comma-separated run names (default: all; \"\": none)")
    parser.add_argument("--checkpoint_dir", default="saved/bench_tca4rec")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--backbones", default=",".join(BACKBONES),
                        help="comma-separated backbones for the 'alone' rows (default: all; '' = none)")
    parser.add_argument("--no_speed", action="store_true", help="skip the speed measurements (e.g. a parallel part)")
    parser.add_argument("--speed_only", action="store_true",
                        help="only the speed measurements (e.g. on a quiet machine, after the table's parts)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="print one table from the --output files of runs made in parts (same settings)")
    parser.add_argument("--child", default=None)
    parser.add_argument("--overrides", default=None)
    args, extra = parser.parse_known_args()

    if args.child:
        sys.argv = [sys.argv[0]]
        overrides = json.loads(args.overrides)
        result = {"run": child_run, "backbones": child_backbones, "speed": child_speed}[args.child](overrides)
        print(json.dumps(result))
        return

    if args.merge:
        parts = [json.load(open(path)) for path in args.merge]
        settings = [part["settings"] for part in parts]
        if any(s != settings[0] for s in settings[1:]):
            sys.exit(f"--merge: the files were not run with the same settings: {args.merge}")
        results = {}
        for part in parts:
            results.update(part["results"])
        order = [f"{b} alone{rule}" for b in BACKBONES for rule in ("", ", unmasked")] + list(RUNS)
        print_table([(name, results[name]) for name in order if name in results],
                    next((p["speed"] for p in parts if p.get("speed")), None), results)
        return

    name = f"ml-100k-u{args.users}"
    data = sample_dataset(os.path.join(args.checkpoint_dir, "data"), name, args.users, args.seed)
    common = {"dataset": name, "data_path": data, "checkpoint_dir": args.checkpoint_dir, "seed": args.seed,
              "show_progress": False, "item_text_fields": ["movie_title", "release_year", "class"],
              "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
              "train_rows_per_user": args.rows or None, "history_len": args.history, "epochs": 1,
              "item_identifier": args.identifier}
    for pair in extra:  # --key=value, as with run_recbole_llm.py
        key, value = pair.lstrip("-").split("=", 1)
        common[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    print(f"ml-100k, {args.users} users sampled (seed {args.seed}), leave-one-out, seed {args.seed}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs; "
          f"train_rows_per_user={args.rows}, history_len={args.history}, 1 epoch, "
          f"item_identifier={args.identifier}, "
          f"llm_path={common.get('llm_path', 'smollm2')}; overrides {extra}", flush=True)

    speed = None if args.no_speed else spawn("speed", dict(common, repeats=args.repeats, **RUNS[DEFAULT_RUN]))
    results = {}
    if args.speed_only:
        print_table([], speed, results)
        write_output(args.output, results, speed, common)
        return
    chosen = [b for b in args.backbones.split(",") if b]
    unknown = [b for b in chosen if b not in BACKBONES]
    if unknown:
        sys.exit(f"--backbones: unknown {unknown}; choose from {BACKBONES}")
    if chosen:
        backbones = spawn("backbones", dict(common, bench_backbones=chosen))
        for backbone in chosen:
            for key, name in ((backbone, f"{backbone} alone"), (f"{backbone} unmasked", f"{backbone} alone, unmasked")):
                if key in backbones:
                    results[name] = backbones[key]
                    print(row(name, backbones[key]), flush=True)
    runs = list(RUNS) if args.runs is None else [run for run in args.runs.split(",") if run]  # "": none
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        sys.exit(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    for run in runs:
        results[run] = spawn("run", dict(common, **RUNS[run]))
        print(row(run, results[run]), flush=True)
    print_table(list(results.items()), speed, results)
    write_output(args.output, results, speed, common)


def write_output(path, results, speed, settings):
    """The run's parts as JSON for ``--merge`` (nothing without ``--output``)."""
    if path:
        with open(path, "w") as f:
            json.dump({"results": results, "speed": speed, "settings": settings}, f, indent=2)


def print_table(rows, speed, results):
    header = " | ".join(f"{c.replace('hit', 'HR').replace('ndcg', 'N'):>6}" for c in COLUMNS)
    base = results.get(BASE_RUN)
    print(f"\n| {'run':<32} | {header} | HR@10 vs base, user by user | valid N@10 | seen masked | time (s) | "
          "peak RSS (MB) |")
    print("|" + "---|" * (len(COLUMNS) + 6))
    for name, result in rows:
        print(row(name, result, base))
    if speed is None:
        return
    print(f"\nspeed (one batch of {speed['batch']} rows, {speed['answer_tokens']} target tokens, vocabulary "
          f"{speed['vocab']}, medians of {speed['repeats']}):")
    print(f"  plain NTP step {speed['ntp_step'] * 1e3:.1f} ms; TCA4Rec step {speed['tca_step'] * 1e3:.1f} ms: "
          f"+{(speed['tca_step'] / speed['ntp_step'] - 1) * 100:.1f}% (CF logits + soft labels + soft loss)")
    print(f"  soft-label build: vectorised {speed['build_vectorised'] * 1e3:.2f} ms "
          f"({speed['build_vectorised'] / speed['ntp_step'] * 100:.2f}% of an NTP step), per-position loop "
          f"{speed['build_loop'] * 1e3:.1f} ms: vectorised is {speed['build_loop'] / speed['build_vectorised']:.1f}x "
          "faster")
    default = results.get(DEFAULT_RUN)
    if default:
        print(f"  default run ({DEFAULT_RUN}, scaled as above): {default['seconds']:.0f} s wall, "
              f"peak RSS {default['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()

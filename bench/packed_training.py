"""Packed vs row training for a generative LLM recommender (TCA4Rec, SmolLM2-135M) on all of ml-100k.

    python bench/packed_training.py [--steps 4] [--window True|False] [--key=value ...]

Prints, for RecBole's every training target (leave-one-out, TCA4Rec's YAML: 10 items of history):
  - tokens per epoch in each format (the LLM's input tokens: prompts + answers for rows; chunks for packed);
  - a training step's time (forward + backward, LoRA, the LLM's dtype) in each format, interleaved A B A B over
    ``--steps`` steps each of ~``train_batch_size`` targets, medians; targets per second, tokens per second and
    their ratio (packed / rows), and the epoch time each format implies on this machine.
alpha 0 (no teacher): the LLM's cost only (the teacher's logits are the same rows in both formats).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, "
            f"AMX {'yes' if 'amx_bf16' in flags else 'no'}, AVX512-BF16 {'yes' if 'avx512_bf16' in flags else 'no'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per format")
    parser.add_argument("--window", type=str, default="True", help="packed_window")
    args, rest = parser.parse_known_args()

    import torch
    from recbole.utils import init_seed

    from recbole_llm import compat
    from recbole_llm.config import Config
    from recbole_llm.llm.precision import autocast_context
    from recbole_llm.model.sequential_recommender.tca4rec import TCA4Rec
    from recbole_llm.trainer.packed import pack
    from recbole_llm.utils import create_dataset, data_preparation

    compat.apply()
    overrides = {"alpha": 0, "packed_window": args.window == "True", "show_progress": False}
    for item in rest:
        key, _, value = item.lstrip("-").partition("=")
        overrides[key] = eval(value, {}, {}) if value[:1] in "[{0123456789" or value in ("True", "False") else value
    config = Config("TCA4Rec", "ml-100k", config_dict=overrides)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = TCA4Rec(config, train._dataset)
    feat = train._dataset.inter_feat
    n_targets = len(feat)

    # tokens per epoch, every training target
    prompts = model.prompts(feat)
    answers = [len(model.trie.tokens(i)) for i in feat[model.POS_ITEM_ID].tolist()]
    row_tokens = sum(map(len, prompts)) + sum(answers)
    packed = model.packed_batches(train, 0)
    window = bool(config["packed_window"])
    packed_tokens = sum(len(pack(c, model.prompt_ids, model.trie.tokens, model.history_len, window).ids)
                        for c in model._chunks[1])
    assert sum(len(b) for b in packed) == n_targets

    # timed steps, interleaved
    model.set_trainable(["llm"])
    model.train()
    size = config["train_batch_size"]
    generator = torch.Generator().manual_seed(0)
    row_batches = [feat[torch.randperm(n_targets, generator=generator)[:size]] for _ in range(args.steps)]
    context = autocast_context(model.device, model.llm_dtype, config["llm_autocast"])
    times = {"rows": [], "packed": []}
    work = {"rows": [], "packed": []}  # (targets, tokens) of each timed step

    def step(batch):
        start = time.perf_counter()
        with context:
            loss = model.calculate_loss(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(row_batches[0])  # warm-up
    step(packed[0])
    for i in range(args.steps):
        rows = row_batches[i]
        times["rows"].append(step(rows))
        work["rows"].append((len(rows), sum(map(len, model.prompts(rows))) + sum(
            len(model.trie.tokens(t)) for t in rows[model.POS_ITEM_ID].tolist())))
        batch = packed[1 + i]
        times["packed"].append(step(batch))
        work["packed"].append((len(batch), int((batch.input_ids != model.tokenizer.pad_token_id).sum())))

    def rate(name):
        per_target = statistics.median(t / n for t, (n, _) in zip(times[name], work[name]))
        per_token = statistics.median(k / t for t, (_, k) in zip(times[name], work[name]))
        return per_target, per_token

    rows_per_target, rows_tps = rate("rows")
    packed_per_target, packed_tps = rate("packed")
    print(f"machine: {cpu_name()}; torch threads {torch.get_num_threads()}; llm dtype {model.llm_dtype}")
    print(f"ml-100k, TCA4Rec (alpha 0), {n_targets:,} training targets, history_len {model.history_len}, "
          f"chunk_items {config['chunk_items']}, packed_window {window}, train_batch_size {size}")
    print("| format | tokens per epoch | tokens / target | s per step | targets / s | tokens / s | epoch (h) |")
    print("|---|---|---|---|---|---|---|")
    for name, tokens, per_target, tps in (("rows", row_tokens, rows_per_target, rows_tps),
                                          ("packed", packed_tokens, packed_per_target, packed_tps)):
        print(f"| {name} | {tokens:,} | {tokens / n_targets:.1f} | {statistics.median(times[name]):.2f} | "
              f"{1 / per_target:.1f} | {tps:.0f} | {per_target * n_targets / 3600:.2f} |")
    print(f"packed / rows: tokens per epoch {packed_tokens / row_tokens:.3f}x; "
          f"targets per second {rows_per_target / packed_per_target:.2f}x (same run, interleaved, medians of "
          f"{args.steps})")


if __name__ == "__main__":
    main()

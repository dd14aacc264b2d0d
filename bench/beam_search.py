"""Beam search over ml-100k titles: unconstrained vs constrained to the item trie, same prompts, same model.

    python bench/beam_search.py [--llm_path smollm2] [--llm_dtype auto] [--prompts 32] [--beams 10] [--batch 16]
                                [--max_title_tokens 16] [--prefix_fn] [--repeats 1]

Items are RecBole's bundled ml-100k movies, "title (year)" of at most ``--max_title_tokens`` tokens (fewer
new tokens per search: a couple of minutes on a CPU; titles shared by two movies keep the first); prompts are
the last 5 movies of random users. Prints items/s (prompts x beams returned per second) of
- unconstrained beam search (free text, up to the trie's depth in new tokens),
- constrained by ``TrieLogitsProcessor`` (``beam_search_items``: one vectorised mask per step),
- with ``--prefix_fn``, constrained by HF's ``prefix_allowed_tokens_fn`` reading the dict trie (one Python call
  per beam per step),
with the ratio of each constrained time to the unconstrained one (target <= 1.2), the mean length of the returned
sequences (EOS included) and the share of them that are real items. Modes are interleaved per batch; medians of repeats.
"""
import argparse
import os
import random
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_llm.data.prompts import collate  # noqa: E402
from recbole_llm.llm import ItemTrie, beam_search, beam_search_items, load_llm  # noqa: E402


def ml100k(folder=None):
    """{item id: "title (year)"} and user histories (item ids by time) from RecBole's bundled ml-100k."""
    import recbole

    folder = folder or os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")
    titles, seen = {}, set()
    with open(os.path.join(folder, "ml-100k.item")) as f:
        next(f)
        for line in f:
            item, title, year = line.rstrip("\n").split("\t")[:3]
            text = f"{title} ({year})" if year else title
            if text not in seen:
                seen.add(text)
                titles[int(item)] = text
    events = defaultdict(list)
    with open(os.path.join(folder, "ml-100k.inter")) as f:
        next(f)
        for line in f:
            user, item, _, timestamp = line.split("\t")
            events[int(user)].append((float(timestamp), int(item)))
    histories = {u: [i for _, i in sorted(e) if i in titles] for u, e in events.items()}
    return titles, histories


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_path", default="smollm2")
    parser.add_argument("--llm_dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max_title_tokens", type=int, default=16)
    parser.add_argument("--prefix_fn", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = {"llm_path": args.llm_path, "llm_dtype": args.llm_dtype, "llm_quantization": "none",
              "llm_cache_dir": None, "llm_gradient_checkpointing": False, "lora_r": 0,
              "device": torch.device("cuda" if torch.cuda.is_available() else "cpu")}
    llm, tokenizer = load_llm(config)
    titles, histories = ml100k()
    texts = {i: " " + t for i, t in titles.items()
             if len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) <= args.max_title_tokens}
    titles = {i: titles[i] for i in texts}
    histories = {u: [i for i in h if i in titles] for u, h in histories.items()}
    trie = ItemTrie.from_texts(texts, tokenizer)
    users = random.Random(0).sample(sorted(u for u, h in histories.items() if len(h) >= 5), args.prompts)
    prompts = [tokenizer("A user watched these movies, most recent last: "
                         + "; ".join(titles[i] for i in histories[u][-5:]) + ". The next movie they will watch is:",
                         add_special_tokens=False)["input_ids"] for u in users]
    eos = tokenizer.eos_token_id
    batches = []
    for start in range(0, len(prompts), args.batch):
        ids, attention, _, _, _ = collate([(p, [], {}) for p in prompts[start:start + args.batch]],
                                          tokenizer.pad_token_id, "left")
        batches.append((ids.to(config["device"]), attention.to(config["device"])))

    def unconstrained(ids, attention):
        tokens, _ = beam_search(llm, ids, attention, args.beams, args.beams, trie.depth, eos_id=eos)
        return tokens

    def with_processor(ids, attention):
        items, _ = beam_search_items(llm, trie, ids, attention, args.beams)
        return items

    def with_prefix_fn(ids, attention):
        tokens, _ = beam_search(llm, ids, attention, args.beams, args.beams, trie.depth, eos_id=eos,
                                prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(ids.shape[1]))
        return tokens

    modes = {"unconstrained": unconstrained, "trie (LogitsProcessor)": with_processor}
    if args.prefix_fn:
        modes["trie (prefix_allowed_tokens_fn)"] = with_prefix_fn
    seconds = {name: [] for name in modes}
    new_tokens = {name: [] for name in modes}
    valid = {name: [] for name in modes}
    for _ in range(args.repeats):
        elapsed = dict.fromkeys(modes, 0.0)
        for ids, attention in batches:
            for name, run in modes.items():
                start = time.perf_counter()
                out = run(ids, attention)
                elapsed[name] += time.perf_counter() - start
                if out.dim() == 3:  # token sequences: their length up to the first EOS (included)
                    out = out.flatten(0, 1)
                    lengths = torch.where((out == eos).any(1), (out == eos).int().argmax(1) + 1, out.shape[1])
                    out = trie.items_of(out)
                else:  # items: their token sequences end with EOS
                    lengths = torch.tensor([len(trie.tokens(i)) if i in trie else 0 for i in out.flatten().tolist()])
                new_tokens[name] += lengths.tolist()
                valid[name] += [i in trie for i in out.flatten().tolist()]
        for name in modes:
            seconds[name].append(elapsed[name])

    n_items = args.prompts * args.beams
    base = statistics.median(seconds["unconstrained"])
    print(f"\nbeam search, {args.llm_path} ({next(llm.parameters()).dtype}, {config['device']}, "
          f"{torch.get_num_threads()} threads): {args.prompts} prompts, {args.beams} beams, batch {args.batch}, "
          f"{len(trie)} items, trie depth {trie.depth}, {args.repeats} repeat(s)")
    print(f"{'mode':34s} {'seconds':>8s} {'items/s':>8s} {'x uncons.':>9s} {'length':>8s} {'real items':>10s}")
    for name in modes:
        t = statistics.median(seconds[name])
        print(f"{name:34s} {t:8.2f} {n_items / t:8.1f} {t / base:9.3f} {statistics.mean(new_tokens[name]):8.1f} "
              f"{100 * statistics.mean(valid[name]):9.1f}%")


if __name__ == "__main__":
    main()

"""Serving a generative recommender from pre-computed top-K lists (AlignTokenRec, Fig. 3).

Beam search is run offline for every user (or chosen users) over the user's whole history (the last
``MAX_ITEM_LIST_LENGTH`` items of all their interactions) and the top-K items are written to a JSON file
(temporary file, then renamed: a reader never sees half a file). Online, a lookup reads the user's row.
New items get codes from the trained codebooks (their CF embedding, or their text) without retraining the
LLM, enter the item trie and can be recommended after a refresh; the file keeps them so later refreshes do too.

    python -m recbole_llm.serve precompute --checkpoint saved/AlignTokenRec-....pth --cache topk.json [--k 10]
    python -m recbole_llm.serve lookup --cache topk.json --user 196
    python -m recbole_llm.serve add-item --checkpoint ... --cache topk.json --item new1 --text "Title, genre"
    python -m recbole_llm.serve add-item --checkpoint ... --cache topk.json --item new2 --like 50
    python -m recbole_llm.serve refresh --checkpoint ... --cache topk.json --users 196 186

API: ``TopKServer(checkpoint)`` (``precompute``, ``add_item``, ``save``) and ``TopKCacheFile(path)`` (``lookup``).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from recbole_llm.errors import ConfigError


def atomic_write_json(obj, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class TopKCacheFile:
    """The pre-computed lists: ``{"k", "users": {user: [[item, score], ...]}, "new_items": {item: codes}}``,
    user and item ids as in the dataset's atomic files."""

    def __init__(self, path=None):
        self.path = path
        self.data = {"k": 0, "users": {}, "new_items": {}}
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.data = json.load(f)

    def lookup(self, user):
        """[(item, score), ...] best first; KeyError for a user without a cached list."""
        return [tuple(pair) for pair in self.data["users"][str(user)]]

    def save(self, path=None):
        atomic_write_json(self.data, path or self.path)


class TopKServer:
    """A trained model (from its checkpoint) that computes top-K lists and adds new items."""

    def __init__(self, checkpoint, cache=None):
        from recbole_llm.quick_start import load_data_and_model

        self.config, self.model, self.dataset, _, _, _ = load_data_and_model(checkpoint)
        if not hasattr(self.model, "codes_for"):
            raise ConfigError(f"serve: {self.config['model']} has no codebooks to serve (use AlignTokenRec)")
        self.cache = cache if isinstance(cache, TopKCacheFile) else TopKCacheFile(cache)
        ds = self.dataset
        self.user_tokens, self.item_tokens = ds.field2id_token[ds.uid_field], list(ds.field2id_token[ds.iid_field])
        self.user_ids, self.item_ids = ds.field2token_id[ds.uid_field], dict(ds.field2token_id[ds.iid_field])
        self.histories = self._histories(ds)
        for token, codes in self.cache.data["new_items"].items():
            self._add(token, torch.tensor(codes))

    @staticmethod
    def _histories(ds):
        feat = ds.inter_feat
        users, items = feat[ds.uid_field].numpy(), feat[ds.iid_field].numpy()
        order = np.lexsort((feat[ds.time_field].numpy(), users)) if ds.time_field in feat.columns else np.argsort(
            users, kind="stable")
        histories = [[] for _ in range(ds.user_num)]
        for r in order:
            histories[users[r]].append(int(items[r]))
        return histories

    def _user_id(self, user):
        if str(user) not in self.user_ids:
            raise ConfigError(f"serve: unknown user '{user}'")
        return self.user_ids[str(user)]

    def precompute(self, users=None, k=10, batch_size=None, show_progress=False):
        """Beam-search the top-``k`` items of ``users`` (dataset tokens; None: every user) into the cache."""
        users = [str(u) for u in (users if users is not None else self.user_tokens[1:])]
        ids = [self._user_id(u) for u in users]
        batch_size = batch_size or int(self.config["llm_eval_batch_size"])
        for start in tqdm(range(0, len(ids), batch_size), disable=not show_progress, desc="precompute", ncols=100):
            chunk = ids[start:start + batch_size]
            items, scores = self.model.recommend([self.histories[u] for u in chunk], k=k)
            for u, row, row_scores in zip(chunk, items.tolist(), scores.tolist()):
                self.cache.data["users"][self.user_tokens[u]] = [
                    [self.item_tokens[i], s] for i, s in zip(row, row_scores) if i > 0]
        self.cache.data["k"] = k
        return self.cache

    def _add(self, token, codes):
        internal = self.model.add_item(codes)
        self.item_tokens.append(token)
        self.item_ids[token] = internal
        return internal

    def add_item(self, token, embedding=None, text=None):
        """Give a new item codes (CF ``embedding``, else ``text``) and add it to the trie; returns its codes."""
        if token in self.item_ids:
            raise ConfigError(f"serve: item '{token}' is already in the catalogue")
        codes = self.model.codes_for(embedding=embedding, text=text)
        self._add(token, codes)
        self.cache.data["new_items"][token] = codes.tolist()
        return codes

    def item_embedding(self, token):
        """The CF embedding of a catalogue item (e.g. to add a look-alike new item)."""
        if str(token) not in self.item_ids or self.item_ids[str(token)] >= self.model.n_items:
            raise ConfigError(f"serve: unknown catalogue item '{token}'")
        return self.model.item_emb[self.item_ids[str(token)]]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recbole_llm.serve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("precompute", "refresh", "add-item"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--cache", required=True)
        p.add_argument("--k", type=int, default=None, help="items per user (default: the cache's, else 10)")
        p.add_argument("--users", nargs="*", default=None, help="user ids (default: all for precompute)")
        if name == "add-item":
            p.add_argument("--item", required=True, help="the new item's id")
            p.add_argument("--text", default=None, help="its text (an item without interactions)")
            p.add_argument("--like", default=None, help="use this catalogue item's CF embedding")
    p = sub.add_parser("lookup")
    p.add_argument("--cache", required=True)
    p.add_argument("--user", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "lookup":
            if not os.path.isfile(args.cache):
                raise ConfigError(f"--cache: no such file {args.cache}")
            try:
                rows = TopKCacheFile(args.cache).lookup(args.user)
            except KeyError:
                raise ConfigError(f"--user: no cached list for user '{args.user}' (run refresh --users)") from None
            for item, score in rows:
                print(f"{item}\t{score:.4f}")
            return 0
        server = TopKServer(args.checkpoint, args.cache)
        k = args.k or server.cache.data.get("k") or 10
        if args.command == "add-item":
            embedding = server.item_embedding(args.like) if args.like else None
            codes = server.add_item(args.item, embedding=embedding, text=args.text)
            print(f"item {args.item}: codes {codes.tolist()}")
            users = args.users or []
        else:
            users = args.users
            if args.command == "refresh" and not users:
                raise ConfigError("refresh: give --users")
        if args.command != "add-item" or users:
            server.precompute(users, k=k, show_progress=True)
        server.cache.save(args.cache)
    except ConfigError as e:
        print(f"recbole-llm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

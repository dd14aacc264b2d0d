"""ItemTrie: items as token sequences (titles, semantic-ID codes), for decoding that only emits real items.

Every item is a token sequence that ends with an end marker (``end_id``, the tokenizer's EOS): a title that is a
prefix of another title is still its own item, and a sequence that has ended allows only ``end_id`` again (so
the allowed set of a valid prefix is never empty). Two items with the same sequence raise a ``ConfigError``
naming both: the caller disambiguates (e.g. adds the year or the id to a title) - a decoder could not.

Two views of the same items:
- a dict trie for one prefix at a time: ``allowed(prefix)``, ``item(sequence)``, HF's ``prefix_allowed_tokens_fn``;
- tensors for batches: items sorted by token sequence, so the items under any prefix are a contiguous range
  ``[lo, hi)``. A batch of prefixes is walked with one ``searchsorted`` per position; the continuing tokens and
  the soft labels of TCA4Rec (softmax of CF scores over a subtree, summed per next token) are then a few gathers,
  a segment softmax and a scatter-add, with no Python loop over rows. ``add`` rebuilds the tensors lazily.
"""
import torch

from recbole_llm.errors import ConfigError


def _expand(start, count):
    """Flatten ranges ``[start[k], start[k] + count[k])``: (k, index) for every index of every range."""
    owner = torch.repeat_interleave(torch.arange(len(start), device=start.device), count)
    offset = torch.arange(len(owner), device=start.device) - (count.cumsum(0) - count)[owner]
    return owner, start[owner] + offset


class ItemTrie:
    """Items <-> token sequences.

    Args:
        sequences (dict): {item id (>= 1, RecBole's ids): token ids}; ``end_id`` is appended where it is not the
            last token.
        end_id (int): the end marker (EOS).
    """

    def __init__(self, sequences, end_id):
        self.end_id = int(end_id)
        self._root = {}
        self._sequences = {}  # item -> tuple of tokens, end included
        self._items = {}  # tuple of tokens -> item
        self._tensors = {}  # device -> compiled view
        self.max_token = -1
        for item, tokens in sequences.items():
            self.add(item, tokens)

    @classmethod
    def from_texts(cls, texts, tokenizer):
        """A trie over ``tokenizer(text)`` of each {item: text}, ending with the tokenizer's EOS."""
        items = list(texts)
        ids = tokenizer([texts[i] for i in items], add_special_tokens=False)["input_ids"]
        return cls(dict(zip(items, ids)), tokenizer.eos_token_id)

    def __len__(self):
        return len(self._sequences)

    def __contains__(self, item):
        return item in self._sequences

    @property
    def depth(self):
        """The longest sequence (end marker included): enough new tokens to decode any item."""
        return max(map(len, self._sequences.values()), default=0)

    def tokens(self, item):
        return list(self._sequences[item])

    def add(self, item, tokens):
        """Add a new item (e.g. a cold item whose codes were just computed)."""
        item = int(item)
        seq = tuple(int(t) for t in tokens)
        if not seq or seq[-1] != self.end_id:
            seq += (self.end_id,)
        if item < 1:
            raise ConfigError(f"item trie: item ids start at 1 (RecBole's item 0 is padding), got {item}")
        if item in self._sequences:
            raise ConfigError(f"item trie: item {item} is already in the trie")
        if len(seq) == 1:
            raise ConfigError(f"item trie: item {item} has an empty token sequence")
        if self.end_id in seq[:-1] or min(seq) < 0:
            raise ConfigError(f"item trie: item {item} has the end marker {self.end_id} or a negative id inside "
                              f"its tokens {list(seq)}")
        if seq in self._items:
            raise ConfigError(f"item trie: items {self._items[seq]} and {item} have the same token sequence "
                              f"{list(seq)}; make their texts or codes distinct")
        node = self._root
        for token in seq:
            node = node.setdefault(token, {})
        self._sequences[item] = seq
        self._items[seq] = item
        self.max_token = max(self.max_token, max(seq))
        self._tensors = {}

    def _node(self, prefix):
        node = self._root
        for i, token in enumerate(prefix):
            if not node and token == self.end_id:  # an ended sequence continues with the end marker only
                continue
            if token not in node:
                raise KeyError(f"item trie: prefix {list(prefix[:i + 1])} continues no item")
            node = node[token]
        return node

    def allowed(self, prefix):
        """Token ids that continue ``prefix`` towards an item (never empty; only ``end_id`` after an ended item)."""
        node = self._node([int(t) for t in prefix])
        return list(node) if node else [self.end_id]

    def item(self, sequence):
        """The item whose tokens are ``sequence`` (the end marker optional, padding with it ignored), or None."""
        seq = [int(t) for t in sequence]
        if self.end_id in seq:
            seq = seq[:seq.index(self.end_id)]
        return self._items.get(tuple(seq) + (self.end_id,))

    def prefix_allowed_tokens_fn(self, prompt_length):
        """HF ``generate``'s ``prefix_allowed_tokens_fn`` for prompts of ``prompt_length`` ids (0 with
        ``inputs_embeds``). Simple, but HF calls it once per beam per step: ``TrieLogitsProcessor`` is faster."""
        def allowed(batch_id, ids):
            try:
                return self.allowed(ids[prompt_length:].tolist())
            except KeyError:  # a beam HF keeps at -inf when fewer beams than num_beams are alive
                return [self.end_id]

        return allowed

    # ---- the vectorised view ----------------------------------------------------------------------------------

    def compiled(self, device="cpu"):
        """Tensors on ``device``: ``items`` (N,) sorted by sequence; ``codes`` (N, D+1) padded with ``end_id``;
        ``walk_keys`` and ``edge_*`` for searchsorted walks (see ``walk`` and ``next_token_mask``)."""
        device = torch.device(device)
        if device not in self._tensors:
            self._tensors[device] = {k: v.to(device) for k, v in self._compile().items()}
        return self._tensors[device]

    def _compile(self):
        if not self._sequences:
            raise ConfigError("item trie: no items")
        ordered = sorted(self._sequences.items(), key=lambda kv: kv[1])
        n, width = len(ordered), self.depth + 1  # one extra end column: ended sequences keep emitting end
        codes = torch.full((n, width), self.end_id, dtype=torch.long)
        for row, (_, seq) in enumerate(ordered):
            codes[row, :len(seq)] = torch.tensor(seq)
        arange = torch.arange(n)
        base = int(codes.max()) + 1
        walk_keys, edge_pos, edge_tokens = [], [], []
        start = torch.zeros(n, dtype=torch.long)  # first row of each row's node at depth d
        for d in range(width):
            # the node after d + 1 tokens starts where the first d + 1 tokens change
            new = torch.ones(n, dtype=torch.bool)
            new[1:] = (codes[1:, :d + 1] != codes[:-1, :d + 1]).any(1)
            walk_keys.append((d * n + start) * base + codes[:, d])
            edge_pos.append(d * n + arange[new])
            edge_tokens.append(codes[new, d])
            start = torch.cummax(torch.where(new, arange, 0), 0).values
        return {"items": torch.tensor([item for item, _ in ordered]), "codes": codes, "base": torch.tensor(base),
                "walk_keys": torch.cat(walk_keys), "edge_pos": torch.cat(edge_pos),
                "edge_tokens": torch.cat(edge_tokens)}

    def walk(self, prefixes):
        """Item ranges under each prefix of a batch.

        Args:
            prefixes (LongTensor): (B, L) token ids; negative ids (label padding) count as ``end_id``.

        Returns:
            (lo, hi): two (B, L + 1) LongTensors; column j is the range of sorted items under ``prefixes[:, :j]``
            (``compiled()["items"][lo:hi]``); ``lo == hi`` from the first token that continues no item on.
        """
        t = self.compiled(prefixes.device)
        n, width = t["codes"].shape
        prefixes = prefixes.masked_fill(prefixes < 0, self.end_id)
        lo = torch.zeros(len(prefixes), dtype=torch.long, device=prefixes.device)
        hi = torch.full_like(lo, n)
        los, his = [lo], [hi]
        for d in range(prefixes.shape[1]):
            token = prefixes[:, d]
            if d >= width:  # past the last column every sequence has ended: end_id loops on the same range
                lo = torch.where(token == self.end_id, lo, hi)
            else:
                ok = (token < t["base"]) & (hi > lo)
                key = (d * n + lo) * t["base"] + token.clamp(max=t["base"] - 1)
                new_lo = torch.searchsorted(t["walk_keys"], key) - d * n
                new_hi = torch.searchsorted(t["walk_keys"], key, right=True) - d * n
                lo, hi = torch.where(ok, new_lo, hi), torch.where(ok, new_hi, hi)
            los.append(lo)
            his.append(hi)
        return torch.stack(los, 1), torch.stack(his, 1)

    def continuations(self, prefixes, kept=None, rows=None):
        """The allowed next tokens of a batch of prefixes (B, L), sparse: (row, token) LongTensor pairs.

        A prefix that continues no item gets ``end_id`` only (a row is never empty).

        ``kept`` (from ``kept_counts``, (R, N + 1)) leaves items out: a token is allowed only if a kept item lies
        under it, so a beam never completes a left-out item nor enters a subtree of left-out items only. Prefix
        ``b`` uses row ``rows[b]`` of ``kept`` (default ``b``: e.g. ``arange(B) // num_beams`` for beams).
        """
        lo, hi = self.walk(prefixes)
        return self._continuations(lo[:, -1], hi[:, -1], torch.full_like(lo[:, -1], prefixes.shape[1]), kept, rows)

    def kept_counts(self, exclude):
        """Running counts of the items not in ``exclude`` (R, n bool indexed by item id, e.g. a user's seen
        items), in the trie's sorted order: (R, N + 1) int32, for ``continuations(..., kept=...)``. Ids beyond
        ``exclude``'s width (items added later) are kept."""
        t = self.compiled(exclude.device)
        items = t["items"]
        inside = items < exclude.shape[1]
        left_out = torch.zeros(len(exclude), len(items), dtype=torch.bool, device=exclude.device)
        left_out[:, inside] = exclude[:, items[inside]].bool()
        counts = torch.zeros(len(exclude), len(items) + 1, dtype=torch.int32, device=exclude.device)
        counts[:, 1:] = (~left_out).int().cumsum(1)
        return counts

    def _continuations(self, lo, hi, depth, kept=None, rows=None):
        """(node, token) pairs of flat nodes ``[lo, hi)`` at ``depth``: the first row of each child range; with
        ``kept``, only children with a kept item (a node left without one gets ``end_id``)."""
        t = self.compiled(lo.device)
        n, width = t["codes"].shape
        offset = depth.clamp(max=width - 1) * n
        first = torch.searchsorted(t["edge_pos"], offset + lo)
        count = torch.searchsorted(t["edge_pos"], offset + hi) - first
        node, edge = _expand(first, count)
        tokens = t["edge_tokens"][edge]
        if kept is not None:
            # child k of a node spans [its first row, the next child's first row or the node's end)
            start = t["edge_pos"][edge] - offset[node]
            last = edge + 1 == first[node] + count[node]
            following = t["edge_pos"][(edge + 1).clamp(max=len(t["edge_pos"]) - 1)] - offset[node]
            end = torch.where(last, hi[node], following)
            owner = node if rows is None else rows.to(node.device)[node]
            keep = kept[owner, end] > kept[owner, start]
            node, tokens = node[keep], tokens[keep]
            count = torch.zeros_like(count).index_add_(0, node, torch.ones_like(node))
        dead = torch.nonzero(count == 0).flatten()
        return torch.cat([node, dead]), torch.cat([tokens, torch.full_like(dead, self.end_id)])

    def next_token_mask(self, prefixes, vocab_size, every_position=False):
        """Tokens that continue each prefix towards an item: (B, vocab_size) bool after the whole prefix, or
        (B, L + 1, vocab_size) after each ``prefixes[:, :j]`` with ``every_position`` (TCA4Rec's masked loss).
        A prefix that continues no item allows ``end_id`` only (a row is never empty)."""
        if not every_position:
            mask = torch.zeros(len(prefixes), vocab_size, dtype=torch.bool, device=prefixes.device)
            mask[self.continuations(prefixes)] = True
            return mask
        lo, hi = self.walk(prefixes)
        depth = torch.arange(lo.shape[1], device=lo.device).expand_as(lo)
        mask = torch.zeros(lo.numel(), vocab_size, dtype=torch.bool, device=lo.device)
        mask[self._continuations(lo.reshape(-1), hi.reshape(-1), depth.reshape(-1))] = True
        return mask.view(*lo.shape, vocab_size)

    def soft_labels(self, prefixes, item_scores, vocab_size):
        """TCA4Rec's collaborative labels: for each prefix ``prefixes[:, :j]``, the softmax of ``item_scores`` over
        the items under it, summed onto the token each item emits next.

        Args:
            prefixes (LongTensor): (B, L) ground-truth item tokens (negative ids count as ``end_id``).
            item_scores (Tensor): (B, n_items) scores indexed by item id (e.g. a backbone's ``logits``); -inf
                leaves an item out (no mass), unless every item under the prefix is -inf (then they share it).
            vocab_size (int): the LLM's vocabulary size.

        Returns:
            FloatTensor: (B, L + 1, vocab_size); each row sums to 1 over tokens that continue a real item.
        """
        t = self.compiled(prefixes.device)
        codes = t["codes"]
        lo, hi = self.walk(prefixes)
        if (hi <= lo).any():
            raise ValueError("item trie: a prefix in soft_labels continues no item")
        batch, positions = lo.shape
        size = (hi - lo).reshape(-1)
        segment, row = _expand(lo.reshape(-1), size)
        scores = item_scores.float()[segment // positions, t["items"][row]]
        top = torch.full((size.numel(),), -torch.inf, device=lo.device).scatter_reduce(0, segment, scores, "amax")
        scored = torch.isfinite(top)[segment]  # a subtree of -inf scores only (masked items) is uniform
        weight = torch.where(scored, (scores - top[segment]).exp(), torch.ones_like(scores))
        total = torch.zeros(size.numel(), device=lo.device).index_add_(0, segment, weight)
        token = codes[row, (segment % positions).clamp(max=codes.shape[1] - 1)]
        labels = torch.zeros(size.numel(), vocab_size, device=lo.device)
        labels.index_put_((segment, token), weight / total[segment], accumulate=True)
        return labels.view(batch, positions, vocab_size)

    def items_of(self, sequences, missing=0):
        """(R,) item ids of generated token sequences (R, L) (anything after ``end_id`` ignored); ``missing`` for
        a sequence that is not a complete item."""
        t = self.compiled(sequences.device)
        ended = (sequences == self.end_id).long().cumsum(1) > 0
        lo, hi = self.walk(sequences.masked_fill(ended, self.end_id))
        complete = ended[:, -1] & (hi[:, -1] - lo[:, -1] == 1)
        return torch.where(complete, t["items"][lo[:, -1].clamp(max=len(t["items"]) - 1)], missing)


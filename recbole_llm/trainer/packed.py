"""Packed sequential training: all of a user's next-item targets in one forward pass.

RecBole's sequential training split holds one row per target (history -> next item). A generative LLM model
that writes each row as a prompt (instruction + the last ``history_len`` items) and an answer (the next item)
re-reads the history for every row: ~10 items of prompt per item of answer. Packed, a user's items are written
once, one after another, and every item after the first is a target:

    [instruction] x_s x_{s+1} ... x_b          each x_j: the item's tokens, ending with its end marker
                  '-- context --'  '-- targets x_a .. x_b: the loss is on their tokens --'

Items are token sequences of an ``ItemTrie`` (titles, semantic-ID codes) that end with the trie's end marker, so
that ``instruction + x_{k-L} ... x_{k-1}`` is exactly the row format's prompt for target x_k (``row_prompt``) and
x_k's tokens its answer. A user's targets are cut into chunks of at most ``chunk_items``; a chunk starts with the
``history_len`` items before its first target as context (no loss). Targets are RecBole's training rows, one per
row, so the packed format sees exactly the targets (and, through ``rows``, the teacher inputs) the rows do.

Attention (a 4D mask per chunk; position ids 0..T-1):
- ``window=False``: causal over the chunk. Target x_k then reads every item of the chunk before it (between
  ``history_len`` and ``history_len + chunk_items - 1`` items); its loss equals the row format's with that
  history, exactly (the tests check it in fp32).
- ``window=True`` (the paper's history window): a token that predicts item x_k's tokens (the end marker of
  x_{k-1} and x_k's own tokens but its last) sees the instruction, the items x_{k-L} .. x_{k-1} and x_k's
  tokens before it: the same tokens as the row format's prompt for x_k. The history items' states are shared by
  the targets that read them, so they saw their own windows: for a target whose window starts after the chunk's
  first item, the deeper layers differ from the row format's (and the instruction is further away); for the
  others the loss is the row format's exactly (tested).

    chunks = user_chunks(train_feat, names, chunk_items, history_len)     # once per dataset
    batch = collate_packed([pack(c, head, tokens, history_len, window) for c in some], pad_id)
    logits = packed_answer_logits(llm, batch)                              # (n_targets, L, V) like answer_logits
"""
from collections.abc import Sequence
from dataclasses import dataclass
from typing import List, NamedTuple

import numpy as np
import torch

from recbole_llm.errors import ConfigError

IGNORE = -100


@dataclass
class Chunk:
    """Items ``items`` (x_s .. x_b, RecBole ids) of one user; targets ``items[first:]``, RecBole's training rows
    ``rows`` (one per target, in order)."""

    user: int
    items: List[int]
    first: int
    rows: List[int]


def user_sequences(feat, uid_field, item_field, seq_field, len_field):
    """``{user: (items x_0 .. x_n, rows r_1 .. r_n)}`` from RecBole's sequential training rows.

    A user's rows are in time order (RecBole builds them so); row r_k has target x_k and history x_0 .. x_{k-1}
    (its last ``MAX_ITEM_LIST_LENGTH``). Checked: every row's history is the end of the items before its target.
    """
    users = feat[uid_field].numpy()
    targets = feat[item_field].numpy()
    seqs, lens = feat[seq_field].numpy(), feat[len_field].numpy()
    out = {}
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds):
        if not len(rows):
            continue
        first = rows[0]
        if lens[first] != 1:  # the user's first training row has one item of history (a data filter can cut it)
            items = list(seqs[first][:lens[first]])
        else:
            items = [int(seqs[first][0])]
        start = len(items) - 1
        items += [int(t) for t in targets[rows]]
        for k, row in enumerate(rows):
            n = lens[row]
            end = start + k + 1
            if end - n < 0 or list(seqs[row][:n]) != items[end - n:end]:
                raise ConfigError(f"packed training: user {users[row]}'s training rows are not one sequence in "
                                  f"time order (row {row}); use train_format: rows")
        out[int(users[first])] = ([int(i) for i in items], [int(r) for r in rows], start)
    return out


def user_chunks(feat, uid_field, item_field, seq_field, len_field, chunk_items, history_len, rows_per_user=None):
    """Every user's targets in chunks of at most ``chunk_items``, each with the ``history_len`` items before its
    first target as context. ``rows_per_user``: only each user's last n targets (None: all)."""
    chunks = []
    for user, (items, rows, start) in user_sequences(feat, uid_field, item_field, seq_field, len_field).items():
        first_target = start + 1  # index in items of the first target (x_1 when the history starts at x_0)
        if rows_per_user is not None:
            skip = max(0, len(rows) - rows_per_user)
            rows, first_target = rows[skip:], first_target + skip
        for a in range(0, len(rows), chunk_items):
            k = first_target + a  # the chunk's first target
            s = max(0, k - history_len)
            b = k + min(chunk_items, len(rows) - a)  # one past its last target
            chunks.append(Chunk(user, items[s:b], k - s, rows[a:a + chunk_items]))
    return chunks


class Packed(NamedTuple):
    """One chunk laid out: token ids, the (T, T) boolean attention mask, and each target's token span."""

    ids: List[int]
    mask: torch.Tensor
    spans: List[tuple]  # (start, length) of each target's tokens
    rows: List[int]


def pack(chunk, head, item_tokens, history_len, window):
    """Lay out ``chunk``: ``head`` (instruction ids) then each item's ``item_tokens(item)`` (end marker included).

    ``window``: see the module docstring. The mask allows query i to read key j (j <= i)."""
    ids, owner = list(head), [-1] * len(head)  # owner: the item a token belongs to (-1: the instruction)
    starts, lengths = [], []
    for j, item in enumerate(chunk.items):
        tokens = item_tokens(item)
        starts.append(len(ids))
        lengths.append(len(tokens))
        ids += tokens
        owner += [j] * len(tokens)
    length = len(ids)
    owner = torch.tensor(owner)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if window:
        # the item a token predicts: its own item, or the next one for an item's last token (its end marker)
        predicts = owner.clone()
        last = torch.tensor([s - 1 for s in starts[1:]] + [length - 1])
        predicts[last] += 1
        predicts[:len(head)] = -1  # the instruction reads only itself
        key = owner.view(1, -1)
        query = predicts.view(-1, 1)
        # keys: the instruction, the L items before the predicted one, and the predicted item's own tokens
        allowed = (key == -1) | ((key >= query - history_len) & (key <= query))
        causal &= allowed
    spans = list(zip(starts, lengths))[chunk.first:]
    return Packed(ids, causal, spans, list(chunk.rows))


class PackedBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T), right-padded
    attention: torch.Tensor  # (B, 1, T, T) bool
    position_ids: torch.Tensor  # (B, T)
    index: torch.Tensor  # (n, L): flat position (b * T + t) of the state predicting target token l
    targets: torch.Tensor  # (n, L): target token ids, -100 past a target's end
    rows: torch.Tensor  # (n,): RecBole's training row of each target

    def to(self, device):
        return PackedBatch(*(t.to(device) for t in self))

    def __len__(self):
        return len(self.rows)


def collate_packed(packed, pad_id):
    """Batch laid-out chunks (right padding; a padding token reads itself only)."""
    width = max(len(p.ids) for p in packed)
    n_rows = len(packed)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention = torch.eye(width, dtype=torch.bool).repeat(n_rows, 1, 1, 1)
    answer_width = max(length for p in packed for _, length in p.spans)
    index, targets, rows = [], [], []
    for b, p in enumerate(packed):
        input_ids[b, :len(p.ids)] = torch.tensor(p.ids)
        attention[b, 0, :len(p.ids), :len(p.ids)] = p.mask
        for (start, length), row in zip(p.spans, p.rows):
            # token t of the target sits at start + t; the state before it predicts it
            positions = [b * width + start - 1 + t for t in range(length)]
            index.append(positions + [positions[-1]] * (answer_width - length))
            targets.append(p.ids[start:start + length] + [IGNORE] * (answer_width - length))
            rows.append(row)
    positions = torch.arange(width).repeat(n_rows, 1)
    return PackedBatch(input_ids, attention, positions, torch.tensor(index), torch.tensor(targets),
                       torch.tensor(rows))


def batch_chunks(chunks, batch_targets, seed):
    """Chunks shuffled (``seed``), then grouped so that a batch holds at most ``batch_targets`` targets (or one
    chunk that has more): lists of chunk indices."""
    order = np.random.default_rng(seed).permutation(len(chunks))
    batches, current, count = [], [], 0
    for i in order:
        n = len(chunks[i].rows)
        if current and count + n > batch_targets:
            batches.append(current)
            current, count = [], 0
        current.append(int(i))
        count += n
    if current:
        batches.append(current)
    return batches


class PackedBatches(Sequence):
    """An epoch's batches, laid out when taken (a chunk's mask is T x T): ``build(group)`` makes the batch of a
    group of chunk indices. Slices stay lazy (the trainer's sharding slices the list across ranks)."""

    def __init__(self, groups, build):
        self.groups, self.build = groups, build

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PackedBatches(self.groups[i], self.build)
        return self.build(self.groups[i])


def packed_answer_logits(llm, batch):
    """Vocabulary logits (n, L, V): ``logits[i, t]`` predicts target i's token t (``batch.targets[i, t]``); the LM
    head runs on the target positions only."""
    from recbole_llm.llm.inputs import decoder, input_embedding

    embeds = input_embedding(llm)(batch.input_ids)
    hidden = decoder(llm)(inputs_embeds=embeds, attention_mask=batch.attention, position_ids=batch.position_ids,
                          use_cache=False).last_hidden_state
    flat = hidden.flatten(0, 1)
    return llm.get_output_embeddings()(flat[batch.index])

"""Token-level collaborative alignment (TCA4Rec): soft next-token labels from a CF model, for any generative
recommender whose items are token sequences in an ``ItemTrie`` (titles, semantic-ID codes).

    loss = SoftLabelLoss(trie, alpha=0.1, kind="mixture")       # plug-and-play: a model switches it on
    value = loss(logits, targets, cf_scores)                    # in place of its next-token cross-entropy
    value = loss(logits, targets, cf_scores, rows)              # soft labels on some rows only (one-hot elsewhere)

``logits``: e.g. ``scoring.answer_logits`` over (prompt, answer) pairs; ``targets``: ``answer_targets(answers)``.

At target position t of an item's token sequence (ground-truth prefix y_<t):
  P_cf,t(v)  the softmax of the CF scores over the items under y_<t, summed per next token v
             (``ItemTrie.soft_labels``: one vectorised walk, a segment softmax and a scatter-add for the batch)
  q_t        (1 - alpha) onehot(y_t) + alpha P_cf,t
  mixture    -log sum_v q_t[v] p_t[v]     (the authors' code)
  soft_ce    -sum_v q_t[v] log p_t[v]     (the paper's formula)
with p_t = softmax(z_t / temperature), the logits of tokens that continue no item set to -inf first when
``masked`` (MSL). ``alpha = 0`` is plain next-token prediction, exactly.

``soft_labels_loop`` builds the same labels the way the reference code does (Python, per row and position): the
baseline of ``bench/tca4rec.py`` and the tests, not for training.
"""
import torch
import torch.nn.functional as F
from torch import nn

from recbole_llm.errors import ConfigError

IGNORE = -100  # target padding (HF's and PyTorch's ignore_index)
LOSSES = ("mixture", "soft_ce")


class SoftLabelLoss(nn.Module):
    """Soft-label next-token loss over item token sequences.

    Args:
        trie (ItemTrie): the items' token sequences (each ends with ``trie.end_id``).
        alpha (float): weight of the CF label, in [0, 1].
        kind (str): ``mixture`` or ``soft_ce``.
        temperature (float): logits are divided by it before the softmax.
        masked (bool): masked softmax over the trie's children (MSL).
        prefix (str): the prefix of the model's option names, for error lines (``tca_`` = ``tca_alpha``, ...).
    """

    def __init__(self, trie, alpha=0.1, kind="mixture", temperature=1.0, masked=False, prefix=""):
        super().__init__()
        if kind not in LOSSES:
            raise ConfigError(f"tca_loss: unknown '{kind}' (choose from {', '.join(LOSSES)})")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"{prefix}alpha: must be in [0, 1], got {alpha}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError(f"{prefix}temperature: must be a positive number, got {temperature!r}")
        self.trie, self.alpha, self.kind = trie, float(alpha), kind
        self.temperature, self.masked = float(temperature), bool(masked)

    def log_probs(self, logits, targets):
        """log p_t (B, L, V) in fp32: temperature, and with MSL -inf on tokens that continue no item."""
        logits = logits.float() / self.temperature
        if self.masked:
            allowed = self.trie.next_token_mask(targets, logits.shape[-1], every_position=True)[:, :-1]
            logits = logits.masked_fill(~allowed, -torch.inf)
        return F.log_softmax(logits, dim=-1)

    def labels(self, targets, cf_scores, vocab_size):
        """q_t (B, L, V): (1 - alpha) onehot(y_t) + alpha P_cf,t."""
        onehot = F.one_hot(targets.clamp(min=0), vocab_size).float()
        if self.alpha == 0:
            return onehot
        p_cf = self.trie.soft_labels(targets, cf_scores, vocab_size)[:, :-1]  # prefix y_<t for t = 0..L-1
        return (1 - self.alpha) * onehot + self.alpha * p_cf

    def forward(self, logits, targets, cf_scores=None, rows=None):
        """Mean loss over target tokens.

        Args:
            logits (Tensor): (B, L, V); ``logits[:, t]`` predicts ``targets[:, t]``.
            targets (LongTensor): (B, L) item token sequences (end marker included), padded with -100.
            cf_scores (Tensor): (B, n_items) CF scores indexed by item id (needed when alpha > 0).
            rows (BoolTensor): (B,) the rows that take the soft label (default: all); the others are one-hot.
        """
        if self.alpha > 0 and cf_scores is None:
            raise ValueError("SoftLabelLoss: alpha > 0 needs CF scores")
        logp = self.log_probs(logits, targets)
        keep = targets != IGNORE
        if self.alpha == 0:  # plain next-token prediction
            return -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
        q = self.labels(targets, cf_scores, logp.shape[-1])
        if rows is not None:
            q = torch.where(rows.view(-1, 1, 1), q, F.one_hot(targets.clamp(min=0), logp.shape[-1]).float())
        if self.kind == "mixture":
            per_token = -torch.logsumexp(logp + q.log(), dim=-1)  # -log sum_v q_v p_v
        else:
            per_token = -torch.where(q > 0, q * logp, torch.zeros_like(logp)).sum(-1)  # -sum_v q_v log p_v
        return per_token[keep].mean()


def answer_targets(answers):
    """(B, L) targets from token id lists (each an item's tokens + end marker), right-padded with -100."""
    targets = torch.full((len(answers), max(map(len, answers))), IGNORE, dtype=torch.long)
    for row, tokens in enumerate(answers):
        targets[row, :len(tokens)] = torch.tensor(tokens)
    return targets


def subtree_table(trie):
    """{prefix: [(item, the token it emits next)]} of every item under every proper prefix (for the loop)."""
    subtree = {}
    for item in trie._sequences:
        seq = trie.tokens(item)
        for t in range(len(seq)):
            subtree.setdefault(tuple(seq[:t]), []).append((item, seq[t]))
    return subtree


def soft_labels_loop(trie, targets, cf_scores, vocab_size, subtree=None):
    """P_cf (B, L + 1, V) built like the reference code: a Python loop over rows and positions, one subtree
    lookup each (``subtree``: ``subtree_table(trie)``, built once). Agrees with ``ItemTrie.soft_labels``."""
    subtree = subtree or subtree_table(trie)
    end = trie.end_id
    labels = torch.zeros(targets.shape[0], targets.shape[1] + 1, vocab_size)
    for b, row in enumerate(targets.tolist()):
        row = [end if tok < 0 else tok for tok in row]
        if end in row:
            row = row[:row.index(end) + 1]
        for t in range(targets.shape[1] + 1):
            prefix = tuple(row[:t])
            if prefix and prefix[-1] == end:  # an ended sequence continues with the end marker only
                labels[b, t, end] = 1.0
                continue
            items, tokens = zip(*subtree[prefix])
            weight = torch.softmax(cf_scores[b, list(items)].float().cpu(), 0)
            labels[b, t].index_add_(0, torch.tensor(tokens), weight)
    return labels

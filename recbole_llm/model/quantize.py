"""Residual codebooks: items -> N discrete codes (semantic IDs), shared by the models that tokenize items.

``ResidualQuantizer`` holds N cascaded codebooks of C codes each (coarse to fine). Level 0 quantizes the input
vector, level n the residual left by level n-1 (``E^n = E^{n-1} - B^{n-1}_{c*}``); each level picks its nearest
code under a distance (``cosine`` or ``l2``). With ``encoder_decoder`` the input first goes through an MLP encoder
and a decoder reconstructs it from the sum of the chosen codes (RQ-VAE, Rajput et al. 2023).

Helpers: ``kmeans`` (each level's initialisation), ``collision_rate`` and ``resolve_collisions`` (a unique code
sequence per item, deterministically; new items are placed among the taken sequences the same way).
"""
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llm.errors import ConfigError

DISTANCES = ("cosine", "l2")


def pairwise_distance(x, codes, distance):
    """(B, C) distances of each row of ``x`` (B, d) to each code (C, d)."""
    if distance == "cosine":
        return 1 - F.normalize(x, dim=-1) @ F.normalize(codes, dim=-1).T
    return torch.cdist(x, codes).pow(2)


def paired_distance(a, b, distance):
    """(B,) distance of row i of ``a`` to row i of ``b``."""
    if distance == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1)
    return (a - b).pow(2).sum(-1)


@torch.no_grad()
def kmeans(x, k, iters=20, distance="l2", seed=0):
    """(k, d) centres of ``x`` (n, d): k-means++-free Lloyd iterations from k distinct random rows (rows are
    repeated when n < k). Empty clusters keep their previous centre. Deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    n = len(x)
    start = torch.randperm(n, generator=generator)
    if n < k:
        start = start.repeat((k + n - 1) // n)
    centres = x[start[:k]].clone()
    for _ in range(iters):
        assign = pairwise_distance(x, centres, distance).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


class ResidualQuantizer(nn.Module):
    """N levels of C codes in d dimensions (eqs. 1-2 of AlignTokenRec; RQ-VAE with ``encoder_decoder``).

    Args:
        dim (int): width of the input vectors and of the codes.
        levels (int): N, the codes per item.
        codes (int): C, the codes per level.
        distance (str): ``cosine`` or ``l2``, for the nearest code and the losses.
        encoder_decoder (bool): an MLP encoder before and a decoder after the codebooks (RQ-VAE).
    """

    def __init__(self, dim, levels=4, codes=256, distance="cosine", encoder_decoder=False):
        super().__init__()
        if distance not in DISTANCES:
            raise ConfigError(f"codebook_distance: unknown '{distance}' (choose from {', '.join(DISTANCES)})")
        self.levels, self.codes, self.distance = levels, codes, distance
        self.codebooks = nn.Parameter(torch.zeros(levels, codes, dim))
        self.encoder = self.decoder = None
        if encoder_decoder:
            self.encoder = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
            self.decoder = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def encode(self, x):
        return x if self.encoder is None else self.encoder(x)

    @torch.no_grad()
    def init_kmeans(self, x, iters=20, seed=0):
        """Each level's codes: k-means centres of that level's input (the residual of the level above)."""
        residual = self.encode(x)
        for n in range(self.levels):
            self.codebooks[n] = kmeans(residual, self.codes, iters, self.distance, seed + n)
            chosen = self.codebooks[n][pairwise_distance(residual, self.codebooks[n], self.distance).argmin(1)]
            residual = residual - chosen

    def forward(self, x):
        """Quantize ``x`` (B, d).

        Returns:
            codes (B, N) LongTensor: c* per level (eq. 2);
            inputs (B, N, d): E^n, each level's input (eq. 1), detached from the codes above;
            chosen (B, N, d): B^n_{c*}, the chosen code vectors (with gradients to the codebooks);
            distances (B, C): distances of the last level's input to every last-level code (collision handling).
        """
        residual = self.encode(x)
        codes, inputs, chosen = [], [], []
        for n in range(self.levels):
            dist = pairwise_distance(residual.detach(), self.codebooks[n], self.distance)
            c = dist.argmin(1)
            codes.append(c)
            inputs.append(residual)
            chosen.append(self.codebooks[n][c])
            residual = residual - chosen[-1].detach()
        return torch.stack(codes, 1), torch.stack(inputs, 1), torch.stack(chosen, 1), dist

    def decode(self, chosen):
        """Reconstruction from the chosen codes (B, N, d), straight-through to the encoder (RQ-VAE only)."""
        return self.decoder(chosen.sum(1))


def collision_rate(codes):
    """Share of items whose code sequence some other item also has (Table 5's CR)."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean()) if len(codes) else 0.0


def resolve_collisions(codes, distances, first_free_from=0):
    """A unique code sequence per item, deterministically.

    Items sharing a sequence: the one closest to its last-level code keeps it (ties: the lower row); each other
    moves to its nearest last-level code not used under the same first N-1 codes. Rows before ``first_free_from``
    are fixed (items already in a catalogue) and are never moved.

    Args:
        codes (LongTensor): (n, N) codes from ``ResidualQuantizer``.
        distances (Tensor): (n, C) distances of each row's last-level input to every last-level code.

    Returns:
        LongTensor (n, N): unique sequences; only last-level codes of colliding rows change.
    """
    codes = codes.clone()
    taken = set()
    used = defaultdict(set)  # first N-1 codes -> last-level codes in use
    own = distances.gather(1, codes[:, -1:]).squeeze(1)
    order = list(range(first_free_from)) + sorted(range(first_free_from, len(codes)),
                                                  key=lambda r: (float(own[r]), r))
    losers = []
    for row in order:
        seq = tuple(codes[row].tolist())
        if seq in taken:
            if row < first_free_from:
                raise ConfigError(f"codes: catalogue items share the code sequence {list(seq)}")
            losers.append(row)
            continue
        taken.add(seq)
        used[seq[:-1]].add(seq[-1])
    for row in losers:
        prefix = tuple(codes[row, :-1].tolist())
        for c in distances[row].argsort().tolist():
            if c not in used[prefix]:
                codes[row, -1] = c
                used[prefix].add(c)
                break
        else:
            raise ConfigError(f"codes: all {distances.shape[1]} last-level codes under {list(prefix)} are taken; "
                              "raise codebook_size or codebook_levels")
    return codes

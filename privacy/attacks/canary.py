"""Privacy auditing in one run: random canaries, guesses from scores, an epsilon lower bound."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ddcore.data import Dataset
from privacy.attacks.canary_bound import epsilon_lower_bound, max_certifiable_epsilon
from privacy.attacks.membership import per_sample_loss
from privacy.attacks.nearest import nearest_l2
from privacy.errors import AuditError

__all__ = [
    "CANARY_KINDS", "Canaries", "CanaryAuditResult", "canary_audit", "default_guess_grid", "distance_scores",
    "epsilon_lower_bound", "guess", "insert_canaries", "loss_scores", "make_canaries",
    "max_certifiable_epsilon",
]

CANARY_KINDS = ("mislabeled", "inverted", "noise")
GUESS_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 0.5)  # k+ as a fraction of m, see default_guess_grid


@dataclass(frozen=True)
class Canaries:
    """``m`` canaries, each included in the training data independently with probability 1/2.

    ``data`` holds all of them (normalised like the source); ``included`` (m,) bool says which
    were inserted. The audit scores all m and guesses which were in.
    """

    data: Dataset
    included: torch.Tensor
    kind: str

    def __len__(self) -> int:
        return len(self.data)

    @property
    def included_index(self) -> torch.Tensor:
        """Indices (into ``data``) of the inserted canaries."""
        return self.included.nonzero().flatten()

    def inserted(self, client: int = 0, num_clients: int = 1) -> Dataset:
        """The included canaries that go into client ``client``'s data (of ``num_clients``).

        Canary i belongs to client ``i mod num_clients``, so each canary is in at most one
        client's data and the clients' shares differ by at most one; one client gets them all.
        """
        if not 0 <= client < num_clients:
            raise AuditError(f"client {client} is outside 0..{num_clients - 1}")
        owner = torch.arange(len(self)) % num_clients == client
        return self.data.subset((self.included & owner).nonzero().flatten())


def make_canaries(source: Dataset, m: int, *, kind: str = "mislabeled", seed: int) -> Canaries:
    """``m`` canaries that a run which saw them should recognise, each included with probability 1/2.

    ``mislabeled``: ``m`` distinct images of ``source`` with a uniformly random *other* label;
    ``inverted``: the same, pixels inverted (``1 - x``, out of distribution); ``noise``:
    uniform-noise images with a uniformly random label. Take ``source`` from data no client
    trains on (a held-out split) and keep the chosen images out of the evaluation set.
    """
    if m < 1:
        raise AuditError(f"need at least one canary, got m = {m}; e.g. m = 1000")
    if kind not in CANARY_KINDS:
        raise AuditError(f"unknown canary kind {kind!r}; known kinds: {', '.join(CANARY_KINDS)}")
    if source.num_classes < 2:
        raise AuditError("canaries need at least 2 classes to be given a wrong label")
    g = torch.Generator().manual_seed(seed)
    k = source.num_classes
    if kind == "noise":
        pixels = torch.rand((m, *source.image_shape), generator=g)  # (m, C, H, W) in [0, 1)
        x, y = _normalise(pixels, source), torch.randint(0, k, (m,), generator=g)
    else:
        if m > len(source):
            raise AuditError(f"{m} {kind} canaries need {m} source images, the source has {len(source)}; "
                             f"use a larger held-out split or fewer canaries")
        idx = torch.randperm(len(source), generator=g)[:m]
        x = source.x[idx].clone()
        y = (source.y[idx] + torch.randint(1, k, (m,), generator=g)) % k  # never the true label
        if kind == "inverted":
            x = _normalise(1.0 - source.denormalise(x).clamp(0, 1), source)
    included = torch.rand(m, generator=g) < 0.5
    data = Dataset(x.float(), y.long(), k, source.mean, source.std, f"{source.name}-canaries-{kind}")
    return Canaries(data, included, kind)


def _normalise(pixels: torch.Tensor, like: Dataset) -> torch.Tensor:
    mean = torch.tensor(like.mean).view(1, -1, 1, 1)
    std = torch.tensor(like.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def insert_canaries(data: Dataset, canaries: Canaries, client: int = 0, num_clients: int = 1) -> Dataset:
    """``data`` with the included canaries of ``client`` appended (same classes and normalisation)."""
    if data.image_shape != canaries.data.image_shape or data.num_classes != canaries.data.num_classes:
        raise AuditError(f"canaries of shape {canaries.data.image_shape} and {canaries.data.num_classes} "
                         f"classes cannot go into data of shape {data.image_shape} and {data.num_classes} "
                         f"classes; make them from a split of the same dataset")
    extra = canaries.inserted(client, num_clients)
    return Dataset(torch.cat([data.x, extra.x]), torch.cat([data.y, extra.y]), data.num_classes,
                   data.mean, data.std, data.name)


def loss_scores(model: nn.Module, canaries: Canaries, batch_size: int = 512) -> torch.Tensor:
    """A model's score of each canary: minus its cross-entropy (higher = more likely included), (m,)."""
    return -per_sample_loss(model, canaries.data, batch_size)


def distance_scores(canaries: Canaries, synthetic: torch.Tensor) -> torch.Tensor:
    """A summary's score of each canary: minus the L2 distance to its nearest synthetic image, (m,).

    Distances are in normalised pixel space; ``synthetic`` must be normalised like the canaries.
    """
    if len(synthetic) == 0:
        raise AuditError("distance scores need at least one synthetic image")
    distance, _ = nearest_l2(canaries.data.x, synthetic.detach().float())
    return -distance


def guess(scores: torch.Tensor, k_plus: int, k_minus: int, generator: torch.Generator) -> torch.Tensor:
    """+1 ("in") for the ``k_plus`` highest scores, -1 ("out") for the ``k_minus`` lowest, 0 else.

    Ties are broken uniformly at random (``generator``), never by canary index.
    """
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise AuditError(f"need k+ >= 0, k- >= 0 and k+ + k- <= m; got k+ = {k_plus}, k- = {k_minus}, "
                         f"m = {m}; guess on at most the m canaries")
    shuffle = torch.randperm(m, generator=generator)
    order = shuffle[torch.argsort(scores[shuffle], descending=True, stable=True)]  # best first
    out = torch.zeros(m, dtype=torch.int8)
    out[order[:k_plus]] = 1
    out[order[m - k_minus:]] = -1  # empty when k_minus = 0
    return out


def default_guess_grid(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs tried by default: k+ = ceil(f m) for f in 1%, 3%, 10%, 30%, 50%, with k- = 0 or k+."""
    pairs = []
    for f in GUESS_FRACTIONS:
        k = min(math.ceil(f * m), m // 2) or min(1, m)
        for pair in ((k, 0), (k, k)):
            if sum(pair) <= m and pair not in pairs:
                pairs.append(pair)
    return pairs


@dataclass(frozen=True)
class CanaryAuditResult:
    """An epsilon lower bound at confidence ``1 - beta``, from the best of ``grid_size`` guess rules."""

    eps_lower_bound: float
    guesses: int  # r = k_plus + k_minus of the best rule
    correct: int  # v
    m: int
    k_plus: int
    k_minus: int
    beta: float
    delta: float
    max_certifiable: float  # the bound if every guess of the largest rule were right
    grid_size: int  # rules tried; each was tested at beta / grid_size (Bonferroni)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def canary_audit(scores: torch.Tensor, included: torch.Tensor, *, delta: float, beta: float = 0.05,
                 guesses: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> CanaryAuditResult:
    """Steinke et al.'s one-run audit: guess from ``scores``, count the right guesses, bound epsilon.

    For each (k+, k-) rule of ``guesses`` (default :func:`default_guess_grid`) the canaries
    are guessed with :func:`guess`, the right guesses counted and turned into a lower bound by
    :func:`epsilon_lower_bound` at confidence ``1 - beta / len(guesses)``; the largest bound is
    reported. The Bonferroni split makes the best of the rules hold at confidence ``1 - beta``
    (a union bound over the rules); pass one rule to test at ``beta`` itself.
    """
    scores, included = scores.detach().flatten().double(), included.flatten().bool()
    m = len(scores)
    if m < 1 or len(included) != m:
        raise AuditError(f"need one score per canary and at least one canary; got {m} scores for "
                         f"{len(included)} canaries")
    if not torch.isfinite(scores).all():
        raise AuditError("canary scores must be finite; score with minus a loss or a distance")
    rules = list(guesses) if guesses is not None else default_guess_grid(m)
    if not rules:
        raise AuditError("no guess rule given; pass (k+, k-) pairs or leave guesses as None")
    if not 0.0 < beta < 1.0:
        raise AuditError(f"beta (1 - confidence) must be in (0, 1), got {beta}; e.g. 0.05 for 95% confidence")
    shared = beta / len(rules)
    best = (-1.0, 0, 0, 0)  # (bound, k+, k-, right guesses)
    for k_plus, k_minus in rules:
        t = guess(scores, k_plus, k_minus, torch.Generator().manual_seed(seed))  # same tie-breaks
        right = int(((t == 1) & included).sum() + ((t == -1) & ~included).sum())
        eps = epsilon_lower_bound(m, k_plus + k_minus, right, delta=delta, beta=shared)
        best = max(best, (eps, k_plus, k_minus, right), key=lambda b: b[0])
    eps, k_plus, k_minus, right = best
    top = max(max_certifiable_epsilon(m, kp + km, delta, shared) for kp, km in rules)
    return CanaryAuditResult(eps, k_plus + k_minus, right, m, k_plus, k_minus, beta, delta, top, len(rules))

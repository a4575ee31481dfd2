"""The server-view audit of a finished system: attack exactly what the clients sent.

The threat model is an honest-but-curious server (and anyone who reads what it stores). Each
system sends something else (:class:`Received`), and each gets its attack from
:mod:`privacy.attacks.server_view`:

- images (distilled summaries, random real images, collaborative and iterative rounds): near-copies
  of private records and the nearest-image membership attack, every private record a member;
- statistics releases: the tracing attack on each client's release and on their sum;
- weights (FedAvg and its kin): the loss-change attack on each client's update (the first and the
  last round the server kept).

Per-client attacks compare a client's records with held-out records of the same classes in the
same numbers (:func:`matched`): otherwise they would detect the client's label mix, not membership.

The headline of every system is ``tpr_at_0.1pct_fpr`` of its strongest attack on what the server
saw (for releases and updates: the most exposed client), beside ``near_copy_fraction`` for images.
Under DP every attack's ROC is checked against ``e^eps FPR + delta``
(:func:`privacy.attacks.server_view.dp_bound_check`, with the client's epsilon).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ddcore.data import Dataset, DataSplits
from ddcore.models import build_model, model_factory
from ddcore.partition import partition_indices
from ddcore.runconfig import RunConfig
from privacy.attacks.canary import Canaries
from privacy.attacks.memorisation import near_copy_threshold, save_closest_pairs
from privacy.attacks.server_view import (
    class_reference,
    dp_bound_check,
    image_view,
    membership_summary,
    nearest_scores,
    tracing_scores,
    update_scores,
)
from privacy.class_release import ClassStatistics, record_features
from privacy.errors import AuditError
from privacy.received import Received, State


def client_records(cfg: RunConfig, splits: DataSplits) -> dict[int, Dataset]:
    """Client id -> its private records (the run's partition of the training split; canaries aside)."""
    parts = partition_indices(splits.train.y.numpy(), cfg.partition)
    return {cid: splits.train.subset(part) for cid, part in enumerate(parts)}


def matched(members: Dataset, nonmembers: Dataset, n: int,
            generator: torch.Generator) -> tuple[Dataset, Dataset]:
    """At most ``n`` members and as many non-members with the *same* number of records of every class.

    A client's records follow its own label distribution (Dirichlet, two classes per client), the
    held-out records the population's. An update trained on a client's classes lowers the loss of
    every record of those classes, member or not; compared with an unmatched non-member set, an
    attack would detect the client's class mix - a property of its data set that record-level DP
    does not hide - and read it as membership. Matching the classes leaves membership as the only
    difference. Classes are filled in proportion to the client's counts, capped by the held-out ones.
    """
    counts_in = torch.bincount(members.y, minlength=members.num_classes)
    counts_out = torch.bincount(nonmembers.y, minlength=members.num_classes)
    take = torch.minimum(counts_in, counts_out)
    if int(take.sum()) > n:  # scale down, keeping the client's proportions
        take = torch.floor(take.double() * n / float(take.sum())).long()
    pick_in, pick_out = [], []
    for c in range(members.num_classes):
        k = int(take[c])
        if k == 0:
            continue
        rows_in, rows_out = (members.y == c).nonzero().flatten(), (nonmembers.y == c).nonzero().flatten()
        pick_in.append(rows_in[torch.randperm(len(rows_in), generator=generator)[:k]])
        pick_out.append(rows_out[torch.randperm(len(rows_out), generator=generator)[:k]])
    if not pick_in:
        raise AuditError(f"{members.name}: no class it holds has a held-out record to compare with")
    return members.subset(torch.cat(pick_in)), nonmembers.subset(torch.cat(pick_out))


def heldout_halves(heldout: Dataset, generator: torch.Generator) -> tuple[Dataset, Dataset]:
    """A seeded split of the held-out records into a reference half and a non-member half."""
    order = torch.randperm(len(heldout), generator=generator)
    half = len(heldout) // 2
    return heldout.subset(order[:half]), heldout.subset(order[half:])


def _bound(member: torch.Tensor, nonmember: torch.Tensor, epsilon: float | None, delta: float) -> dict | None:
    if epsilon is None:
        return None
    return dp_bound_check(member, nonmember, epsilon=epsilon, delta=delta)


def _headline(rows: list[dict]) -> dict:
    """The most exposed row (highest TPR at 0.1% FPR, then AUC)."""
    return max(rows, key=lambda r: (r["tpr_at_0.1pct_fpr"], r["auc"]))


class StatisticsView:
    """The bank of a statistics run, the reference class means, and features of any records."""

    def __init__(self, cfg: RunConfig, splits: DataSplits, reference: Dataset) -> None:
        from privacy.statistics import bank_of

        spec = splits.train
        factory = model_factory(cfg.distill.model, spec.image_shape, spec.num_classes, "cpu")
        self.bank = bank_of(factory, cfg.distill, spec.image_shape)
        self.num_classes = spec.num_classes
        self.reference = class_reference(self.features(reference), reference.y, self.num_classes)

    def features(self, data: Dataset, batch_size: int = 256) -> torch.Tensor:
        """phi of every record of ``data`` in the public normalisation, as the clients embed it."""
        from privacy.statistics import public_view

        public = public_view(data)
        with torch.no_grad():
            return torch.cat([record_features(self.bank, public.x[i:i + batch_size])
                              for i in range(0, len(public), batch_size)])

    def scores(self, data: Dataset, release: ClassStatistics) -> torch.Tensor:
        return tracing_scores(self.features(data), data.y, release.means(), self.reference)


def statistics_view(cfg: RunConfig, received: Received, splits: DataSplits, *, samples: int,
                    generator: torch.Generator, epsilons: dict[int, float], delta: float) -> dict:
    """The tracing attack on each client's release (members: its records) and on the server's sum.

    Under secure aggregation the server holds the sum alone (``received.total``): the attack runs on
    it, every client's records members, and its DP bound is the aggregate's (the largest epsilon
    a client reports: each reports the sum's).
    """
    reference, heldout = heldout_halves(splits.test, generator)
    view = StatisticsView(cfg, splits, reference)
    if not received.releases and received.total is not None:
        members, nonmembers = matched(splits.train, heldout, samples, generator)
        member, out_scores = view.scores(members, received.total), view.scores(nonmembers, received.total)
        row = {**membership_summary(member, out_scores),
               "dp_bound": _bound(member, out_scores, max(epsilons.values()) if epsilons else None, delta)}
        return {"kind": "statistics", "attack": "tracing (the secure sum alone; Homer et al. 2008)",
                "auc": row["auc"], "tpr_at_1pct_fpr": row["tpr_at_1pct_fpr"],
                "tpr_at_0.1pct_fpr": row["tpr_at_0.1pct_fpr"], "most_exposed_client": None, "per_client": [],
                "total": row, "dp_bound_holds": (row["dp_bound"] or {}).get("holds", True)}
    records = client_records(cfg, splits)
    rows = []
    for cid, release in sorted(received.releases.items()):
        if cid not in records:
            continue  # a deployed node's own data: the simulation holds no copy to attack with
        members, nonmembers = matched(records[cid], heldout, samples, generator)
        member, nonmember = view.scores(members, release), view.scores(nonmembers, release)
        rows.append({"client": cid, **membership_summary(member, nonmember),
                     "dp_bound": _bound(member, nonmember, epsilons.get(cid), delta)})
    if not rows:
        raise AuditError("no statistics release of a known client to attack")
    total = ClassStatistics.total(list(received.releases.values()))
    members, nonmembers = matched(splits.train, heldout, samples, generator)
    member, out_scores = view.scores(members, total), view.scores(nonmembers, total)
    worst = _headline(rows)
    attack = "tracing (per-client release; Homer et al. 2008, Dwork et al. 2015)"
    return {"kind": "statistics", "attack": attack,
            "auc": worst["auc"], "tpr_at_1pct_fpr": worst["tpr_at_1pct_fpr"],
            "tpr_at_0.1pct_fpr": worst["tpr_at_0.1pct_fpr"], "most_exposed_client": worst["client"],
            "per_client": rows, "total": membership_summary(member, out_scores),
            "dp_bound_holds": all((r["dp_bound"] or {}).get("holds", True) for r in rows)}


def _model(cfg: RunConfig, state: State, data: Dataset) -> torch.nn.Module:
    model = build_model(cfg.distill.model, data.image_shape, data.num_classes,
                        torch.Generator().manual_seed(0))
    model.load_state_dict(state)
    return model.eval()


def weights_view(cfg: RunConfig, received: Received, splits: DataSplits, *, samples: int,
                 generator: torch.Generator, epsilons: dict[int, float], delta: float) -> dict:
    """The loss-change attack on each client's update, in every round the server kept."""
    records = client_records(cfg, splits)
    rows = []
    for server_round, sent, replies in received.updates:
        before = _model(cfg, sent, splits.test)
        for cid, state in sorted(replies.items()):
            if cid not in records:
                continue
            after = _model(cfg, state, splits.test)
            members, nonmembers = matched(records[cid], splits.test, samples, generator)
            member = update_scores(before, after, members)
            nonmember = update_scores(before, after, nonmembers)
            rows.append({"client": cid, "round": server_round, **membership_summary(member, nonmember),
                         "dp_bound": _bound(member, nonmember, epsilons.get(cid), delta)})
    if not rows:
        raise AuditError("no client update of a known client to attack")
    worst = _headline(rows)
    return {"kind": "weights", "attack": "update loss change (per-client update)", "auc": worst["auc"],
            "tpr_at_1pct_fpr": worst["tpr_at_1pct_fpr"], "tpr_at_0.1pct_fpr": worst["tpr_at_0.1pct_fpr"],
            "most_exposed_client": worst["client"], "most_exposed_round": worst["round"], "per_client": rows,
            "dp_bound_holds": all((r["dp_bound"] or {}).get("holds", True) for r in rows)}


def images_view(received: Received, splits: DataSplits, *, seed: int, epsilon: float | None, delta: float,
                closest_png: Path | None = None, title: str = "",
                extra_private: Dataset | None = None) -> dict:
    """Near-copies and the nearest-image membership attack on every image the server received.

    The private set is the training split plus ``extra_private`` (records the clients also held:
    the audit's included canaries); the near-copy threshold is the training split's.
    """
    images = torch.cat([x for parts in received.images.values() for x in parts])
    private = splits.train
    if extra_private is not None and len(extra_private):
        private = Dataset(torch.cat([private.x, extra_private.x]), torch.cat([private.y, extra_private.y]),
                          private.num_classes, private.mean, private.std, private.name)
    view = image_view(images, private, splits.test, seed=seed,
                      threshold=near_copy_threshold(splits.train, seed=seed))
    out = {"kind": "images", "attack": "nearest received image (all private records vs all held-out)", **view}
    if epsilon is not None:
        members, nonmembers = nearest_scores(images, private), nearest_scores(images, splits.test)
        out["dp_bound"] = dp_bound_check(members, nonmembers, epsilon=epsilon, delta=delta)
        out["dp_bound_holds"] = out["dp_bound"]["holds"]
    if closest_png is not None:
        pairs = save_closest_pairs(images, private, closest_png, threshold=view["near_copy_threshold"],
                                   title=title)
        out["closest_pairs"], out["closest_png"] = pairs, closest_png.name
    return out


def server_view_audit(cfg: RunConfig, received: Received, splits: DataSplits, *, samples: int = 1000,
                      seed: int = 0, epsilons: dict[int, float] | None = None,
                      closest_png: Path | None = None, title: str = "",
                      extra_private: Dataset | None = None) -> dict | None:
    """The attack that fits what ``received`` holds (None when the server received nothing).

    ``epsilons``: client id -> the epsilon it spent (DP runs; checked against every ROC point);
    ``extra_private``: records the clients held beside the training split (included canaries).
    """
    epsilons = {c: e for c, e in (epsilons or {}).items() if e is not None and math.isfinite(e)}
    delta = cfg.distill.dp.delta
    generator = torch.Generator().manual_seed(seed)
    kind = received.kind
    if kind == "images":
        eps = max(epsilons.values()) if epsilons else None
        return images_view(received, splits, seed=seed, epsilon=eps, delta=delta, closest_png=closest_png,
                           title=title, extra_private=extra_private)
    if kind == "statistics":
        return statistics_view(cfg, received, splits, samples=samples, generator=generator, epsilons=epsilons,
                               delta=delta)
    if kind == "weights":
        return weights_view(cfg, received, splits, samples=samples, generator=generator, epsilons=epsilons,
                            delta=delta)
    return None


def canary_scores(cfg: RunConfig, received: Received, splits: DataSplits, canaries: Canaries,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Server-view scores of every canary (higher = "included"), for the one-run canary audit.

    Canary ``i`` goes into client ``i mod N``'s data (:meth:`Canaries.inserted`), so it is scored
    against what that client sent: the tracing score under its release, or the loss change of its
    update in the last round the server kept. (Image systems' canaries are scored by the distance
    to the nearest received image in :func:`privacy.audit.canary_columns`.)
    """
    n = cfg.partition.num_partitions
    owner = torch.arange(len(canaries)) % n
    scores = torch.full((len(canaries),), float("-inf"))
    if received.kind == "statistics":
        reference, _ = heldout_halves(splits.test, torch.Generator().manual_seed(seed))
        view = StatisticsView(cfg, splits, reference)
        if not received.releases and received.total is not None:  # secure aggregation: the sum alone
            return {"tracing": view.scores(canaries.data, received.total)}
        for cid, release in received.releases.items():
            mask = owner == cid
            if mask.any():
                scores[mask] = view.scores(canaries.data.subset(mask.nonzero().flatten()), release)
        return {"tracing": scores}
    if received.kind == "weights":
        _, sent, replies = received.updates[-1]
        before = _model(cfg, sent, splits.test)
        for cid, state in replies.items():
            mask = owner == cid
            if mask.any():
                scores[mask] = update_scores(before, _model(cfg, state, splits.test),
                                             canaries.data.subset(mask.nonzero().flatten()))
        return {"update": scores}
    return {}

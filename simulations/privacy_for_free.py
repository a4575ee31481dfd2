"""Privacy for free? Distillation, random real images, DP distillation and (DP-)FedAvg under the same attacks.

    python -m simulations.privacy_for_free --out runs/free

Dong et al. (ICML 2022) claimed that dataset condensation gives "privacy for free"; Carlini,
Feldman & Nasr (2022) answered that it does not beat the naive baseline (a random subset of
real images) and that DP-SGD protects better at equal accuracy. This driver puts the project's
own systems to that test, in a setting where membership signal exists (few clients with little
data each, summaries started from real images, a global model trained long on a small pool):

- a pool of ``--pool`` training records (mnist5k by default); the target run trains on each
  record independently with probability 1/2 (its *members*; the rest are its *non-members*),
  split IID among ``--clients`` clients, plus ``--canaries`` inverted, mislabelled canaries of
  which each is put in with probability 1/2;
- every system (``--systems``) is run once as the target, by the recipe of
  :mod:`simulations.recipes` (the client and server steps of the Flower apps, in this process);
- **LiRA** (online, ``--shadows`` shadow models, each the system's *whole* recipe - split,
  distill, pool, train - on a random half of the pool): AUC and TPR at 1% / 0.1% FPR;
- **one-run epsilon lower bounds** (Steinke, Nasr & Jagielski 2023, 95% confidence): from the
  canaries (scored by the global model's loss and the distance to the nearest synthetic image)
  and from the pool's records themselves (their inclusion is also a fair coin; scored by LiRA);
- **memorisation** of the pooled summary: the fraction of synthetic images that are near-copies
  of a member, and that sit closer to a member than to a non-member.

The run settings default to the ``privacy`` preset of the privacy-utility sweep (60 image
updates, 16 real images per class per update, 10 FedAvg rounds; the server trains the global
model for 400 steps on the pooled summaries). Every system loads the data with public
normalisation constants (no private statistic leaves a client). Writes report.json, report.md,
attack_vs_accuracy.png and the closest pairs of each summary into --out.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ddcore.data import Dataset, load_dataset
from ddcore.errors import ConfigError
from ddcore.files import environment
from ddcore.methods.base import check_ipc
from ddcore.runconfig import RunConfig, from_flat
from ddcore.settings import add_settings, settings_from_args
from simulations.common import check_dp_clients, fail, recorded_config, warn_if_bound_exceeds, write_report

# name -> (kind, run-config keys on top of the preset); DP systems get "@eps=E" per --epsilons
SYSTEMS: dict[str, tuple[str, dict]] = {
    "random_real": ("distill", {"method": "random_real", "allow-near-copies": True}),
    "dm": ("distill", {"method": "dm", "init": "real", "allow-near-copies": True}),
    "dm-noise": ("distill", {"method": "dm", "init": "noise"}),
    "gm": ("distill", {"method": "gm", "init": "real", "allow-near-copies": True}),
    "dp-dm": ("distill", {"method": "dm", "init": "noise", "dp": True}),
    "fedavg": ("fedavg", {}),
    "dp-fedavg": ("fedavg", {"dp": True}),
}
# DP-DM is the costliest system here (its image updates run a bank of 20 networks): one epsilon
DEFAULT_SYSTEMS = "random_real,dm,gm,dp-dm@8,fedavg,dp-fedavg"
FLAGS = {
    "dataset": "dataset",
    "data-dir": "data-dir",
    "ipc": "ipc",
    "iterations": "iterations",
    "fedavg-rounds": "fedavg-rounds",
    "seed": "seed",
    "device": "device",
}
BETA = 0.05  # 1 - confidence of every lower bound


@dataclass(frozen=True)
class Budget:
    """The audit's size: candidate records, shadow models per system, canaries, clients."""

    pool: int = 1000
    shadows: int = 8
    canaries: int = 100
    clients: int = 2


BUDGETS = {"quick": Budget(pool=400, shadows=2, canaries=20, clients=2)}  # every other preset: Budget()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.privacy_for_free",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument(
        "--systems", default=DEFAULT_SYSTEMS,
        help=f"comma-separated, of {', '.join(SYSTEMS)}; a DP system runs at every --epsilons, or at one "
        f"with NAME@EPS (e.g. dp-dm@8); default {DEFAULT_SYSTEMS}",
    )
    parser.add_argument("--epsilons", default="1,8", help="target epsilons of the DP systems (per client)")
    for name, what in (
        ("pool", "candidate records (members are a random half)"),
        ("shadows", "LiRA shadow models per system (even, >= 2)"),
        ("canaries", "inverted mislabelled canaries (0 = none)"),
        ("clients", "clients the data is split among (IID)"),
    ):
        parser.add_argument(
            f"--{name}",
            type=int,
            default=None,
            help=f"{what}; default {getattr(Budget(), name)} ({getattr(BUDGETS['quick'], name)} "
            "with --preset quick)",
        )
    # the privacy sweep's settings (60 image updates, 10 FedAvg rounds): every system runs
    # shadows + 1 times, so it must cost about a minute or less
    add_settings(parser, FLAGS, preset="privacy")
    return parser


def parse_systems(text: str, epsilons: list[float]) -> list[tuple[str, str, dict]]:
    """(row name, kind, run-config keys) per system; a DP system once per epsilon.

    ``dp-dm@8`` (or ``dp-dm@eps=8``) names one epsilon of a DP system; plain ``dp-dm`` runs
    every one of ``epsilons``.
    """
    out = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, _, eps_text = item.partition("@")
        if name not in SYSTEMS:
            raise ConfigError(f"unknown --systems entry {item!r}; known: {', '.join(SYSTEMS)}")
        kind, keys = SYSTEMS[name]
        if eps_text and not keys.get("dp"):
            raise ConfigError(f"--systems {item!r}: only DP systems take an epsilon")
        chosen = parse_epsilons(eps_text.removeprefix("eps=")) if eps_text else epsilons
        if keys.get("dp"):
            out += [(f"{name}@eps={e:g}", kind, {**keys, "target-epsilon": e}) for e in chosen]
        else:
            out.append((name, kind, keys))
    if not out:
        raise ConfigError(f"--systems names no system; known: {', '.join(SYSTEMS)}")
    return out


def parse_epsilons(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"epsilons are numbers > 0 separated by commas, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ConfigError(f"epsilons must be finite numbers > 0, got {text!r}")
    return values


def make_budget(args: argparse.Namespace) -> Budget:
    base = BUDGETS.get(args.preset, Budget())
    budget = replace(
        base,
        **{
            k: getattr(args, k)
            for k in ("pool", "shadows", "canaries", "clients")
            if getattr(args, k) is not None
        },
    )
    if budget.shadows < 2 or budget.shadows % 2:
        raise ConfigError(
            f"--shadows must be even and >= 2 (each record is in half of them), got {budget.shadows}"
        )
    if budget.pool < 4 * budget.clients or budget.clients < 1:
        raise ConfigError(
            f"--pool {budget.pool} is too small for {budget.clients} clients (need >= 4 per client)"
        )
    if budget.canaries < 0:
        raise ConfigError(f"--canaries must be >= 0, got {budget.canaries}")
    return budget


@dataclass(frozen=True)
class Setting:
    """The audit's data: the candidate pool, the target's coin per candidate, canaries, test split."""

    pool: Dataset
    included: torch.Tensor  # (pool,) bool: a member of the target run
    canaries: object  # privacy.attacks.canary.Canaries | None
    test: Dataset

    @property
    def members(self) -> Dataset:
        return self.pool.subset(self.included.nonzero().flatten())

    @property
    def nonmembers(self) -> Dataset:
        return self.pool.subset((~self.included).nonzero().flatten())


def make_setting(cfg: RunConfig, budget: Budget) -> Setting:
    """``budget.pool`` training records, a fair coin per record, and the canaries (all seeded)."""
    from privacy.attacks.canary import make_canaries

    splits = load_dataset(
        cfg.dataset, data_dir=cfg.data_dir or None, seed=cfg.partition.seed, public_normalisation=True
    )
    if budget.pool > len(splits.train):
        raise ConfigError(
            f"--pool {budget.pool} exceeds the {len(splits.train)} training records of {cfg.dataset}"
        )
    g = torch.Generator().manual_seed(cfg.partition.seed)
    pool = splits.train.subset(torch.randperm(len(splits.train), generator=g)[: budget.pool])
    included = torch.rand(budget.pool, generator=g) < 0.5
    canaries = (
        make_canaries(splits.test, budget.canaries, kind="inverted", seed=cfg.partition.seed + 1)
        if budget.canaries
        else None
    )
    return Setting(pool, included, canaries, splits.test)


def target_clients(setting: Setting, clients: int, generator: torch.Generator) -> list[Dataset]:
    """The target run's clients: the members split IID, each with its share of the included canaries."""
    from privacy.attacks.canary import insert_canaries
    from simulations.recipes import split_clients

    parts = split_clients(setting.members, clients, generator)
    if setting.canaries is None:
        return parts
    return [insert_canaries(part, setting.canaries, i, clients) for i, part in enumerate(parts)]


def audit(name: str, kind: str, cfg: RunConfig, setting: Setting, budget: Budget, out: Path, tick) -> dict:
    """Run ``name`` as the target, train its shadows, and audit it; one report row."""
    from ddcore.train import evaluate
    from privacy.attacks.canary import canary_audit
    from privacy.attacks.membership import (
        lira_result,
        lira_scores,
        logit_confidence,
        scored_attack,
        train_shadows,
    )
    from privacy.attacks.memorisation import memorisation, save_closest_pairs
    from privacy.attacks.nearest import nearest_l2
    from privacy.audit import canary_columns
    from simulations.recipes import recipe, shadow_trainer

    seed = cfg.partition.seed
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed * 7919 + 1)
    target = recipe(kind, cfg)(target_clients(setting, budget.clients, g), g)
    tick()
    accuracy = evaluate(target.model, setting.test)["accuracy"]
    shadows = train_shadows(
        setting.pool,
        shadow_trainer(kind, cfg, budget.clients),
        num_shadow=budget.shadows,
        generator=torch.Generator().manual_seed(seed * 7919 + 2),
        progress=lambda k: tick(),
    )
    scores = lira_scores(logit_confidence(target.model, setting.pool), shadows)
    lira = lira_result(scores, setting.included, budget.shadows)
    delta = cfg.distill.dp.delta
    members_audit = canary_audit(scores, setting.included, delta=delta, beta=BETA, seed=seed)
    row = {
        "system": name,
        "kind": kind,
        "method": cfg.distill.method if kind == "distill" else "fedavg",
        "init": cfg.distill.init if kind == "distill" else None,
        "dp": cfg.distill.dp.enabled,
        "epsilon_target": cfg.distill.dp.target_epsilon if cfg.distill.dp.enabled else None,
        "epsilon_spent": target.eps_spent,
        "delta": delta,
        "accuracy": accuracy,
        "lira": lira.to_dict(),
        "eps_lb_members": members_audit.eps_lower_bound,
        "members_audit": members_audit.to_dict(),
    }
    if setting.canaries is not None:
        canary = canary_columns(
            setting.canaries, target.model, target.pooled, delta=delta, beta=BETA, seed=seed
        )
        row.update(
            {
                "eps_lb_canaries": canary["eps_lower_bound"],
                "canary_score": canary["canary_score"],
                "canary_guesses": canary["canary_guesses"],
                "canary_correct": canary["canary_correct"],
                "canary_max_certifiable": canary["canary_max_certifiable"],
                "canary_audits": canary["canary_audits"],
            }
        )
    if target.pooled is not None:
        mem = memorisation(target.pooled.images, setting.members, setting.nonmembers, seed=seed)
        png = out / f"closest_{name.replace('@', '_').replace('=', '')}.png"
        save_closest_pairs(
            target.pooled.images,
            setting.members,
            png,
            threshold=mem.near_copy_threshold,
            title=f"{name}: synthetic (top) and nearest member (bottom)",
        )
        # the released summary as a membership oracle: a candidate near a synthetic image is "in"
        nearest = -nearest_l2(setting.pool.x, target.pooled.images.detach().float())[0]
        summary_attack = scored_attack("summary-distance", nearest, setting.included)
        summary_bound = canary_audit(nearest, setting.included, delta=delta, beta=BETA, seed=seed)
        row.update(
            {
                "summary_attack": summary_attack.to_dict(),
                "eps_lb_members_summary": summary_bound.eps_lower_bound,
                "near_copy_fraction": mem.near_copy_fraction,
                "near_copy_fraction_heldout": mem.near_copy_fraction_heldout,
                "closer_to_member": mem.closer_to_private_l2,
                "summary_images": len(target.pooled),
                "closest_png": png.name,
                "memorisation": mem.to_dict(),
            }
        )
    bounds = [row.get(k) for k in ("eps_lb_canaries", "eps_lb_members", "eps_lb_members_summary")]
    bounds = [b for b in bounds if b is not None]
    spent = target.eps_spent
    row["bound_exceeds_epsilon"] = warn_if_bound_exceeds(name, {"eps_lower_bound": max(bounds)}, spent)
    if spent is not None and not math.isfinite(spent):
        row["epsilon_spent"] = None  # JSON has no inf; a noiseless DP path spends no finite epsilon
    row["seconds"] = time.perf_counter() - start
    return row


def _f(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    b = report["budget"]
    header = [
        "system",
        "eps (spent)",
        "acc (%)",
        "LiRA AUC",
        "LiRA TPR@1%",
        "LiRA TPR@0.1%",
        "summary MIA TPR@0.1%",
        "eps lb canaries",
        "eps lb members",
        "near-copies",
        "closer to member",
        "min",
    ]
    rows = []
    for r in report["rows"]:
        lira = r["lira"]
        eps = "-" if not r["dp"] else f"{r['epsilon_target']:g} ({_f(r['epsilon_spent'], '{:.2f}')})"
        rows.append(
            [
                r["system"],
                eps,
                f"{100 * r['accuracy']:.1f}",
                _f(lira["auc"]),
                _f(lira["tpr_at_1pct_fpr"]),
                _f(lira["tpr_at_0_1pct_fpr"]),
                _f((r.get("summary_attack") or {}).get("tpr_at_0_1pct_fpr")),
                _f(r.get("eps_lb_canaries"), "{:.2f}")
                + (" **DP BUG**" if r["bound_exceeds_epsilon"] else ""),
                _f(r["eps_lb_members"], "{:.2f}"),
                _f(r.get("near_copy_fraction"), "{:.2f}"),
                _f(r.get("closer_to_member"), "{:.2f}"),
                f"{r['seconds'] / 60:.1f}",
            ]
        )
    align = ["---"] + ["---:"] * (len(header) - 1)
    table = ["| " + " | ".join(c) + " |" for c in (header, align, *rows)]
    members = report["setting"]["members"]
    return "\n".join(
        [
            f"# {report['title']}",
            "",
            *table,
            "",
            f"{report['setting']['pool']} candidate records of {report['config']['dataset']}, "
            f"{members} of them "
            f"members of the target run (a fair coin each), split IID among {b['clients']} clients; "
            f"{b['canaries']} inverted mislabelled canaries "
            f"({report['setting']['canaries_included']} put in). "
            f"LiRA: online, {b['shadows']} shadow models per system, each the system's whole recipe "
            "on a random "
            f"half of the pool; TPR at 0.1% FPR is the TPR at zero false positives when there are fewer than "
            f"1,000 non-members. eps lb: Steinke et al.'s one-run lower bound at {100 * (1 - BETA):.0f}% "
            f"confidence and delta {report['rows'][0]['delta']:g}, from the canaries (best of loss and "
            f"nearest-synthetic distance) and from the pool's records (LiRA scores). summary MIA: a "
            f"record is guessed a member when it lies near a synthetic image (minus the L2 distance "
            f"to the nearest one as score; summaries only). near-copies: synthetic "
            f"images within the near-copy threshold of a member (privacy.attacks.memorisation); closer to "
            f"member: nearer (L2) to a member than to a non-member (0.5 = no sign). min: minutes of the row "
            f"(target and shadows).",
            "",
            f"Whole run: {report['seconds'] / 60:.1f} min.",
            "",
        ]
    )


def plot(report: dict, out: Path) -> None:
    """attack_vs_accuracy.png: LiRA TPR at 1% FPR and the canary lower bound against test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (lambda r: 100 * r["lira"]["tpr_at_1pct_fpr"], "LiRA TPR at 1% FPR (%)"),
        (lambda r: r.get("eps_lb_canaries") or 0.0, "canary epsilon lower bound (95%)"),
    )
    for ax, (value, label) in zip(axes, panels, strict=True):
        for i, r in enumerate(report["rows"]):
            marker = "s" if r["kind"] == "fedavg" else ("^" if r["dp"] else "o")
            ax.scatter(
                100 * r["accuracy"], value(r), marker=marker, s=50, color=f"C{i % 10}", label=r["system"]
            )
            ax.annotate(
                r["system"],
                (100 * r["accuracy"], value(r)),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="grey", ls=":", lw=1)  # chance: TPR = FPR
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Privacy for free? attack success vs utility (squares FedAvg, triangles DP)")
    fig.tight_layout()
    fig.savefig(out / "attack_vs_accuracy.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        epsilons = parse_epsilons(args.epsilons)
        budget = make_budget(args)
        base = settings_from_args(args, FLAGS)
        planned = [
            (name, kind, from_flat(keys, base=base))
            for name, kind, keys in parse_systems(args.systems, epsilons)
        ]
        setting = make_setting(base, budget)
        parts = target_clients(setting, budget.clients, torch.Generator().manual_seed(0))
        sizes = [len(p) for p in parts]
        for name, kind, cfg in planned:
            if kind == "distill":
                for i, part in enumerate(parts):
                    check_ipc(replace(part, name=f"{name}'s client {i}"), cfg.distill.ipc)
            if cfg.distill.dp.enabled:
                shadow_client = budget.pool // 2 // budget.clients  # a shadow's clients hold this many
                check_dp_clients(name, cfg, [*sizes, shadow_client])
    except ValueError as exc:
        return fail(exc)
    from tqdm import tqdm

    import privacy.methods  # noqa: F401  (registers dp-dm)

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    with tqdm(
        total=len(planned) * (budget.shadows + 1),
        desc="privacy for free",
        unit="run",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for name, kind, cfg in planned:
            bar.set_postfix_str(name)
            rows.append(audit(name, kind, cfg, setting, budget, args.out, lambda: bar.update(1)))
    report = {
        "title": f"Privacy for free? ({base.dataset}, {budget.clients} clients, "
        f"{budget.pool} candidate records)",
        "config": recorded_config(args.preset, base),
        "environment": environment(base.distill.device),
        "budget": asdict(budget),
        "epsilons": epsilons,
        "beta": BETA,
        "setting": {
            "pool": len(setting.pool),
            "members": int(setting.included.sum()),
            "canaries_included": int(setting.canaries.included.sum()) if setting.canaries else 0,
            "normalisation": "public (0.5 / 0.5)",
        },
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "violations": [r["system"] for r in rows if r["bound_exceeds_epsilon"]],
    }
    write_report(args.out, report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

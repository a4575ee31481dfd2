"""What the server received from the clients of one system: the input of the server-view audit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # Opacus loads with privacy.class_release: only where statistics are attacked
    from privacy.class_release import ClassStatistics

State = dict[str, torch.Tensor]


@dataclass
class Received:
    """What the server received from the clients of one system, by client id.

    ``images``: every image a client sent, all rounds (normalised like the run's data);
    ``releases``: each client's statistics release; ``total``: the sum of the releases alone,
    when the clients sent them through secure aggregation (the server saw no single release);
    ``updates``: (round, the global weights the server sent, {client id: the weights it sent
    back}) for the rounds the server kept.
    """

    images: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    releases: dict[int, ClassStatistics] = field(default_factory=dict)
    total: ClassStatistics | None = None
    updates: list[tuple[int, State, dict[int, State]]] = field(default_factory=list)

    @property
    def kind(self) -> str | None:
        """"images", "statistics", "weights" or None (nothing received)."""
        if self.images:
            return "images"
        if self.releases or self.total is not None:
            return "statistics"
        return "weights" if self.updates else None

"""What each client sent and received, round by round, and what the server did with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ClientRound:
    """One client's part in one round."""

    round: int
    node_id: int
    client_id: int = -1
    bytes_down: int = 0  # content bytes of the message the server sent (count_bytes)
    bytes_up: int = 0  # content bytes of the reply
    array_bytes_up: int = 0  # raw array payload of the reply (sum of nbytes)
    examples: int = 0
    seconds: float = 0.0  # the client's own measured work time
    peak_mb: float = 0.0
    images: int = 0
    status: str = "sent"  # sent | accepted | rejected | failed
    reason: str = ""
    privacy: dict = field(default_factory=dict)  # DP runs: epsilon spent so far, delta, sigma, q, steps


@dataclass
class Ledger:
    """Per-client, per-round records of one system (distillation, FedAvg, ...)."""

    entries: list[ClientRound] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # {round, accuracy, bytes_up_cum, ...}
    round_notes: dict[int, str] = field(default_factory=dict)

    def sent(self, round_: int, node_id: int, bytes_down: int) -> ClientRound:
        entry = ClientRound(round=round_, node_id=node_id, bytes_down=bytes_down)
        self.entries.append(entry)
        return entry

    def find(self, round_: int, node_id: int) -> ClientRound:
        for entry in reversed(self.entries):
            if entry.round == round_ and entry.node_id == node_id:
                return entry
        return self.sent(round_, node_id, 0)

    def mark_silent(self, round_: int) -> None:
        """Mark the clients of ``round_`` that never replied as failed."""
        for entry in self.entries:
            if entry.round == round_ and entry.status == "sent":
                entry.status, entry.reason = "failed", "no reply (dropped out or timed out)"

    def bytes_up(self, up_to_round: int | None = None) -> int:
        return sum(e.bytes_up for e in self.entries if up_to_round is None or e.round <= up_to_round)

    def bytes_down(self, up_to_round: int | None = None) -> int:
        return sum(e.bytes_down for e in self.entries if up_to_round is None or e.round <= up_to_round)

    def record_accuracy(self, round_: int, accuracy: float, loss: float) -> None:
        self.history.append(
            {"round": round_, "accuracy": accuracy, "loss": loss,
             "bytes_up_cum": self.bytes_up(round_), "bytes_down_cum": self.bytes_down(round_)}
        )

    def clients(self) -> list[dict]:
        return [asdict(e) for e in self.entries]

"""The client side of the secure sum: SecAgg+ messages routed through ``secaggplus_mod`` to a release.

Flower's SecAgg+ workflow sends all four of its stages as plain ``train`` messages carrying its
``secaggplus_configs`` record, so they reach the default ``@app.train()`` handler. The mod
:func:`secure_route`, placed on that handler, hands exactly those messages to Flower's
``secaggplus_mod`` and lets every other ``train`` message (FedAvg's) through untouched. In the
stage that collects the masked vectors, ``secaggplus_mod`` calls the inner handler, which asks
the release function for the client's arrays and answers in the legacy ``FitRes`` form the mod
expects: the arrays flattened into one float64 vector (:func:`privacy.secure_sum.flatten`),
``num_examples`` 1 (every client weighs the same, so the server's weighted mean times the number
of clients is the sum) and, in the clear, the release's metrics plus its layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import WARNING

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, log, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from privacy.secure_sum import MAX_WEIGHT, SPEC_KEY, SecureSumError, check_release, flatten

FITINS_CONFIG = "fitins.config"  # where the legacy FitIns carries the server's config
Scalar = str | int | float | bool
# (the server's config, this node's context, the SecAgg+ reconstruction threshold) -> (arrays to sum,
# metrics sent in the clear)
Release = Callable[[Mapping, Context, int], tuple[dict[str, np.ndarray], dict[str, Scalar]]]


def secure_route(release: Release) -> Mod:
    """A mod for the default train handler: SecAgg+ messages go to ``release``, the rest through.

    ``release`` is told the protocol's reconstruction threshold, read from ``secaggplus_mod``'s
    own state (what this node's protocol run enforces), so a DP release splits its noise over the
    clients the sum is sure to hold. A release SecAgg+ would alter (NaN/Inf, or beyond the
    clipping range: :func:`privacy.secure_sum.check_release`) is refused with a logged reason; the
    raised error reaches the server as this node's failure, and the sum goes on without it.
    """

    def reply(message: Message, context: Context) -> Message:
        secagg = context.state[RECORD_KEY_STATE]  # secaggplus_mod's state, saved after the key stage
        threshold, clipping = int(secagg["threshold"]), float(secagg["clipping_range"])
        arrays, metrics = release(message.content[FITINS_CONFIG], context, threshold)
        try:
            check_release(arrays, clipping)
            vector, spec = flatten(arrays)
        except SecureSumError as exc:
            log(WARNING, "node %d refuses to send its release to the secure sum: %s", context.node_id, exc)
            raise
        fitres = FitRes(Status(Code.OK, "release"), ndarrays_to_parameters([vector]), int(MAX_WEIGHT),
                        {**metrics, SPEC_KEY: spec.to_json()})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)

    def route(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if RECORD_KEY_CONFIGS not in message.content:
            return call_next(message, context)
        return secaggplus_mod(message, context, reply)

    return route

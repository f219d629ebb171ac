"""The client's side of ``--secagg``: Flower's SecAgg+ mod around fedlora's ``train`` handler.

:func:`secagg_bridge` hands a ``train`` message to ``flwr.client.mod.secaggplus_mod`` when it
carries SecAgg+'s config record (the server's four protocol stages), and passes every other
message straight on. In the stage that trains, the mod calls fedlora's handler, which answers with
:func:`secure_reply`: the clipped update ``Δ_k`` (``fedlora.privacy.secagg``) in Flower's ``FitRes``
layout, the only layout the mod reads. The mod quantizes and masks it and strips the arrays
before the reply leaves the node: what reaches the server is the masked vector and the metrics.
"""

from __future__ import annotations

from flwr.app import Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedlora.privacy.secagg import client_weight, clip_update, flatten
from fedlora.training.client import LocalClient

SECAGG_RECORD = RECORD_KEY_CONFIGS
"""The config record SecAgg+ adds to its messages (``secaggplus``)."""


def secagg_bridge(msg: Message, context, call_next) -> Message:
    """A ClientApp mod: SecAgg+ for its protocol messages, nothing for the others."""
    if msg.metadata.message_type == MessageType.TRAIN and is_secure(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is SecAgg+'s training stage (its reply must be :func:`secure_reply`)."""
    return SECAGG_RECORD in msg.content.config_records


def secure_reply(client: LocalClient, upload: dict, metrics: MetricRecord, msg: Message) -> Message:
    """The ``FitRes``-shaped reply SecAgg+ masks: this client's clipped update, its weight, and
    its metrics (plus the share of the update the clip cut, ``secagg-clipped``)."""
    delta, cut = clip_update(client.update(upload), client.cfg)
    # float64: SecAgg+ scales and shifts the values before rounding them to T levels, and float32
    # would round them to 2^-23 of the range first
    arrays = [t.detach().cpu().double().numpy() for t in flatten(delta)]
    scalars = {k: float(v) if isinstance(v, float) else int(v) for k, v in metrics.items()}
    scalars["secagg-clipped"] = float(cut)
    res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                 num_examples=client_weight(client.cfg, len(client)), metrics=scalars)
    content: RecordDict = fitres_to_recorddict(res, keep_input=False)
    return Message(content, reply_to=msg)

"""The simulator's transport: every client in this process, a round's clients trained together.

:class:`BatchedTransport` implements :class:`fedlora.rounds.transport.Transport` over a
:class:`~fedlora.simulations.engine.Job`'s batched model: the clients of a round train in passes
of up to ``fm.num_clients`` slots (one forward/backward per step for the whole pass), each slot
loaded with the coordinator's global state and the factors its client keeps. Nothing is
serialised; the bytes each way are counted as the deployed messages would carry them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fedlora.models.state import (
    extract_kept,
    extract_upload,
    load_kept,
    probe_tensors,
    upload_from_tensors,
    upload_tensors,
)
from fedlora.privacy.accounting import Budget, ClientBudgets
from fedlora.rounds.compress import pack, relative_error
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.transport import Replies
from fedlora.rounds.wire import tensor_bytes
from fedlora.strategies import ClientUpload, Probe
from fedlora.training.sketch import client_sketches
from fedlora.training.train import TrainConfig, local_training


def chunks(clients: list[int], size: int) -> list[list[int]]:
    return [clients[i:i + size] for i in range(0, len(clients), size)]


class BatchedTransport:
    """A round's clients as slots of the batched model (see the module docstring).

    Parameters
    ----------
    job : Job
        The simulator's data, model and per-client samplers, budgets and personal test sets.
    coord : Coordinator
        Whose global state the slots load, and who keeps the clients' personal factors.
    on_step : callable, optional
        Progress: called with the number of clients of a pass after each of its steps.
    """

    lone = False
    stateless = False

    def __init__(self, job, coord: Coordinator, on_step: Callable[[int], None] | None = None) -> None:
        self.job, self.coord, self.on_step = job, coord, on_step
        self.budgets: ClientBudgets | None = job.budgets
        for c, steps in coord.ledgers.items():  # a resumed run: the steps each client had taken
            self.budgets[c].steps = steps

    def available(self, rnd: int, clients: list[int]) -> list[int]:
        return clients  # every simulated client answers

    def _ledgers(self, clients: list[int]) -> list[Budget] | None:
        return None if self.budgets is None else [self.budgets[c] for c in clients]

    def _keep_ledgers(self) -> None:
        """``--dp sample``: every client's DP-SGD steps so far, for the checkpoint (as the personal
        factors are kept): those of each budget read so far, round 0's initialisation steps included."""
        if self.budgets is not None:
            self.coord.ledgers = {c: b.steps for c, b in self.budgets.made.items() if b.steps}

    def _privacy(self, clients: list[int]) -> list[tuple[float, float]]:
        ledgers = self._ledgers(clients) or []
        return [(b.spent, b.sigma) for b in ledgers]

    def _payload_bytes(self, clients: list[int]) -> list[int]:
        """Bytes down per client, each distinct payload serialised once."""
        coord, cache, out = self.coord, {}, []
        for c in clients:
            key = (coord.synced.get(c, 0), c in coord.has_shared)
            if key not in cache:
                down, catch = coord.payload(c)
                cache[key] = tensor_bytes(pack(coord.down, down)) + tensor_bytes(pack(coord.down, catch))
            out.append(cache[key])
        return out

    def _load_pass(self, chunk: list[int]) -> None:
        """Slots ``0..len(chunk)-1`` at the clients' ranks, the global state, each client's kept factors."""
        job, fm = self.job, self.job.fm
        pad = [job.cfg.rank_of(chunk[0])] * (fm.num_clients - len(chunk))
        fm.set_ranks([job.cfg.rank_of(c) for c in chunk] + pad)
        self.coord.reload()
        for k, c in enumerate(chunk):  # what each client kept from its last round (plan's keep)
            if c in self.coord.personal:
                load_kept(fm, k, self.coord.personal[c])

    def train(self, rnd: int, clients: list[int]) -> Replies:
        """Train ``clients`` pass by pass from the global state: their uploads and losses."""
        job, coord = self.job, self.coord
        down = self._payload_bytes(clients)
        uploads, losses = [], []
        for chunk in chunks(clients, job.fm.num_clients):
            self._load_pass(chunk)
            step = None if self.on_step is None else partial(self.on_step, len(chunk))
            losses += local_training(job.fm, job.train, [job.samplers[c] for c in chunk],
                                     TrainConfig.from_job(job.cfg, clip=coord.clip), rnd,
                                     self._ledgers(chunk), step)
            uploads += [extract_upload(job.fm, k, len(job.samplers[c])) for k, c in enumerate(chunk)]
            if job.fm.config.plan.keep:
                coord.personal.update({c: extract_kept(job.fm, k) for k, c in enumerate(chunk)})
        uploads, up, report = self._compressed(clients, uploads)
        self._keep_ledgers()
        return Replies(list(clients), uploads, up, down, losses, self._privacy(clients), report=report)

    def _compressed(self, clients: list[int], uploads: list[ClientUpload]
                    ) -> tuple[list[ClientUpload], list[int], dict]:
        """``--compress``: each client codes its upload (keeping its error-feedback residual), the
        server decodes it; the uploads as decoded, the bytes of the messages, ``compress_error``."""
        coord = self.coord
        tensors = [upload_tensors(u, coord.plan) for u in uploads]
        if not coord.codec.on:
            return uploads, [tensor_bytes(t) for t in tensors], {}
        ref, out, up, parts = coord.reference(), [], [], []
        for c, u, t in zip(clients, uploads, tensors, strict=True):
            message, coord.residual[c], part = coord.codec.encode(t, ref, coord.residual.get(c, {}))
            got = coord.codec.decode(message, ref)  # the server's decoding, from the round's one reference
            out.append(upload_from_tensors(got, u.num_examples, u.scale, coord.plan, coord.state))
            up.append(tensor_bytes(message))
            parts.append(part)
        return out, up, {"compress_error": relative_error(parts)}

    def query(self, phase: int, probes: dict[str, Probe], clients: list[int]) -> Replies:
        """One initialisation phase (Fed-SB): every client's ``Lᵀ G_k R``, pass by pass."""
        job, uploads = self.job, []
        for chunk in chunks(clients, job.fm.num_clients):
            got = client_sketches(job.fm, job.train, [job.samplers[c] for c in chunk],
                                  TrainConfig.from_job(job.cfg), job.cfg.init_batches, probes,
                                  self._ledgers(chunk), phase)
            uploads += [ClientUpload(num_examples=len(job.samplers[c]),
                                     grads={name: g[k] for name, g in got.items()})
                        for k, c in enumerate(chunk)]
        codec, plan = self.coord.codec, self.coord.plan
        messages = [codec.encode_once(upload_tensors(u, plan)) for u in uploads]  # --compress
        if codec.on:  # the server's decoding of each coded message
            uploads = [upload_from_tensors(codec.decode_once(m), u.num_examples, 1.0, plan)
                       for m, u in zip(messages, uploads, strict=True)]
        up = [tensor_bytes(m) for m in messages]
        down = [tensor_bytes(probe_tensors(probes))] * len(uploads)
        self._keep_ledgers()
        return Replies(list(clients), uploads, up, down, privacy=self._privacy(clients))

    def evaluate(self, clients: list[int]) -> list[dict]:
        """Each client's own model (the global state plus what it kept) on its own held-out
        examples, in slot 0 at the client's rank (FlexLoRA's clients start from their own rank's
        truncation of the global update)."""
        job, coord = self.job, self.coord
        if job.personal is None:
            return []
        results = []
        for c in clients:
            job.fm.set_ranks([job.cfg.rank_of(c)] * job.fm.num_clients)
            coord.reload()
            if c in coord.personal:
                load_kept(job.fm, 0, coord.personal[c])
            results.append(job.task.evaluate(job.fm, job.personal[c], job.cfg))
        coord.reload()
        return results

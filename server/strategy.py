"""One Flower strategy (``flwr.serverapp.strategy.Strategy``) over every fedlora strategy.

:class:`FedLoRA` turns a :class:`fedlora.rounds.Coordinator` (which owns the global
state and delegates aggregation to the registry's strategy) into Flower messages:

* round 0: Fed-SB's gradient query (``query`` messages), then the initial state;
* round t: a ``train`` message per node with the global state (``global``), the
  FLoRA folds that node still misses (``catchup``) and the round's settings
  (``config``); the replies are validated (``fedlora.validate``), sorted by client
  id, and aggregated;
* after every round: a metric row in ``metrics.jsonl`` and an atomic checkpoint,
  so :meth:`start` can resume after the last completed round.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedlora.rounds import Coordinator, personal_columns
from fedlora.secagg import error_bound
from fedlora.server.secagg import secure_round
from fedlora.server.transport import send_and_collect, wait_for_nodes
from fedlora.state import download_tensors, probe_tensors, upload_from_tensors
from fedlora.strategies import ClientUpload
from fedlora.validate import MAX_UPDATE_NORM, RejectedReply, check_record_size, check_upload, expected_upload
from fedlora.wire import from_record, to_record, wire_bytes

log = logging.getLogger("fedlora.server")


@dataclass
class RoundSettings:
    """Deployment settings of a run (``fedlora-server`` flags / run-config keys)."""

    min_replies: int = 1
    round_timeout: float = 600.0
    max_update_norm: float = MAX_UPDATE_NORM
    stateless_clients: bool = False  # clients keep nothing between rounds (Flower's simulation)
    poll: float = 0.1

    @classmethod
    def from_run_config(cls, rc: dict) -> RoundSettings:
        return cls(min_replies=int(rc.get("min-replies", 1)),
                   round_timeout=float(rc.get("round-timeout", 600.0)),
                   max_update_norm=float(rc.get("max-update-norm", MAX_UPDATE_NORM)),
                   stateless_clients=bool(rc.get("stateless-clients", False)))


RECONNECT_GRACE = 5.0
"""Seconds a round after the first waits for clients missing from the SuperLink's node list."""


class FedLoRA(FlowerStrategy):
    """Flower strategy delegating to the coordinator's fedlora strategy."""

    def __init__(self, coord: Coordinator, settings: RoundSettings, out_dir: Path,
                 label_names: list[str]) -> None:
        self.coord, self.settings, self.out_dir = coord, settings, out_dir
        self.label_names = label_names
        self.sent_bytes: dict[int, int] = {}
        self.rejected: list[dict] = []
        self.sampled_once = False  # the first round of this process waits for every client

    # ---- Flower's Strategy interface ----
    def summary(self) -> None:
        cfg = self.coord.cfg
        log.info("fedlora %s: %d rounds, rank %d, %d clients per round (min %d replies, timeout %.0fs)",
                 cfg.strategy, cfg.rounds, cfg.rank, cfg.num_clients, self.settings.min_replies,
                 self.settings.round_timeout)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> list[Message]:
        """One ``train`` message per node; ``arrays`` is ignored (downloads are per node)."""
        nodes = self._sample(grid, server_round)
        messages = []
        self.sent_bytes = {}
        for node in nodes:
            content = self._global_content(node, server_round)
            self.sent_bytes[node] = sum(wire_bytes(r) for r in content.array_records.values())
            messages.append(Message(content=content, message_type="train", dst_node_id=node,
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, sort by client id, aggregate; None if too few valid replies."""
        uploads, bytes_up, losses, seconds, eps = [], [], [], [], []
        self._nodes = []
        self._clients = []
        for node, msg, tensors in self._valid(list(replies), "upload", kind="train"):
            self._nodes.append(node)
            m = msg.content["metrics"]
            self._clients.append(int(m.get("client-id", 0)))
            upload = upload_from_tensors(tensors, int(m["num-examples"]),
                                         self.coord.cfg.lora_alpha / int(m["rank"]), self.coord.plan,
                                         self.coord.state)
            uploads.append(upload)
            bytes_up.append(wire_bytes(msg.content["upload"]))
            losses.append(float(m["train-loss"]))
            seconds.append(float(m["train-seconds"]))
            eps.append((float(m.get("epsilon", 0.0)), float(m.get("noise-multiplier", 0.0))))
            if not self.settings.stateless_clients:
                self.coord.delivered(node)  # it now holds this round's folds / shared factors
        if len(uploads) < self.settings.min_replies:
            return None, None
        agg = self.coord.aggregate(uploads)
        self._last = (bytes_up, agg.agg_error, losses, seconds)
        self._epsilons = eps
        metrics = MetricRecord({"train-loss": sum(losses) / len(losses), "clients": len(uploads)})
        return to_record(self.coord.download(first=False)), metrics

    def _secure_train(self, grid, rnd: int, timeout: float) -> None:
        """``--secagg``: the round through SecAgg+ (``server/secagg.py``); the strategy aggregates
        the clients' weighted mean update, the only thing of theirs the server learns."""
        coord = self.coord
        nodes = self._sample(grid, rnd)
        contents = {node: self._global_content(node, rnd) for node in nodes}
        shapes = expected_upload(coord.fm, coord.cfg.rank, coord.plan, "train")
        got = secure_round(grid, contents, rnd, coord.cfg, shapes, timeout, self.settings.poll)
        self.rejected = got.rejected if got is not None else []
        n = len(got.replies) if got is not None else 0
        self._note_failures(rnd, [], sorted(set(nodes) - set(got.replies if got else ())))
        if n < max(self.settings.min_replies, 1):
            raise RuntimeError(self._too_few(rnd, n))
        start = download_tensors(coord.state, {}, coord.plan, first=True)
        total = sum(w for w, _ in got.replies.values())
        mean = upload_from_tensors({k: start[k] + d.to(start[k].dtype) for k, d in got.mean.items()}, total,
                                   coord.cfg.lora_alpha / coord.cfg.rank, coord.plan, coord.state)
        coord.aggregate_mean(mean, n)
        self._nodes = sorted(got.replies)
        metrics = [m for _, m in (got.replies[k] for k in self._nodes)]
        self._clients = [int(m.get("client-id", 0)) for m in metrics]
        if not self.settings.stateless_clients:
            for node in self._nodes:
                coord.delivered(node)
        self.sent_bytes = {k: got.down.get(k, 0) for k in nodes}
        self._last = ([got.up.get(k, 0) for k in self._nodes], None,
                      [float(m["train-loss"]) for m in metrics], [float(m["train-seconds"]) for m in metrics])
        self._epsilons = [(float(m.get("epsilon", 0.0)), float(m.get("noise-multiplier", 0.0)))
                          for m in metrics]
        self._secure = {"secagg_error_bound": error_bound(coord.cfg, n, total),
                        "secagg_clipped": max(float(m.get("secagg-clipped", 0.0)) for m in metrics)}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid) -> list[Message]:
        """With ``--personal-test-fraction``, one ``evaluate`` message per client of the round:
        the new global state, which the client measures (with what it keeps) on its own held-out
        examples. The server evaluates the global model on the test split itself."""
        if not self.coord.cfg.personal_test_fraction:
            return []
        messages = []
        for node in self._nodes:
            content = self._global_content(node, server_round + 1)
            messages.append(Message(content=content, message_type="evaluate", dst_node_id=node,
                                    group_id=f"eval-{server_round}"))
        return messages

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        """``personal_accuracy`` of the clients that replied (weighted by their held-out examples)."""
        got = []
        for msg in replies:
            m = msg.content["metrics"]
            got.append((int(m["client-id"]), {"accuracy": float(m["accuracy"]),
                                              "eval_examples": int(m["eval-examples"])}))
        results = [r for _, r in sorted(got, key=lambda g: g[0])]
        return MetricRecord(personal_columns(results)) if results else None

    # ---- the run ----
    def start(self, grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, **_) -> None:
        """Rounds ``coord.round + 1 .. cfg.rounds`` (round 0 first on a fresh run)."""
        self.summary()
        cfg = self.coord.cfg
        if self.coord.state is None:
            self._initial_round(grid)
        for rnd in range(self.coord.round + 1, (num_rounds or cfg.rounds) + 1):
            t0 = time.perf_counter()
            self.rejected = []
            if cfg.secagg:
                self._secure_train(grid, rnd, timeout or self.settings.round_timeout)
            else:
                replies, errors, missing = send_and_collect(
                    grid, self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid),
                    timeout or self.settings.round_timeout, self.settings.poll)
                self._note_failures(rnd, errors, missing)
                arrays, _ = self.aggregate_train(rnd, replies)
                if arrays is None:
                    raise RuntimeError(self._too_few(rnd, len(replies)))
            bytes_up, agg_error, losses, seconds = self._last
            row = self.coord.row(bytes_up, [self.sent_bytes[n] for n in sorted(self.sent_bytes)],
                                 agg_error, losses, time.perf_counter() - t0, len(bytes_up))
            row.update(rejected=self.rejected, failed=sum(self.failures), client_ids=self._clients,
                       client_seconds=round(max(seconds), 3),
                       overhead_seconds=round(row["train_seconds"] - max(seconds), 3))
            if cfg.secagg:
                row.update(self._secure)
            evals = self.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(), grid)
            if evals:
                wait = timeout or self.settings.round_timeout
                replies, errors, missing = send_and_collect(grid, evals, wait, self.settings.poll)
                for node, reason in [*errors, *((n, "no reply") for n in missing)]:
                    log.warning("round %d: node %s did not evaluate: %s", rnd, node, reason)
                personal = self.aggregate_evaluate(rnd, replies)
                row.update(dict(personal) if personal is not None else {})
            if self.coord.cfg.dp == "sample":
                row.update(dp="sample", dp_backend=self.coord.cfg.dp_backend_for(lone=True),
                           epsilon_per_client=[round(e, 4) for e, _ in self._epsilons],
                           epsilon=round(max(e for e, _ in self._epsilons), 4),
                           noise_multiplier=max(s for _, s in self._epsilons))
            self._commit(row)

    def _initial_round(self, grid) -> None:
        """Round 0: the strategy's initialisation phases (Fed-SB), each a query to the same
        sampled nodes carrying the phase's probes; then the initial state."""
        t0 = time.perf_counter()
        nodes = self._sample(grid, 0) if self.coord.strategy.init_releases else []
        up: dict[int, int] = {}
        down: dict[int, int] = {}

        def gather(phase: int, probes) -> list[ClientUpload]:
            record = to_record(probe_tensors(probes))
            config = self._round_config(0)
            config["phase"] = phase
            msgs = [Message(content=RecordDict({"config": config, "probes": record}),
                            message_type="query", dst_node_id=n, group_id=f"0.{phase}") for n in nodes]
            replies, errors, missing = send_and_collect(grid, msgs, self.settings.round_timeout,
                                                        self.settings.poll)
            self._note_failures(0, errors, missing)
            uploads = []
            for node, msg, tensors in self._valid(replies, "grads", kind="init", probes=probes):
                uploads.append(upload_from_tensors(tensors, int(msg.content["metrics"]["num-examples"]),
                                                   1.0, self.coord.plan))
                up[node] = up.get(node, 0) + wire_bytes(msg.content["grads"])
                down[node] = down.get(node, 0) + wire_bytes(record)
            if len(uploads) < self.settings.min_replies:
                raise RuntimeError(self._too_few(0, len(replies)))
            return uploads

        self.coord.start(gather)
        self._commit(self.coord.row(list(up.values()), list(down.values()), None, None,
                                    time.perf_counter() - t0, len(up)))

    # ---- helpers ----
    def _sample(self, grid, rnd: int) -> list[int]:
        """The round's nodes. The first round of this process waits up to ``--round-timeout`` for
        every client to connect; later ones wait :data:`RECONNECT_GRACE` seconds for missing
        clients (a dead node has left the SuperLink's list: waiting for it would stall every
        round), and up to the timeout only while fewer than ``--min-replies`` are connected."""
        cfg = self.coord.cfg
        timeout = self.settings.round_timeout
        wait = min(RECONNECT_GRACE, timeout) if self.sampled_once else timeout
        nodes = wait_for_nodes(grid, cfg.num_clients, wait)
        if len(nodes) < self.settings.min_replies:
            nodes = wait_for_nodes(grid, self.settings.min_replies, timeout)
        if len(nodes) < self.settings.min_replies:
            raise RuntimeError(f"round {rnd}: only {len(nodes)} client(s) connected within"
                               f" {timeout:.0f}s, need {self.settings.min_replies}")
        self.sampled_once = True
        want = min(cfg.clients_per_round or cfg.num_clients, cfg.num_clients)
        if len(nodes) > want:
            nodes = sorted(random.Random(cfg.seed * 7919 + rnd).sample(nodes, want))
        return nodes

    def _global_content(self, node: int, rnd: int) -> RecordDict:
        """What ``node`` needs to load the global state for round ``rnd``: its download
        (``global``), the folds it misses (``catchup``) and the round's ``config``."""
        down, catch = self.coord.payload(node)
        content = RecordDict({"global": to_record(down), "config": self._round_config(rnd)})
        if catch:
            content["catchup"] = to_record(catch)
        return content

    def _round_config(self, rnd: int) -> ConfigRecord:
        seed, state = self.coord.fresh_seed, self.coord.state
        return ConfigRecord({"round": rnd, "fresh-seed": -1 if seed is None else int(seed),
                             "scale": float(state.scale) if state is not None else 0.0,
                             "clip": float(self.coord.clip or 0.0),
                             "label-names": list(self.label_names) or [""]})

    def _valid(self, replies: list[Message], record: str, kind: str, probes=None):
        """``(node, message, tensors)`` of valid replies, sorted by client id then node
        (each record is decoded once, here)."""
        good = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if record not in msg.content.array_records or "metrics" not in msg.content.metric_records:
                    raise RejectedReply(f"reply has no '{record}' arrays or no metrics")
                m = msg.content["metrics"]
                client = int(m.get("client-id", 0))
                rank = int(m.get("rank", self.coord.cfg.rank))
                if kind == "train" and rank != self.coord.cfg.rank_of(client):
                    raise RejectedReply(f"rank {rank} is not this client's rank"
                                        f" {self.coord.cfg.rank_of(client)}")
                expected = expected_upload(self.coord.fm, rank, self.coord.plan, kind, probes)
                check_record_size(msg.content[record], expected)
                tensors = from_record(msg.content[record])
                check_upload(tensors, expected, self.settings.max_update_norm)
                claimed = int(m.get("num-examples", 0))
                if claimed < 1:
                    raise RejectedReply("num-examples must be ≥ 1")
                cap = self.coord.cfg.max_examples
                if cap and claimed > cap:
                    log.warning("node %s claims %d examples, above --max-examples %d: weighted as %d",
                                node, claimed, cap, cap)
            except (RejectedReply, KeyError, TypeError, ValueError) as exc:
                log.warning("rejected reply from node %s: %s", node, exc)
                self.rejected.append({"node": node, "reason": str(exc)})
                continue
            good.append((client, node, msg, tensors))
        return [(node, msg, tensors) for _, node, msg, tensors in sorted(good, key=lambda g: (g[0], g[1]))]

    def _note_failures(self, rnd: int, errors, missing) -> None:
        self.failures = (len(errors), len(missing))
        for node, reason in errors:
            log.warning("round %d: node %s failed: %s", rnd, node, reason)
            self.coord.forget(node)
        for node in missing:
            log.warning("round %d: node %s did not reply within %.0fs", rnd, node,
                        self.settings.round_timeout)
            self.coord.forget(node)

    def _too_few(self, rnd: int, got: int) -> str:
        failed, late = getattr(self, "failures", (0, 0))
        return (f"round {rnd}: {got} repl(ies) ({len(self.rejected)} rejected), {failed} client"
                f" error(s), {late} without a reply within --round-timeout"
                f" {self.settings.round_timeout:.0f}s; fewer than --min-replies"
                f" {self.settings.min_replies} valid ones. The last completed round is checkpointed:"
                " fix the clients and rerun with --resume")

    def _commit(self, row: dict) -> None:
        with (self.out_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.coord.save(self.out_dir)
        log.info("round %d done: acc %.4f, %d clients", row["round"], row["accuracy"], row["clients"])

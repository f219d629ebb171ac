"""The Flower transport: a round's payloads as Flower messages over a ``Grid``.

:class:`FlowerTransport` implements :class:`fedlora.rounds.transport.Transport` for the ServerApp
(a deployment, Flower's simulation engine, or an in-process grid in tests):

* **who is who**: a node's client id (its partition) is learnt once, by an ``identify`` query, the
  first time the node is seen; a client back as a new node (a restarted process) is forgotten by the
  coordinator, so it is re-sent what it lost. Rounds are sampled by client id (as ``fedlora-sim``);
* **round t**: a ``train`` message per sampled client with its payload (``global``: the global
  state, ``catchup``: the folds it misses, ``config``: the round's settings); the replies are
  validated (:mod:`fedlora.rounds.validate`, after ``--compress``'s decoding) and sorted by client
  id; with ``--secagg`` the round goes through SecAgg+ (:mod:`fedlora.server.secagg`) and only the
  weighted mean comes back;
* **round 0**: Fed-SB's initialisation phases as ``query`` messages carrying the probes;
* **personal evaluation**: an ``evaluate`` message per client of the round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict

from fedlora.models.state import download_tensors, probe_tensors, upload_from_tensors
from fedlora.privacy.secagg import error_bound
from fedlora.rounds.compress import pack, relative_error
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.transport import Replies
from fedlora.rounds.validate import (
    MAX_UPDATE_NORM,
    RejectedReply,
    check_record_size,
    check_upload,
    expected_upload,
)
from fedlora.rounds.wire import array_bytes, from_record, to_record, wire_bytes
from fedlora.server.nodes import identify_query, left_out_notice
from fedlora.server.polling import gather, push, send_and_collect
from fedlora.server.secagg import secure_round
from fedlora.strategies.base import Probe

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
"""Seconds a round after the first waits for its clients missing from the SuperLink's node list."""
IDENTIFY_TIMEOUT = 30.0
"""Seconds a new node has to say which client it is."""


RESUME_ADVICE = "The last completed round is checkpointed: fix the clients and rerun with --resume"
"""What a deployed run that got too few replies advises (not ``--engine flower``, which cannot resume)."""


class FlowerTransport:
    """Rounds over a Flower ``grid`` (see the module docstring)."""

    lone = True
    budgets = None  # each deployed client keeps its own privacy ledger

    def __init__(self, grid, coord: Coordinator, settings: RoundSettings, label_names: list[str]) -> None:
        self.grid, self.coord, self.settings = grid, coord, settings
        self.label_names = label_names
        self.stateless = settings.stateless_clients
        self.nodes: dict[int, int] = {}    # client id -> node id
        self.clients: dict[int, int] = {}  # node id -> client id
        self.rejected: list[dict] = []     # of the current exchange
        self.failures = (0, 0)             # error replies, missing replies of the current exchange
        self.errors: list[tuple[int | None, str]] = []  # (client, reason) of its error replies
        self.waited = False                # the first round of this process waits for every client
        self.asked: set[int] = set()       # nodes asked this round which client they are
        self.asking: dict[str, int] = {}   # identify queries not answered yet: message id -> node id

    # ---- who is who ----
    def available(self, rnd: int, clients: list[int]) -> list[int]:
        """Which of ``clients`` are connected. The first round of this process waits up to
        ``--round-timeout`` for them to connect, later ones :data:`RECONNECT_GRACE` seconds (a dead
        node has left the SuperLink's list: waiting for it would stall every round), and up to the
        timeout only while fewer than ``--min-replies`` are connected."""
        timeout = self.settings.round_timeout
        self.asked.clear()  # asked again once a round
        got = self._wait(clients, min(RECONNECT_GRACE, timeout) if self.waited else timeout, len(clients))
        need = min(self.settings.min_replies, len(clients))
        if len(got) < need:
            got = self._wait(clients, timeout, need)
        if len(got) < need:
            raise RuntimeError(f"round {rnd}: only {len(got)} of the round's client(s) {clients} connected"
                               f" within {timeout:.0f}s, need {need}")
        self.waited = True
        return got

    def _wait(self, clients: list[int], wait: float, enough: int) -> list[int]:
        deadline, shown = time.monotonic() + wait, -1
        while True:
            self._identify(sorted(self.grid.get_node_ids()))
            got = [c for c in clients if c in self.nodes]
            if len(got) >= enough or time.monotonic() >= deadline:
                return got
            if len(got) != shown:
                log.info("waiting for clients: %d of %d connected", len(got), len(clients))
                shown = len(got)
            time.sleep(2 * self.settings.poll)

    def _identify(self, node_ids: list[int]) -> None:
        """Forget nodes that left; ask each new node which client it is, once a round.

        A node's answer counts whenever it comes: one that misses :data:`IDENTIFY_TIMEOUT` (a
        ClientApp still loading its model, Ray actors still starting) is found by a later poll
        of the same wait, from its query's reply, instead of being left out until the next round.
        """
        live = set(node_ids)
        for node in [n for n in self.clients if n not in live]:
            self.nodes.pop(self.clients.pop(node), None)
        self.asking = {m: n for m, n in self.asking.items() if n in live and n not in self.clients}
        new = [n for n in node_ids if n not in self.clients and n not in self.asked]
        self.asked.update(new)  # asked once a round, not at every poll of the round's wait
        got = []
        if new:
            sent = push(self.grid, [identify_query(n) for n in new])
            self.asking.update(sent)
            wait = min(IDENTIFY_TIMEOUT, self.settings.round_timeout)
            got = gather(self.grid, sent, wait, self.settings.poll)
        answered = {r.metadata.reply_to_message_id for r in got}
        earlier = [m for m in self.asking if m not in answered]  # asked before: one pull
        got += gather(self.grid, earlier, 0.0) if earlier else []
        for msg in got:
            self.asking.pop(msg.metadata.reply_to_message_id, None)
            if msg.has_error():
                log.warning("node %s did not identify itself: %s", msg.metadata.src_node_id,
                            msg.error.reason or "error")
            else:
                self._learn(msg)

    def _learn(self, msg: Message) -> None:
        """Take the client id of an identify reply."""
        node = msg.metadata.src_node_id
        try:
            client = int(msg.content["metrics"]["client-id"])
        except (KeyError, TypeError, ValueError):
            log.warning("node %s did not say which client it is", node)
            return
        if not 0 <= client < self.coord.cfg.num_clients:
            log.warning("node %s is client %d, outside the job's %d clients: ignored", node, client,
                        self.coord.cfg.num_clients)
            return
        old = self.nodes.get(client)
        if old is not None and old != node and self._answers(old):  # two live nodes, one client id
            log.warning("node %s says it is client %d, which node %s is: left out (give each fedlora-client"
                        " its own --client-id or --partition-id)", node, client, old)
            push(self.grid, [left_out_notice(node, client)])  # its own output says so too
            return
        if old is not None and old != node:  # a restarted client: it holds nothing of ours
            log.info("client %d came back as node %s (was %s)", client, node, old)
            self.clients.pop(old, None)
            self.coord.forget(client)
        self.nodes[client], self.clients[node] = node, client

    def _answers(self, node: int) -> bool:
        """Whether ``node`` still answers an identify query (within :data:`RECONNECT_GRACE` × 2): a
        live node, not the dead one of a restarted client that the SuperLink still lists."""
        got = gather(self.grid, push(self.grid, [identify_query(node)]),
                     min(2 * RECONNECT_GRACE, self.settings.round_timeout), self.settings.poll)
        return any(not r.has_error() for r in got)

    # ---- the exchanges ----
    def train(self, rnd: int, clients: list[int]) -> Replies:
        """Round ``rnd``: send each client its payload, validate and sort the uploads."""
        self.rejected = []
        if self.coord.cfg.secagg:
            return self._secure_train(rnd, clients)
        contents = {c: self._content(c, rnd) for c in clients}
        down = {c: array_bytes(content) for c, content in contents.items()}
        sent_to = {c: self.nodes[c] for c in clients}
        replies = self._exchange(rnd, "train", contents, str(rnd))
        errors = dict(self.errors)
        again = self._came_back(rnd, clients, replies, sent_to)
        if again:  # its restart's node was not identified yet when the round was sent
            replies = replies + self._exchange(rnd, "train", again, f"{rnd}-again")
            errors.update(self.errors)
            for c, content in again.items():  # both sends were shipped
                down[c] += array_bytes(content)
        answered = {self.clients.get(r.metadata.src_node_id) for r in replies}
        lost = [c for c in clients if c not in answered]
        self.errors = [(c, errors[c]) for c in lost if c in errors]
        self.failures = (len(self.errors), len(lost) - len(self.errors))
        return self.collect(replies, down, rnd)

    def _came_back(self, rnd: int, clients: list[int], replies: list[Message],
                   sent_to: dict[int, int]) -> dict[int, RecordDict]:
        """The round's content for each of ``clients`` that sent no result and has since identified
        from another node (a client restarted while the SuperLink still listed its dead node, which
        the round was sent to): its round is sent once more, to the new node."""
        answered = {self.clients.get(r.metadata.src_node_id) for r in replies}
        if all(c in answered for c in clients):
            return {}
        self._identify(sorted(self.grid.get_node_ids()))
        moved = [c for c in clients if c not in answered and self.nodes.get(c) not in (None, sent_to[c])]
        for c in moved:
            log.info("round %d: client %d came back as node %s: its round is sent again", rnd, c,
                     self.nodes[c])
        return {c: self._content(c, rnd) for c in moved}

    def collect(self, replies: list[Message], down: dict[int, int], rnd: int) -> Replies:
        """The valid uploads among a round's ``replies`` (``down``: bytes sent, by client)."""
        coord, cfg = self.coord, self.coord.cfg
        valid = self._valid(replies, "upload", "train")
        if len(valid) < self.settings.min_replies:
            raise RuntimeError(self._too_few(rnd, len(replies)))
        metrics = [msg.content["metrics"] for _, msg, _ in valid]
        uploads = [upload_from_tensors(t, int(m["num-examples"]), cfg.lora_alpha / int(m["rank"]),
                                       coord.plan, coord.state)
                   for (_, _, t), m in zip(valid, metrics, strict=True)]
        report = self._report([float(m["train-seconds"]) for m in metrics])
        if coord.codec.on:  # what the clients' coding lost, as they measured it
            report["compress_error"] = relative_error(
                [(float(m.get("compress-err2", 0.0)), float(m.get("compress-norm2", 0.0))) for m in metrics])
        return Replies([c for c, _, _ in valid], uploads,
                       [wire_bytes(msg.content["upload"]) for _, msg, _ in valid],
                       [down[c] for c in sorted(down)], [float(m["train-loss"]) for m in metrics],
                       self._privacy(metrics), failed=self._lost(replies, down), report=report)

    def _secure_train(self, rnd: int, clients: list[int]) -> Replies:
        """``--secagg``: the round through SecAgg+; the server learns the weighted mean update only."""
        coord, cfg = self.coord, self.coord.cfg
        contents = {self.nodes[c]: self._content(c, rnd) for c in clients}
        shapes = expected_upload(coord.fm, cfg.rank, coord.plan, "train")
        got = secure_round(self.grid, contents, rnd, cfg, shapes, self.settings.round_timeout,
                           self.settings.poll)
        self.rejected, self.errors = (got.rejected if got is not None else []), []
        replied = sorted(self.clients[n] for n in (got.replies if got is not None else {}))
        self.failures = (0, len(clients) - len(replied))
        for c in sorted(set(clients) - set(replied)):
            log.warning("round %d: client %d (node %s) dropped out of SecAgg+", rnd, c, self.nodes.get(c))
        if len(replied) < max(self.settings.min_replies, 1):
            raise RuntimeError(self._too_few(rnd, len(replied)))
        start = download_tensors(coord.state, {}, coord.plan, first=True)
        total = sum(w for w, _ in got.replies.values())
        mean = upload_from_tensors({k: start[k] + d.to(start[k].dtype) for k, d in got.mean.items()}, total,
                                   cfg.lora_alpha / cfg.rank, coord.plan, coord.state)
        metrics = [got.replies[self.nodes[c]][1] for c in replied]
        report = self._report([float(m["train-seconds"]) for m in metrics])
        report.update(secagg_error_bound=error_bound(cfg, len(replied), total),
                      secagg_clipped=max(float(m.get("secagg-clipped", 0.0)) for m in metrics))
        return Replies(replied, [], [got.up.get(self.nodes[c], 0) for c in replied],
                       [got.down.get(self.nodes[c], 0) for c in clients],
                       [float(m["train-loss"]) for m in metrics], self._privacy(metrics), mean=mean,
                       failed=sorted(set(clients) - set(replied)), report=report)

    def query(self, phase: int, probes: dict[str, Probe], clients: list[int]) -> Replies:
        """Initialisation phase ``phase``: each client's gradient sketches for ``probes``."""
        self.rejected = []
        record = to_record(probe_tensors(probes))
        config = self._round_config(0)
        config["phase"] = phase
        contents = {c: RecordDict({"config": config, "probes": record}) for c in clients}
        replies = self._exchange(0, "query", contents, f"0.{phase}")
        valid = self._valid(replies, "grads", "init", probes)
        if len(valid) < self.settings.min_replies:
            raise RuntimeError(self._too_few(0, len(replies)))
        metrics = [msg.content["metrics"] for _, msg, _ in valid]
        return Replies([c for c, _, _ in valid],
                       [upload_from_tensors(t, int(m["num-examples"]), 1.0, self.coord.plan)
                        for (_, _, t), m in zip(valid, metrics, strict=True)],
                       [wire_bytes(msg.content["grads"]) for _, msg, _ in valid],
                       [wire_bytes(record)] * len(valid), privacy=self._privacy(metrics),
                       failed=self._lost(replies, contents))

    def evaluate(self, clients: list[int]) -> list[dict]:
        """``--personal-test-fraction``: each client loads the new global state (with what it
        keeps) and measures it on its own held-out examples."""
        rnd = self.coord.round + 1
        replies = self._exchange(rnd, "evaluate", {c: self._content(c, rnd) for c in clients},
                                 f"eval-{rnd - 1}", warn="did not evaluate")
        got = []
        for msg in replies:
            m = msg.content["metrics"]
            got.append((int(m["client-id"]), {"accuracy": float(m["accuracy"]),
                                              "eval_examples": int(m["eval-examples"])}))
        return [r for _, r in sorted(got, key=lambda g: g[0])]

    # ---- helpers ----
    def _exchange(self, rnd: int, kind: str, contents: dict[int, RecordDict], group: str,
                  warn: str | None = None) -> list[Message]:
        """Send each client its content; the result replies (errors and silences are logged, and
        for training counted in :attr:`failures`)."""
        msgs = [Message(content=content, message_type=kind, dst_node_id=self.nodes[c], group_id=group)
                for c, content in contents.items()]
        replies, errors, missing = send_and_collect(self.grid, msgs, self.settings.round_timeout,
                                                    self.settings.poll)
        if warn is None:
            self.failures = (len(errors), len(missing))
            self.errors = [(self.clients.get(node), reason) for node, reason in errors]
        for node, reason in [*errors, *((n, "no reply") for n in missing)]:
            log.warning("round %d: node %s (client %s) %s: %s", rnd, node, self.clients.get(node),
                        warn or "failed", reason)
        return replies

    def _lost(self, replies: list[Message], sent) -> list[int]:
        """Clients that were sent an exchange and sent no result back."""
        answered = {self.clients.get(r.metadata.src_node_id) for r in replies}
        return sorted(c for c in sent if c not in answered)

    def _content(self, client: int, rnd: int) -> RecordDict:
        """What ``client`` needs to load the global state for round ``rnd``: its download
        (``global``, absent when empty), the folds it misses (``catchup``) and the round's ``config``."""
        down, catch = self.coord.payload(client)
        coding = self.coord.down  # --compress-down: the state is held at this precision
        content = RecordDict({"config": self._round_config(rnd)})
        if down:  # nothing to send is not sent (FLoRA's first round, without a head): 0 bytes, as billed
            content["global"] = to_record(pack(coding, down))
        if catch:
            content["catchup"] = to_record(pack(coding, catch))
        return content

    def _round_config(self, rnd: int) -> ConfigRecord:
        seed, state = self.coord.fresh_seed, self.coord.state
        return ConfigRecord({"round": rnd, "fresh-seed": -1 if seed is None else int(seed),
                             "scale": float(state.scale) if state is not None else 0.0,
                             "clip": float(self.coord.clip or 0.0),
                             "label-names": list(self.label_names) or [""]})

    def _privacy(self, metrics) -> list[tuple[float, float]]:
        if self.coord.cfg.dp != "sample":
            return []
        return [(float(m.get("epsilon", 0.0)), float(m.get("noise-multiplier", 0.0))) for m in metrics]

    def _report(self, seconds: list[float]) -> dict:
        return {"rejected": self.rejected, "failed": sum(self.failures),
                "client_seconds": round(max(seconds), 3)}

    def _valid(self, replies: list[Message], record: str, kind: str, probes=None) -> list[tuple]:
        """``(client, message, tensors)`` of the valid replies, sorted by client id (each record is
        decoded once, here); the others are logged in :attr:`rejected`."""
        cfg, good = self.coord.cfg, []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if record not in msg.content.array_records or "metrics" not in msg.content.metric_records:
                    raise RejectedReply(f"reply has no '{record}' arrays or no metrics")
                m = msg.content["metrics"]
                client = int(m.get("client-id", -1))
                if client != self.clients.get(node):
                    raise RejectedReply(f"client-id {client} is not the client this node identified as"
                                        f" ({self.clients.get(node)})")
                rank = int(m.get("rank", cfg.rank))
                if kind == "train" and rank != cfg.rank_of(client):
                    raise RejectedReply(f"rank {rank} is not this client's rank {cfg.rank_of(client)}")
                expected = expected_upload(self.coord.fm, rank, self.coord.plan, kind, probes)
                check_record_size(msg.content[record], expected)
                tensors = from_record(msg.content[record])
                if kind == "train":  # --compress: decoded from the coded message (none: as it is)
                    tensors = self.coord.decode_upload(tensors, expected)
                elif kind == "init":  # Fed-SB's sketches, coded as sent once
                    tensors = self.coord.codec.decode_once(tensors, expected)
                check_upload(tensors, expected, self.settings.max_update_norm)
                claimed = int(m.get("num-examples", 0))
                if claimed < 1:
                    raise RejectedReply("num-examples must be ≥ 1")
                self.coord.check_client_data(client, m.get("data-digest") if kind == "train" else None)
                if cfg.max_examples and claimed > cfg.max_examples:
                    log.warning("node %s claims %d examples, above --max-examples %d: weighted as %d",
                                node, claimed, cfg.max_examples, cfg.max_examples)
            except (RejectedReply, KeyError, TypeError, ValueError) as exc:
                log.warning("rejected reply from node %s: %s", node, exc)
                self.rejected.append({"node": node, "reason": str(exc)})
                continue
            good.append((client, msg, tensors))
        return sorted(good, key=lambda g: g[0])

    def _too_few(self, rnd: int, got: int) -> str:
        failed, late = self.failures
        first = (f" (client {self.errors[0][0]}: {self.errors[0][1].strip().splitlines()[0][:300]})"
                 if self.errors else "")
        reasons = {reason.strip() for _, reason in self.errors}
        one = len(reasons) == 1 and next(iter(reasons)).startswith("refused:") and not (got or late)
        advice = ("Every client refused the job for that reason: fix the job (its flags or data) and start it"
                  " again" if one else RESUME_ADVICE)
        return (f"round {rnd}: {got} repl(ies) ({len(self.rejected)} rejected), {failed} client"
                f" error(s){first}, {late} without a reply within --round-timeout"
                f" {self.settings.round_timeout:.0f}s; fewer than --min-replies"
                f" {self.settings.min_replies} valid ones. {advice}")

"""ServerApp: stock ``FedAvg.start`` over the LoRA weights, printing per-round timings."""

import json
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from stock_flower_lora.task import build_model, get_weights, resolve_model_path

app = ServerApp()


class TimedFedAvg(FedAvg):
    """Stock FedAvg that prints one ``STOCK_ROUND {json}`` line per training round.

    A round is timed from the start of ``configure_train`` to the end of
    ``aggregate_train``; the slowest client's ``train-seconds`` and
    ``build-seconds`` (and ``data-seconds``, the per-message tokenisation) are
    reported next to it.
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Start the round clock, then defer to FedAvg."""
        self._t_round = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with FedAvg, stop the round clock and print ``STOCK_ROUND``."""
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        seconds = time.perf_counter() - self._t_round
        ok = [m.content["metrics"] for m in replies if not m.has_error()]
        line = {
            "round": server_round,
            "seconds": seconds,
            "client_train_seconds": max((float(m["train-seconds"]) for m in ok), default=0.0),
            "client_build_seconds": max((float(m["build-seconds"]) for m in ok), default=0.0),
            "client_data_seconds": max((float(m["data-seconds"]) for m in ok), default=0.0),
            "num_replies": len(ok),
        }
        print("STOCK_ROUND " + json.dumps(line), flush=True)
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of FedAvg over the LoRA adapter.

    Parameters
    ----------
    grid : Grid
        Flower grid to the SuperNodes.
    context : Context
        Carries the run config.
    """
    cfg = context.run_config
    num_labels = int(cfg["num-labels"])
    path = resolve_model_path(str(cfg["model"]), num_labels)
    torch.manual_seed(0)
    model = build_model(path, num_labels, int(cfg["rank"]), float(cfg["lora-alpha"]))
    initial = ArrayRecord(get_weights(model))
    del model

    min_nodes = int(cfg["min-nodes"])
    strategy = TimedFedAvg(fraction_train=float(cfg["fraction-train"]), fraction_evaluate=0.0,
                           min_train_nodes=min_nodes, min_available_nodes=min_nodes)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]))

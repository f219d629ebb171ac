"""ClientApp: rebuild the model, load global LoRA weights, train, reply (Message API)."""

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stock_flower_lora.task import build_model, get_weights, load_partition, resolve_model_path, set_weights
from stock_flower_lora.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global LoRA adapter on this node's partition.

    Parameters
    ----------
    msg : Message
        Carries ``arrays`` (global LoRA weights) and ``config`` (with ``server-round``).
    context : Context
        Run config and node config (``partition-id``, ``num-partitions``).

    Returns
    -------
    Message
        Reply with the updated ``arrays`` and ``metrics`` (``num-examples``,
        ``train-loss``, ``train-seconds``, ``build-seconds``, ``data-seconds``).
    """
    cfg = context.run_config
    pid = int(context.node_config["partition-id"])
    nparts = int(context.node_config["num-partitions"])
    num_labels = int(cfg["num-labels"])
    path = resolve_model_path(str(cfg["model"]), num_labels)

    t0 = time.perf_counter()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # as Flower's LLM examples
    model = build_model(path, num_labels, int(cfg["rank"]), float(cfg["lora-alpha"])).to(device)
    build_s = time.perf_counter() - t0
    set_weights(model, msg.content["arrays"].to_torch_state_dict())

    t0 = time.perf_counter()
    data = load_partition(path, pid, nparts, int(cfg["max-length"]))
    data_s = time.perf_counter() - t0

    server_round = int(msg.content["config"].get("server-round", 0))
    t0 = time.perf_counter()
    loss = train_fn(model, data, int(cfg["local-steps"]), int(cfg["batch-size"]), float(cfg["lr"]),
                    seed=1000 * server_round + pid)
    train_s = time.perf_counter() - t0

    metrics = MetricRecord({
        "num-examples": int(data["labels"].shape[0]),
        "train-loss": loss,
        "train-seconds": train_s,
        "build-seconds": build_s,
        "data-seconds": data_s,
    })
    weights = {k: v.detach().cpu() for k, v in get_weights(model).items()}
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics})
    return Message(content=content, reply_to=msg)
